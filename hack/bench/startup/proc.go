package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rund-dev/rund/hack/bench/benchutil"
)

// clockTicks is USER_HZ, the unit of /proc/*/stat and /proc/stat times; it
// is 100 on every Linux architecture Go supports here.
const clockTicks = 100

// sandboxProcs is the host side of one sandbox: its shim and what the shim
// runs (the VMM).
type sandboxProcs struct {
	id    string
	shim  int
	procs []procInfo
}

type procInfo struct {
	pid      int
	role     string // "qemu", "shim" or "other"
	guestRAM string // the guest RAM backing file (qemu only)
}

func (s *sandboxProcs) pids() []int {
	var p []int
	for _, pi := range s.procs {
		p = append(p, pi.pid)
	}
	return p
}

// findSandbox asks rund for the container's pid (the shim's) and collects
// the shim's descendants from /proc.
func (e *env) findSandbox(ctx context.Context, id string) (*sandboxProcs, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, e.rund, e.rundArgs("state", id)...).Output()
	if err != nil {
		return nil, fmt.Errorf("rund state %s: %w", id, err)
	}
	var st struct {
		Pid    int    `json:"pid"`
		Status string `json:"status"`
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return nil, fmt.Errorf("rund state %s: %w", id, err)
	}
	if st.Pid <= 0 || st.Status != "running" {
		return nil, fmt.Errorf("sandbox %s: status %s pid %d", id, st.Status, st.Pid)
	}
	sb := &sandboxProcs{id: id, shim: st.Pid}
	for _, pid := range descendants(st.Pid) {
		pi := procInfo{pid: pid, role: "other"}
		args := cmdline(pid)
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		switch {
		case pid == st.Pid:
			pi.role = "shim"
		case strings.HasPrefix(filepath.Base(exe), "qemu-system"):
			pi.role = "qemu"
			pi.guestRAM = guestRAMPath(args)
		}
		sb.procs = append(sb.procs, pi)
	}
	return sb, nil
}

// descendants returns pid and every process below it.
func descendants(pid int) []int {
	out := []int{pid}
	for i := 0; i < len(out); i++ {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", out[i]))
		for _, t := range tasks {
			b, _ := os.ReadFile(t)
			for _, f := range strings.Fields(string(b)) {
				if c, err := strconv.Atoi(f); err == nil {
					out = append(out, c)
				}
			}
		}
	}
	return out
}

func cmdline(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return nil
	}
	return strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
}

// guestRAMPath finds the file behind the guest's RAM on a QEMU command line:
// the memory-backend-file whose id -machine memory-backend= names.
func guestRAMPath(args []string) string {
	backend := ""
	objects := map[string]string{} // id -> mem-path
	for i := 0; i+1 < len(args); i++ {
		switch args[i] {
		case "-machine":
			if v, ok := qemuOpts(args[i+1])["memory-backend"]; ok {
				backend = v
			}
		case "-object":
			o := qemuOpts(args[i+1])
			if o[""] == "memory-backend-file" {
				objects[o["id"]] = o["mem-path"]
			}
		}
	}
	return objects[backend]
}

