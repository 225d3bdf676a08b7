package blockcache

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Block memory lives outside the Go heap, in anonymous mappings that are
// unmapped on eviction. The Go collector lets the heap grow to about twice
// its live size before it collects (GOGC=100), so a cache of 256 MiB of
// garbage-collected buffers that churns through a sequential read would reach
// ~512 MiB of RSS; mappings return memory to the kernel at once, so RSS
// tracks the accounted bytes. The mappings hold no Go pointers.

const hugePage = 2 << 20

// roundToPage rounds n up to a whole number of pages: the memory a mapping of
// n bytes really occupies, and therefore what the bound counts.
func roundToPage(n int64) int64 {
	page := int64(os.Getpagesize())
	return (n + page - 1) / page * page
}

// mapBuffer returns a zeroed buffer of n bytes (n a multiple of the page size).
func mapBuffer(n int64) ([]byte, error) {
	b, err := unix.Mmap(-1, 0, int(n), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return nil, fmt.Errorf("blockcache: allocating %d bytes of block memory: %w", n, err)
	}
	if n >= hugePage {
		// Large extents (sequential fetches) in 2 MiB pages: 512 times
		// fewer faults and TLB entries while the socket fills them. Only a
		// hint; without transparent huge pages it changes nothing.
		_ = unix.Madvise(b, unix.MADV_HUGEPAGE)
	}
	// Fault the pages in now, in one call, rather than one by one inside
	// the socket reads that fill them.
	if err := unix.Madvise(b, unix.MADV_POPULATE_WRITE); err != nil && !errors.Is(err, unix.EINVAL) {
		_ = unix.Munmap(b)
		return nil, fmt.Errorf("blockcache: allocating %d bytes of block memory: %w", n, err)
	}
	return b, nil
}

// resizeBuffer gives a buffer from mapBuffer the length n (a multiple of
// the page size), keeping the pages it has: an evicted extent's memory is
// reused by a new extent of another size without the kernel zeroing it
// again. Pages it grows by are faulted in as mapBuffer does. The contents
// are left as they were: callers overwrite every byte. On failure it
// returns the mapping that is left, for the caller to release.
func resizeBuffer(b []byte, n int64) ([]byte, error) {
	old := int64(len(b))
	if old == n {
		return b, nil
	}
	nb, err := unix.Mremap(b, int(n), unix.MREMAP_MAYMOVE)
	if err != nil {
		return b, fmt.Errorf("blockcache: resizing block memory from %d to %d bytes: %w", old, n, err)
	}
	if n > old {
		if n >= hugePage {
			_ = unix.Madvise(nb, unix.MADV_HUGEPAGE)
		}
		if err := unix.Madvise(nb[old:], unix.MADV_POPULATE_WRITE); err != nil && !errors.Is(err, unix.EINVAL) {
			return nb, fmt.Errorf("blockcache: resizing block memory from %d to %d bytes: %w", old, n, err)
		}
	}
	return nb, nil
}

// unmapBuffer releases a buffer from mapBuffer. Callers guarantee no reader
// still uses it (the extent's reference count is zero).
func unmapBuffer(b []byte) error {
	if b == nil {
		return nil
	}
	if err := unix.Munmap(b); err != nil {
		return fmt.Errorf("blockcache: releasing block memory: %w", err)
	}
	return nil
}
