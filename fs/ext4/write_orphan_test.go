package ext4

import (
	"bytes"
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
