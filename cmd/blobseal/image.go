package main

import (
	"bufio"
	"context"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"

	"github.com/blobseal/blobseal/blob/progress"
	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/image"
)

func runImageCreate(ctx context.Context, args []string) error {
	f := flag.NewFlagSet("image create", flag.ContinueOnError)
	f.Usage = func() {
		fmt.Fprintln(f.Output(), "usage: blobseal image create --from DIR --key-file KEY [flags] OUT\n\n"+
			"Builds an ext4 filesystem holding a copy of DIR (no root needed) and encrypts it into OUT.\n\nflags:")
		f.PrintDefaults()
	}
	from := f.String("from", "", "source directory")
	keyFile := f.String("key-file", "", "file whose bytes become the LUKS passphrase (or, with --format plain, the raw 32- or 64-byte XTS key)")
	format := f.String("format", "luks2", "luks2 or plain (headerless AES-XTS)")
	sectorSize := f.Int("sector-size", 4096, "encryption sector size: 512, 1024, 2048 or 4096 (at most --block-size)")
	blockSize := f.Int("block-size", 4096, "ext4 block size: 1024, 2048 or 4096")
	pbkdf := f.String("pbkdf", "pbkdf2", "LUKS2 keyslot KDF: pbkdf2 or argon2id (the key is random, so pbkdf2 loses nothing)")
	sizeFlag := f.String("size", "", "ext4 size (e.g. 512M, 2G); default: sized from DIR with headroom")
	label := f.String("label", "blobseal", "ext4 volume label (at most 16 bytes)")
	journal := f.Bool("journal", false, "keep an ext4 journal (only useful for images later mounted read-write)")
	noHoles := f.Bool("no-holes", false, "encrypt zero runs too (for images that must read the same through dm-crypt)")
	noVerity := f.Bool("no-verity", false, "leave out the dm-verity tree (the image can then be modified by storage undetected)")
	jsonOut := f.Bool("json", false, "print the result as JSON")
	pos, err := parseInterspersed(f, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		f.Usage()
		return usageErrorf("want one OUT argument, got %d", len(pos))
	}
	out := pos[0]
	switch {
	case *from == "":
		return usageErrorf("--from DIR is required")
	case *keyFile == "":
		return usageErrorf("--key-file is required")
	case *format != "luks2" && *format != "plain":
		return usageErrorf("--format %q: use luks2 or plain", *format)
	case *pbkdf != "pbkdf2" && *pbkdf != "argon2id":
		return usageErrorf("--pbkdf %q: use pbkdf2 or argon2id", *pbkdf)
	case *sectorSize != 512 && *sectorSize != 1024 && *sectorSize != 2048 && *sectorSize != 4096:
		return usageErrorf("--sector-size %d: use 512, 1024, 2048 or 4096", *sectorSize)
	case *blockSize != 1024 && *blockSize != 2048 && *blockSize != 4096:
		return usageErrorf("--block-size %d: use 1024, 2048 or 4096", *blockSize)
	case *sectorSize > *blockSize:
		return usageErrorf("--sector-size %d is larger than --block-size %d: a filesystem block must not share an encryption sector with its neighbour", *sectorSize, *blockSize)
	}
	var size int64
	if *sizeFlag != "" {
		if size, err = parseSize(*sizeFlag); err != nil {
			return usageErrorf("--size: %v", err)
		}
		if size%int64(*blockSize) != 0 {
			return usageErrorf("--size %d is not a multiple of the block size %d", size, *blockSize)
		}
	}
	key, err := readImageKeyFile(*keyFile)
	if err != nil {
		return err
	}
	defer key.Wipe()
	if *format == "plain" && len(key) != 32 && len(key) != 64 {
		return fmt.Errorf("key file %s has %d bytes; a plain image needs a raw 32- or 64-byte XTS key", *keyFile, len(key))
	}

	tty := progress.IsTerminal(os.Stderr) && !*jsonOut
	if tty {
		fmt.Fprintf(os.Stderr, "building ext4 from %s...\n", *from)
	}
	bar := progress.New(os.Stderr, "encrypting", tty, 0)
	keyBytes := 64
	if *format == "plain" {
		keyBytes = len(key)
	}
	res, err := image.Create(ctx, image.CreateOptions{
		From: *from, Out: out, Key: key,
		BlockSize: *blockSize, Size: size, Label: *label, Journal: *journal,
		Warn:     func(msg string) { fmt.Fprintln(os.Stderr, "warning:", msg) },
		NoVerity: *noVerity,
		Crypto: crypto.FormatOptions{
			Format:     *format,
			SectorSize: *sectorSize,
			KeyBytes:   keyBytes,
			PBKDF:      *pbkdf,
			Label:      *label,
			NoHoles:    *noHoles,
			Progress:   bar.Update,
		},
	})
	if err != nil {
		return fmt.Errorf("create %s: %w", out, err)
	}
	if *jsonOut {
		return printJSON(struct {
			Image           string            `json:"image"`
			Format          string            `json:"format"`
			FilesystemBytes int64             `json:"filesystem_bytes"`
			ImageBytes      int64             `json:"image_bytes"`
			HoleBytes       int64             `json:"hole_bytes"`
			BlockSize       int               `json:"block_size"`
			SectorSize      int               `json:"sector_size"`
			Entries         int               `json:"entries"`
			Verity          *image.VerityInfo `json:"verity"`
		}{out, *format, res.FilesystemBytes, res.ImageBytes, res.HoleBytes, *blockSize, *sectorSize, res.Entries, res.Verity})
	}
	fmt.Printf("created %s: %s, ext4 %d MiB (%d-byte blocks), %d-byte sectors\n",
		out, *format, res.FilesystemBytes>>20, *blockSize, *sectorSize)
	if res.Verity != nil {
		printVerity(res.Verity)
	} else {
		fmt.Println("no verity tree (--no-verity): mounts cannot detect changes made by storage")
	}
	return nil
}

