package rootfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"
)

// flockCtx takes a flock of kind how (unix.LOCK_SH or unix.LOCK_EX) on f,
// waiting until it is granted or ctx ends. On error f is closed (if ctx ends
// first, by the waiting goroutine once the lock comes), so f must not be used
// after an error.
func flockCtx(ctx context.Context, f *os.File, how int) error {
	if err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB); err == nil {
		return nil
	} else if !errors.Is(err, unix.EWOULDBLOCK) {
		f.Close()
		return fmt.Errorf("flock %s: %w", f.Name(), err)
	}
	done := make(chan error, 1)
	go func() {
		done <- flockRetry(int(f.Fd()), how)
	}()
	select {
	case err := <-done:
		if err != nil {
			f.Close()
			return fmt.Errorf("flock %s: %w", f.Name(), err)
		}
		return nil
	case <-ctx.Done():
		go func() {
			<-done
			f.Close()
		}()
		return fmt.Errorf("waiting for lock on %s: %w", f.Name(), ctx.Err())
	}
}

func flockRetry(fd, how int) error {
	for {
		err := unix.Flock(fd, how)
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// tryLock takes a flock of kind how on f without waiting and reports whether
// it got it.
func tryLock(f *os.File, how int) (bool, error) {
	err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.EWOULDBLOCK):
		return false, nil
	default:
		return false, fmt.Errorf("flock %s: %w", f.Name(), err)
	}
}

// sameFile reports whether path still names the file open as f.
func sameFile(f *os.File, path string) (bool, error) {
	var a, b unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &a); err != nil {
		return false, fmt.Errorf("stat %s: %w", f.Name(), err)
	}
	if err := unix.Stat(path, &b); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, fmt.Errorf("stat %s: %w", path, err)
	}
	return a.Dev == b.Dev && a.Ino == b.Ino, nil
}

// lockPath opens path (creating it if create is set) and takes a flock of
// kind how on it. A file unlinked while the caller waited (by an evictor that
// held it exclusively) is not trusted: lockPath opens the path again. With
// create unset, a missing path is reported as an error wrapping
// fs.ErrNotExist.
func lockPath(ctx context.Context, path string, how int, create bool) (*os.File, error) {
	flags := os.O_RDONLY | unix.O_CLOEXEC
	if create {
		flags |= os.O_CREATE
	}
	for {
		f, err := os.OpenFile(path, flags, 0o644)
		if err != nil {
			return nil, fmt.Errorf("opening %s: %w", path, err)
		}
		if err := flockCtx(ctx, f, how); err != nil {
			return nil, err
		}
		ok, err := sameFile(f, path)
		if err != nil {
			f.Close()
			return nil, err
		}
		if ok {
			return f, nil
		}
		f.Close()
		if !create {
			return nil, fmt.Errorf("opening %s: %w", path, fs.ErrNotExist)
		}
	}
}
