package ext4

import (
	"bytes"
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"

	"github.com/blobseal/blobseal/internal/testenv"
)

// TestWriterOrphans: a file unlinked while held stays readable and
// writable, is freed on Release, and after a crash with it still held the
// orphan list is emptied both by our open and by the kernel's mount, to the
// same free space, e2fsck-clean.
func TestWriterOrphans(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTools(t, "mount", "umount")
	img := mkfs(t, nil, "", 32)
	w := openWritable(t, img)
	free0 := w.FS().StatFS()
	o := writerOps{w}
	must(t, o.create("held", 0o644))
	must(t, o.writeAt("held", fill(1, 100_000), 0))
	in, err := lookupPath(w.FS(), "held")
	must(t, err)
	w.Hold(in.Ino)
	must(t, o.unlink("held"))
	if _, err := o.w.WriteAt(in.Ino, []byte("still writable"), 5); err != nil {
		t.Fatalf("write to an unlinked, held file: %v", err)
	}
	gone, err := w.FS().Inode(in.Ino)
	must(t, err)
	if gone.Links != 0 || !bytes.Equal(readAll(t, w.FS(), gone)[:19], append(fill(1, 100_000)[:5:5], "still writable"...)) {
		t.Fatalf("unlinked held file: %d links, content not as written", gone.Links)
	}
	must(t, w.Release(in.Ino))
	must(t, w.Checkpoint())
	e2fsckClean(t, img)
	if got := w.FS().StatFS(); got.FreeBlocks != free0.FreeBlocks || got.FreeInodes != free0.FreeInodes {
		t.Errorf("after release: %d blocks, %d inodes free; want %d, %d", got.FreeBlocks, got.FreeInodes, free0.FreeBlocks, free0.FreeInodes)
	}

	// A crash while held: the orphan list is on disk.
	must(t, o.mkdir("d", 0o755))
	must(t, o.create("d/f", 0o644))
	must(t, o.writeAt("d/f", fill(2, 50_000), 0))
	f, err := lookupPath(w.FS(), "d/f")
	must(t, err)
	d, err := lookupPath(w.FS(), "d")
	must(t, err)
	w.Hold(f.Ino)
	w.Hold(d.Ino)
	must(t, o.unlink("d/f"))
	must(t, o.rmdir("d"))
	must(t, w.Sync())
	byKernel := copyFile(t, img)
	w2 := openWritable(t, img) // the first Writer is abandoned: the crash
	e2fsckClean(t, img)
	if got := w2.FS().StatFS(); got.FreeBlocks != free0.FreeBlocks || got.FreeInodes != free0.FreeInodes {
		t.Errorf("after orphan recovery: %d blocks, %d inodes free; want %d, %d", got.FreeBlocks, got.FreeInodes, free0.FreeBlocks, free0.FreeInodes)
	}
	kernelMountCycle(t, byKernel)
	e2fsckClean(t, byKernel)
	kf, _ := openImage(t, byKernel)
	if got := kf.StatFS(); got.FreeBlocks != free0.FreeBlocks || got.FreeInodes != free0.FreeInodes {
		t.Errorf("after the kernel's orphan processing: %d blocks, %d inodes free; want %d, %d", got.FreeBlocks, got.FreeInodes, free0.FreeBlocks, free0.FreeInodes)
	}
}

