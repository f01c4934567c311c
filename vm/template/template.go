// Package template stores microVM snapshot templates: one VM booted once,
// warmed, paused and saved, from which every sandbox is restored as a
// copy-on-write clone. It owns the on-disk layout, the key that says which
// template fits a sandbox, the versioned and checksummed manifest, and the
// lock that makes concurrent creates wait for one build instead of building
// twice. Booting and snapshotting the VM is the caller's BuildFunc.
package template

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/rund-dev/rund/internal/atomicfile"
	"github.com/rund-dev/rund/internal/flock"
)

// Errors.
var (
	// ErrNotFound means no template exists for a key.
	ErrNotFound = errors.New("template not found")
	// ErrCorrupt means a template's files do not match its manifest.
	ErrCorrupt = errors.New("template corrupt")
)

const (
	manifestMagic   = "rund-template"
	manifestVersion = 1
	manifestFile    = "manifest.json"
)

// FileID identifies a file's version cheaply: path, size and modification
// time. A rebuilt kernel or initramfs changes it.
type FileID struct {
	Path    string `json:"path"`
	Size    int64  `json:"size"`
	ModTime int64  `json:"mtime"`
}

// IdentifyFile returns path's FileID.
func IdentifyFile(path string) (FileID, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return FileID{}, fmt.Errorf("identifying %s: %w", path, err)
	}
	return FileID{Path: path, Size: fi.Size(), ModTime: fi.ModTime().UnixNano()}, nil
}

// Key is everything that shapes a template. Two sandboxes whose keys are
// equal can be clones of the same template.
type Key struct {
	Backend        string   `json:"backend"`
	BackendVersion string   `json:"backendVersion"`
	Kernel         FileID   `json:"kernel"`
	Initrd         FileID   `json:"initrd"` // holds the agent: the rund binary
	Cmdline        string   `json:"cmdline"`
	VCPUs          int      `json:"vcpus"`
	MemoryMiB      int      `json:"memoryMiB"`
	Accel          string   `json:"accel"`
	TBSizeMiB      int      `json:"tbSizeMiB"`
	Devices        []string `json:"devices"` // device layout, e.g. "disk:rootro:ro:17179869184"
}

// ID is the key's hash, naming the template on disk.
func (k Key) ID() string {
	b, _ := json.Marshal(k)
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])[:16]
}

// Manifest describes a saved template.
type Manifest struct {
	Magic   string            `json:"magic"`
	Version int               `json:"version"`
	ID      string            `json:"id"`
	Key     Key               `json:"key"`
	Created time.Time         `json:"created"`
	MemPath string            `json:"memPath"`
	MemSize int64             `json:"memSize"`
	Files   map[string]string `json:"files"` // snapshot file name → sha256
	// BuildSeconds is how long the build took (boot, warm-up, snapshot).
	BuildSeconds float64 `json:"buildSeconds"`
	Checksum     string  `json:"checksum"` // sha256 of the manifest with this field empty
}

func (m *Manifest) sum() string {
	c := *m
	c.Checksum = ""
	b, _ := json.Marshal(c)
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// Template is a ready template.
type Template struct {
	Dir      string // the snapshot files, as the backend wrote them
	Manifest Manifest
}

// Store is a directory of templates; guest memory files live in MemDir
// (tmpfs, so clones map them from the page cache).
type Store struct {
	Dir    string
	MemDir string
}

// BuildFunc boots a template VM whose RAM is the (shared) file memPath,
// warms it, pauses it and saves its device state into dir.
type BuildFunc func(ctx context.Context, memPath, dir string) error

// Get returns the valid template for key.
func (s *Store) Get(key Key) (*Template, error) {
	dir := filepath.Join(s.Dir, key.ID())
	m, err := readManifest(dir)
	if err != nil {
		return nil, err
	}
	if m.Key.ID() != key.ID() {
		return nil, fmt.Errorf("template %s: key mismatch: %w", key.ID(), ErrCorrupt)
	}
	t := &Template{Dir: dir, Manifest: *m}
	if err := t.Verify(); err != nil {
		return nil, err
	}
	return t, nil
}

// Ensure returns the template for key, building it with build when there is
// none or the one there is corrupt. Concurrent callers wait for a single
// build. built reports whether this call built it.
func (s *Store) Ensure(ctx context.Context, key Key, build BuildFunc) (t *Template, built bool, err error) {
	if t, err := s.Get(key); err == nil {
		return t, false, nil
	}
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return nil, false, fmt.Errorf("creating template store: %w", err)
	}
	lk, err := flock.Acquire(ctx, filepath.Join(s.Dir, key.ID()+".lock"))
	if err != nil {
		return nil, false, fmt.Errorf("waiting for template build: %w", err)
	}
	defer lk.Release()
	// Someone may have built it while we waited.
	if t, err := s.Get(key); err == nil {
		return t, false, nil
	}
	t, err = s.buildLocked(ctx, key, build)
	if err != nil {
		return nil, false, err
	}
	s.pruneStale(ctx, key)
	return t, true, nil
}

// pruneStale removes templates made from an older version of the same
// kernel or initramfs file: they can never be used again.
func (s *Store) pruneStale(ctx context.Context, key Key) {
	all, err := s.List()
	if err != nil {
		return
	}
	for _, m := range all {
		k := m.Key
		if m.ID == key.ID() || k.Kernel.Path != key.Kernel.Path || k.Initrd.Path != key.Initrd.Path {
			continue
		}
		if k.Kernel != key.Kernel || k.Initrd != key.Initrd {
			s.Remove(ctx, m.ID)
		}
	}
}

