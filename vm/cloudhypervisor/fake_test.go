package cloudhypervisor

// A fake Cloud Hypervisor VMM, for tests only, faithful to the documented
// behaviour of the real one (see the reference sheet, §8): the API's paths,
// methods, status codes and error bodies; one request served at a time over
// HTTP/1.1 with Content-Length bodies; the VM state machine; snapshot files;
// restore from an edited config.json; hybrid vsock CONNECT/OK; the event
// monitor. It records every request so tests can assert the exact JSON rund
// sends. Its config types are its own (not api.go's), so a wrong JSON name in
// the client is not mirrored here.
//
// It runs in-process (newFake) or as a separate VMM process: the test binary
// re-executes itself with the cloud-hypervisor command line (see
// fake_main_test.go), which lets tests exercise process start, crash and exit.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// fakeOptions configure the fake and inject faults.
type fakeOptions struct {
	version    string        // e.g. "53.0.0"; before 47, error bodies are plain text
	dieOn      string        // endpoint: exit without answering
	hangOn     string        // endpoint: never answer
	failOn     string        // endpoint: answer failStatus with an error body
	failStatus int           // default 500
	guestPorts []uint32      // ports the fake guest listens on while running
	guestDelay time.Duration // the guest listens only this long after it first runs
	logPath    string        // append every request as a JSON line (child mode)
	eventsPath string        // --event-monitor
	onExit     func(code int)
}

// recorded is one request as the fake saw it.
type recorded struct {
	Method        string `json:"method"`
	Endpoint      string `json:"endpoint"`
	Body          string `json:"body"`
	ContentLength string `json:"content_length"` // the header, "" if absent
	Chunked       bool   `json:"chunked"`
	Fds           int    `json:"fds"`
}

// fakeVMM is the emulated VMM. mu serialises request handling, as the real
// API thread does, and guards everything below it.
type fakeVMM struct {
	opts fakeOptions
	ln   *net.UnixListener
	path string

	mu         sync.Mutex
	cfg        *fConfig // nil: no VM
	state      string   // "", Created, Running, Paused, Shutdown
	nextID     int      // shared counter of generated device ids
	nextSlot   int      // next PCI device number
	requests   []recorded
	vsockLn    *net.UnixListener
	vsockPath  string
	runningAt  time.Time // when the guest first ran
	memMode    string    // how guest RAM is backed: "anon", "file-shared", "file-private", "copy"
	pending    []string  // device ids whose removal the guest has not acked
	nextHost   uint32
	exited     bool
	eventsFile *os.File
}

// fakeStatus is a non-2xx answer with the VMM's error chain.
type fakeStatus struct {
	code  int
	chain []string
}

func errStatus(code int, chain ...string) *fakeStatus { return &fakeStatus{code: code, chain: chain} }

// vmmError is the 500 the VMM answers for almost every failure before v53.
func vmmError(chain ...string) *fakeStatus {
	return errStatus(http.StatusInternalServerError, chain...)
}

