package proto

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
)

// Version is the protocol version exchanged in Hello. Host and guest must
// agree exactly: the guest is built from the same binary as the host.
const Version = 1

// MaxPayload bounds a frame's payload; larger data is split by the sender.
const MaxPayload = 1 << 20

// HeaderSize is the size of a frame header in bytes.
const HeaderSize = 13

// InitStream is the stream of the container's init process.
const InitStream = 1

// VsockPort is the AF_VSOCK port the agent listens on when the VM has a
// vsock device instead of the virtio-serial port (Cloud Hypervisor); the
// host connects to it.
const VsockPort = 1024

// Kind identifies a frame.
type Kind uint8

// Frame kinds. H→G are host requests, G→H guest messages.
const (
	KindHello      Kind = 1  // H→G Hello
	KindReply      Kind = 2  // G→H Reply to the request with the same seq
	KindCreate     Kind = 3  // H→G CreateRequest on stream 1
	KindStart      Kind = 4  // H→G no payload
	KindExec       Kind = 5  // H→G ExecRequest on a new stream
	KindSignal     Kind = 6  // H→G SignalRequest
	KindResize     Kind = 7  // H→G ResizeRequest
	KindStdin      Kind = 8  // H→G raw bytes
	KindCloseStdin Kind = 9  // H→G no payload
	KindStdout     Kind = 10 // G→H raw bytes (all output when the process has a terminal)
	KindStderr     Kind = 11 // G→H raw bytes
	KindExit       Kind = 12 // G→H ExitMessage, after the stream's output is drained
	KindPs         Kind = 13 // H→G; Reply carries Pids
	KindShutdown   Kind = 14 // H→G; the agent syncs and powers the VM off
	KindWarmup     Kind = 15 // H→G WarmupRequest (template build only)
	KindLog        Kind = 16 // G→H raw text: agent diagnostics for the host's debug log
	KindPause      Kind = 17 // H→G freeze the container's processes (SIGSTOP)
	KindResume     Kind = 18 // H→G thaw them (SIGCONT)
	KindIomem      Kind = 19 // H→G; Reply.Info carries the guest's /proc/iomem
)

var kindNames = map[Kind]string{
	KindHello: "hello", KindReply: "reply", KindCreate: "create", KindStart: "start",
	KindExec: "exec", KindSignal: "signal", KindResize: "resize", KindStdin: "stdin",
	KindCloseStdin: "close-stdin", KindStdout: "stdout", KindStderr: "stderr",
	KindExit: "exit", KindPs: "ps", KindShutdown: "shutdown", KindWarmup: "warmup",
	KindLog: "log", KindPause: "pause", KindResume: "resume", KindIomem: "iomem",
}

