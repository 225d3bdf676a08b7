package ext4

import "testing"

// TestLRUBounded checks the cache never exceeds its bound and evicts the
// least recently used entry.
func TestLRUBounded(t *testing.T) {
	c := newLRU[int, string](3)
	c.put(1, "a")
	c.put(2, "b")
	c.put(3, "c")
	if _, ok := c.get(1); !ok { // 1 becomes most recent
		t.Fatal("1 missing")
	}
	c.put(4, "d") // evicts 2
	if c.len() != 3 {
		t.Fatalf("len %d, want 3", c.len())
	}
	if _, ok := c.get(2); ok {
		t.Error("2 should have been evicted")
	}
	for _, k := range []int{1, 3, 4} {
		if _, ok := c.get(k); !ok {
			t.Errorf("%d missing", k)
		}
	}
	c.put(4, "e")
	if v, _ := c.get(4); v != "e" || c.len() != 3 {
		t.Errorf("update: %q, len %d", v, c.len())
	}
}
