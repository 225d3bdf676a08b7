package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"time"
)

// rssOverhead is the "small fixed overhead" allowed above 1.2× the cache
// bound: Go runtime, FUSE request buffers, ext4 metadata.
const rssOverhead = 64 << 20

// row is one line of the summary table.
type row struct {
	Figure, Blobseal, Peer, Ratio, Goal, Met string
}

type report struct {
	Failed   int // cases that produced no figure
	Header   []string
	Rows     []row
	Details  []measurement
	Warnings []string
	Setup    []string
}

// goal describes a target ratio: ≥ min or ≤ max (zero means none).
type goal struct {
	atLeast, atMost float64
}

func (g goal) String() string {
	switch {
	case g.atLeast > 0:
		return fmt.Sprintf("≥ %.2g×", g.atLeast)
	case g.atMost > 0:
		return fmt.Sprintf("≤ %.2g×", g.atMost)
	}
	return "—"
}

func (g goal) met(ratio float64) string {
	switch {
	case g.atLeast > 0 && ratio >= g.atLeast, g.atMost > 0 && ratio <= g.atMost:
		return "yes"
	case g.atLeast > 0 || g.atMost > 0:
		return "NO"
	}
	return "—"
}

func (h *harness) report(total time.Duration) *report {
	r := &report{Details: h.results, Warnings: h.warnings, Setup: h.setupCmds}
	for _, m := range h.results {
		if m.Failed != "" {
			r.Failed++
		}
	}
	r.Header = []string{
		"date: " + time.Now().UTC().Format("2006-01-02 15:04 UTC"),
		"machine: " + machine(),
		"load average at end: " + loadavg(),
		fmt.Sprintf("size: %d MiB, quick: %v, runs: %d (median), blobseal --cache-memory %d MiB, random phases %v, proxy latency %v each way, proxy bandwidth %d KB/s per connection each way (0: none), total %s",
			h.cfg.Size>>20, h.cfg.Quick, h.cfg.Runs, h.cfg.CacheMiB, h.cfg.RandomFor, h.cfg.Latency, h.cfg.BandwidthKBps, total.Round(time.Second)),
		"peers: " + h.peerVersions(),
		"command: " + h.cfg.Command,
	}
	mbps := func(m measurement) string { return fmt.Sprintf("%.1f MB/s", m.MBps()) }
	cpu := func(m measurement) string { return fmt.Sprintf("%.2f s/GiB", m.perGiB(m.ClientCPU)) }
	az := func(m measurement) string { return fmt.Sprintf("%.2f s/GiB", m.perGiB(m.AzuriteCPU)) }
	var add addFn = func(fig string, a, b measurement, va, vb func(measurement) string, ra, rb float64, g goal) {
		if a.Failed != "" || b.Failed != "" || a.Key == "" || b.Key == "" {
			show := func(m measurement, v func(measurement) string) string {
				if m.Failed != "" || m.Key == "" {
					return "FAILED"
				}
				return v(m)
			}
			r.Rows = append(r.Rows, row{fig, show(a, va), show(b, vb), "—", g.String(), "n/a (failed, see below)"})
			return
		}
		ratio := 0.0
		if rb != 0 {
			ratio = ra / rb
		}
		r.Rows = append(r.Rows, row{fig, va(a), vb(b), fmt.Sprintf("%.2f", ratio), g.String(), g.met(ratio)})
	}
	get := func(k string) measurement { m, _ := h.find(k); return m }
	rawBest, rawPage := get("raw/block/best"), get("raw/page/best")
	seqB, seqP, seqR := get("seq/blobseal/block"), get("seq/blobseal/page"), get("seq/rclone")
	cacheC, cacheV := get("cache/cipher"), get("cache/volume")

	add("seq read, block-blob mount vs best raw SDK ("+rawBest.Label+")", seqB, rawBest, mbps, mbps, seqB.MBps(), rawBest.MBps(), goal{atLeast: 0.9})
	if rawPaired, ok := h.find("raw/block/paired"); ok {
		add("  the same against that variant measured again, alternating with the mount reads", seqB, rawPaired, mbps, mbps, seqB.MBps(), rawPaired.MBps(), goal{atLeast: 0.9})
	}
	add("  client CPU per GiB, mount vs raw SDK", seqB, rawBest, cpu, cpu, seqB.perGiB(seqB.ClientCPU), rawBest.perGiB(rawBest.ClientCPU), goal{})
	add("  Azurite CPU per GiB, mount vs raw SDK", seqB, rawBest, az, az, seqB.perGiB(seqB.AzuriteCPU), rawBest.perGiB(rawBest.AzuriteCPU), goal{})
	seqC := get("seq/blobseal/pagecache")
	add("  the same with --direct-io=off (page cache) vs best raw SDK", seqC, rawBest, mbps, mbps, seqC.MBps(), rawBest.MBps(), goal{})
	add("    client CPU per GiB, --direct-io=off vs default", seqC, seqB, cpu, cpu, seqC.perGiB(seqC.ClientCPU), seqB.perGiB(seqB.ClientCPU), goal{})
	add("seq read, page-blob mount vs raw SDK on the page blob (same variant)", seqP, rawPage, mbps, mbps, seqP.MBps(), rawPage.MBps(), goal{atLeast: 0.9})
	add("  Azurite CPU per GiB, page mount vs raw SDK", seqP, rawPage, az, az, seqP.perGiB(seqP.AzuriteCPU), rawPage.perGiB(rawPage.AzuriteCPU), goal{})
	add("blockcache ciphertext (in process) vs best raw SDK", cacheC, rawBest, mbps, mbps, cacheC.MBps(), rawBest.MBps(), goal{atLeast: 0.9})
	add("  Azurite CPU per GiB", cacheC, rawBest, az, az, cacheC.perGiB(cacheC.AzuriteCPU), rawBest.perGiB(rawBest.AzuriteCPU), goal{})
	add("blockcache + XTS decrypted volume (in process) vs best raw SDK", cacheV, rawBest, mbps, mbps, cacheV.MBps(), rawBest.MBps(), goal{atLeast: 0.9})
	add("  Azurite CPU per GiB", cacheV, rawBest, az, az, cacheV.perGiB(cacheV.AzuriteCPU), rawBest.perGiB(rawBest.AzuriteCPU), goal{})
	add("seq read, blobseal mount vs rclone crypt mount", seqB, seqR, mbps, mbps, seqB.MBps(), seqR.MBps(), goal{atLeast: 1.3})
	add("  the same with --direct-io=off (page cache) vs rclone", seqC, seqR, mbps, mbps, seqC.MBps(), seqR.MBps(), goal{})
	add("  client CPU per GiB, blobseal vs rclone", seqB, seqR, cpu, cpu, seqB.perGiB(seqB.ClientCPU), seqR.perGiB(seqR.ClientCPU), goal{atMost: 0.5})
	add("  Azurite CPU per GiB, blobseal vs rclone", seqB, seqR, az, az, seqB.perGiB(seqB.AzuriteCPU), seqR.perGiB(seqR.AzuriteCPU), goal{})

	for _, t := range []string{"1", "16"} {
		b, p := get("rand"+t+"/blobseal"), get("rand"+t+"/rclone")
		for _, m := range []*measurement{&b, &p} {
			if m.Latency == nil && m.Failed == "" {
				m.Failed = "no latency recorded"
			}
			if m.Latency == nil {
				m.Latency = &latencyStats{}
			}
		}
		p50 := func(m measurement) string { return fmt.Sprintf("%.2f ms", float64(m.Latency.P50.Microseconds())/1000) }
		p99 := func(m measurement) string { return fmt.Sprintf("%.2f ms", float64(m.Latency.P99.Microseconds())/1000) }
		iops := func(m measurement) string { return fmt.Sprintf("%.0f IOPS", m.Latency.IOPS) }
		add("random 4 KiB, "+t+" thread(s): p50 latency vs rclone", b, p, p50, p50,
			float64(b.Latency.P50), float64(p.Latency.P50), goal{})
		add("random 4 KiB, "+t+" thread(s): p99 latency vs rclone", b, p, p99, p99,
			float64(b.Latency.P99), float64(p.Latency.P99), goal{})
		add("random 4 KiB, "+t+" thread(s): IOPS vs rclone", b, p, iops, iops, b.Latency.IOPS, p.Latency.IOPS, goal{})
	}

	parB, parR := get("par16/blobseal"), get("par16/rclone")
	add("16 parallel readers: aggregate throughput vs rclone", parB, parR, mbps, mbps, parB.MBps(), parR.MBps(), goal{})
	bound := float64(h.cfg.CacheMiB<<20)*1.2 + rssOverhead
	mib := func(v float64) func(measurement) string {
		return func(measurement) string { return fmt.Sprintf("%.0f MiB", v/(1<<20)) }
	}
	add(fmt.Sprintf("16 parallel readers: blobseal peak RSS vs 1.2 × %d MiB cache + %d MiB", h.cfg.CacheMiB, rssOverhead>>20),
		parB, parB, mib(float64(parB.PeakRSS)), mib(bound), float64(parB.PeakRSS), bound, goal{atMost: 1})
	add("16 parallel readers: rclone peak RSS (for reference)", parR, parR, mib(float64(parR.PeakRSS)), mib(0), 0, 0, goal{})

	vOn, vOff := get("verity/on"), get("verity/off")
	add("seq read, verified mount vs unverified mount (same block blob, alternating)", vOn, vOff, mbps, mbps, vOn.MBps(), vOff.MBps(), goal{atLeast: 0.9})
	add("  client CPU per GiB, verified vs unverified", vOn, vOff, cpu, cpu, vOn.perGiB(vOn.ClientCPU), vOff.perGiB(vOff.ClientCPU), goal{})
	vaOn, vaOff := get("verity-azure/on"), get("verity-azure/off")
	add(h.azureLabel()+": seq read, verified mount vs unverified mount (alternating)", vaOn, vaOff, mbps, mbps, vaOn.MBps(), vaOff.MBps(), goal{atLeast: 0.9})
	add("  client CPU per GiB, verified vs unverified", vaOn, vaOff, cpu, cpu, vaOn.perGiB(vaOn.ClientCPU), vaOff.perGiB(vaOff.ClientCPU), goal{})

	kib := func(v float64) func(measurement) string {
		return func(measurement) string { return fmt.Sprintf("%.2f MiB", v/(1<<20)) }
	}
	for _, k := range []struct{ key, what string }{{"sparse", "page blob"}, {"sparse/block", "block blob"}} {
		sp := get(k.key)
		add(fmt.Sprintf("sparse 64 MiB image, %s, verified: bytes fetched to open and read all files, tree included (%d requests) vs 4 MiB", k.what, sp.Requests),
			sp, sp, kib(float64(sp.Bytes)), mib(4<<20), float64(sp.Bytes), 4<<20, goal{atMost: 1})
	}

	pRaw, pB, pR := get("proxy/raw/best"), get("proxy/seq/blobseal"), get("proxy/seq/rclone")
	lbl := fmt.Sprintf("+%v each way: ", h.cfg.Latency)
	add(lbl+"seq read, blobseal mount vs rclone crypt mount", pB, pR, mbps, mbps, pB.MBps(), pR.MBps(), goal{atLeast: 2})
	add(lbl+"  client CPU per GiB, blobseal vs rclone", pB, pR, cpu, cpu, pB.perGiB(pB.ClientCPU), pR.perGiB(pR.ClientCPU), goal{atMost: 0.5})
	add(lbl+"seq read, blobseal mount vs best raw SDK ("+pRaw.Label+")", pB, pRaw, mbps, mbps, pB.MBps(), pRaw.MBps(), goal{atLeast: 0.9})
	add(lbl+"  Azurite CPU per GiB, mount vs raw SDK", pB, pRaw, az, az, pB.perGiB(pB.AzuriteCPU), pRaw.perGiB(pRaw.AzuriteCPU), goal{})
	pC := get("proxy/seq/blobseal/pagecache")
	add(lbl+"  the same with --direct-io=off (page cache) vs rclone", pC, pR, mbps, mbps, pC.MBps(), pR.MBps(), goal{})
	h.peerRows(add)
	return r
}

