package guest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const (
	modulesDir = "/lib/modules"
	portName   = "rund.agent"
	stateDir   = "/rund"
)

// earlyMount is one of the agent's own mounts, made before anything else.
type earlyMount struct {
	target, fstype, data string
	flags                uintptr
}

var earlyMounts = []earlyMount{
	{"/proc", "proc", "", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC},
	{"/sys", "sysfs", "", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC},
	{"/dev", "devtmpfs", "mode=0755", unix.MS_NOSUID},
	{"/dev/pts", "devpts", "newinstance,ptmxmode=0666,mode=0620", unix.MS_NOSUID | unix.MS_NOEXEC},
	{"/dev/shm", "tmpfs", "mode=1777", unix.MS_NOSUID | unix.MS_NODEV},
	{"/run", "tmpfs", "mode=0755", unix.MS_NOSUID | unix.MS_NODEV},
	{"/tmp", "tmpfs", "mode=1777", unix.MS_NOSUID | unix.MS_NODEV},
}

// agentMain is PID 1: mount the basics, load modules, find the channel
// (channel.go) and serve it forever.
func agentMain() {
	start := time.Now()
	unix.Umask(0)
	for _, m := range earlyMounts {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			consolef("rund-agent: mkdir %s: %v", m.target, err)
		}
		if err := unix.Mount(m.fstype, m.target, m.fstype, m.flags, m.data); err != nil && !errors.Is(err, unix.EBUSY) {
			consolef("rund-agent: mount %s on %s: %v", m.fstype, m.target, err)
		}
	}
	_ = os.MkdirAll(stateDir, 0o700)
	ignoreSignals()

	a := newAgent()
	go a.reaper.run()
	go a.loadModules()

	ch, err := openChannel()
	if err != nil {
		// Without a channel there is nothing to serve; power off so the
		// host sees the VM exit rather than hang.
		consolef("rund-agent: %v", err)
		powerOff()
	}
	a.bootTime = time.Since(start)
	a.serveChannel(ch)
}

// ignoreSignals makes PID 1 immune to stray signals (the kernel only delivers
// to init the signals it handles, and Go's default handlers would exit).
// Handlers, unlike SIG_IGN, are reset for the processes it starts.
func ignoreSignals() {
	ch := make(chan os.Signal, 16)
	signal.Notify(ch, unix.SIGHUP, unix.SIGINT, unix.SIGQUIT, unix.SIGTERM,
		unix.SIGUSR1, unix.SIGUSR2, unix.SIGPIPE, unix.SIGALRM, unix.SIGTSTP,
		unix.SIGTTIN, unix.SIGTTOU, unix.SIGABRT, unix.SIGXCPU, unix.SIGXFSZ,
		unix.SIGVTALRM, unix.SIGIO, unix.SIGPWR, unix.SIGWINCH)
	go func() {
		for range ch {
		}
	}()
}

// loadModules loads every module listed in /lib/modules/order, in order, then
// deletes the initramfs files so that nothing of them stays reachable.
func (a *agent) loadModules() {
	defer close(a.modulesDone)
	t := time.Now()
	f, err := os.Open(filepath.Join(modulesDir, "order"))
	if err != nil {
		a.modulesErr = fmt.Errorf("loading modules: %w", err)
		consolef("rund-agent: %v", a.modulesErr)
		return
	}
	var names []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if n := strings.TrimSpace(sc.Text()); n != "" && !strings.HasPrefix(n, "#") {
			names = append(names, n)
		}
	}
	f.Close()
	// Load in the listed order, then retry what failed (a dependency listed
	// after its user fails with ENOENT, unknown symbol) while that helps.
	pending := names
	var failed []string
	wanted := moduleFilter("/sys")
	for len(pending) > 0 {
		var again []string
		failed = failed[:0]
		for _, n := range pending {
			if !wanted(n) {
				continue
			}
			if err := loadModule(filepath.Join(modulesDir, n)); err != nil {
				again = append(again, n)
				failed = append(failed, fmt.Sprintf("%s: %v", n, err))
			}
		}
		if len(again) == len(pending) {
			break
		}
		pending = again
	}
	if len(failed) > 0 {
		a.modulesErr = fmt.Errorf("loading modules: %s", strings.Join(failed, "; "))
		consolef("rund-agent: %v", a.modulesErr)
	}
	a.modulesTime = time.Since(t)
	// The initramfs stays mounted under everything (it cannot be unmounted):
	// empty it so that no container, even one escaping its chroot, sees the
	// agent's binary or modules. /init keeps running from its open inode and
	// is re-executed through /proc/self/exe.
	for _, n := range names {
		_ = os.Remove(filepath.Join(modulesDir, n))
	}
	_ = os.Remove(filepath.Join(modulesDir, "order"))
	_ = os.Remove("/init")
}

func loadModule(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.FinitModule(fd, "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return err
	}
	return nil
}

// portReader reads the channel, waiting while the host is not connected
// (virtio-serial reads then return 0) instead of reporting EOF.
type portReader struct{ f *os.File }

func (p portReader) Read(b []byte) (int, error) {
	for {
		n, err := p.f.Read(b)
		if n > 0 {
			return n, nil
		}
		if err != nil && !errors.Is(err, io.EOF) {
			consolef("rund-agent: reading channel: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// consolef writes a line to the console (the serial log).
func consolef(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
}

// powerOff syncs and powers the VM off; it does not return.
func powerOff() {
	unix.Sync()
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
		consolef("rund-agent: power off: %v", err)
	}
	for {
		time.Sleep(time.Hour)
	}
}
