package container

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/rund-dev/rund/internal/shimapi"
)

// OCIState is the runtime-spec state document, with runc's extra keys.
type OCIState struct {
	OCIVersion  string            `json:"ociVersion"`
	ID          string            `json:"id"`
	Status      Status            `json:"status"`
	Pid         int               `json:"pid"`
	Bundle      string            `json:"bundle"`
	Rootfs      string            `json:"rootfs"`
	Created     time.Time         `json:"created"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Owner       string            `json:"owner"`
}

// OCIVersion is the runtime-spec version rund reports.
const OCIVersion = "1.2.0"

// Query returns the state of id as the runtime-spec describes it.
func Query(root, id string) (*OCIState, error) {
	st, err := Load(root, id)
	if err != nil {
		return nil, err
	}
	return st.oci(), nil
}

func (st *State) oci() *OCIState {
	s := st.Refresh()
	out := &OCIState{
		OCIVersion: OCIVersion, ID: st.ID, Status: s, Bundle: st.Bundle,
		Rootfs: st.Rootfs, Created: st.Created, Annotations: st.Annotations, Owner: "",
	}
	if s != Stopped {
		out.Pid = st.Shim.Pid
	}
	return out
}

// List returns the state of every container under root, by id.
func List(root string) ([]*OCIState, error) {
	ents, err := os.ReadDir(root)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("listing %s: %w", root, err)
	}
	var out []*OCIState
	for _, e := range ents {
		if !e.IsDir() || ValidateID(e.Name()) != nil {
			continue
		}
		st, err := Load(root, e.Name())
		if err != nil {
			continue
		}
		out = append(out, st.oci())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// Pause freezes the container's processes; Resume thaws them.
func Pause(ctx context.Context, root, id string) error {
	return setPaused(ctx, root, id, true)
}

// Resume thaws a paused container.
func Resume(ctx context.Context, root, id string) error {
	return setPaused(ctx, root, id, false)
}

func setPaused(ctx context.Context, root, id string, pause bool) error {
	l, err := lock(ctx, root, id)
	if err != nil {
		return err
	}
	defer l.Release()
	st, err := Load(root, id)
	if err != nil {
		return err
	}
	s := st.Refresh()
	op, want, next := shimapi.OpPause, Running, Paused
	if !pause {
		op, want, next = shimapi.OpResume, Paused, Running
	}
	if s != want {
		if s == Stopped {
			return fmt.Errorf("%s: %w", id, ErrNotRunning)
		}
		return fmt.Errorf("container %s is %s, not %s", id, s, want)
	}
	if _, err := callShim(ctx, root, id, shimapi.Request{Op: op}); err != nil {
		return fmt.Errorf("%s of %s: %w", op, id, err)
	}
	st.Status = next
	return st.saveLocked(root)
}

// Pids returns the host pids standing for the container's processes (the
// shim) and the guest pids reported by the agent.
func Pids(ctx context.Context, root, id string) (host []int, guest []int, err error) {
	st, err := Load(root, id)
	if err != nil {
		return nil, nil, err
	}
	if st.Refresh() == Stopped {
		return nil, nil, nil
	}
	resp, err := callShim(ctx, root, id, shimapi.Request{Op: shimapi.OpPs})
	if err != nil {
		return nil, nil, err
	}
	return []int{st.Shim.Pid}, resp.Pids, nil
}
