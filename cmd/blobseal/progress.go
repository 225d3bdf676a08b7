package main

import (
	"io"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// progress shows a byte progress bar on stderr while long work runs (image
// create, upload). It draws only when stderr is a terminal, so logs, CI
// output and pipes stay clean.
type progress struct {
	w     io.Writer // nil: off
	label string
	bar   *progressbar.ProgressBar
}

func newProgress(w io.Writer, label string) *progress {
	if !isTerminal(w) {
		return &progress{}
	}
	return &progress{w: w, label: label}
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// update reports done of total bytes; it is called from one goroutine at a time.
func (p *progress) update(done, total int64) {
	if p.w == nil || total <= 0 {
		return
	}
	if p.bar == nil {
		p.bar = progressbar.NewOptions64(total,
			progressbar.OptionSetWriter(p.w),
			progressbar.OptionSetDescription(p.label),
			progressbar.OptionShowBytes(true),
			progressbar.OptionSetWidth(30),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionClearOnFinish(),
		)
	}
	_ = p.bar.Set64(done) // a failed redraw of a terminal is not worth failing the work
}

// finish clears the bar, whether or not the work completed.
func (p *progress) finish() {
	if p.bar != nil {
		_ = p.bar.Exit()
	}
}
