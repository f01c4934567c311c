package shim

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/rund-dev/rund/internal/shimapi"
	"github.com/rund-dev/rund/vm/agent/client"
	"github.com/rund-dev/rund/vm/agent/proto"
)

// serve answers control requests until the listener is closed.
func (s *shim) serve(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go s.handle(c)
	}
}

func reply(c net.Conn, r shimapi.Response) error {
	b, _ := json.Marshal(r)
	_, err := c.Write(append(b, '\n'))
	return err
}

func (s *shim) handle(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	line, err := br.ReadBytes('\n')
	if err != nil {
		return
	}
	var req shimapi.Request
	if err := json.Unmarshal(line, &req); err != nil {
		reply(c, shimapi.Response{Error: fmt.Sprintf("decoding request: %v", err)})
		return
	}
	if req.Op == shimapi.OpExec {
		s.exec(c, br, req)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var resp shimapi.Response
	switch req.Op {
	case shimapi.OpStart:
		err = s.agent.Start(ctx)
	case shimapi.OpKill:
		err = s.agent.Signal(ctx, proto.InitStream, req.Signal, req.All)
	case shimapi.OpPause:
		err = s.agent.Pause(ctx)
	case shimapi.OpResume:
		err = s.agent.Resume(ctx)
	case shimapi.OpPs:
		resp.Pids, err = s.agent.Ps(ctx)
	case shimapi.OpIomem:
		resp.Iomem, err = s.agent.Iomem(ctx)
	default:
		err = fmt.Errorf("unknown operation %q", req.Op)
	}
	if err != nil {
		resp.Error = err.Error()
	}
	reply(c, resp)
}

// exec runs a process in the container on a new stream and relays it over
// the control connection as proto frames until it exits.
func (s *shim) exec(c net.Conn, br *bufio.Reader, req shimapi.Request) {
	if req.Process == nil {
		reply(c, shimapi.Response{Error: "exec: no process"})
		return
	}
	stream := proto.InitStream + s.execs.Add(1)
	w := proto.NewWriter(c)
	stdinR, stdinW := io.Pipe()
	// Output may arrive before the reply line is written: hold it back
	// until then, or it would corrupt the reply.
	replied := make(chan struct{})
	defer func() {
		select {
		case <-replied:
		default:
			close(replied)
		}
	}()
	stdio := client.Stdio{
		Stdin:  stdinR,
		Stdout: frameWriter{w: w, kind: proto.KindStdout, stream: stream, ready: replied},
		Stderr: frameWriter{w: w, kind: proto.KindStderr, stream: stream, ready: replied},
	}
	if req.Process.Terminal {
		stdio.Stderr = nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	pid, err := s.agent.Exec(ctx, stream, proto.ExecRequest{Process: *req.Process}, stdio)
	cancel()
	if err != nil {
		stdinW.Close()
		reply(c, shimapi.Response{Error: err.Error()})
		return
	}
	err = reply(c, shimapi.Response{Pid: pid})
	close(replied)
	if err != nil {
		return
	}
	// Client → guest: stdin, signals, resizes.
	go func() {
		fr := proto.NewReader(br)
		defer stdinW.Close()
		for {
			f, err := fr.Read()
			if err != nil {
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			switch f.Kind {
			case proto.KindStdin:
				stdinW.Write(f.Payload)
			case proto.KindCloseStdin:
				stdinW.Close()
			case proto.KindSignal:
				var sr proto.SignalRequest
				if f.Decode(&sr) == nil {
					s.agent.Signal(ctx, stream, sr.Signal, false)
				}
			case proto.KindResize:
				var rr proto.ResizeRequest
				if f.Decode(&rr) == nil {
					s.agent.Resize(ctx, stream, rr.Rows, rr.Cols)
				}
			}
			cancel()
		}
	}()
	status, err := s.agent.Wait(context.Background(), stream)
	if err != nil {
		logrus.Warnf("exec stream %d: %v", stream, err)
		status = 255
	}
	w.WriteJSON(proto.KindExit, stream, 0, proto.ExitMessage{Status: status})
}

// frameWriter sends writes as data frames of one kind on one stream.
type frameWriter struct {
	w      *proto.Writer
	kind   proto.Kind
	stream uint32
	ready  <-chan struct{} // closed once the frames may flow
}

func (f frameWriter) Write(b []byte) (int, error) {
	<-f.ready
	if err := f.w.WriteData(f.kind, f.stream, b); err != nil {
		return 0, err
	}
	return len(b), nil
}