// qemuOpts splits a QEMU option string (a,b=c,d=e,,f) into keys and values;
// the leading bare word is stored under "". A doubled comma is a comma.
func qemuOpts(s string) map[string]string {
	var parts []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			parts = append(parts, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	parts = append(parts, cur.String())
	m := map[string]string{}
	for i, p := range parts {
		k, v, ok := strings.Cut(p, "=")
		if !ok && i == 0 {
			m[""] = p
			continue
		}
		m[k] = v
	}
	return m
}

// breakdown is PSS in KiB by kind of mapping.
type breakdown struct {
	GuestRAMDirtyKiB  float64 `json:"guest_ram_dirty_kib"`  // pages copied on write since the restore (Anonymous of the RAM mapping)
	GuestRAMSharedKiB float64 `json:"guest_ram_shared_kib"` // PSS of template pages still shared (RAM mapping Pss - Anonymous)
	TCGKiB            float64 `json:"tcg_kib"`              // the translation cache (anonymous executable mapping)
	AnonKiB           float64 `json:"anon_kib"`             // heap, stacks, other anonymous memory
	FileKiB           float64 `json:"file_kib"`             // file-backed mappings (binaries, libraries)
	TotalKiB          float64 `json:"total_kib"`            // smaps_rollup Pss
	// For reference: what smaps says of the guest RAM mapping.
	GuestRAMRssKiB          float64 `json:"guest_ram_rss_kib,omitempty"`
	GuestRAMPrivateDirtyKiB float64 `json:"guest_ram_private_dirty_kib,omitempty"`
	FilePrivateDirtyKiB     float64 `json:"file_private_dirty_kib,omitempty"`
}

func (b *breakdown) add(o breakdown) {
	b.GuestRAMDirtyKiB += o.GuestRAMDirtyKiB
	b.GuestRAMSharedKiB += o.GuestRAMSharedKiB
	b.TCGKiB += o.TCGKiB
	b.AnonKiB += o.AnonKiB
	b.FileKiB += o.FileKiB
	b.TotalKiB += o.TotalKiB
	b.GuestRAMRssKiB += o.GuestRAMRssKiB
	b.GuestRAMPrivateDirtyKiB += o.GuestRAMPrivateDirtyKiB
	b.FilePrivateDirtyKiB += o.FilePrivateDirtyKiB
}

func (b breakdown) scale(f float64) breakdown {
	return breakdown{
		b.GuestRAMDirtyKiB * f, b.GuestRAMSharedKiB * f, b.TCGKiB * f, b.AnonKiB * f,
		b.FileKiB * f, b.TotalKiB * f, b.GuestRAMRssKiB * f, b.GuestRAMPrivateDirtyKiB * f,
		b.FilePrivateDirtyKiB * f,
	}
}

func (b breakdown) sumParts() float64 {
	return b.GuestRAMDirtyKiB + b.GuestRAMSharedKiB + b.TCGKiB + b.AnonKiB + b.FileKiB
}

// mapping is one /proc/PID/smaps entry (sizes in KiB).
type mapping struct {
	perms, path                   string
	size, rss, pss, anon, privDir float64
}

func readSmaps(pid int) ([]mapping, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var maps []mapping
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if !strings.HasSuffix(fields[0], ":") {
			// A mapping header: addr perms offset dev inode [path].
			m := mapping{}
			if len(fields) >= 2 {
				m.perms = fields[1]
			}
			if len(fields) >= 6 {
				m.path = strings.Join(fields[5:], " ")
			}
			maps = append(maps, m)
			continue
		}
		if len(maps) == 0 || len(fields) < 2 {
			continue
		}
		v, err := strconv.ParseFloat(fields[1], 64)
		if err != nil {
			continue
		}
		m := &maps[len(maps)-1]
		switch fields[0] {
		case "Size:":
			m.size = v
		case "Rss:":
			m.rss = v
		case "Pss:":
			m.pss = v
		case "Anonymous:":
			m.anon = v
		case "Private_Dirty:":
			m.privDir = v
		}
	}
	return maps, sc.Err()
}

// rollupPss is the process's total PSS in KiB.
func rollupPss(pid int) (float64, error) {
	v, err := benchutil.PssMiB(pid)
	return v * 1024, err
}

// classify splits a process's PSS by kind of mapping.
func classify(p procInfo) (breakdown, error) {
	var b breakdown
	maps, err := readSmaps(p.pid)
	if err != nil {
		return b, err
	}
	for _, m := range maps {
		anonymous := m.path == "" || strings.HasPrefix(m.path, "[") || strings.HasPrefix(m.path, "/memfd:")
		switch {
		case p.guestRAM != "" && (m.path == p.guestRAM || m.path == p.guestRAM+" (deleted)"):
			b.GuestRAMDirtyKiB += m.anon
			b.GuestRAMSharedKiB += max(m.pss-m.anon, 0)
			b.GuestRAMRssKiB += m.rss
			b.GuestRAMPrivateDirtyKiB += m.privDir
		case p.role == "qemu" && (strings.Contains(m.path, "tcg-jit") ||
			(m.path == "" && strings.Contains(m.perms, "x"))):
			b.TCGKiB += m.pss
		case anonymous:
			b.AnonKiB += m.pss
		default:
			b.FileKiB += m.pss
			b.FilePrivateDirtyKiB += m.privDir
		}
	}
	b.TotalKiB, err = rollupPss(p.pid)
	return b, err
}

