package container

import (
	"encoding/json"
	"reflect"
	"testing"
	"time"
)

// TestStateSerialises: the persisted state round-trips through JSON and has
// no field that cannot (channels, funcs, interfaces).
func TestStateSerialises(t *testing.T) {
	var check func(t reflect.Type, path string)
	check = func(typ reflect.Type, path string) {
		switch typ.Kind() {
		case reflect.Chan, reflect.Func, reflect.Interface, reflect.UnsafePointer:
			t.Errorf("%s: %s cannot be persisted", path, typ.Kind())
		case reflect.Struct:
			if typ == reflect.TypeOf(time.Time{}) {
				return
			}
			for i := range typ.NumField() {
				f := typ.Field(i)
				check(f.Type, path+"."+f.Name)
			}
		case reflect.Pointer, reflect.Slice, reflect.Map:
			check(typ.Elem(), path)
		}
	}
	check(reflect.TypeOf(State{}), "State")

	in := State{
		Version: stateVersion, ID: "x", Bundle: "/b", Rootfs: "/b/rootfs", Status: Created,
		Created: time.Unix(1, 2).UTC(), Annotations: map[string]string{"a": "b"},
		Shim: Proc{Pid: 10, StartTime: 20}, VMM: Proc{Pid: 11, StartTime: 21},
		CgroupParent: "/rund", CgroupName: "x", CgroupPooled: true, Hypervisor: "qemu", Template: "t",
	}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	var out State
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(in, out) {
		t.Errorf("round trip: got %+v, want %+v", out, in)
	}
}

// TestRefreshDerivesStopped: a container whose shim is gone is stopped,
// whatever was recorded.
func TestRefreshDerivesStopped(t *testing.T) {
	st := State{Status: Running, Shim: Proc{Pid: 1 << 30}}
	if got := st.Refresh(); got != Stopped {
		t.Errorf("got %s, want stopped", got)
	}
	st = State{Status: Running, Shim: NewProc(1)}
	if got := st.Refresh(); got != Running {
		t.Errorf("live shim: got %s, want running", got)
	}
}
