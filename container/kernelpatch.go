package container

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/rund-dev/rund/internal/shimapi"
	"github.com/rund-dev/rund/kernelpatch"
	"github.com/rund-dev/rund/vm/template"
)

// KernelPatchReport measures, for the running sandbox id, which pages of
// its template's memory its VMM holds as private copies, by guest region
// (kernel text, rodata, data/bss, other).
func KernelPatchReport(ctx context.Context, o Options, id string) ([]kernelpatch.Row, error) {
	st, err := Load(o.Root, id)
	if err != nil {
		return nil, err
	}
	if st.Refresh() == Stopped {
		return nil, fmt.Errorf("%s: %w", id, ErrNotRunning)
	}
	if st.Template == "" {
		return nil, fmt.Errorf("%s was cold-booted, not cloned from a template: its memory is all its own", id)
	}
	store := &template.Store{Dir: filepath.Join(o.Config.DataDir, "templates"), MemDir: o.Config.MemDir}
	all, err := store.List()
	if err != nil {
		return nil, fmt.Errorf("kernelpatch %s: %w", id, err)
	}
	var tpl *template.Manifest
	for i := range all {
		if all[i].ID == st.Template {
			tpl = &all[i]
		}
	}
	if tpl == nil {
		return nil, fmt.Errorf("kernelpatch %s: template %s is not in %s (removed, or another data_dir)", id, st.Template, store.Dir)
	}
	resp, err := callShim(ctx, o.Root, id, shimapi.Request{Op: shimapi.OpIomem})
	if err != nil {
		return nil, fmt.Errorf("kernelpatch %s: reading the guest's kernel layout: %w", id, err)
	}
	ranges, err := kernelpatch.ParseIomem(resp.Iomem)
	if err != nil {
		return nil, fmt.Errorf("kernelpatch %s: %w", id, err)
	}
	maps, err := kernelpatch.FindMappings(st.VMM.Pid, tpl.MemPath)
	if err != nil {
		return nil, fmt.Errorf("kernelpatch %s: %w", id, err)
	}
	layout := kernelpatch.Q35(uint64(tpl.MemSize))
	if st.Hypervisor == "cloud-hypervisor" {
		layout = kernelpatch.CloudHypervisor
	}
	var rows []kernelpatch.Row
	for _, m := range maps {
		if !m.Private {
			return nil, fmt.Errorf("kernelpatch %s: the VMM maps %s shared, not copy-on-write", id, tpl.MemPath)
		}
		r, err := kernelpatch.Measure(st.VMM.Pid, m, layout, ranges)
		if err != nil {
			return nil, fmt.Errorf("kernelpatch %s: %w", id, err)
		}
		rows = kernelpatch.Add(rows, r)
	}
	return rows, nil
}