// procTicks is the process's user+system CPU time in clock ticks.
func procTicks(pid int) (uint64, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(s[i+1:])
	// After the comm: state(0) ... utime(11) stime(12).
	if len(f) < 13 {
		return 0, false
	}
	u, _ := strconv.ParseUint(f[11], 10, 64)
	st, _ := strconv.ParseUint(f[12], 10, 64)
	return u + st, true
}

func procAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] != 'Z' && s[i+2] != 'X'
}

// idleInfo records how the idle wait went.
type idleInfo struct {
	Reached          bool    `json:"reached"`
	WaitedS          float64 `json:"waited_s"`
	CPUPerSandbox    float64 `json:"cpu_cores_per_sandbox"` // over the last window
	PssChangePercent float64 `json:"pss_change_percent"`    // over the last window
	Rule             string  `json:"rule"`
}

// waitIdle waits until the sandboxes' total PSS is stable (under 0.5%
// change) and their CPU use low (under 5% of a core each) over two
// consecutive 3-second windows, or the timeout passes.
func waitIdle(ctx context.Context, sbs []*sandboxProcs, timeout time.Duration) idleInfo {
	const window = 3 * time.Second
	info := idleInfo{Rule: "two consecutive 3 s windows with total PSS change < 0.5% and CPU < 0.05 cores per sandbox"}
	sample := func() (ticks uint64, pss float64) {
		for _, sb := range sbs {
			for _, p := range sb.procs {
				t, _ := procTicks(p.pid)
				ticks += t
				v, _ := rollupPss(p.pid)
				pss += v
			}
		}
		return
	}
	t0 := time.Now()
	ticks, pss := sample()
	last := time.Now()
	calm := 0
	for time.Since(t0) < timeout && ctx.Err() == nil {
		select {
		case <-ctx.Done():
		case <-time.After(window):
		}
		t2, p2 := sample()
		now := time.Now()
		dt := now.Sub(last).Seconds()
		info.CPUPerSandbox = float64(t2-ticks) / clockTicks / dt / float64(len(sbs))
		if pss > 0 {
			info.PssChangePercent = 100 * (p2 - pss) / pss
		}
		ticks, pss, last = t2, p2, now
		if info.CPUPerSandbox < 0.05 && info.PssChangePercent < 0.5 && info.PssChangePercent > -0.5 {
			calm++
		} else {
			calm = 0
		}
		fmt.Printf("memory: idle wait %.0fs: cpu %.3f cores/sandbox, pss change %+.2f%%\n", time.Since(t0).Seconds(), info.CPUPerSandbox, info.PssChangePercent)
		if calm >= 2 {
			info.Reached = true
			break
		}
	}
	info.WaitedS = time.Since(t0).Seconds()
	return info
}

// measure fills rep's per-sandbox memory figures.
func measure(sbs []*sandboxProcs, rep *memReport, memDir string) error {
	var total, qemu, shim, other breakdown
	var errs []string
	for _, sb := range sbs {
		var one breakdown
		for _, p := range sb.procs {
			b, err := classify(p)
			if err != nil {
				errs = append(errs, fmt.Sprintf("%s pid %d: %v", sb.id, p.pid, err))
				continue
			}
			one.add(b)
			switch p.role {
			case "qemu":
				qemu.add(b)
			case "shim":
				shim.add(b)
			default:
				other.add(b)
			}
		}
		total.add(one)
		rep.PerSandboxPssMiB = append(rep.PerSandboxPssMiB, one.TotalKiB/1024)
	}
	n := float64(len(sbs))
	rep.Measured = len(sbs)
	rep.Avg = total.scale(1 / n)
	rep.AvgQEMU = qemu.scale(1 / n)
	rep.AvgShim = shim.scale(1 / n)
	if other.TotalKiB > 0 {
		o := other.scale(1 / n)
		rep.AvgOther = &o
	}
	rep.AvgPssMiB = rep.Avg.TotalKiB / 1024
	rep.UnclassifiedKiB = rep.Avg.TotalKiB - rep.Avg.sumParts()
	rep.MinPssMiB, rep.MaxPssMiB = percentile(rep.PerSandboxPssMiB, 0), percentile(rep.PerSandboxPssMiB, 100)
	if len(sbs) > 0 && len(sbs[0].procs) > 0 {
		for _, p := range sbs[0].procs {
			if p.role == "qemu" {
				rep.GuestRAMFile = p.guestRAM
				rep.QEMUCmdline = strings.Join(cmdline(p.pid), " ")
			}
		}
	}
	// The template's memory file lives in tmpfs once per host; the PSS above
	// already charges each clone its share of the pages it maps.
	if rep.GuestRAMFile != "" {
		rep.TemplateMemFileMiB = fileMiB(rep.GuestRAMFile)
	} else if memDir != "" {
		rep.TemplateMemFileMiB = dirMiB(memDir)
	}
	if len(errs) > 0 {
		return fmt.Errorf("reading smaps: %s", strings.Join(errs, "; "))
	}
	return nil
}

