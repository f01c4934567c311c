// Package shim is the per-container host process behind the hidden
// `rund shim` verb. It owns the VMM process, relays the container's stdio
// and signals to the guest agent, serves the CLI's control requests on a
// unix socket, and exits with the container's exit status — so that conmon,
// which waits on the pid create reported, sees the container's lifetime.
package shim

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/rund-dev/rund/internal/shimapi"
	"github.com/rund-dev/rund/vm"
	"github.com/rund-dev/rund/vm/agent/client"
	"github.com/rund-dev/rund/vm/agent/proto"
)

// shim is one container's host process.
type shim struct {
	launch  shimapi.Launch
	vmDir   string
	machine vm.Machine
	agent   *client.Client
	// execs counts exec'd processes; stream ids follow the init stream.
	execs  atomic.Uint32
	exited chan int
}

// Main runs the shim for container id under root and returns its exit
// status: the container's (128+N for signal N).
func Main(root, id string) int {
	dir := filepath.Join(root, id)
	logf, err := os.OpenFile(filepath.Join(dir, shimapi.ShimLogFile), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err == nil {
		logrus.SetOutput(logf)
	}
	sync := os.NewFile(shimapi.SyncFd, "sync")
	s := &shim{exited: make(chan int, 1)}
	status, err := s.run(dir, sync)
	if err != nil {
		logrus.Errorf("shim %s: %v", id, err)
		if sync != nil {
			writeReady(sync, shimapi.Ready{Error: err.Error()})
		}
		return 255
	}
	return status
}

func writeReady(f *os.File, r shimapi.Ready) {
	b, _ := json.Marshal(r)
	f.Write(b)
	f.Close()
}

func (s *shim) run(dir string, sync *os.File) (int, error) {
	b, err := os.ReadFile(filepath.Join(dir, shimapi.LaunchFile))
	if err != nil {
		return 0, fmt.Errorf("reading launch: %w", err)
	}
	if err := json.Unmarshal(b, &s.launch); err != nil {
		return 0, fmt.Errorf("decoding launch: %w", err)
	}
	l := &s.launch
	s.vmDir = l.VMDir
	if l.Debug {
		logrus.SetLevel(logrus.DebugLevel)
	}
	if err := os.MkdirAll(s.vmDir, 0o700); err != nil {
		return 0, fmt.Errorf("creating vm directory: %w", err)
	}
	// Forward signals from the start: conmon relays TERM/INT/QUIT to us.
	sigs := make(chan os.Signal, 32)
	signal.Notify(sigs)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	t0 := time.Now()
	m, ready, err := s.boot(ctx)
	if err != nil {
		return 0, err
	}
	s.machine = m
	ok := false
	defer func() {
		if !ok {
			s.stopVM()
		}
	}()
	if err := joinCgroups(l.CgroupProcs, m.Pid(), os.Getpid()); err != nil {
		return 0, err
	}
	logrus.Debugf("sandbox %s: vm up after %s", l.ID, time.Since(t0))
	conn, err := m.Dial(ctx)
	if err != nil {
		return 0, fmt.Errorf("connecting to the guest agent: %w", err)
	}
	s.agent = client.New(conn, client.WithLogs(func(m string) { logrus.Debugf("agent: %s", m) }))
	if err := s.hello(ctx); err != nil {
		return 0, err
	}
	logrus.Debugf("sandbox %s: agent ready %s after start (template %q)", l.ID, time.Since(t0), ready.Template)
	stdio, restore, err := s.stdio()
	if err != nil {
		return 0, err
	}
	defer restore()
	if _, err := s.agent.Create(ctx, l.Create, stdio); err != nil {
		return 0, fmt.Errorf("creating container in the guest: %w", err)
	}
	logrus.Debugf("sandbox %s: container created after %s", l.ID, time.Since(t0))
	ln, err := net.Listen("unix", filepath.Join(s.vmDir, shimapi.SocketFile))
	if err != nil {
		return 0, fmt.Errorf("listening on control socket: %w", err)
	}
	defer ln.Close()
	go s.serve(ln)
	go s.waitInit()
	go s.watchVMM()
	ready.VMMPid = m.Pid()
	writeReady(sync, ready)
	ok = true
	status := s.loop(sigs)
	os.WriteFile(filepath.Join(dir, shimapi.ExitFile), []byte(strconv.Itoa(status)), 0o600)
	s.stopVM()
	return status, nil
}

// hello gives the guest its identity: clock and fresh entropy.
func (s *shim) hello(ctx context.Context) error {
	seed := make([]byte, 64)
	if _, err := rand.Read(seed); err != nil {
		return fmt.Errorf("reading entropy: %w", err)
	}
	h := proto.Hello{Version: proto.Version, TimeUnixNano: time.Now().UnixNano(), Seed: seed, Hostname: s.launch.Create.Hostname}
	if err := s.agent.Hello(ctx, h); err != nil {
		return fmt.Errorf("greeting the guest agent: %w", err)
	}
	return nil
}

// waitInit reports the init process's exit status.
func (s *shim) waitInit() {
	status, err := s.agent.Wait(context.Background(), proto.InitStream)
	if err != nil {
		logrus.Warnf("waiting for the container process: %v", err)
		status = 255
	}
	s.exited <- status
}

// watchVMM turns a VMM that dies under us into a container exit.
func (s *shim) watchVMM() {
	err := s.machine.Wait()
	logrus.Debugf("vmm exited: %v", err)
	// Let a clean exit's status win the race.
	time.Sleep(100 * time.Millisecond)
	select {
	case s.exited <- 128 + int(syscall.SIGKILL):
	default:
	}
}

// loop forwards signals until the container exits, and returns its status.
func (s *shim) loop(sigs chan os.Signal) int {
	for {
		select {
		case st := <-s.exited:
			return st
		case sig := <-sigs:
			ss, ok := sig.(syscall.Signal)
			if !ok {
				continue
			}
			switch ss {
			case syscall.SIGCHLD, syscall.SIGPIPE, syscall.SIGURG:
			case syscall.SIGWINCH:
				s.resize()
			default:
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				if err := s.agent.Signal(ctx, proto.InitStream, int(ss), false); err != nil {
					logrus.Debugf("forwarding %v: %v", ss, err)
				}
				cancel()
			}
		}
	}
}

// stopVM ends the VMM: the sandbox keeps nothing worth a graceful shutdown.
func (s *shim) stopVM() {
	if s.machine == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := s.machine.Shutdown(ctx); err != nil && !errors.Is(err, vm.ErrExited) {
		logrus.Debugf("stopping vmm: %v", err)
	}
	os.RemoveAll(s.vmDir)
}

// joinCgroups moves the given pids into each cgroup.procs file.
func joinCgroups(procs []string, pids ...int) error {
	for _, p := range procs {
		for _, pid := range pids {
			if err := os.WriteFile(p, []byte(strconv.Itoa(pid)), 0o644); err != nil {
				return fmt.Errorf("joining cgroup %s: %w", filepath.Dir(p), err)
			}
		}
	}
	return nil
}
