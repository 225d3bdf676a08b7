package main

import (
	"bufio"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/image"
	"github.com/blobseal/blobseal/internal/secret"
)

func newImageCmd() *cobra.Command {
	return newGroup("image", "Build, check, protect and upload encrypted images",
		newImageCreateCmd(), newImageCheckCmd(), newImageVerityCmd(), newImageUploadCmd(), newImageResizeCmd())
}

type imageCreateFlags struct {
	from, keyFile, format, pbkdf, size, label string
	sectorSize, blockSize                     int
	journal, noHoles, noVerity, json          bool
	readWrite                                 bool
}

func newImageCreateCmd() *cobra.Command {
	var o imageCreateFlags
	cmd := &cobra.Command{
		Use:   "create --from DIR --key-file KEY [flags] OUT",
		Short: "Build an encrypted ext4 image from a directory",
		Long: "Builds an ext4 filesystem holding a copy of DIR (no root needed; every stat field ext4 holds,\n" +
			"timestamps to the nanosecond) and encrypts it into OUT, with a dm-verity tree appended.",
		Example: "  blobseal image create --from ./data --key-file key.bin data.img",
		Args:    positional("OUT"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runImageCreate(cmd, o, args[0])
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.from, "from", "", "source directory")
	f.StringVar(&o.keyFile, "key-file", "", "file whose bytes become the LUKS passphrase (or, with --format plain, the raw 32- or 64-byte XTS key)")
	f.StringVar(&o.format, "format", "luks2", "luks2 or plain (headerless AES-XTS)")
	f.IntVar(&o.sectorSize, "sector-size", 4096, "encryption sector size: 512, 1024, 2048 or 4096 (at most --block-size)")
	f.IntVar(&o.blockSize, "block-size", 4096, "ext4 block size: 1024, 2048 or 4096")
	f.StringVar(&o.pbkdf, "pbkdf", "pbkdf2", "LUKS2 keyslot KDF: pbkdf2 or argon2id (the key is random, so pbkdf2 loses nothing)")
	f.StringVar(&o.size, "size", "", "ext4 size (e.g. 512M, 2G); default: sized from DIR with headroom")
	f.StringVar(&o.label, "label", "blobseal", "ext4 volume label (at most 16 bytes)")
	f.BoolVar(&o.journal, "journal", false, "keep an ext4 journal (only useful for images later mounted read-write)")
	f.BoolVar(&o.noHoles, "no-holes", false, "encrypt zero runs too (for images that must read the same through dm-crypt)")
	f.BoolVar(&o.noVerity, "no-verity", false, "leave out the dm-verity tree (the image can then be modified by storage undetected)")
	f.BoolVar(&o.json, "json", false, "print the result as JSON")
	f.BoolVar(&o.readWrite, "read-write", false, "build an image for `blobseal mount --read-write`: with a journal, without a verity tree, and (without --size) twice the space DIR needs, at least 64 MiB free")
	markRequired(cmd, "from", "key-file")
	completeValues(cmd, "format", "luks2", "plain")
	completeValues(cmd, "pbkdf", "pbkdf2", "argon2id")
	completeValues(cmd, "sector-size", "512", "1024", "2048", "4096")
	completeValues(cmd, "block-size", "1024", "2048", "4096")
	return cmd
}

func runImageCreate(cmd *cobra.Command, o imageCreateFlags, out string) error {
	ctx := cmd.Context()
	switch {
	case o.format != "luks2" && o.format != "plain":
		return usageErrorf("--format %q: use luks2 or plain", o.format)
	case o.pbkdf != "pbkdf2" && o.pbkdf != "argon2id":
		return usageErrorf("--pbkdf %q: use pbkdf2 or argon2id", o.pbkdf)
	case o.sectorSize != 512 && o.sectorSize != 1024 && o.sectorSize != 2048 && o.sectorSize != 4096:
		return usageErrorf("--sector-size %d: use 512, 1024, 2048 or 4096", o.sectorSize)
	case o.blockSize != 1024 && o.blockSize != 2048 && o.blockSize != 4096:
		return usageErrorf("--block-size %d: use 1024, 2048 or 4096", o.blockSize)
	case o.sectorSize > o.blockSize:
		return usageErrorf("--sector-size %d is larger than --block-size %d: a filesystem block must not share an encryption sector with its neighbour", o.sectorSize, o.blockSize)
	}
	var size int64
	if o.size != "" {
		var err error
		if size, err = parseSize(o.size); err != nil {
			return usageErrorf("--size: %v", err)
		}
		if size%int64(o.blockSize) != 0 {
			return usageErrorf("--size %d is not a multiple of the block size %d", size, o.blockSize)
		}
	}
	key, err := readImageKeyFile(o.keyFile)
	if err != nil {
		return err
	}
	defer key.Wipe()
	if o.format == "plain" && len(key) != 32 && len(key) != 64 {
		return fmt.Errorf("key file %s has %d bytes; a plain image needs a raw 32- or 64-byte XTS key", o.keyFile, len(key))
	}

	stderr := cmd.ErrOrStderr()
	bar := newProgress(stderr, "encrypting")
	if o.json {
		bar = newProgress(nil, "")
	}
	defer bar.finish()
	keyBytes := 64
	if o.format == "plain" {
		keyBytes = len(key)
	}
	res, err := image.Create(ctx, image.CreateOptions{
		From: o.from, Out: out, Key: key,
		BlockSize: o.blockSize, Size: size, Label: o.label, Journal: o.journal,
		Warn:      func(msg string) { fmt.Fprintln(stderr, "warning:", msg) },
		NoVerity:  o.noVerity,
		ReadWrite: o.readWrite,
		Crypto: crypto.FormatOptions{
			Format:     o.format,
			SectorSize: o.sectorSize,
			KeyBytes:   keyBytes,
			PBKDF:      o.pbkdf,
			Label:      o.label,
			NoHoles:    o.noHoles,
			Progress:   bar.update,
		},
	})
	bar.finish()
	if err != nil {
		return fmt.Errorf("create %s: %w", out, err)
	}
	if o.json {
		return printJSON(cmd.OutOrStdout(), struct {
			Image           string            `json:"image"`
			Format          string            `json:"format"`
			FilesystemBytes int64             `json:"filesystem_bytes"`
			ImageBytes      int64             `json:"image_bytes"`
			HoleBytes       int64             `json:"hole_bytes"`
			BlockSize       int               `json:"block_size"`
			SectorSize      int               `json:"sector_size"`
			Entries         int               `json:"entries"`
			Verity          *image.VerityInfo `json:"verity"`
		}{out, o.format, res.FilesystemBytes, res.ImageBytes, res.HoleBytes, o.blockSize, o.sectorSize, res.Entries, res.Verity})
	}
	fmt.Fprintf(cmd.OutOrStdout(), "created %s: %s, ext4 %d MiB (%d-byte blocks), %d-byte sectors\n",
		out, o.format, res.FilesystemBytes>>20, o.blockSize, o.sectorSize)
	if res.Verity != nil {
		printVerity(cmd.OutOrStdout(), res.Verity)
	} else if o.readWrite {
		fmt.Fprintln(cmd.OutOrStdout(), "read-write image: journal, no verity tree; mount it with `blobseal mount --read-write`")
	} else {
		fmt.Fprintln(cmd.OutOrStdout(), "no verity tree (--no-verity): mounts cannot detect changes made by storage")
	}
	return nil
}

// printVerity prints what a mount must pin, in veritysetup's words.
func printVerity(w io.Writer, v *image.VerityInfo) {
	fmt.Fprintf(w, "verity root hash:   %s\n", v.RootHash)
	fmt.Fprintf(w, "verity hash offset: %d\n", v.HashOffset)
	fmt.Fprintf(w, "verity salt:        %s\n", v.Salt)
	fmt.Fprintf(w, "verity data blocks: %d (of %d bytes, %s)\n", v.DataBlocks, v.BlockSize, v.Algorithm)
	fmt.Fprintln(w, "mount with --verity-root-hash", v.RootHash, "(sidecar: verity_root_hash)")
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newImageVerityCmd() *cobra.Command {
	var saltHex string
	var jsonOut bool
	cmd := &cobra.Command{
		Use:   "verity [flags] IMAGE",
		Short: "Append a dm-verity hash tree to an image and print its root hash",
		Long: "Appends a dm-verity hash tree over the whole of IMAGE (a local file made by blobseal,\n" +
			"cryptsetup or anything else) and prints its root hash. The file is padded to whole\n" +
			"4096-byte blocks; the tree follows at the printed hash offset, in the format\n" +
			"`veritysetup verify IMAGE IMAGE ROOT --hash-offset OFFSET` checks.",
		Args: positional("IMAGE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if image.IsRemote(args[0]) {
				return usageErrorf("IMAGE must be a local file: add the tree before uploading")
			}
			var salt []byte
			if saltHex != "" {
				var err error
				if salt, err = hex.DecodeString(saltHex); err != nil || len(salt) > 256 {
					return usageErrorf("--salt must be at most 256 bytes in hex")
				}
			}
			v, err := image.AddVerity(cmd.Context(), args[0], image.VerityOptions{Salt: salt})
			if err != nil {
				return err
			}
			if jsonOut {
				return printJSON(cmd.OutOrStdout(), v)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "added a verity tree to %s (%d bytes)\n", args[0], v.TreeBytes)
			printVerity(cmd.OutOrStdout(), v)
			return nil
		},
	}
	cmd.Flags().StringVar(&saltHex, "salt", "", "salt in hex (default: 32 random bytes)")
	cmd.Flags().BoolVar(&jsonOut, "json", false, "print the result as JSON")
	return cmd
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

func newImageCheckCmd() *cobra.Command {
	var vf volumeFlags
	var inf integrityFlags
	var jsonOut bool
	cmd := &cobra.Command{
		Use:   "check --key-file KEY [flags] IMAGE",
		Short: "Unlock an image, read every entry and print a manifest",
		Long: "Unlocks IMAGE (a file or a blob URL), reads every entry and every byte, and prints one line\n" +
			"per entry: TYPE PERM UID:GID SIZE SHA256|\"LINK TARGET\"|MAJOR,MINOR|- PATH.\n" +
			"Holes are never read. A file with more than 8 GiB of holes gets a digest of its data ranges\n" +
			"only (sparse-sha256:HEX over each range's offset, length and bytes), with a note on stderr.\n" +
			"Exits 1 if anything is damaged or inconsistent.",
		Args: positional("IMAGE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runImageCheck(cmd, &vf, &inf, jsonOut, args[0])
		},
	}
	vf.register(cmd.Flags())
	inf.register(cmd.Flags())
	cmd.Flags().BoolVar(&jsonOut, "json", false, "print the manifest and a summary as one JSON object")
	markRequired(cmd, "key-file")
	completeValues(cmd, "format", "auto", "luks", "plain")
	return cmd
}

// checkEntryJSON is one manifest entry in image check --json.
type checkEntryJSON struct {
	Path   string `json:"path"`
	Type   string `json:"type"` // the manifest's type letter: f, d, l, c, b, p, s
	Mode   string `json:"mode"` // permission bits in octal
	UID    uint32 `json:"uid"`
	GID    uint32 `json:"gid"`
	Size   uint64 `json:"size"`
	Digest string `json:"digest"` // sha256 (files), target (symlinks), major,minor (devices), "-"
	Note   string `json:"note,omitempty"`
}

func runImageCheck(cmd *cobra.Command, vf *volumeFlags, inf *integrityFlags, jsonOut bool, loc string) error {
	ctx := cmd.Context()
	if err := vf.validateFormat(); err != nil {
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
	spec := vf.imageSpec(loc, key)
	spec.Integrity = integrity
	spec.Logger = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	img, err := image.Open(ctx, spec)
	key.Wipe()
	if err != nil {
		return err
	}
	defer img.Close()
	out := bufio.NewWriterSize(cmd.OutOrStdout(), 64<<10)
	var entries []checkEntryJSON
	count := 0
	var notes []string
	problems := image.Check(ctx, img.FS, func(e image.ManifestEntry) {
		count++
		if !jsonOut {
			fmt.Fprintln(out, e.String())
			if e.Note != "" {
				notes = append(notes, e.Path+": "+e.Note)
			}
			return
		}
		typ, _, _ := strings.Cut(e.String(), " ")
		entries = append(entries, checkEntryJSON{Path: e.Path, Type: typ, Mode: fmt.Sprintf("%04o", e.Mode&0o7777),
			UID: e.UID, GID: e.GID, Size: e.Size, Digest: e.Digest, Note: e.Note})
	})
	if jsonOut {
		msgs := make([]string, 0, len(problems))
		for _, p := range problems {
			msgs = append(msgs, p.Error())
		}
		if err := printJSON(out, struct {
			Image      string           `json:"image"`
			Entries    int              `json:"entries"`
			Consistent bool             `json:"consistent"`
			Problems   []string         `json:"problems"`
			Manifest   []checkEntryJSON `json:"manifest"`
		}{img.Name, count, len(problems) == 0, msgs, entries}); err != nil {
			return err
		}
	}
	if err := out.Flush(); err != nil {
		return err
	}
	for _, n := range notes {
		fmt.Fprintln(cmd.ErrOrStderr(), "note:", n)
	}
	for _, p := range problems {
		fmt.Fprintln(cmd.ErrOrStderr(), "inconsistent:", p)
	}
	if len(problems) > 0 {
		return fmt.Errorf("%s: %d problems in %d entries", img.Name, len(problems), count)
	}
	fmt.Fprintf(cmd.ErrOrStderr(), "%s: %d entries, all consistent\n", img.Name, count)
	return nil
}

type imageResizeFlags struct {
	vol           volumeFlags
	rel           releaseFlags
	size          string
	leaseDuration time.Duration
	json          bool
}

func newImageResizeCmd() *cobra.Command {
	var o imageResizeFlags
	cmd := &cobra.Command{
		Use:   "resize --size SIZE (--key-file KEY | --key-name NAME ...) [flags] IMAGE|URL",
		Short: "Grow a read-write image (file or page blob) and its ext4 filesystem, offline",
		Long: "Grows IMAGE (a local file or a page blob URL) to SIZE bytes, then its encrypted volume and the ext4\n" +
			"filesystem in it, offline (nothing may have it mounted; a page blob is held under a write lease\n" +
			"meanwhile). The filesystem gains new block groups; files are untouched. A journal left by a crash\n" +
			"is replayed first. Images with a verity tree, block blobs, LUKS segments of fixed size and\n" +
			"shrinking are refused; so is growth beyond what the filesystem's group descriptor table can\n" +
			"describe (the message names the largest size). The key comes from --key-file or, as for\n" +
			"blobseal mount, from a secure key release.",
		Example: "  blobseal image resize --size 2G --key-file key.bin data.img\n" +
			"  blobseal image resize --size 64G --key-file key.bin https://ACCOUNT.blob.core.windows.net/images/data.img",
		Args: positional("IMAGE|URL"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runImageResize(cmd, &o, args[0])
		},
	}
	f := cmd.Flags()
	o.vol.register(f)
	o.rel.register(f)
	f.StringVar(&o.size, "size", "", "new size of the image (file or blob), e.g. 2G; a multiple of 4 KiB, larger than now")
	f.DurationVar(&o.leaseDuration, "lease-duration", blob.DefaultLeaseDuration, "page blobs: the write lease held during the resize, 15s to 60s; after a crash the blob stays locked this long")
	f.BoolVar(&o.json, "json", false, "print the result as JSON")
	markRequired(cmd, "size")
	for _, rel := range releaseFlagNames() {
		cmd.MarkFlagsMutuallyExclusive("key-file", rel)
	}
	cmd.MarkFlagsOneRequired("key-file", "key-name")
	o.rel.declare(cmd)
	completeValues(cmd, "format", "auto", "luks", "plain")
	return cmd
}

func runImageResize(cmd *cobra.Command, o *imageResizeFlags, loc string) error {
	ctx := cmd.Context()
	if err := o.vol.validateFormat(); err != nil {
		return err
	}
	size, err := parseSize(o.size)
	if err != nil {
		return usageErrorf("--size: %v", err)
	}
	if size%image.ResizeAlign != 0 {
		return usageErrorf("--size %d is not a multiple of %d bytes", size, image.ResizeAlign)
	}
	if o.leaseDuration < 15*time.Second || o.leaseDuration > 60*time.Second {
		return usageErrorf("--lease-duration %v: storage allows 15s to 60s", o.leaseDuration)
	}
	release := o.vol.keyFile == ""
	if release {
		if err := o.rel.prepare(); err != nil {
			return err
		}
	}
	logger := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	var key secret.Bytes
	if release {
		rel, err := o.rel.release(ctx, logger)
		if err != nil {
			return err
		}
		key = rel.Secret
	} else if key, err = readImageKeyFile(o.vol.keyFile); err != nil {
		return err
	}
	defer key.Wipe()
	spec := o.vol.imageSpec(loc, key)
	spec.Logger = logger
	spec.Write.Lease.Duration = o.leaseDuration
	res, err := image.Resize(ctx, spec, size)
	if err != nil {
		return err
	}
	if o.json {
		return printJSON(cmd.OutOrStdout(), struct {
			Image           string `json:"image"`
			OldBytes        int64  `json:"old_bytes"`
			NewBytes        int64  `json:"new_bytes"`
			OldFilesystem   int64  `json:"old_filesystem_bytes"`
			NewFilesystem   int64  `json:"new_filesystem_bytes"`
			FilesystemGroup uint32 `json:"block_groups"`
		}{res.Name, res.OldBytes, res.NewBytes, res.OldFSBytes, res.NewFSBytes, res.Groups})
	}
	fmt.Fprintf(cmd.OutOrStdout(), "resized %s: %d -> %d bytes; ext4 %d -> %d bytes (%d block groups)\n",
		res.Name, res.OldBytes, res.NewBytes, res.OldFSBytes, res.NewFSBytes, res.Groups)
	return nil
}
