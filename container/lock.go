package container

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/rund-dev/rund/internal/flock"
)

// lock takes the container's lock, which every mutating verb holds.
func lock(ctx context.Context, root, id string) (*flock.Lock, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	dir := dirOf(root, id)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", id, ErrNotExist)
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	l, err := flock.Acquire(ctx, filepath.Join(dir, "lock"))
	if err != nil {
		if _, serr := os.Stat(dir); errors.Is(serr, fs.ErrNotExist) {
			return nil, fmt.Errorf("%s: %w", id, ErrNotExist)
		}
		return nil, err
	}
	return l, nil
}