// TestWriterHeldCreation: what the *Held operations make is held from the
// change that makes it, so removing its name at once (before the caller's
// first use) leaves it usable until Release, which frees it.
func TestWriterHeldCreation(t *testing.T) {
	ctx := context.Background()
	img := mkfs(t, nil, "", 16)
	w := openWritable(t, img)
	free0 := w.FS().StatFS()
	target := strings.Repeat("t", 100) // a slow symlink: a data block to free
	for _, c := range []struct {
		name string
		make func() (*Inode, error)
		mode uint16
	}{
		{"create", func() (*Inode, error) { return w.CreateHeld(ctx, RootIno, "f", 0o640, 1, 2) }, sIFREG | 0o640},
		{"mknod", func() (*Inode, error) { return w.MknodHeld(ctx, RootIno, "f", sIFIFO|0o600, 0, 0, 0) }, sIFIFO | 0o600},
		{"mkdir", func() (*Inode, error) { return w.MkdirHeld(ctx, RootIno, "f", 0o750, 0, 0) }, sIFDIR | 0o750},
		{"symlink", func() (*Inode, error) { return w.SymlinkHeld(ctx, RootIno, "f", target, 0, 0) }, sIFLNK | 0o777},
	} {
		in, err := c.make()
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if in.Mode != c.mode || in.Links == 0 {
			t.Fatalf("%s returned mode %#o, %d links; want %#o, linked", c.name, in.Mode, in.Links, c.mode)
		}
		if in.IsDir() {
			must(t, w.Rmdir(RootIno, "f"))
		} else {
			must(t, w.Unlink(RootIno, "f"))
		}
		got, err := w.FS().Inode(in.Ino)
		if err != nil || got.Mode != c.mode || got.Generation != in.Generation || got.Links != 0 {
			t.Fatalf("%s: after removing its name the held inode reads %+v, %v; want it kept, unlinked", c.name, got, err)
		}
		if in.IsRegular() {
			if _, err := w.WriteAt(in.Ino, []byte("kept"), 0); err != nil {
				t.Fatalf("%s: writing the held, unlinked file: %v", c.name, err)
			}
		}
		if st := w.FS().StatFS(); st.FreeInodes != free0.FreeInodes-1 {
			t.Fatalf("%s: %d inodes free while held, want %d", c.name, st.FreeInodes, free0.FreeInodes-1)
		}
		must(t, w.Release(in.Ino))
		if st := w.FS().StatFS(); st.FreeInodes != free0.FreeInodes || st.FreeBlocks != free0.FreeBlocks {
			t.Fatalf("%s: after Release %d inodes, %d blocks free; want %d, %d", c.name, st.FreeInodes, st.FreeBlocks, free0.FreeInodes, free0.FreeBlocks)
		}
	}

	// LinkHeld returns the new link count and holds the file.
	in, err := w.Create(RootIno, "a", 0o644, 0, 0)
	must(t, err)
	linked, err := w.LinkHeld(ctx, in.Ino, RootIno, "b")
	must(t, err)
	if linked.Ino != in.Ino || linked.Links != 2 {
		t.Fatalf("LinkHeld returned inode %d with %d links, want %d with 2", linked.Ino, linked.Links, in.Ino)
	}
	must(t, w.Unlink(RootIno, "a"))
	must(t, w.Unlink(RootIno, "b"))
	if _, err := w.WriteAt(in.Ino, []byte("kept"), 0); err != nil {
		t.Fatalf("writing the held file after its last unlink: %v", err)
	}
	must(t, w.Release(in.Ino))
	must(t, w.Close())
	e2fsckClean(t, img)
}

// TestWriterCreateHeldRace: an unlink racing each creation finds the file
// (or not yet), but never frees it under its creator, who writes to it.
func TestWriterCreateHeldRace(t *testing.T) {
	img := mkfs(t, nil, "", 16)
	w := openWritable(t, img)
	free0 := w.FS().StatFS()
	rootBlocks := func() uint64 {
		root, err := w.FS().Inode(RootIno)
		must(t, err)
		return root.Blocks / uint64(w.FS().BlockSize()/512)
	}
	root0 := rootBlocks()
	ctx := context.Background()
	const n = 200
	names := make(chan string, n)
	done := make(chan struct{})
	go func() { // the racing unlinker
		defer close(done)
		for name := range names {
			for w.Unlink(RootIno, name) != nil {
				runtime.Gosched() // not there yet
			}
		}
	}()
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("race-%d", i)
		names <- name // the unlinker may win the moment the name exists
		in, err := w.CreateHeld(ctx, RootIno, name, 0o644, 0, 0)
		must(t, err)
		if _, err := w.WriteAt(in.Ino, fill(uint64(i), 5000), 0); err != nil {
			t.Fatalf("write %d to a held new file: %v", i, err)
		}
		got, err := w.FS().Inode(in.Ino)
		if err != nil || got.Generation != in.Generation || got.Size != 5000 {
			t.Fatalf("held new file %d reads %+v, %v", i, got, err)
		}
		must(t, w.Release(in.Ino))
	}
	close(names)
	<-done
	// The root directory may have grown while names piled up; it keeps
	// its blocks, as on the kernel's ext4. Every file's were freed.
	wantFree := free0.FreeBlocks - (rootBlocks() - root0)
	if st := w.FS().StatFS(); st.FreeInodes != free0.FreeInodes || st.FreeBlocks != wantFree {
		t.Fatalf("%d inodes, %d blocks free at the end; want %d, %d", st.FreeInodes, st.FreeBlocks, free0.FreeInodes, wantFree)
	}
	must(t, w.Close())
	e2fsckClean(t, img)
}