// fileMiB is the memory a file occupies (allocated blocks), in MiB.
func fileMiB(p string) float64 {
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		return 0
	}
	return float64(st.Blocks) * 512 / (1 << 20)
}

func dirMiB(d string) float64 {
	var sum float64
	filepath.Walk(d, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			sum += fileMiB(p)
		}
		return nil
	})
	return sum
}

// leftovers lists live processes that belong to this benchmark's sandboxes:
// shims and VMMs whose command lines name our rund root or mem dir.
func (e *env) leftovers() []string {
	var out []string
	self := os.Getpid()
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		pid, err := strconv.Atoi(filepath.Base(d))
		if err != nil || pid == self || !procAlive(pid) {
			continue
		}
		args := cmdline(pid)
		if len(args) == 0 {
			continue
		}
		all := strings.Join(args, " ")
		if strings.Contains(all, e.rundRoot) || (e.memDir != "" && strings.Contains(all, e.memDir)) {
			out = append(out, fmt.Sprintf("pid %d: %s", pid, tail(all, 120)))
		}
	}
	return out
}

// procCount is a host-wide count of rund's kinds of processes (everyone's).
type procCount struct {
	QEMU int `json:"qemu"`
	Shim int `json:"rund_shim"`
}

func countProcs() procCount {
	var c procCount
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		pid, err := strconv.Atoi(filepath.Base(d))
		if err != nil || !procAlive(pid) {
			continue
		}
		args := cmdline(pid)
		if len(args) == 0 {
			continue
		}
		switch {
		case strings.HasPrefix(filepath.Base(args[0]), "qemu-system"):
			c.QEMU++
		case args[0] == "rund-shim":
			c.Shim++
		}
	}
	return c
}

func memAvailableMiB() float64 {
	return benchutil.MeminfoFileMiB("/proc/meminfo", "MemAvailable")
}

// cpuStat is the host's aggregate /proc/stat cpu line, in ticks.
type cpuStat struct{ busy, total uint64 }

func readCPUStat() cpuStat {
	busy, total := benchutil.CPUTicks()
	return cpuStat{busy, total}
}

// hostCPU is the whole host's CPU use over an interval (everyone's).
type hostCPU struct {
	BusySeconds      float64 `json:"busy_seconds"`
	AvailableSeconds float64 `json:"available_seconds"`
}

func (s cpuStat) since(a cpuStat) hostCPU {
	return hostCPU{float64(s.busy-a.busy) / clockTicks, float64(s.total-a.total) / clockTicks}
}

type hostDesc struct {
	CPUs        int     `json:"cpus"`
	Kernel      string  `json:"kernel"`
	MemTotalMiB float64 `json:"mem_total_mib"`
	RundVersion string  `json:"rund_version"`
	RuncVersion string  `json:"runc_version"`
	QEMUVersion string  `json:"qemu_version"`
	KVM         string  `json:"kvm"`
}

func hostInfo(o options) hostDesc {
	first := func(name string, args ...string) string {
		out, err := exec.Command(name, args...).Output()
		if err != nil {
			return ""
		}
		l, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		return strings.TrimSpace(l)
	}
	h := hostDesc{
		CPUs:        runtime.NumCPU(),
		Kernel:      first("uname", "-r"),
		MemTotalMiB: benchutil.MeminfoFileMiB("/proc/meminfo", "MemTotal"),
		RundVersion: strings.TrimPrefix(first(o.rund, "--version"), "rund version "),
		RuncVersion: strings.TrimPrefix(first(o.runc, "--version"), "runc version "),
		QEMUVersion: first("qemu-system-x86_64", "--version"),
		KVM:         "absent",
	}
	if _, err := os.Stat("/dev/kvm"); err == nil {
		h.KVM = "present"
		if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
			h.KVM = "present (kvm_pvm: stock guests need TCG)"
		}
	}
	return h
}
