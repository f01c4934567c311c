package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// bundles are the two bundle dirs; both name one rootfs, so both sandboxes
// of a configuration share one image.
type bundles struct {
	rootfs   string
	reader   string // reads /data/blob once
	baseline string // reads nothing
}

// The guest side: save /proc/meminfo, (read the blob,) save it again, mark
// done, idle. Everything the process writes is a few KiB on the writable
// layer.
const (
	readerScript   = "cat /proc/meminfo > /tmp/m0; cat /data/blob > /dev/null; cat /proc/meminfo > /tmp/m1; echo ok > /tmp/done; exec sleep 100000"
	baselineScript = "cat /proc/meminfo > /tmp/m0; cat /proc/meminfo > /tmp/m1; echo ok > /tmp/done; exec sleep 100000"
)

// makeBundles builds a busybox rootfs holding blobMiB of random bytes in
// /data/blob and the two bundles (config.json from `rund spec`).
func makeBundles(top, rund, busybox string, blobMiB int) (*bundles, error) {
	b := &bundles{
		rootfs:   filepath.Join(top, "rootfs"),
		reader:   filepath.Join(top, "bundle-reader"),
		baseline: filepath.Join(top, "bundle-baseline"),
	}
	for _, d := range []string{"bin", "proc", "sys", "dev", "tmp", "etc", "root", "data"} {
		if err := os.MkdirAll(filepath.Join(b.rootfs, d), 0o755); err != nil {
			return nil, err
		}
	}
	src, err := os.ReadFile(busybox)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(b.rootfs, "bin", "busybox"), src, 0o755); err != nil {
		return nil, err
	}
	list, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("busybox --list: %w", err)
	}
	for _, a := range strings.Fields(string(list)) {
		if a == "busybox" || strings.Contains(a, "/") {
			continue
		}
		if err := os.Symlink("busybox", filepath.Join(b.rootfs, "bin", a)); err != nil && !errors.Is(err, os.ErrExist) {
			return nil, err
		}
	}
	if err := writeRandom(filepath.Join(b.rootfs, "data", "blob"), int64(blobMiB)<<20); err != nil {
		return nil, err
	}

	spec := filepath.Join(top, "spec")
	if err := os.MkdirAll(spec, 0o755); err != nil {
		return nil, err
	}
	if out, err := exec.Command(rund, "spec", "-b", spec).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("rund spec: %v: %s", err, out)
	}
	raw, err := os.ReadFile(filepath.Join(spec, "config.json"))
	if err != nil {
		return nil, err
	}
	for dir, script := range map[string]string{b.reader: readerScript, b.baseline: baselineScript} {
		var s map[string]any
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, fmt.Errorf("rund spec output: %w", err)
		}
		proc, _ := s["process"].(map[string]any)
		root, _ := s["root"].(map[string]any)
		if proc == nil || root == nil {
			return nil, errors.New("rund spec output has no process or root")
		}
		proc["terminal"] = false
		proc["args"] = []string{"/bin/sh", "-c", script}
		root["path"] = b.rootfs
		root["readonly"] = false
		out, err := json.MarshalIndent(s, "", "  ")
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(dir, "config.json"), out, 0o644); err != nil {
			return nil, err
		}
	}
	return b, nil
}

// writeRandom writes n incompressible bytes (a fresh seed per run, so no
// earlier run's image is ever reused).
func writeRandom(path string, n int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	seed := [32]byte{}
	t := uint64(time.Now().UnixNano())
	for i := range 8 {
		seed[i] = byte(t >> (8 * i))
	}
	r := rand.NewChaCha8(seed)
	buf := make([]byte, 1<<20)
	for left := n; left > 0; left -= int64(len(buf)) {
		r.Read(buf)
		chunk := buf
		if left < int64(len(chunk)) {
			chunk = chunk[:left]
		}
		if _, err := f.Write(chunk); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}
