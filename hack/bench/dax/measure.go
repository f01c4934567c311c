package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// residentMiB is how much of a file is in the host page cache: mincore over
// a shared read-only mapping of the whole file.
func residentMiB(path string) (float64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	size := fi.Size()
	if size == 0 {
		return 0, nil
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return 0, fmt.Errorf("mmap %s: %w", path, err)
	}
	defer unix.Munmap(mem)
	ps := int64(os.Getpagesize())
	vec := make([]byte, (size+ps-1)/ps)
	// x/sys/unix has no Mincore on Linux; the raw call is simple.
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&mem[0])), uintptr(len(mem)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		return 0, fmt.Errorf("mincore %s: %w", path, e)
	}
	n := 0
	for _, v := range vec {
		if v&1 != 0 {
			n++
		}
	}
	return float64(int64(n)*ps) / (1 << 20), nil
}

// evict drops a file's clean, unmapped pages from the host page cache.
func evict(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return err
	}
	return unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
}

// leftovers lists live processes of this configuration: any naming its root
// or mem_dir on the command line (shims, VMMs), and the VMMs recorded in the
// state files if they still run.
func (m *mode) leftovers(vmms []int) []string {
	var out []string
	self := os.Getpid()
	seen := map[int]bool{}
	check := func(pid int) {
		if pid == self || seen[pid] || !alive(pid) {
			return
		}
		seen[pid] = true
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || len(b) == 0 {
			return
		}
		all := strings.ReplaceAll(strings.TrimRight(string(b), "\x00"), "\x00", " ")
		if strings.Contains(all, m.root) || strings.Contains(all, m.memDir) || strings.Contains(all, m.dataDir) {
			if len(all) > 120 {
				all = all[:120] + "..."
			}
			out = append(out, fmt.Sprintf("pid %d: %s", pid, all))
		}
	}
	for _, pid := range vmms {
		check(pid)
	}
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		if pid, err := strconv.Atoi(filepath.Base(d)); err == nil {
			check(pid)
		}
	}
	return out
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	return b[i+2] != 'Z' && b[i+2] != 'X'
}

func onTmpfs(dir string) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && st.Type == unix.TMPFS_MAGIC
}

func rundVersion(rund string) string {
	out, err := exec.Command(rund, "--version").Output()
	if err != nil {
		return "rund ?"
	}
	return strings.SplitN(strings.TrimSpace(string(out)), "\n", 2)[0]
}