func (k Kind) String() string {
	if n, ok := kindNames[k]; ok {
		return n
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// ErrFrameTooLarge is returned when a frame's declared length exceeds MaxPayload.
var ErrFrameTooLarge = errors.New("frame too large")

// Frame is one message on the channel.
type Frame struct {
	Kind    Kind
	Stream  uint32
	Seq     uint32
	Payload []byte
}

// Hello opens a session. It carries the identity a clone must not share with
// its template or its siblings.
type Hello struct {
	Version      int    `json:"version"`
	TimeUnixNano int64  `json:"time_unix_nano"`
	Seed         []byte `json:"seed"` // fresh host entropy, credited to the guest RNG
	Hostname     string `json:"hostname,omitempty"`
}

// Reply answers one host request.
type Reply struct {
	Error   string `json:"error,omitempty"`
	Version int    `json:"version,omitempty"` // answer to Hello
	Pid     int    `json:"pid,omitempty"`     // guest pid, answer to Create/Exec
	Pids    []int  `json:"pids,omitempty"`    // answer to Ps
	Info    string `json:"info,omitempty"`    // free text (e.g. what warm-up did)
}

// Rlimit is one POSIX resource limit, named as in the runtime-spec ("RLIMIT_NOFILE").
type Rlimit struct {
	Type string `json:"type"`
	Hard uint64 `json:"hard"`
	Soft uint64 `json:"soft"`
}

// Process is what to run, a subset of the runtime-spec process.
type Process struct {
	Args            []string `json:"args"`
	Env             []string `json:"env,omitempty"`
	Cwd             string   `json:"cwd"`
	UID             uint32   `json:"uid"`
	GID             uint32   `json:"gid"`
	AdditionalGids  []uint32 `json:"additionalGids,omitempty"`
	Umask           *uint32  `json:"umask,omitempty"`
	Terminal        bool     `json:"terminal,omitempty"`
	Rows            uint16   `json:"rows,omitempty"`
	Cols            uint16   `json:"cols,omitempty"`
	Rlimits         []Rlimit `json:"rlimits,omitempty"`
	NoNewPrivileges bool     `json:"noNewPrivileges,omitempty"`
	// Capabilities kept in the bounding, effective, permitted, inheritable and
	// ambient sets, by name ("CAP_CHOWN"). Nil keeps the full set.
	Capabilities *Capabilities `json:"capabilities,omitempty"`
}

// Capabilities are the runtime-spec capability sets, by name.
type Capabilities struct {
	Bounding    []string `json:"bounding,omitempty"`
	Effective   []string `json:"effective,omitempty"`
	Inheritable []string `json:"inheritable,omitempty"`
	Permitted   []string `json:"permitted,omitempty"`
	Ambient     []string `json:"ambient,omitempty"`
}

// Mount is a mount applied inside the container root, in order.
type Mount struct {
	Destination string   `json:"destination"`
	Type        string   `json:"type,omitempty"`
	Source      string   `json:"source,omitempty"`
	Options     []string `json:"options,omitempty"`
	// Data, when non-nil, is the content of a host file bind-mounted into the
	// container (hosts, resolv.conf, hostname): the agent writes it to a
	// private file and bind-mounts that.
	Data []byte `json:"data,omitempty"`
	// Tag names a shared directory (9p/virtio-fs tag) that backs a host
	// directory bind mount.
	Tag string `json:"tag,omitempty"`
}

// Root says how the agent builds the container's root filesystem.
type Root struct {
	// Lower is the guest device holding the read-only image (e.g. /dev/vda,
	// /dev/pmem0) and LowerType its filesystem ("erofs", "ext4").
	Lower     string `json:"lower"`
	LowerType string `json:"lowerType"`
	DAX       bool   `json:"dax,omitempty"`
	// Upper is the guest device of the writable ext4 layer; empty means the
	// root is the lower layer alone (read-only).
	Upper string `json:"upper,omitempty"`
	// SharedTag, when set, replaces Lower/Upper: the root is the host's
	// directory shared under this tag (write-through).
	SharedTag string `json:"sharedTag,omitempty"`
	// SharedType is the shared directory's filesystem ("9p", "virtiofs").
	SharedType string `json:"sharedType,omitempty"`
	Readonly   bool   `json:"readonly,omitempty"`
}

// CreateRequest sets up the container and forks its process, held before exec.
type CreateRequest struct {
	ID            string            `json:"id"`
	Hostname      string            `json:"hostname,omitempty"`
	Root          Root              `json:"root"`
	Mounts        []Mount           `json:"mounts,omitempty"`
	Process       Process           `json:"process"`
	Sysctl        map[string]string `json:"sysctl,omitempty"`
	MaskedPaths   []string          `json:"maskedPaths,omitempty"`
	ReadonlyPaths []string          `json:"readonlyPaths,omitempty"`
}

// ExecRequest runs another process in the container, at once.
type ExecRequest struct {
	Process Process `json:"process"`
}

// SignalRequest sends a signal to a stream's process (or, with All, to every
// process of the container).
type SignalRequest struct {
	Signal int  `json:"signal"`
	All    bool `json:"all,omitempty"`
}

// ResizeRequest sets a stream's terminal size.
type ResizeRequest struct {
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
}

// ExitMessage reports that a stream's process ended. Status is the exit code,
// or 128+N when killed by signal N.
type ExitMessage struct {
	Status int `json:"status"`
}

// WarmupRequest asks the agent, during a template build, to do once every
// thing a sandbox will do, so that clones find it done.
type WarmupRequest struct {
	// Devices the agent mounts and unmounts once (same as a Root), and whose
	// cached blocks it then drops.
	Root Root `json:"root"`
}

// Writer writes frames; it is safe for concurrent use.
type Writer struct {
	mu  sync.Mutex
	w   io.Writer
	hdr [HeaderSize]byte
}

// NewWriter returns a Writer on w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// Write sends one frame. Payloads larger than MaxPayload are rejected; use
// WriteData for bulk bytes.
func (fw *Writer) Write(f Frame) error {
	if len(f.Payload) > MaxPayload {
		return ErrFrameTooLarge
	}
	fw.mu.Lock()
	defer fw.mu.Unlock()
	fw.hdr[0] = byte(f.Kind)
	binary.BigEndian.PutUint32(fw.hdr[1:5], f.Stream)
	binary.BigEndian.PutUint32(fw.hdr[5:9], f.Seq)
	binary.BigEndian.PutUint32(fw.hdr[9:13], uint32(len(f.Payload)))
	if _, err := fw.w.Write(fw.hdr[:]); err != nil {
		return err
	}
	if len(f.Payload) > 0 {
		if _, err := fw.w.Write(f.Payload); err != nil {
			return err
		}
	}
	return nil
}

// WriteJSON sends a control frame whose payload is v encoded as JSON.
func (fw *Writer) WriteJSON(kind Kind, stream, seq uint32, v any) error {
	var p []byte
	if v != nil {
		var err error
		if p, err = json.Marshal(v); err != nil {
			return fmt.Errorf("encoding %s: %w", kind, err)
		}
	}
	return fw.Write(Frame{Kind: kind, Stream: stream, Seq: seq, Payload: p})
}

// WriteData sends b as one or more data frames of the given kind.
func (fw *Writer) WriteData(kind Kind, stream uint32, b []byte) error {
	for len(b) > 0 {
		n := min(len(b), MaxPayload)
		if err := fw.Write(Frame{Kind: kind, Stream: stream, Payload: b[:n]}); err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// Reader reads frames; it is not safe for concurrent use.
type Reader struct {
	r   io.Reader
	hdr [HeaderSize]byte
}

// NewReader returns a Reader on r.
func NewReader(r io.Reader) *Reader { return &Reader{r: r} }

// Read returns the next frame. Its payload is freshly allocated.
func (fr *Reader) Read() (Frame, error) {
	if _, err := io.ReadFull(fr.r, fr.hdr[:]); err != nil {
		return Frame{}, err
	}
	f := Frame{
		Kind:   Kind(fr.hdr[0]),
		Stream: binary.BigEndian.Uint32(fr.hdr[1:5]),
		Seq:    binary.BigEndian.Uint32(fr.hdr[5:9]),
	}
	n := binary.BigEndian.Uint32(fr.hdr[9:13])
	if n > MaxPayload {
		return Frame{}, fmt.Errorf("%s frame of %d bytes: %w", f.Kind, n, ErrFrameTooLarge)
	}
	if n > 0 {
		f.Payload = make([]byte, n)
		if _, err := io.ReadFull(fr.r, f.Payload); err != nil {
			return Frame{}, fmt.Errorf("reading %s payload: %w", f.Kind, io.ErrUnexpectedEOF)
		}
	}
	return f, nil
}

// Decode unmarshals a control frame's JSON payload into v.
func (f Frame) Decode(v any) error {
	if len(f.Payload) == 0 {
		return nil
	}
	if err := json.Unmarshal(f.Payload, v); err != nil {
		return fmt.Errorf("decoding %s: %w", f.Kind, err)
	}
	return nil
}
