package qemu

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rund-dev/rund/vm"
)

// TestMeasure prints cold boot and restore latencies and the memory of idle
// clones under several QEMU settings. It asserts nothing about them and runs
// only when RUND_QEMU_MEASURE names how many clones to run at once:
//
//	RUND_QEMU_MEASURE=4 go test -run TestMeasure -v ./vm/qemu/
func TestMeasure(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("RUND_QEMU_MEASURE"))
	if n <= 0 {
		t.Skip("set RUND_QEMU_MEASURE=<clones> to measure")
	}
	idle := 5 * time.Second
	g := newTestGuest(t)

	for _, fw := range []string{"", FirmwareSeaBIOS} {
		b := New(Options{Firmware: fw})
		var total time.Duration
		const runs = 3
		for range runs {
			total += coldBoot(t, g, b)
		}
		t.Logf("cold boot to channel, firmware %q: %v average of %d", b.Firmware(), total/runs, runs)
	}

	b := New(Options{})
	shm := shmDir(t)
	snap := t.TempDir()
	tmpl := buildTemplate(t, g, b, shm, snap)

	variants := []struct {
		name   string
		tb     int
		arenas int
		kernel bool
		thp    bool
	}{
		{"chosen: tb-size=32, no THP, no -kernel on clones", 32, 0, false, false},
		{"tb-size=8", 8, 0, false, false},
		{"tb-size=128", 128, 0, false, false},
		{"MALLOC_ARENA_MAX=2", 32, 2, false, false},
		{"THP allowed (host: madvise)", 32, 0, false, true},
		{"-kernel/-initrd on clones too", 32, 0, true, false},
	}
	for _, v := range variants {
		mallocArenaMax, cloneLoadsKernel, disableTHP = v.arenas, v.kernel, !v.thp
		measureClones(t, b, tmpl, snap, n, v.tb, idle, v.name)
	}
	mallocArenaMax, cloneLoadsKernel, disableTHP = 0, false, true
}

func coldBoot(t *testing.T, g *testGuest, b *Backend) time.Duration {
	t.Helper()
	cfg := g.config(t.TempDir())
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	start := time.Now()
	m, err := b.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Shutdown(ctx)
	ch := dialGuest(t, m)
	if got := ch.line(); got != "ready" {
		t.Fatalf("got %q, want ready", got)
	}
	return time.Since(start)
}

func measureClones(t *testing.T, b *Backend, tmpl vm.Config, snap string, n, tb int, idle time.Duration, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	var restore, channel time.Duration
	var machines []vm.Machine
	defer func() {
		for _, m := range machines {
			m.Shutdown(ctx)
		}
	}()
	for i := range n {
		cfg := cloneConfig(t, tmpl, fmt.Sprintf("clone-%d", i))
		cfg.TBSizeMiB = tb
		start := time.Now()
		m, err := b.Restore(ctx, cfg, snap)
		if err != nil {
			t.Fatalf("%s: restore: %v", name, err)
		}
		restore += time.Since(start)
		machines = append(machines, m)
		ch := dialGuest(t, m)
		if got := ch.call("ping"); got != "pong" {
			t.Fatalf("%s: ping: got %q", name, got)
		}
		channel += time.Since(start)
	}
	time.Sleep(idle) // let the clones settle into idling
	var sum map[string]int
	for _, m := range machines {
		r := smapsRollup(t, m.Pid())
		if sum == nil {
			sum = make(map[string]int)
		}
		for k, v := range r {
			sum[k] += v
		}
	}
	avg := func(k string) float64 { return float64(sum[k]) / float64(n) / 1024 }
	t.Logf("%s: restore %v, to channel %v (average of %d); per idle clone after %v: Pss %.1f MiB (anon %.1f, file %.1f, shmem %.1f), Private_Dirty %.1f MiB, Rss %.1f MiB",
		name, restore/time.Duration(n), channel/time.Duration(n), n, idle,
		avg("Pss"), avg("Pss_Anon"), avg("Pss_File"), avg("Pss_Shmem"), avg("Private_Dirty"), avg("Rss"))
}

// smapsRollup returns /proc/pid/smaps_rollup's fields, in KiB.
func smapsRollup(t *testing.T, pid int) map[string]int {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := make(map[string]int)
	s := bufio.NewScanner(f)
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), ":")
		if !ok {
			continue
		}
		fields := strings.Fields(v)
		if len(fields) == 2 && fields[1] == "kB" {
			n, _ := strconv.Atoi(fields[0])
			r[k] = n
		}
	}
	return r
}
