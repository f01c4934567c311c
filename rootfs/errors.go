package rootfs

import "errors"

// ErrNotExist is returned by [ImageCache.Open] when no image has the key.
var ErrNotExist = errors.New("image not in cache")

// ErrReleased is returned when an [Image] is used after [Image.Release].
var ErrReleased = errors.New("image released")
