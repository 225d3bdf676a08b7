package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of utime/stime in /proc/PID/stat. It is
// 100 on every Linux architecture Go supports.
const clockTicks = 100

// procCPU returns the user+system CPU time a process has used so far.
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("cpu of pid %d: %w", pid, err)
	}
	return parseStatCPU(b)
}

// parseStatCPU extracts utime+stime from a /proc/PID/stat line. The command
// name (field 2) may hold spaces and parentheses, so fields are counted
// from the last ')'.
func parseStatCPU(b []byte) (time.Duration, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("malformed /proc stat line: no ')'")
	}
	f := strings.Fields(string(b[i+1:]))
	// After ")" come fields 3 (state) onwards; utime is field 14, stime 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("malformed /proc stat line: %d fields after the name", len(f))
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("malformed /proc stat line: utime %q stime %q", f[11], f[12])
	}
	return time.Duration(ut+st) * time.Second / clockTicks, nil
}

// selfCPU is the CPU time of this process (user+system), for in-process clients.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// procPeakRSS returns VmHWM (peak resident set) of a process in bytes.
func procPeakRSS(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("rss of pid %d: %w", pid, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("rss of pid %d: bad VmHWM line %q", pid, line)
			}
			return kb << 10, nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("rss of pid %d: %w", pid, err)
	}
	return 0, fmt.Errorf("rss of pid %d: no VmHWM in /proc status", pid)
}

// cpuMeter measures the CPU used by a set of processes over an interval.
// A pid of 0 means this process (getrusage).
type cpuMeter struct {
	pids  []int
	start []time.Duration
}

func startCPU(pids ...int) (*cpuMeter, error) {
	m := &cpuMeter{pids: pids, start: make([]time.Duration, len(pids))}
	for i, p := range pids {
		d, err := cpuOf(p)
		if err != nil {
			return nil, err
		}
		m.start[i] = d
	}
	return m, nil
}

// stop returns the CPU each process used since startCPU, in order.
func (m *cpuMeter) stop() ([]time.Duration, error) {
	out := make([]time.Duration, len(m.pids))
	for i, p := range m.pids {
		d, err := cpuOf(p)
		if err != nil {
			return nil, err
		}
		out[i] = d - m.start[i]
	}
	return out, nil
}

// cpuOf returns the CPU used so far by process pid, by this process for
// pid 0, and by the main thread alone of process -pid for a negative pid.
func cpuOf(pid int) (time.Duration, error) {
	switch {
	case pid == 0:
		return selfCPU(), nil
	case pid < 0:
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/stat", -pid, -pid))
		if err != nil {
			return 0, fmt.Errorf("cpu of the main thread of pid %d: %w", -pid, err)
		}
		return parseStatCPU(b)
	}
	return procCPU(pid)
}

// dropCaches empties the kernel page cache so every read is cold (Azurite's
// extent files included). It needs root; the error says so.
func dropCaches() error {
	syscall.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		return fmt.Errorf("drop caches (needs root): %w", err)
	}
	return nil
}
