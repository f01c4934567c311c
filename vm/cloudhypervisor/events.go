package cloudhypervisor

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
)

// Event is one record of the VMM's --event-monitor stream, e.g.
// {"timestamp":{"secs":1,"nanos":2},"source":"vm","event":"booted","properties":null}.
type Event struct {
	Timestamp struct {
		Secs  uint64 `json:"secs"`
		Nanos uint32 `json:"nanos"`
	} `json:"timestamp"`
	Source     string            `json:"source"`
	Event      string            `json:"event"`
	Properties map[string]string `json:"properties"`
}

// DecodeEvents reads an event-monitor stream: pretty-printed JSON objects
// separated by blank lines. A record cut short at the end (the VMM is still
// writing it) is not an error.
func DecodeEvents(r io.Reader) ([]Event, error) {
	d := json.NewDecoder(r)
	var events []Event
	for {
		var e Event
		err := d.Decode(&e)
		switch {
		case err == nil:
			events = append(events, e)
		case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
			return events, nil
		default:
			return events, fmt.Errorf("decoding vmm events: %w", err)
		}
	}
}

// Events reads the events the VMM has written so far.
func (m *Machine) Events() ([]Event, error) {
	f, err := os.Open(m.paths.events)
	if err != nil {
		return nil, fmt.Errorf("reading vmm events: %w", err)
	}
	defer f.Close()
	return DecodeEvents(f)
}