// addFn adds one row: figure, ours, the peer's, and the goal for ours ÷ peer.
type addFn func(fig string, a, b measurement, va, vb func(measurement) string, ra, rb float64, g goal)

// write prints the report as Markdown.
func (r *report) write(w io.Writer) error {
	bw := bufio.NewWriter(w)
	fmt.Fprintln(bw, "## blobseal end-to-end benchmark")
	fmt.Fprintln(bw)
	for _, l := range r.Header {
		fmt.Fprintf(bw, "- %s\n", l)
	}
	fmt.Fprintln(bw)
	fmt.Fprintln(bw, "| figure | blobseal | peer | ratio | goal | met? |")
	fmt.Fprintln(bw, "|---|---|---|---|---|---|")
	for _, x := range r.Rows {
		fmt.Fprintf(bw, "| %s | %s | %s | %s | %s | %s |\n", x.Figure, x.Blobseal, x.Peer, x.Ratio, x.Goal, x.Met)
	}
	fmt.Fprintln(bw)
	fmt.Fprintln(bw, "### every measurement (cold: page cache dropped, fresh mount per read)")
	fmt.Fprintln(bw)
	fmt.Fprintln(bw, "| case | MB/s | client CPU s/GiB | Azurite CPU s/GiB | requests | peak RSS | latency | command |")
	fmt.Fprintln(bw, "|---|---|---|---|---|---|---|---|")
	for _, m := range r.Details {
		if strings.HasSuffix(m.Key, "/best") && m.Key != "raw/page/best" {
			continue // duplicate of a sweep entry
		}
		mb, cpu, az, req, rss, lat := "—", "—", "—", "—", "—", "—"
		switch {
		case m.Failed != "":
			lat = "FAILED: " + strings.NewReplacer("|", "/", "\n", "; ").Replace(m.Failed)
		case strings.HasPrefix(m.Key, "sparse"):
			mb = fmt.Sprintf("%.2f MiB fetched", float64(m.Bytes)/(1<<20))
		case m.Latency != nil:
			lat = fmt.Sprintf("p50 %.2f ms, p99 %.2f ms, %.0f IOPS, %d reads", float64(m.Latency.P50.Microseconds())/1000,
				float64(m.Latency.P99.Microseconds())/1000, m.Latency.IOPS, m.Latency.Reads)
			cpu = fmt.Sprintf("%.2f s total", m.ClientCPU.Seconds())
			az = fmt.Sprintf("%.2f s total", m.AzuriteCPU.Seconds())
		default:
			mb = fmt.Sprintf("%.1f", m.MBps())
			cpu = fmt.Sprintf("%.2f", m.perGiB(m.ClientCPU))
			az = fmt.Sprintf("%.2f (main thread %.2f)", m.perGiB(m.AzuriteCPU), m.perGiB(m.AzuriteMainCPU))
		}
		if m.Requests > 0 {
			req = fmt.Sprint(m.Requests)
		}
		if len(m.Runs) > 1 {
			runs := make([]string, len(m.Runs))
			for i, v := range m.Runs {
				runs[i] = fmt.Sprintf("%.0f", v)
			}
			mb += " (median of " + strings.Join(runs, ", ") + ")"
		}
		if m.PeakRSS > 0 {
			rss = fmt.Sprintf("%d MiB", m.PeakRSS>>20)
		}
		fmt.Fprintf(bw, "| %s | %s | %s | %s | %s | %s | %s | `%s` |\n", m.Label, mb, cpu, az, req, rss, lat, m.Cmd)
	}
	fmt.Fprintln(bw)
	fmt.Fprintln(bw, "### setup")
	fmt.Fprintln(bw)
	for _, s := range r.Setup {
		fmt.Fprintf(bw, "- `%s`\n", s)
	}
	if len(r.Warnings) > 0 {
		fmt.Fprintln(bw)
		fmt.Fprintln(bw, "### warnings")
		fmt.Fprintln(bw)
		for _, s := range r.Warnings {
			fmt.Fprintf(bw, "- %s\n", s)
		}
	}
	return bw.Flush()
}

// machine describes the host: CPUs, CPU model, memory.
func machine() string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	mem := "unknown memory"
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "MemTotal:"); ok {
				var kb int64
				fmt.Sscan(strings.TrimSpace(v), &kb)
				mem = fmt.Sprintf("%.1f GiB RAM", float64(kb)/(1<<20))
			}
		}
	}
	return fmt.Sprintf("%d CPUs (%s), %s, %s/%s", runtime.NumCPU(), model, mem, runtime.GOOS, runtime.GOARCH)
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
