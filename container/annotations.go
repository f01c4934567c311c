package container

import (
	"crypto/sha256"
	"encoding/hex"
	"path/filepath"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/rund-dev/rund/internal/config"
)

// Annotations rund reads from config.json.
const (
	AnnotationTemplate   = "rund.template"   // "off" cold-boots this container
	AnnotationHypervisor = "rund.hypervisor" // "qemu" or "cloud-hypervisor"
	AnnotationRootfs     = "rund.rootfs"     // "split" or "shared"
)

func annotation(s *specs.Spec, key string) string {
	if s.Annotations == nil {
		return ""
	}
	return s.Annotations[key]
}

func hypervisorOf(cfg config.Config, s *specs.Spec) string {
	if h := annotation(s, AnnotationHypervisor); h != "" {
		return h
	}
	return cfg.Hypervisor
}

func templatesOn(cfg config.Config, s *specs.Spec) bool {
	switch annotation(s, AnnotationTemplate) {
	case "off", "false", "0":
		return false
	case "on", "true", "1":
		return true
	}
	return cfg.Templates == "on"
}

func rootfsModeOf(cfg config.Config, s *specs.Spec) string {
	if m := annotation(s, AnnotationRootfs); m != "" {
		return m
	}
	return cfg.Rootfs
}

// vmDirOf is the VMM's private runtime directory: sockets need paths under
// 108 bytes, and ids may be long, so it is named by a hash of the id.
func vmDirOf(root, id string) string {
	h := sha256.Sum256([]byte(id))
	return filepath.Join(root, ".vm", hex.EncodeToString(h[:8]))
}

func splitLines(s string) []string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) == 0 {
		return []string{""}
	}
	return lines
}
