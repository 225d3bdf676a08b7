package blob

import (
	"strings"
	"testing"
)

func TestParseLocation(t *testing.T) {
	cases := []struct {
		in                     string
		path, acct, cont, name string
		sas                    bool
		errContains            string
	}{
		{in: "/var/img/disk.img", path: "/var/img/disk.img"},
		{in: "rel/disk.img", path: "rel/disk.img"},
		{in: "file:///var/disk.img", path: "/var/disk.img"},
		{in: "https://acct.blob.core.windows.net/c/dir/b.img?sv=1&sig=SECRET&se=2030-01-01T00:00:00Z", acct: "acct", cont: "c", name: "dir/b.img", sas: true},
		{in: "https://acct.blob.core.chinacloudapi.cn/c/b", acct: "acct", cont: "c", name: "b"},
		{in: "http://127.0.0.1:10000/devstoreaccount1/img/x.img", acct: "devstoreaccount1", cont: "img", name: "x.img"},
		{in: "http://localhost:10000/devstoreaccount1/img/x.img", acct: "devstoreaccount1", cont: "img", name: "x.img"},
		{in: "http://acct.blob.core.windows.net/c/b", errContains: "refusing plain http"},
		{in: "https://acct.blob.core.windows.net/c", errContains: "must name a container and a blob"},
		{in: "https://acct.blob.core.windows.net/c/", errContains: "not a blob"},
		{in: "https://example.com/c/b", errContains: "not a blob endpoint"},
		{in: "http://127.0.0.1:10000/devstoreaccount1/img", errContains: "must name an account, a container and a blob"},
		{in: "ftp://x/y", errContains: "unsupported URL scheme"},
		{in: "https://u:p@acct.blob.core.windows.net/c/b", errContains: "user info"},
		{in: "", errContains: "empty location"},
		{in: "file://host/x", errContains: "remote host"},
	}
	for _, c := range cases {
		l, err := parseLocation(c.in)
		if c.errContains != "" {
			if err == nil || !strings.Contains(err.Error(), c.errContains) {
				t.Errorf("parseLocation(%q) err = %v, want %q", c.in, err, c.errContains)
			}
			continue
		}
		if err != nil {
			t.Errorf("parseLocation(%q): %v", c.in, err)
			continue
		}
		if l.path != c.path || l.account != c.acct || l.container != c.cont || l.name != c.name || l.sas != c.sas {
			t.Errorf("parseLocation(%q) = %+v", c.in, l)
		}
		if strings.Contains(l.redacted(), "SECRET") {
			t.Errorf("redacted() leaks the SAS: %q", l.redacted())
		}
	}
}

func TestContainerURL(t *testing.T) {
	l, err := parseLocation("https://a.blob.core.windows.net/cont/dir/cont/b?sig=x")
	if err != nil {
		t.Fatal(err)
	}
	if got := containerURL(l); got != "https://a.blob.core.windows.net/cont?sig=x" {
		t.Fatalf("containerURL = %q", got)
	}
}

func TestParseConnectionString(t *testing.T) {
	k, err := parseConnectionString("DefaultEndpointsProtocol=http;AccountName=dev;AccountKey=a2V5==;BlobEndpoint=http://127.0.0.1:1/dev;")
	if err != nil || k.account != "dev" || k.key.Reveal() != "a2V5==" {
		t.Fatalf("got %+v, %v", k, err)
	}
	for in, want := range map[string]string{
		"AccountName=dev":                  "no AccountKey",
		"AccountKey=eA==":                  "no AccountName",
		"garbage":                          "Name=Value",
		"SharedAccessSignature=sv=1&sig=x": "holds a SAS",
		"":                                 "neither",
	} {
		_, err := parseConnectionString(in)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("parseConnectionString(%q) = %v, want %q", in, err, want)
		}
		if err != nil && strings.Contains(err.Error(), "eA==") {
			t.Errorf("error leaks the key: %v", err)
		}
	}
}

func TestMergeAndPlan(t *testing.T) {
	rs := MergeRanges([]Range{{1024, 512}, {0, 512}, {512, 512}, {4096, 0}, {8192, 512}, {8000, 300}})
	want := []Range{{0, 1536}, {8000, 704}}
	if len(rs) != len(want) || rs[0] != want[0] || rs[1] != want[1] {
		t.Fatalf("MergeRanges = %v, want %v", rs, want)
	}
	segs := planRead([]Range{{0, 1000}, {1100, 100}, {1 << 20, 10}}, 500, 1<<20, 256)
	// [500,1000) data + 100-byte hole absorbed + [1100,1200) data, big hole, [1M,1M+10) data, trailing hole.
	if len(segs) != 4 || !segs[0].data || segs[0].off != 500 || segs[0].len != 700 || segs[1].data || !segs[2].data || segs[2].len != 10 || segs[3].data || segs[3].len != 490 {
		t.Fatalf("planRead = %+v", segs)
	}
	if got := subtractRange([]Range{{0, 100}, {200, 100}}, Range{50, 200}); len(got) != 2 || got[0] != (Range{0, 50}) || got[1] != (Range{250, 50}) {
		t.Fatalf("subtractRange = %v", got)
	}
}

