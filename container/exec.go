package container

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/rund-dev/rund/internal/shimapi"
	"github.com/rund-dev/rund/internal/term"
	"github.com/rund-dev/rund/vm/agent/proto"
)

// ExecOptions are exec's flags.
type ExecOptions struct {
	Root          string
	ID            string
	ProcessFile   string   // --process
	Args          []string // command line, when no process file
	Detach        bool
	PidFile       string
	ConsoleSocket string
	Tty           bool
	Cwd           string
	Env           []string
	User          string // uid[:gid]
	AdditionalGID []int
	NoNewPrivs    bool
}

// Exec runs another process in a running container. This process (or, with
// Detach, a child re-executed as `rund exec --relay`) stands for it on the
// host: it relays stdio and signals and exits with the process's status.
func Exec(ctx context.Context, o ExecOptions) (int, error) {
	st, err := Load(o.Root, o.ID)
	if err != nil {
		return 0, err
	}
	switch st.Refresh() {
	case Running, Created:
	case Paused:
		return 0, fmt.Errorf("%s: %w", o.ID, ErrPaused)
	default:
		return 0, fmt.Errorf("%s: %w", o.ID, ErrNotRunning)
	}
	p, err := execProcess(st, o)
	if err != nil {
		return 0, err
	}
	if p.Terminal && o.ConsoleSocket != "" {
		slave, err := newConsole(o.ConsoleSocket)
		if err != nil {
			return 0, err
		}
		for _, fd := range []int{0, 1, 2} {
			unix.Dup2(int(slave.Fd()), fd)
		}
		slave.Close()
	}
	if o.Detach {
		return 0, detachExec(o, p)
	}
	return relayExec(ctx, o.Root, o.ID, p, nil)
}

// execProcess builds the process to run: from --process, or from the
// container's own process with the command line and flags applied.
func execProcess(st *State, o ExecOptions) (*proto.Process, error) {
	var sp specs.Process
	if o.ProcessFile != "" {
		b, err := os.ReadFile(o.ProcessFile)
		if err != nil {
			return nil, fmt.Errorf("reading process %s: %w", o.ProcessFile, err)
		}
		if err := json.Unmarshal(b, &sp); err != nil {
			return nil, fmt.Errorf("parsing process %s: %w", o.ProcessFile, err)
		}
	} else {
		spec, _, err := loadSpec(st.Bundle)
		if err != nil {
			return nil, err
		}
		sp = *spec.Process
		sp.Args = o.Args
		sp.Terminal = o.Tty
		sp.Env = append(sp.Env, o.Env...)
		if o.Cwd != "" {
			sp.Cwd = o.Cwd
		}
		if o.NoNewPrivs {
			sp.NoNewPrivileges = true
		}
		if o.User != "" {
			u, g, _ := strings.Cut(o.User, ":")
			uid, err := strconv.ParseUint(u, 10, 32)
			if err != nil {
				return nil, fmt.Errorf("invalid --user %q", o.User)
			}
			sp.User.UID = uint32(uid)
			if g != "" {
				gid, err := strconv.ParseUint(g, 10, 32)
				if err != nil {
					return nil, fmt.Errorf("invalid --user %q", o.User)
				}
				sp.User.GID = uint32(gid)
			}
		}
		for _, g := range o.AdditionalGID {
			sp.User.AdditionalGids = append(sp.User.AdditionalGids, uint32(g))
		}
	}
	if len(sp.Args) == 0 {
		return nil, errors.New("exec: process args are empty")
	}
	if sp.Cwd == "" {
		sp.Cwd = "/"
	}
	p := toProcess(&sp)
	return &p, nil
}

