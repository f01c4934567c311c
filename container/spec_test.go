package container

import (
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func TestCheckCapabilities(t *testing.T) {
	tests := []struct {
		name    string
		caps    *specs.LinuxCapabilities
		wantErr bool
	}{
		{name: "none", caps: nil},
		{name: "known", caps: &specs.LinuxCapabilities{Bounding: []string{"CAP_CHOWN", "CAP_CHECKPOINT_RESTORE"}}},
		{name: "unknown", caps: &specs.LinuxCapabilities{Effective: []string{"CAP_TEST"}}, wantErr: true},
		{name: "no prefix", caps: &specs.LinuxCapabilities{Permitted: []string{"CHOWN"}}, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := checkCapabilities(tc.caps)
			if (err != nil) != tc.wantErr {
				t.Errorf("got %v, want error %v", err, tc.wantErr)
			}
		})
	}
}

func TestValidateID(t *testing.T) {
	tests := []struct {
		id string
		ok bool
	}{
		{"abc", true}, {"a.b-c_d+e", true}, {"", false}, {"..", false}, {".", false},
		{"../x", false}, {"a/b", false}, {string(make([]byte, 1025)), false},
	}
	for _, tc := range tests {
		if err := ValidateID(tc.id); (err == nil) != tc.ok {
			t.Errorf("ValidateID(%q): got %v, want ok %v", tc.id, err, tc.ok)
		}
	}
}

func TestParseSignal(t *testing.T) {
	tests := []struct {
		in   string
		want int
		err  bool
	}{
		{"", 15, false}, {"9", 9, false}, {"KILL", 9, false}, {"sigterm", 15, false},
		{"SIGUSR1", 10, false}, {"SIGNOPE", 0, true}, {"0", 0, true}, {"99", 0, true},
	}
	for _, tc := range tests {
		got, err := ParseSignal(tc.in)
		if (err != nil) != tc.err || (err == nil && int(got) != tc.want) {
			t.Errorf("ParseSignal(%q) = %d, %v; want %d, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}