// buildLocked builds the template for key, replacing any stale one.
//
// Preconditions: the key's build lock is held.
func (s *Store) buildLocked(ctx context.Context, key Key, build BuildFunc) (*Template, error) {
	id := key.ID()
	final := filepath.Join(s.Dir, id)
	s.removeDir(final)
	tmp, err := os.MkdirTemp(s.Dir, "."+id+".build*")
	if err != nil {
		return nil, fmt.Errorf("building template %s: %w", id, err)
	}
	defer os.RemoveAll(tmp)
	memDir, err := os.MkdirTemp(s.MemDir, id+".")
	if err != nil {
		if err := os.MkdirAll(s.MemDir, 0o700); err != nil {
			return nil, fmt.Errorf("creating memory directory %s: %w", s.MemDir, err)
		}
		if memDir, err = os.MkdirTemp(s.MemDir, id+"."); err != nil {
			return nil, fmt.Errorf("building template %s: %w", id, err)
		}
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(memDir)
		}
	}()
	memPath := filepath.Join(memDir, "mem")
	start := time.Now()
	if err := build(ctx, memPath, tmp); err != nil {
		return nil, fmt.Errorf("building template %s: %w", id, err)
	}
	fi, err := os.Stat(memPath)
	if err != nil {
		return nil, fmt.Errorf("building template %s: memory file: %w", id, err)
	}
	m := Manifest{
		Magic: manifestMagic, Version: manifestVersion, ID: id, Key: key,
		Created: time.Now().UTC(), MemPath: memPath, MemSize: fi.Size(),
		Files: map[string]string{}, BuildSeconds: time.Since(start).Seconds(),
	}
	ents, err := os.ReadDir(tmp)
	if err != nil {
		return nil, fmt.Errorf("building template %s: %w", id, err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		sum, err := fileSum(filepath.Join(tmp, e.Name()))
		if err != nil {
			return nil, err
		}
		m.Files[e.Name()] = sum
	}
	m.Checksum = m.sum()
	b, _ := json.MarshalIndent(&m, "", "  ")
	if err := atomicfile.Write(filepath.Join(tmp, manifestFile), b, 0o600); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp, final); err != nil {
		return nil, fmt.Errorf("installing template %s: %w", id, err)
	}
	ok = true
	return &Template{Dir: final, Manifest: m}, nil
}

// Verify checks the template's files against its manifest: the memory file
// and every snapshot file, by size and checksum.
func (t *Template) Verify() error {
	m := &t.Manifest
	if m.Magic != manifestMagic || m.Version != manifestVersion {
		return fmt.Errorf("template %s: manifest version %q/%d: %w", m.ID, m.Magic, m.Version, ErrCorrupt)
	}
	if m.Checksum != m.sum() {
		return fmt.Errorf("template %s: manifest checksum: %w", m.ID, ErrCorrupt)
	}
	fi, err := os.Stat(m.MemPath)
	if err != nil || fi.Size() != m.MemSize {
		return fmt.Errorf("template %s: memory file %s missing or resized: %w", m.ID, m.MemPath, ErrCorrupt)
	}
	for name, want := range m.Files {
		got, err := fileSum(filepath.Join(t.Dir, name))
		if err != nil || got != want {
			return fmt.Errorf("template %s: %s does not match its checksum: %w", m.ID, name, ErrCorrupt)
		}
	}
	return nil
}

// List returns the manifests of every template in the store.
func (s *Store) List() ([]Manifest, error) {
	ents, err := os.ReadDir(s.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listing templates: %w", err)
	}
	var out []Manifest
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		m, err := readManifest(filepath.Join(s.Dir, e.Name()))
		if err != nil {
			out = append(out, Manifest{ID: e.Name()})
			continue
		}
		out = append(out, *m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out, nil
}

// Remove deletes a template. Sandboxes restored from it keep running: they
// map its memory file privately, and an unlinked file lives on while mapped.
func (s *Store) Remove(ctx context.Context, id string) error {
	dir := filepath.Join(s.Dir, id)
	if _, err := os.Stat(dir); err != nil {
		return fmt.Errorf("template %s: %w", id, ErrNotFound)
	}
	lk, err := flock.Acquire(ctx, filepath.Join(s.Dir, id+".lock"))
	if err != nil {
		return err
	}
	defer lk.Release()
	s.removeDir(dir)
	os.Remove(filepath.Join(s.Dir, id+".lock"))
	return nil
}

// removeDir removes a template directory and its memory file.
func (s *Store) removeDir(dir string) {
	if m, err := readManifest(dir); err == nil && m.MemPath != "" && strings.HasPrefix(m.MemPath, s.MemDir) {
		os.RemoveAll(filepath.Dir(m.MemPath))
	}
	os.RemoveAll(dir)
}

func readManifest(dir string) (*Manifest, error) {
	b, err := os.ReadFile(filepath.Join(dir, manifestFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", dir, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("reading template manifest: %w", err)
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("template %s: manifest: %w", filepath.Base(dir), ErrCorrupt)
	}
	return &m, nil
}

func fileSum(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("checksumming %s: %w", path, err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("checksumming %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