// detachExec re-executes rund as the exec'd process's host stand-in, waits
// until the process runs, and writes the stand-in's pid to the pid file.
func detachExec(o ExecOptions, p *proto.Process) error {
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("finding rund executable: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("creating sync pipe: %w", err)
	}
	defer r.Close()
	cmd := exec.Command(exe, "--root", o.Root, "exec-relay", o.ID)
	cmd.Args[0] = "rund-exec"
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{w}
	cmd.Env = append(os.Environ(), "RUND_EXEC_PROCESS="+string(b))
	// Its own session; with a console, the pty slave (now fd 0) becomes its
	// controlling terminal, so it receives SIGWINCH.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if p.Terminal && o.ConsoleSocket != "" {
		cmd.SysProcAttr.Setctty, cmd.SysProcAttr.Ctty = true, 0
	}
	if err := cmd.Start(); err != nil {
		w.Close()
		return fmt.Errorf("starting exec relay: %w", err)
	}
	w.Close()
	pid := cmd.Process.Pid
	cmd.Process.Release()
	msg, _ := io.ReadAll(r)
	if len(msg) == 0 || string(msg) != "ok" {
		syscall.Kill(pid, syscall.SIGKILL)
		if len(msg) == 0 {
			return errors.New("exec relay exited before the process started")
		}
		return errors.New(string(msg))
	}
	if o.PidFile != "" {
		return writePidFile(o.PidFile, pid)
	}
	return nil
}

// ExecRelay is the body of the detached stand-in (`rund exec-relay`).
func ExecRelay(ctx context.Context, root, id string) (int, error) {
	var p proto.Process
	if err := json.Unmarshal([]byte(os.Getenv("RUND_EXEC_PROCESS")), &p); err != nil {
		return 0, fmt.Errorf("decoding exec process: %w", err)
	}
	os.Unsetenv("RUND_EXEC_PROCESS")
	return relayExec(ctx, root, id, &p, os.NewFile(3, "sync"))
}

// relayExec asks the shim to exec p and relays it until it exits. sync, if
// set, receives "ok" or the error once the process runs.
func relayExec(ctx context.Context, root, id string, p *proto.Process, sync *os.File) (int, error) {
	report := func(msg string) {
		if sync != nil {
			sync.Write([]byte(msg))
			sync.Close()
			sync = nil
		}
	}
	c, err := dialShim(ctx, root, id)
	if err != nil {
		report(err.Error())
		return 0, err
	}
	defer c.Close()
	if p.Terminal {
		if rows, cols := term.Size(0); rows > 0 {
			p.Rows, p.Cols = rows, cols
		}
	}
	_, br, err := roundTrip(c, shimapi.Request{Op: shimapi.OpExec, Process: p})
	if err != nil {
		report(err.Error())
		return 0, fmt.Errorf("exec in %s: %w", id, err)
	}
	report("ok")
	w := proto.NewWriter(c)
	if p.Terminal {
		if restore := term.MakeRaw(0); restore != nil {
			defer restore()
		}
	}
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs)
	defer signal.Stop(sigs)
	go func() {
		for s := range sigs {
			ss := s.(syscall.Signal)
			switch ss {
			case syscall.SIGCHLD, syscall.SIGPIPE, syscall.SIGURG:
			case syscall.SIGWINCH:
				rows, cols := term.Size(0)
				w.WriteJSON(proto.KindResize, 0, 0, proto.ResizeRequest{Rows: rows, Cols: cols})
			default:
				w.WriteJSON(proto.KindSignal, 0, 0, proto.SignalRequest{Signal: int(ss)})
			}
		}
	}()
	go func() {
		buf := make([]byte, 32<<10)
		for {
			n, err := os.Stdin.Read(buf)
			if n > 0 {
				if w.WriteData(proto.KindStdin, 0, buf[:n]) != nil {
					return
				}
			}
			if err != nil {
				w.Write(proto.Frame{Kind: proto.KindCloseStdin})
				return
			}
		}
	}()
	fr := proto.NewReader(br)
	for {
		f, err := fr.Read()
		if err != nil {
			return 255, fmt.Errorf("exec in %s: connection to shim lost: %w", id, err)
		}
		switch f.Kind {
		case proto.KindStdout:
			os.Stdout.Write(f.Payload)
		case proto.KindStderr:
			os.Stderr.Write(f.Payload)
		case proto.KindExit:
			var em proto.ExitMessage
			if err := f.Decode(&em); err != nil {
				return 255, err
			}
			return em.Status, nil
		}
	}
}
