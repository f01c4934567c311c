package main

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"time"

	"github.com/rund-dev/rund/hack/bench/benchutil"
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
	if err := benchutil.BusyboxRootfs(b.rootfs, busybox); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(b.rootfs, "data"), 0o755); err != nil {
		return nil, err
	}
	if err := writeRandom(filepath.Join(b.rootfs, "data", "blob"), int64(blobMiB)<<20); err != nil {
		return nil, err
	}
	for dir, script := range map[string]string{b.reader: readerScript, b.baseline: baselineScript} {
		if err := benchutil.Bundle(rund, dir, b.rootfs, nil, "/bin/sh", "-c", script); err != nil {
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
