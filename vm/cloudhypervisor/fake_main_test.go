package cloudhypervisor

// The fake as a VMM process: the test binary re-executed with
// RUND_FAKE_CH=1 takes cloud-hypervisor's command line, binds the API socket
// and serves it until vmm.shutdown, SIGTERM/SIGINT, or a guest power-off
// (SIGUSR1 here). Faults are injected through FAKE_CH_* variables.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

const fakeEnv = "RUND_FAKE_CH"

// fakeRequestLog is where a fake VMM process records requests, next to its
// API socket.
const fakeRequestLog = "fake-requests.jsonl"

func TestMain(m *testing.M) {
	if os.Getenv(fakeEnv) == "1" {
		// The same binary stands in for virtiofsd when run with its flags.
		if len(os.Args) > 1 && strings.HasPrefix(os.Args[1], "--socket-path=") {
			os.Exit(fakeVirtiofsd(os.Args[1:]))
		}
		os.Exit(fakeMain(os.Args[1:]))
	}
	os.Exit(m.Run())
}

func fakeMain(args []string) int {
	version := envOr("FAKE_CH_VERSION", "53.0.0")
	var api, events, logFile string
	verbosity := 0
	for i := 0; i < len(args); i++ {
		next := func() string {
			i++
			if i >= len(args) {
				return ""
			}
			return args[i]
		}
		switch args[i] {
		case "--version", "-V":
			fmt.Printf("cloud-hypervisor v%s\n", version)
			return 0
		case "--api-socket":
			api = strings.TrimPrefix(next(), "path=")
		case "--event-monitor":
			events = strings.TrimPrefix(next(), "path=")
		case "--log-file":
			logFile = next()
		case "-v":
			verbosity++
		default:
			fmt.Fprintf(os.Stderr, "error: unexpected argument '%s' found\n", args[i])
			return 1
		}
	}
	if logFile != "" {
		if lf, err := os.OpenFile(logFile, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600); err == nil {
			fmt.Fprintf(lf, "cloud-hypervisor: fake VMM v%s starting (verbosity %d)\n", version, verbosity)
			lf.Close()
		}
	}
	if msg := os.Getenv("FAKE_CH_EXIT_AT_START"); msg != "" {
		fmt.Fprintln(os.Stderr, msg)
		return 1
	}
	if os.Getenv("FAKE_CH_NO_SOCKET") == "1" {
		select {} // alive, but the API never comes up
	}
	if d, err := time.ParseDuration(os.Getenv("FAKE_CH_BIND_DELAY")); err == nil {
		time.Sleep(d)
	}
	if api == "" {
		fmt.Fprintln(os.Stderr, "Error: no --api-socket")
		return 1
	}
	exitCode := make(chan int, 1)
	opts := fakeOptions{
		version:    version,
		dieOn:      os.Getenv("FAKE_CH_DIE_ON"),
		hangOn:     os.Getenv("FAKE_CH_HANG_ON"),
		failOn:     os.Getenv("FAKE_CH_FAIL_ON"),
		logPath:    filepath.Join(filepath.Dir(api), fakeRequestLog),
		eventsPath: events,
		onExit: func(code int) {
			select {
			case exitCode <- code:
			default:
			}
		},
	}
	opts.failStatus, _ = strconv.Atoi(os.Getenv("FAKE_CH_FAIL_STATUS"))
	for _, p := range strings.FieldsFunc(os.Getenv("FAKE_CH_GUEST_PORTS"), func(r rune) bool { return r == ',' }) {
		n, _ := strconv.ParseUint(p, 10, 32)
		opts.guestPorts = append(opts.guestPorts, uint32(n))
	}
	opts.guestDelay, _ = time.ParseDuration(os.Getenv("FAKE_CH_GUEST_DELAY"))
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGUSR1)
	f, err := serveFake(api, opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		return 1
	}
	for {
		select {
		case code := <-exitCode:
			return code
		case s := <-sigs:
			if s == syscall.SIGUSR1 {
				go f.powerOff()
			} else {
				go f.exit(0)
			}
		}
	}
}

// fakeVirtiofsd stands in for virtiofsd: it checks its flags and listens on
// --socket-path until killed.
func fakeVirtiofsd(args []string) int {
	var sock, dir string
	for _, a := range args {
		switch {
		case strings.HasPrefix(a, "--socket-path="):
			sock = strings.TrimPrefix(a, "--socket-path=")
		case strings.HasPrefix(a, "--shared-dir="):
			dir = strings.TrimPrefix(a, "--shared-dir=")
		case a == "--cache=never":
		default:
			fmt.Fprintf(os.Stderr, "virtiofsd: unknown argument %s\n", a)
			return 1
		}
	}
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		fmt.Fprintf(os.Stderr, "virtiofsd: shared dir %q: %v\n", dir, err)
		return 1
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		fmt.Fprintln(os.Stderr, "virtiofsd:", err)
		return 1
	}
	defer ln.Close()
	select {}
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// fakeBackend is a Backend whose "cloud-hypervisor" is this test binary
// acting as the fake VMM, with the given FAKE_CH_* settings.
func fakeBackend(t *testing.T, env ...string) *Backend {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	e := append(os.Environ(), fakeEnv+"=1", "FAKE_CH_GUEST_PORTS="+strconv.Itoa(AgentPort))
	return &Backend{Binary: exe, Env: append(e, env...), Virtiofsd: exe}
}

// shortDir is a temporary directory with a short path (unix socket paths are
// limited to 107 bytes; t.TempDir embeds the test's name).
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "ch")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// startFake serves an in-process fake on a fresh socket.
func startFake(t *testing.T, opts fakeOptions) (*fakeVMM, *Client) {
	t.Helper()
	path := filepath.Join(shortDir(t), "api.sock")
	f, err := serveFake(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.exit(0) })
	return f, NewClient(path)
}

// processRequests reads what a fake VMM process recorded in dir.
func processRequests(t *testing.T, dir string) []recorded {
	t.Helper()
	fh, err := os.Open(filepath.Join(dir, fakeRequestLog))
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	var out []recorded
	sc := bufio.NewScanner(fh)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var r recorded
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

// sequence renders requests as "METHOD endpoint" lines.
func sequence(reqs []recorded) []string {
	var s []string
	for _, r := range reqs {
		s = append(s, r.Method+" "+r.Endpoint)
	}
	return s
}
