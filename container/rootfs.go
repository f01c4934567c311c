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
// shimapi.WritableFd and shimapi.ImageFd.
func prepareRootfs(ctx context.Context, cfg config.Config, s *specs.Spec, st *State, l *shimapi.Launch, share shareFunc) ([]*os.File, error) {
	switch m := rootfsModeOf(cfg, s); m {
	case "split":
	case "shared":
		// runc's semantics: the container's root is the bundle's rootfs
		// itself, writes land on the host.
		tag, fsType, err := share(st.Rootfs, s.Root != nil && s.Root.Readonly)
		if err != nil {
			return nil, fmt.Errorf("shared rootfs: %w", err)
		}
		l.Create.Root.SharedTag, l.Create.Root.SharedType = tag, fsType
		return nil, nil
	default:
		return nil, fmt.Errorf("annotation %s: unknown rootfs mode %q (want split or shared)", AnnotationRootfs, m)
	}
	cache, err := rootfs.OpenImageCache(filepath.Join(cfg.DataDir, "images"), int64(cfg.ImageCacheMiB)<<20)
	if err != nil {
		return nil, err
	}
	img, err := cache.Get(ctx, st.Rootfs)
	if err != nil {
		return nil, fmt.Errorf("preparing read-only image of %s: %w", st.Rootfs, err)
	}
	// The image stays held (never evicted) while the VMM has this file open.
	imgFile := img.File()
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
	l.RootImage, l.RootImageSize = img.Path, img.Size
	l.HasWritable = true
	if l.PmemSize > 0 && img.Size < l.PmemSize {
		// virtio-pmem maps exactly the template's region size: pad the
		// cached image (sparse; its content is unchanged).
		if err := os.Truncate(img.Path, l.PmemSize); err != nil {
			rw.Close()
			imgFile.Close()
			return nil, fmt.Errorf("padding image %s for virtio-pmem: %w", img.Path, err)
		}
	}
	return []*os.File{rw, imgFile}, nil
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