// serveFake binds the API socket at path (failing if it exists, as the VMM
// does before v53) and serves it until the fake exits.
func serveFake(path string, opts fakeOptions) (*fakeVMM, error) {
	if opts.version == "" {
		opts.version = "53.0.0"
	}
	if opts.failStatus == 0 {
		opts.failStatus = http.StatusInternalServerError
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("Error creating API socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	f := &fakeVMM{opts: opts, ln: ln, path: path, nextHost: 1 << 30}
	if opts.eventsPath != "" {
		if f.eventsFile, err = os.OpenFile(opts.eventsPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600); err != nil {
			ln.Close()
			return nil, err
		}
	}
	f.event("vmm", "starting", nil)
	go f.acceptLoop(ln)
	return f, nil
}

func (f *fakeVMM) acceptLoop(ln *net.UnixListener) {
	for {
		conn, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		go f.serveConn(conn)
	}
}

// fdReader reads from a unix connection, collecting SCM_RIGHTS fds.
type fdReader struct {
	conn *net.UnixConn
	fds  []*os.File
}

func (r *fdReader) Read(p []byte) (int, error) {
	oob := make([]byte, syscall.CmsgSpace(16*4))
	n, oobn, _, _, err := r.conn.ReadMsgUnix(p, oob)
	if oobn > 0 {
		msgs, _ := syscall.ParseSocketControlMessage(oob[:oobn])
		for _, m := range msgs {
			fds, _ := syscall.ParseUnixRights(&m)
			for _, fd := range fds {
				r.fds = append(r.fds, os.NewFile(uintptr(fd), "scm"))
			}
		}
	}
	return n, err
}

func (f *fakeVMM) serveConn(conn *net.UnixConn) {
	defer conn.Close()
	fr := &fdReader{conn: conn}
	br := bufio.NewReader(fr)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		rec := recorded{Method: req.Method, ContentLength: req.Header.Get("Content-Length")}
		rec.Endpoint = strings.TrimPrefix(req.URL.Path, "/api/v1/")
		var body []byte
		if len(req.TransferEncoding) > 0 {
			// micro_http knows only Content-Length: a chunked
			// body arrives empty.
			rec.Chunked = true
			_, _ = io.Copy(io.Discard, req.Body)
		} else {
			body, _ = io.ReadAll(req.Body)
		}
		rec.Body = string(body)
		fds := fr.fds
		fr.fds = nil
		rec.Fds = len(fds)

		f.mu.Lock()
		f.record(rec)
		if f.opts.dieOn == rec.Endpoint {
			f.mu.Unlock()
			f.exit(1)
			return
		}
		if f.opts.hangOn == rec.Endpoint {
			f.mu.Unlock()
			select {} // the VMM's single API thread is stuck
		}
		var status int
		var out []byte
		if !strings.HasPrefix(req.URL.Path, "/api/v1/") {
			status, out = f.errorReply(errStatus(http.StatusNotFound))
		} else if f.opts.failOn == rec.Endpoint {
			status, out = f.errorReply(errStatus(f.opts.failStatus, "Error from API", "injected failure of "+rec.Endpoint))
		} else {
			status, out = f.dispatch(req.Method, rec.Endpoint, body, fds)
		}
		exitAfter := f.exited
		f.mu.Unlock()
		for _, fd := range fds {
			fd.Close()
		}
		writeReply(conn, status, out)
		if exitAfter {
			f.exit(0)
			return
		}
		if req.Close {
			return
		}
	}
}

func writeReply(w io.Writer, status int, body []byte) {
	var b bytes.Buffer
	fmt.Fprintf(&b, "HTTP/1.1 %d %s\r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n", status, http.StatusText(status))
	if len(body) > 0 {
		fmt.Fprintf(&b, "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n", len(body))
		b.Write(body)
	} else {
		b.WriteString("\r\n")
	}
	_, _ = w.Write(b.Bytes())
}

// record keeps a request. Preconditions: f.mu is held.
func (f *fakeVMM) record(r recorded) {
	f.requests = append(f.requests, r)
	if f.opts.logPath == "" {
		return
	}
	lf, err := os.OpenFile(f.opts.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return
	}
	defer lf.Close()
	b, _ := json.Marshal(r)
	_, _ = lf.Write(append(b, '\n'))
}

// errorReply renders an error the way the configured version does: a JSON
// array of the error chain since v47, plain text before.
func (f *fakeVMM) errorReply(s *fakeStatus) (int, []byte) {
	if len(s.chain) == 0 {
		return s.code, nil
	}
	if f.major() >= 47 {
		b, _ := json.Marshal(s.chain)
		return s.code, b
	}
	return s.code, []byte(strings.Join(s.chain, ": "))
}

func (f *fakeVMM) major() int {
	n, _ := strconv.Atoi(strings.SplitN(f.opts.version, ".", 2)[0])
	return n
}

// Endpoint table: method and whether a body is required.
type endpoint struct {
	method string
	body   bool
}

var fakeEndpoints = map[string]endpoint{
	"vmm.ping": {http.MethodGet, false}, "vm.info": {http.MethodGet, false}, "vm.counters": {http.MethodGet, false},
	"vm.create": {http.MethodPut, true}, "vm.boot": {http.MethodPut, false}, "vm.pause": {http.MethodPut, false},
	"vm.resume": {http.MethodPut, false}, "vm.shutdown": {http.MethodPut, false}, "vm.reboot": {http.MethodPut, false},
	"vm.power-button": {http.MethodPut, false}, "vm.delete": {http.MethodPut, false}, "vm.nmi": {http.MethodPut, false},
	"vmm.shutdown": {http.MethodPut, false}, "vm.snapshot": {http.MethodPut, true}, "vm.restore": {http.MethodPut, true},
	"vm.add-disk": {http.MethodPut, true}, "vm.add-pmem": {http.MethodPut, true}, "vm.add-fs": {http.MethodPut, true},
	"vm.add-net": {http.MethodPut, true}, "vm.add-vsock": {http.MethodPut, true}, "vm.remove-device": {http.MethodPut, true},
	"vm.resize": {http.MethodPut, true},
}

// dispatch applies the HTTP rules, then the VM state machine.
// Preconditions: f.mu is held.
func (f *fakeVMM) dispatch(method, ep string, body []byte, fds []*os.File) (int, []byte) {
	e, ok := fakeEndpoints[ep]
	if !ok {
		return f.errorReply(errStatus(http.StatusNotFound))
	}
	if method != e.method {
		return f.errorReply(errStatus(http.StatusBadRequest, "Method not allowed"))
	}
	if e.body && len(body) == 0 {
		return f.errorReply(errStatus(http.StatusBadRequest, "Missing body"))
	}
	if !e.body && len(body) > 0 {
		return f.errorReply(errStatus(http.StatusBadRequest, "Body not allowed"))
	}
	var out any
	var st *fakeStatus
	switch ep {
	case "vmm.ping":
		out = map[string]any{"build_version": "v" + f.opts.version + "-fake", "version": f.opts.version, "pid": os.Getpid(), "features": []string{"kvm"}}
	case "vmm.shutdown":
		f.exited = true
	default:
		out, st = f.vmCall(ep, body, fds)
	}
	if st != nil {
		return f.errorReply(st)
	}
	if out == nil {
		return http.StatusNoContent, nil
	}
	b, _ := json.Marshal(out)
	return http.StatusOK, b
}

// decodeBody parses a request body; bad JSON is a 400, unknown keys are
// ignored.
func decodeBody(body []byte, v any) *fakeStatus {
	if err := json.Unmarshal(body, v); err != nil {
		return errStatus(http.StatusBadRequest, "Error parsing request body", err.Error())
	}
	return nil
}

// event writes one event-monitor record: pretty JSON, then a blank line.
func (f *fakeVMM) event(source, name string, props map[string]string) {
	if f.eventsFile == nil {
		return
	}
	now := time.Now()
	rec := map[string]any{
		"timestamp":  map[string]any{"secs": now.Unix(), "nanos": now.Nanosecond()},
		"source":     source,
		"event":      name,
		"properties": props,
	}
	b, _ := json.MarshalIndent(rec, "", "  ")
	_, _ = f.eventsFile.Write(append(b, '\n', '\n'))
}

// exit stops the fake as the VMM process would exit: the API socket goes,
// and a running VM's vsock socket is removed only on a clean exit.
func (f *fakeVMM) exit(code int) {
	f.mu.Lock()
	if f.ln == nil {
		f.mu.Unlock()
		return
	}
	f.ln.Close()
	f.ln = nil
	if f.vsockLn != nil {
		if code != 0 {
			f.vsockLn.SetUnlinkOnClose(false)
		}
		f.vsockLn.Close()
	}
	if code == 0 {
		f.event("vmm", "shutdown", nil)
	}
	f.mu.Unlock()
	if f.opts.onExit != nil {
		f.opts.onExit(code)
	}
}

// powerOff is the guest powering the VM off: the VMM exits cleanly.
func (f *fakeVMM) powerOff() {
	f.mu.Lock()
	f.event("vm", "shutdown", nil)
	f.mu.Unlock()
	f.exit(0)
}

// requestsSoFar returns a copy of the recorded requests.
func (f *fakeVMM) requestsSoFar() []recorded {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]recorded(nil), f.requests...)
}