// FuzzParseLocation: never panics, never echoes a SAS signature in errors
// or String forms, and accepted blob URLs have all their parts.
func FuzzParseLocation(f *testing.F) {
	for _, s := range []string{
		"https://acct.blob.core.windows.net/c/b.img?sv=2024&sig=SECRETSIG&se=2030-01-01T00:00:00Z",
		"http://127.0.0.1:10000/devstoreaccount1/img/x.img",
		"file:///tmp/x", "/tmp/x", "https://%zz/?sig=SECRETSIG", "http://[::1]:1/a/b/c", "https://a.blob./c/b",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		l, err := parseLocation(in)
		if err != nil {
			// A signature in the query must never be echoed (one in the
			// host or path is not a credential).
			before, query, _ := strings.Cut(in, "?")
			if strings.Contains(query, "SECRETSIG") && !strings.Contains(before, "SECRETSIG") && strings.Contains(err.Error(), "SECRETSIG") {
				t.Fatalf("error leaks the signature: %v", err)
			}
			return
		}
		if l.isFile() {
			return
		}
		if l.account == "" || l.container == "" || l.name == "" {
			t.Fatalf("accepted %q without account/container/blob: %+v", in, l)
		}
		before, _, _ := strings.Cut(in, "?")
		if !strings.Contains(before, "SECRETSIG") && strings.Contains(l.redacted(), "SECRETSIG") {
			t.Fatalf("redacted() leaks: %q", l.redacted())
		}
		_ = containerURL(l)
	})
}

func FuzzParseConnectionString(f *testing.F) {
	f.Add("AccountName=a;AccountKey=SECRETKEY;BlobEndpoint=http://x")
	f.Add(";;=;AccountKey=SECRETKEY")
	f.Add("SharedAccessSignature=sig=SECRETKEY")
	f.Fuzz(func(t *testing.T, in string) {
		k, err := parseConnectionString(in)
		if err != nil {
			if strings.Contains(err.Error(), "SECRETKEY") {
				t.Fatalf("error leaks the key: %v", err)
			}
			return
		}
		if k.account == "" || k.key == "" {
			t.Fatalf("accepted %q without account or key", in)
		}
	})
}

// FuzzPlanRead checks planRead against a byte map: segments tile the read
// exactly, data segments cover every written byte, and holes hold none.
func FuzzPlanRead(f *testing.F) {
	f.Add([]byte{0, 10, 20, 5, 40, 3}, uint16(3), uint16(60), uint16(4))
	f.Add([]byte{5, 5, 5, 5}, uint16(0), uint16(30), uint16(0))
	f.Fuzz(func(t *testing.T, raw []byte, off, n, minHole uint16) {
		const space = 2048
		var rs []Range
		for i := 0; i+1 < len(raw) && i < 40; i += 2 {
			rs = append(rs, Range{Off: int64(raw[i]) * 4, Len: int64(raw[i+1])})
		}
		rs = MergeRanges(rs)
		var written [space]bool
		for i, r := range rs {
			if i > 0 && r.Off <= rs[i-1].End() {
				t.Fatalf("MergeRanges left overlapping/adjacent ranges: %v", rs)
			}
			for b := r.Off; b < r.End(); b++ {
				written[b] = true
			}
		}
		o, l := int64(off%space), int64(n%space)
		if o+l > space {
			l = space - o
		}
		pos := o
		for _, s := range planRead(rs, o, l, int64(minHole%64)) {
			if s.off != pos || s.len <= 0 {
				t.Fatalf("segments do not tile [%d,%d): %+v", o, o+l, s)
			}
			for b := s.off; b < s.off+s.len; b++ {
				if written[b] && !s.data {
					t.Fatalf("written byte %d planned as a hole", b)
				}
			}
			pos += s.len
		}
		if pos != o+l {
			t.Fatalf("segments end at %d, want %d", pos, o+l)
		}
	})
}

// FuzzPageRuns checks that pageRuns partitions a buffer into whole pages,
// classifying each one correctly.
func FuzzPageRuns(f *testing.F) {
	f.Add([]byte{0, 1, 0}, uint8(3))
	f.Fuzz(func(t *testing.T, seeds []byte, pages uint8) {
		buf := make([]byte, int(pages%16)*PageSize+int(pages%3)*7)
		for i, s := range seeds {
			if len(buf) > 0 {
				buf[(i*977+int(s)*31)%len(buf)] = s
			}
		}
		data, zero := pageRuns(buf, 4096)
		all := MergeRanges(append(append([]Range(nil), data...), zero...))
		if len(buf) > 0 && (len(all) != 1 || all[0] != (Range{4096, int64(len(buf))})) {
			t.Fatalf("runs %v + %v do not cover the buffer exactly", data, zero)
		}
		for _, r := range data {
			if allZero(buf[r.Off-4096 : r.End()-4096]) {
				t.Fatalf("data run %v is all zero", r)
			}
		}
		for _, r := range zero {
			if !allZero(buf[r.Off-4096 : r.End()-4096]) {
				t.Fatalf("zero run %v holds data", r)
			}
		}
	})
}
