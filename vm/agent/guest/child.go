package guest

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/rund-dev/rund/vm/agent/proto"
	"golang.org/x/sys/unix"
)

// childSockFd is the helper child's end of the sync socket.
const childSockFd = 3

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// childMain is the helper child (a zygote until it is given a process): it
// tells the agent it is up, waits for its config and stdio, enters the
// container and drops privileges, tells the agent it is ready, waits to be
// released and execs the container's program. Credentials and the mount
// namespace are per thread in Linux: everything runs on one locked thread,
// which is the one that execs.
func childMain() {
	runtime.LockOSThread()
	// Inherited fds lose close-on-exec; the agent learns that exec happened
	// from this socket closing.
	unix.CloseOnExec(childSockFd)
	prepareChild()
	childSend(childMsg{Idle: true})
	cfg, err := receiveConfig()
	if err != nil {
		childFail(err, 1)
	}
	sp := newSteps()
	exe, err := setupChild(cfg, sp)
	if err != nil {
		childFail(err, 1)
	}
	childSend(childMsg{Ready: true, Info: sp.String()})
	var b [1]byte
	for {
		n, err := unix.Read(childSockFd, b[:])
		if err == unix.EINTR {
			continue
		}
		if n != 1 {
			os.Exit(1) // the agent gave up on us
		}
		break
	}
	env := cfg.Process.Env
	if env == nil {
		env = []string{}
	}
	if cfg.InitPid > 0 {
		forkExec(exe, cfg.Process, env)
	}
	err = unix.Exec(exe, cfg.Process.Args, env)
	childFail(fmt.Errorf("exec %s: %w", cfg.Process.Args[0], err), 127)
}

// prepareChild does, while the zygote is idle (in a template: before the
// snapshot), the one-time work its request would otherwise start with.
func prepareChild() {
	u := uint32(0o22)
	sample := childConfig{Root: "/", CapLast: lastKnownCap, Process: proto.Process{
		Args: []string{"true"}, Env: []string{"PATH=/bin"}, Cwd: "/", AdditionalGids: []uint32{0},
		Umask: &u, Rlimits: []proto.Rlimit{{Type: "RLIMIT_NOFILE", Hard: 1, Soft: 1}},
		Capabilities: &proto.Capabilities{Bounding: []string{"CAP_KILL"}, Effective: []string{"CAP_KILL"},
			Inheritable: []string{"CAP_KILL"}, Permitted: []string{"CAP_KILL"}, Ambient: []string{"CAP_KILL"}},
	}}
	if b, err := json.Marshal(sample); err == nil {
		_ = json.Unmarshal(b, &childConfig{})
	}
	_, _ = json.Marshal(childMsg{Ready: true})
	if os.Getpid() == 1 {
		stageOwnProc()
	}
}

// pidnsStage is where the helper of an init (then idle, in the agent's
// mount namespace; rootPid is its pid there) stages its namespace's proc.
func pidnsStage(rootPid int) string { return fmt.Sprintf("/rund-pidns-%d", rootPid) }

// rootPid is this process's pid in the agent's PID namespace (whose proc is
// /proc until the container root is entered).
func rootPid() int {
	s, _ := os.Readlink("/proc/self")
	n, _ := strconv.Atoi(s)
	return n
}

// stageOwnProc mounts, while the helper of an init is idle (in a template:
// before the snapshot), its namespace's proc with the usual masked and
// read-only paths, in a tmpfs of the agent's mount namespace. Its setup
// moves that proc into the root instead of mounting one (under TCG a clone
// runs the mount code afresh). Best effort: without it, setup mounts one.
func stageOwnProc() {
	dir := pidnsStage(rootPid())
	if err := os.Mkdir(dir, 0o700); err != nil {
		return
	}
	ok := false
	defer func() {
		if !ok {
			_ = unix.Unmount(dir, unix.MNT_DETACH)
			_ = os.Remove(dir)
		}
	}()
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0700"); err != nil {
		return
	}
	if err := os.Mkdir(dir+"/proc", 0o555); err != nil {
		return
	}
	if err := unix.Mount("proc", dir+"/proc", "proc", procFlags, ""); err != nil {
		return
	}
	rootfd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	defer unix.Close(rootfd)
	if applyProcPaths(rootfd, []string{"/proc"}, usualMasked, usualReadonly) != nil {
		return
	}
	ok = true
}

