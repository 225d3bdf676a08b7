// Package progress renders transfer progress for the CLI: a bar redrawn in
// place on a terminal, and a plain line every few seconds otherwise (logs,
// CI), so that piped output stays readable.
package progress

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// IsTerminal reports whether f is a terminal.
func IsTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// Printer writes progress reports. Update must be called from one goroutine.
type Printer struct {
	w        io.Writer
	label    string
	tty      bool
	interval time.Duration // between plain lines
	now      func() time.Time

	start, last time.Time
	lastDone    int64
	finished    bool
}

// New returns a Printer. On a terminal it redraws one line; otherwise it
// prints a line every interval (5s when zero) and one when done reaches total.
func New(w io.Writer, label string, tty bool, interval time.Duration) *Printer {
	if interval <= 0 {
		interval = 5 * time.Second
	}
	return &Printer{w: w, label: label, tty: tty, interval: interval, now: time.Now}
}

// Update reports done of total bytes.
func (p *Printer) Update(done, total int64) {
	now := p.now()
	if p.start.IsZero() {
		p.start, p.last = now, now
	}
	if p.finished {
		return
	}
	complete := total > 0 && done >= total
	if p.tty {
		fmt.Fprintf(p.w, "\r%s %s %s", p.label, bar(done, total, 30), p.stats(done, total, now))
		if complete {
			fmt.Fprintln(p.w)
			p.finished = true
		}
		return
	}
	if complete || now.Sub(p.last) >= p.interval {
		fmt.Fprintf(p.w, "%s %s\n", p.label, p.stats(done, total, now))
		p.last, p.lastDone = now, done
		p.finished = complete
	}
}

func (p *Printer) stats(done, total int64, now time.Time) string {
	pct := 100.0
	if total > 0 {
		pct = 100 * float64(done) / float64(total)
	}
	rate := 0.0
	if el := now.Sub(p.start).Seconds(); el > 0 {
		rate = float64(done) / 1e6 / el
	}
	return fmt.Sprintf("%5.1f%% %s / %s  %.1f MB/s", pct, mib(done), mib(total), rate)
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

func bar(done, total int64, width int) string {
	fill := width
	if total > 0 {
		fill = int(int64(width) * min(done, total) / total)
	}
	return "[" + strings.Repeat("#", fill) + strings.Repeat(".", width-fill) + "]"
}