// printVerity prints what a mount must pin, in veritysetup's words.
func printVerity(v *image.VerityInfo) {
	fmt.Printf("verity root hash:   %s\n", v.RootHash)
	fmt.Printf("verity hash offset: %d\n", v.HashOffset)
	fmt.Printf("verity salt:        %s\n", v.Salt)
	fmt.Printf("verity data blocks: %d (of %d bytes, %s)\n", v.DataBlocks, v.BlockSize, v.Algorithm)
	fmt.Println("mount with --verity-root-hash", v.RootHash, "(sidecar: verity_root_hash)")
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func runImageVerity(ctx context.Context, args []string) error {
	f := flag.NewFlagSet("image verity", flag.ContinueOnError)
	f.Usage = func() {
		fmt.Fprintln(f.Output(), "usage: blobseal image verity [flags] IMAGE\n\n"+
			"Appends a dm-verity hash tree over the whole of IMAGE (a local file made by blobseal,\n"+
			"cryptsetup or anything else) and prints its root hash. The file is padded to whole\n"+
			"4096-byte blocks; the tree follows at the printed hash offset, in the format\n"+
			"`veritysetup verify IMAGE IMAGE ROOT --hash-offset OFFSET` checks.\n\nflags:")
		f.PrintDefaults()
	}
	saltHex := f.String("salt", "", "salt in hex (default: 32 random bytes)")
	jsonOut := f.Bool("json", false, "print the result as JSON")
	pos, err := parseInterspersed(f, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		f.Usage()
		return usageErrorf("want one IMAGE argument, got %d", len(pos))
	}
	if image.IsRemote(pos[0]) {
		return usageErrorf("IMAGE must be a local file: add the tree before uploading")
	}
	var salt []byte
	if *saltHex != "" {
		if salt, err = hex.DecodeString(*saltHex); err != nil || len(salt) > 256 {
			return usageErrorf("--salt must be at most 256 bytes in hex")
		}
	}
	v, err := image.AddVerity(ctx, pos[0], image.VerityOptions{Salt: salt})
	if err != nil {
		return err
	}
	if *jsonOut {
		return printJSON(v)
	}
	fmt.Printf("added a verity tree to %s (%d bytes)\n", pos[0], v.TreeBytes)
	printVerity(v)
	return nil
}

// parseSize reads a byte count with an optional K, M, G or T suffix
// (binary units).
func parseSize(s string) (int64, error) {
	mult := int64(1)
	t := strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "B")
	t = strings.TrimSuffix(t, "I")
	if n := len(t); n > 0 {
		if i := strings.IndexByte("KMGT", t[n-1]); i >= 0 {
			mult = int64(1) << (10 * (i + 1))
			t = t[:n-1]
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n <= 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("%q is not a size like 512M or 2G", s)
	}
	return n * mult, nil
}

func runImageCheck(ctx context.Context, args []string) error {
	f := flag.NewFlagSet("image check", flag.ContinueOnError)
	f.Usage = func() {
		fmt.Fprintln(f.Output(), "usage: blobseal image check --key-file KEY [flags] IMAGE\n\n"+
			"Unlocks IMAGE (a file or a blob URL), reads every entry and every byte, and prints one line\n"+
			"per entry: TYPE PERM UID:GID SIZE SHA256|\"LINK TARGET\"|MAJOR,MINOR|- PATH.\n"+
			"Exits 1 if anything is damaged or inconsistent.\n\nflags:")
		f.PrintDefaults()
	}
	var vf volumeFlags
	vf.register(f)
	var inf integrityFlags
	inf.register(f)
	pos, err := parseInterspersed(f, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		f.Usage()
		return usageErrorf("want one IMAGE argument, got %d", len(pos))
	}
	if err := vf.validate(); err != nil {
		return err
	}
	integrity, err := inf.integrity()
	if err != nil {
		return err
	}
	key, err := readImageKeyFile(vf.keyFile)
	if err != nil {
		return err
	}
	spec := vf.imageSpec(pos[0], key)
	spec.Integrity = integrity
	spec.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	img, err := image.Open(ctx, spec)
	key.Wipe()
	if err != nil {
		return err
	}
	defer img.Close()
	out := bufio.NewWriterSize(os.Stdout, 64<<10)
	entries := 0
	problems := image.Check(ctx, img.FS, func(e image.ManifestEntry) {
		entries++
		fmt.Fprintln(out, e.String())
	})
	if err := out.Flush(); err != nil {
		return err
	}
	for _, p := range problems {
		fmt.Fprintln(os.Stderr, "inconsistent:", p)
	}
	if len(problems) > 0 {
		return fmt.Errorf("%s: %d problems in %d entries", img.Name, len(problems), entries)
	}
	fmt.Fprintf(os.Stderr, "%s: %d entries, all consistent\n", img.Name, entries)
	return nil
}