const procFlags = unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC

// moveStagedProc moves the proc staged by stageOwnProc onto the root's
// /proc when that is the root's only proc and its masked and read-only
// paths are the usual ones. The caller has its own mount namespace.
func moveStagedProc(root string, procs, masked, readonly []string) bool {
	if !slices.Equal(procs, []string{"/proc"}) ||
		!sameProcPaths(masked, usualMasked) || !sameProcPaths(readonly, usualReadonly) {
		return false
	}
	stage := pidnsStage(rootPid()) + "/proc"
	return unix.Mount(stage, root+"/proc", "", unix.MS_MOVE, "") == nil
}

// sameProcPaths reports whether a and b have the same paths under /proc.
func sameProcPaths(a, b []string) bool {
	f := func(l []string) []string {
		var out []string
		for _, p := range l {
			if isUnderAny(p, []string{"/proc"}) {
				out = append(out, path.Clean("/"+p))
			}
		}
		slices.Sort(out)
		return slices.Compact(out)
	}
	return slices.Equal(f(a), f(b))
}

func childSend(m childMsg) {
	b, _ := json.Marshal(m)
	b = append(b, '\n')
	for len(b) > 0 {
		n, err := unix.Write(childSockFd, b)
		if err != nil && err != unix.EINTR {
			return
		}
		if n > 0 {
			b = b[n:]
		}
	}
}

// forkExec starts an exec'd process in the container's PID namespace (this
// thread joined it: its children are born there) as the agent's child,
// reports its pid and exits. The process inherits this thread's
// credentials, root, namespaces and limits.
func forkExec(exe string, p proto.Process, env []string) {
	attr := &syscall.ProcAttr{
		Env:   env,
		Files: []uintptr{0, 1, 2},
		Sys:   &syscall.SysProcAttr{Setsid: true, Setctty: p.Terminal, Ctty: 0, Cloneflags: unix.CLONE_PARENT},
	}
	pid, err := syscall.ForkExec(exe, p.Args, attr)
	if err != nil {
		childFail(fmt.Errorf("exec %s: %w", p.Args[0], err), 127)
	}
	childSend(childMsg{Pid: pid})
	os.Exit(0)
}

func childFail(err error, status int) {
	childSend(childMsg{Error: err.Error()})
	os.Exit(status)
}

// setupChild does everything but exec, and returns the program to exec.
func setupChild(cfg childConfig, sp *steps) (string, error) {
	p := cfg.Process
	if p.Terminal && cfg.InitPid == 0 {
		// The helper leads its own session (setsid at fork): its terminal
		// becomes the session's controlling terminal.
		if err := unix.IoctlSetInt(0, unix.TIOCSCTTY, 1); err != nil {
			return "", fmt.Errorf("setting the controlling terminal: %w", err)
		}
	}
	// A spare helper started while the container runs was niced.
	_ = unix.Setpriority(unix.PRIO_PROCESS, 0, 0)
	if cfg.InitPid > 0 {
		if err := joinInit(cfg.InitPid); err != nil {
			return "", err
		}
		sp.mark("join")
	} else {
		if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
			return "", fmt.Errorf("unsharing the mount namespace: %w", err)
		}
		sp.mark("unshare")
		staged := moveStagedProc(cfg.Root, cfg.ProcMounts, cfg.Masked, cfg.Readonly)
		if staged {
			sp.mark("staged proc")
		}
		if err := enterRoot(cfg.Root); err != nil {
			return "", fmt.Errorf("entering the container root: %w", err)
		}
		sp.mark("root")
		if !staged {
			if err := mountOwnProc(cfg.ProcMounts, cfg.Masked, cfg.Readonly); err != nil {
				return "", err
			}
			sp.mark("proc")
		}
	}
	if err := setRlimits(p.Rlimits); err != nil {
		return "", err
	}
	if err := setCredentials(p, cfg.CapLast); err != nil {
		return "", err
	}
	umask := 0o022
	if p.Umask != nil {
		umask = int(*p.Umask)
	}
	unix.Umask(umask)
	cwd := p.Cwd
	if cwd == "" {
		cwd = "/"
	}
	if err := unix.Chdir(cwd); err != nil {
		return "", fmt.Errorf("chdir to cwd (%q) set in config.json: %w", cwd, err)
	}
	sp.mark("credentials")
	exe, err := lookPath(p.Args[0], p.Env)
	if err != nil {
		return "", err
	}
	sp.mark("path")
	if p.NoNewPrivileges {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return "", fmt.Errorf("setting no_new_privs: %w", err)
		}
	}
	return exe, nil
}

