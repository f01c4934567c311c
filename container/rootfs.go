package container

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"

	"github.com/rund-dev/rund/internal/config"
	"github.com/rund-dev/rund/internal/shimapi"
	"github.com/rund-dev/rund/rootfs"
)

// prepareRootfs builds the container's root layers and records them in l:
// the read-only EROFS image of the bundle's rootfs (from the image cache)
// and a fresh writable layer, a reflink copy of a pre-formatted ext4 disk,
// already unlinked. It returns the files the shim inherits, in the order of
// shimapi.WritableFd and shimapi.ImageFd. In "shared" mode the root is the
// bundle's rootfs shared over 9p; the devices the template carries then get
// a writable layer all the same (bounded like any other) and a sparse
// read-only placeholder for the image, which the guest never mounts.
func prepareRootfs(ctx context.Context, cfg config.Config, s *specs.Spec, st *State, l *shimapi.Launch, share shareFunc) ([]*os.File, error) {
	var imgPath string
	var imgSize int64
	var imgFile *os.File
	switch m := rootfsModeOf(cfg, s); m {
	case "split":
		cache, err := rootfs.OpenImageCache(filepath.Join(cfg.DataDir, "images"), int64(cfg.ImageCacheMiB)<<20)
		if err != nil {
			return nil, err
		}
		img, err := cache.Get(ctx, st.Rootfs)
		if err != nil {
			return nil, fmt.Errorf("preparing read-only image of %s: %w", st.Rootfs, err)
		}
		// The image stays held (never evicted) while the VMM has this
		// file open.
		imgPath, imgSize, imgFile = img.Path, img.Size, img.File()
	case "shared":
		// runc's semantics: the container's root is the bundle's rootfs
		// itself, writes land on the host.
		tag, fsType, err := share(st.Rootfs, s.Root != nil && s.Root.Readonly)
		if err != nil {
			return nil, fmt.Errorf("shared rootfs: %w", err)
		}
		l.Create.Root.SharedTag, l.Create.Root.SharedType = tag, fsType
		if imgPath, imgFile, err = imagePlaceholder(cfg.DataDir, l.PmemSize); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("annotation %s: unknown rootfs mode %q (want split or shared)", AnnotationRootfs, m)
	}
	wdir := filepath.Join(cfg.DataDir, "writable")
	ws, err := rootfs.OpenWritableStore(ctx, wdir, l.WritableSize, rootfs.WritableOptions{Logf: warnOnce(wdir)})
	if err != nil {
		imgFile.Close()
		return nil, err
	}
	defer ws.Close()
	rw, err := ws.New()
	if err != nil {
		imgFile.Close()
		return nil, fmt.Errorf("creating writable layer: %w", err)
	}
	l.RootImage, l.RootImageSize = imgPath, imgSize
	l.HasWritable = true
	if l.PmemSize > 0 && imgSize < l.PmemSize {
		// virtio-pmem maps exactly the template's region size: pad the
		// cached image (sparse; its content is unchanged).
		if err := os.Truncate(imgPath, l.PmemSize); err != nil {
			rw.Close()
			imgFile.Close()
			return nil, fmt.Errorf("padding image %s for virtio-pmem: %w", imgPath, err)
		}
	}
	return []*os.File{rw, imgFile}, nil
}

// imagePlaceholder returns (making it once) an empty, sparse, read-only
// file standing for the image device of a shared-root sandbox, of the
// virtio-pmem region's size (1 MiB when the image is on virtio-blk).
func imagePlaceholder(dataDir string, pmemSize int64) (string, *os.File, error) {
	size := max(pmemSize, 1<<20)
	p := filepath.Join(dataDir, "placeholders", fmt.Sprintf("image-%d", size))
	if _, err := os.Stat(p); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			return "", nil, fmt.Errorf("image placeholder: %w", err)
		}
		tmp, err := os.CreateTemp(filepath.Dir(p), ".image-*")
		if err != nil {
			return "", nil, fmt.Errorf("image placeholder: %w", err)
		}
		err = tmp.Truncate(size)
		if cerr := tmp.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			err = os.Chmod(tmp.Name(), 0o400)
		}
		if err == nil {
			err = os.Rename(tmp.Name(), p)
		}
		if err != nil {
			os.Remove(tmp.Name())
			return "", nil, fmt.Errorf("image placeholder: %w", err)
		}
	}
	f, err := os.Open(p)
	if err != nil {
		return "", nil, fmt.Errorf("image placeholder: %w", err)
	}
	return p, f, nil
}

// warnOnce logs the writable store's copy-fallback warning once per data
// directory, not once per create.
func warnOnce(dir string) func(string, ...any) {
	return func(format string, args ...any) {
		marker := filepath.Join(dir, ".copy-fallback-warned")
		if _, err := os.Stat(marker); errors.Is(err, fs.ErrNotExist) {
			logrus.Warnf(format, args...)
			os.WriteFile(marker, nil, 0o600)
		}
	}
}