// joinInit enters the PID namespace (for the children of this thread) and
// the mount namespace and root of the container's init process.
func joinInit(pid int) error {
	dir := fmt.Sprintf("/proc/%d/", pid)
	var fds [3]int
	for i, name := range []string{"ns/pid", "ns/mnt", "root"} {
		flags := unix.O_RDONLY | unix.O_CLOEXEC
		if name == "root" {
			flags = unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC
		}
		fd, err := unix.Open(dir+name, flags, 0)
		if err != nil {
			return fmt.Errorf("joining the container's init (pid %d): %w", pid, err)
		}
		defer unix.Close(fd)
		fds[i] = fd
	}
	if err := unix.Setns(fds[0], unix.CLONE_NEWPID); err != nil {
		return fmt.Errorf("joining the container's PID namespace: %w", err)
	}
	// setns to a mount namespace wants a filesystem context of this thread
	// alone.
	if err := unix.Unshare(unix.CLONE_FS); err != nil {
		return fmt.Errorf("unsharing the filesystem context: %w", err)
	}
	if err := unix.Setns(fds[1], unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("joining the container's mount namespace: %w", err)
	}
	if err := unix.Fchdir(fds[2]); err != nil {
		return fmt.Errorf("entering the container root: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	return unix.Chdir("/")
}

// mountOwnProc mounts, over each proc filesystem in the container root (the
// agent mounted them at procs: they show the agent's PID namespace), a proc
// of this process's PID namespace, and applies the masked and read-only
// paths under it again. The caller is that namespace's PID 1.
func mountOwnProc(procs, masked, readonly []string) error {
	if len(procs) == 0 {
		return nil
	}
	rootfd, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening root: %w", err)
	}
	defer unix.Close(rootfd)
	for _, mp := range procs {
		// A masked or read-only path of the old proc is a mount under mp:
		// mounting over mp hides them with it.
		if err := unix.Mount("proc", mp, "proc", procFlags, ""); err != nil {
			return fmt.Errorf("mounting proc on %s: %w", mp, err)
		}
	}
	return applyProcPaths(rootfd, procs, masked, readonly)
}

// applyProcPaths applies the masked and read-only paths under the proc
// mounts procs, relative to rootfd.
func applyProcPaths(rootfd int, procs, masked, readonly []string) error {
	for _, p := range readonly {
		if isUnderAny(p, procs) {
			if err := readonlyPath(rootfd, p); err != nil {
				return fmt.Errorf("read-only path %s: %w", p, err)
			}
		}
	}
	for _, p := range masked {
		if isUnderAny(p, procs) {
			if err := maskPath(rootfd, p); err != nil {
				return fmt.Errorf("masked path %s: %w", p, err)
			}
		}
	}
	return nil
}

func isUnderAny(p string, dirs []string) bool {
	p = path.Clean("/" + p)
	for _, d := range dirs {
		if d != "/" && under(p, d) {
			return true
		}
	}
	return false
}

// enterRoot makes root the process's / in its own mount namespace (the
// helper was cloned with CLONE_NEWNS). The initramfs cannot be pivoted away
// from, so the root is moved over / and chrooted into, after detaching every
// mount that is not the container's.
func enterRoot(root string) error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making mounts private: %w", err)
	}
	var other []string
	for _, mp := range mountPoints() {
		if mp == "/" || mp == root || strings.HasPrefix(mp, root+"/") || strings.HasPrefix(root, mp+"/") {
			continue
		}
		other = append(other, mp)
	}
	sort.SliceStable(other, func(i, j int) bool { return len(other[i]) > len(other[j]) })
	for _, mp := range other {
		_ = unix.Unmount(mp, unix.MNT_DETACH)
	}
	if err := unix.Chdir(root); err != nil {
		return err
	}
	if err := unix.Mount(root, "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("moving the root: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	return unix.Chdir("/")
}

var rlimitTypes = map[string]int{
	"RLIMIT_CPU": unix.RLIMIT_CPU, "RLIMIT_FSIZE": unix.RLIMIT_FSIZE,
	"RLIMIT_DATA": unix.RLIMIT_DATA, "RLIMIT_STACK": unix.RLIMIT_STACK,
	"RLIMIT_CORE": unix.RLIMIT_CORE, "RLIMIT_RSS": unix.RLIMIT_RSS,
	"RLIMIT_NPROC": unix.RLIMIT_NPROC, "RLIMIT_NOFILE": unix.RLIMIT_NOFILE,
	"RLIMIT_MEMLOCK": unix.RLIMIT_MEMLOCK, "RLIMIT_AS": unix.RLIMIT_AS,
	"RLIMIT_LOCKS": unix.RLIMIT_LOCKS, "RLIMIT_SIGPENDING": unix.RLIMIT_SIGPENDING,
	"RLIMIT_MSGQUEUE": unix.RLIMIT_MSGQUEUE, "RLIMIT_NICE": unix.RLIMIT_NICE,
	"RLIMIT_RTPRIO": unix.RLIMIT_RTPRIO, "RLIMIT_RTTIME": unix.RLIMIT_RTTIME,
}

func setRlimits(limits []proto.Rlimit) error {
	for _, l := range limits {
		res, ok := rlimitTypes[l.Type]
		if !ok {
			return fmt.Errorf("unknown rlimit %q", l.Type)
		}
		// unix.Setrlimit also tells the Go runtime not to restore its own
		// RLIMIT_NOFILE at exec.
		if err := unix.Setrlimit(res, &unix.Rlimit{Cur: l.Soft, Max: l.Hard}); err != nil {
			return fmt.Errorf("setting %s: %w", l.Type, err)
		}
	}
	return nil
}

// setCredentials switches to the process's user and groups and sets its
// capabilities, on the current (locked) thread only.
func setCredentials(p proto.Process, last int) error {
	caps := p.Capabilities
	if caps != nil {
		if err := dropBounding(caps.Bounding, last); err != nil {
			return err
		}
		if p.UID != 0 {
			if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 1, 0, 0, 0); err != nil {
				return fmt.Errorf("setting keepcaps: %w", err)
			}
		}
	}
	if err := setgroupsThread(p.AdditionalGids); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, uintptr(p.GID), uintptr(p.GID), uintptr(p.GID)); e != 0 {
		return fmt.Errorf("setgid %d: %w", p.GID, e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, uintptr(p.UID), uintptr(p.UID), uintptr(p.UID)); e != 0 {
		return fmt.Errorf("setuid %d: %w", p.UID, e)
	}
	if caps == nil {
		return nil
	}
	if p.UID != 0 {
		_ = unix.Prctl(unix.PR_SET_KEEPCAPS, 0, 0, 0, 0)
	}
	return setCaps(caps, last)
}

// lookPath finds the program as execvp would, on the container's PATH.
func lookPath(arg0 string, env []string) (string, error) {
	if strings.Contains(arg0, "/") {
		if err := checkExecutable(arg0); err != nil {
			return "", fmt.Errorf("exec: %q: %w", arg0, err)
		}
		return arg0, nil
	}
	pathEnv := defaultPath
	for _, e := range env {
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			pathEnv = v
		}
	}
	var denied error
	for _, dir := range filepath.SplitList(pathEnv) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, arg0)
		err := checkExecutable(p)
		if err == nil {
			return p, nil
		}
		if errors.Is(err, unix.EACCES) && denied == nil {
			denied = err
		}
	}
	if denied != nil {
		return "", fmt.Errorf("exec: %q: %w", arg0, denied)
	}
	return "", fmt.Errorf("exec: %q: executable file not found in $PATH", arg0)
}

func checkExecutable(p string) error {
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		return &os.PathError{Op: "stat", Path: p, Err: err}
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return &os.PathError{Op: "exec", Path: p, Err: unix.EACCES}
	}
	if err := unix.Faccessat(unix.AT_FDCWD, p, unix.X_OK, unix.AT_EACCESS); err != nil {
		return &os.PathError{Op: "exec", Path: p, Err: err}
	}
	return nil
}
