# rund — build, install and test. Run `make help` for the targets.
SHELL := /bin/bash
GO        ?= go
BIN       := bin
GUEST     := $(BIN)/guest
PREFIX    ?= /usr/local
SHAREDIR  ?= $(PREFIX)/share/rund
GOFLAGS_BUILD := -trimpath
VERSION   := $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X github.com/rund-dev/rund/commands.version=$(VERSION)

.PHONY: all deps rund guest kernel cloud-kernel install test test-unit test-integration test-oci bench-startup bench-dax bench-cgpool bench-kernel vet fmt lint clean help

all: rund guest

help:
	@echo "make            build bin/rund and both guests (bin/guest/rund: streamlined kernel, bin/guest/cloud: Debian's)"
	@echo "make kernel     build the streamlined guest kernel (once per machine, ~8 min on 2 cores)"
	@echo "make install    install rund to $(PREFIX)/bin and the guest to $(SHAREDIR)"
	@echo "make test       run every test (unit + integration; needs root and QEMU)"
	@echo "make test-oci   run the OCI runtime-tools validation suite against rund and runc"

rund: $(BIN)/rund
$(BIN)/rund: $(shell find . -name '*.go' -not -path './bin/*') go.mod go.sum
	CGO_ENABLED=0 $(GO) build $(GOFLAGS_BUILD) -ldflags '$(LDFLAGS)' -o $@ .

# Two guest flavours, each a kernel + an initramfs holding rund as /init:
# rund's streamlined kernel (hack/kernel: built from Debian's linux-source-6.1
# once per machine, cached under /var/cache/rund/kernel), the default, and
# Debian's cloud kernel (fetched with apt-get download, with its modules).
kernel: $(GUEST)/rund/vmlinuz
$(GUEST)/rund/vmlinuz: hack/kernel/build.sh hack/kernel/rund.config $(wildcard /usr/src/linux-source-6.1.tar.xz)
	hack/kernel/build.sh $(GUEST)/rund

cloud-kernel: $(GUEST)/cloud/vmlinuz
$(GUEST)/cloud/vmlinuz:
	hack/guest/fetch-kernel.sh $(GUEST)/cloud

guest: $(GUEST)/rund/initrd.img $(GUEST)/cloud/initrd.img
$(GUEST)/%/initrd.img: $(BIN)/rund $(GUEST)/%/vmlinuz hack/guest/mkinitramfs.sh
	hack/guest/mkinitramfs.sh $(BIN)/rund $(GUEST)/$* $@

install: all
	install -D -m 0755 $(BIN)/rund $(DESTDIR)$(PREFIX)/bin/rund
	for f in rund cloud; do \
		install -D -m 0644 $(GUEST)/$$f/vmlinuz $(DESTDIR)$(SHAREDIR)/$$f/vmlinuz && \
		install -D -m 0644 $(GUEST)/$$f/initrd.img $(DESTDIR)$(SHAREDIR)/$$f/initrd.img || exit 1; \
	done

lint: vet fmt

vet:
	$(GO) vet ./...
	$(GO) vet -tags integration ./integration/

fmt:
	@out=$$(gofmt -l $$(find . -name '*.go' -not -path './bin/*')); if [ -n "$$out" ]; then echo "gofmt:"; echo "$$out"; exit 1; fi

# Debian packages the build and the tests need (idempotent, fast when present).
deps:
	hack/install-deps.sh

test: deps all vet fmt test-unit test-integration

test-unit:
	$(GO) test -count=1 ./...

test-integration: all
	RUND=$(CURDIR)/$(BIN)/rund $(GO) test -count=1 -tags integration -timeout 40m -v ./integration/ 2>&1 | tee $(BIN)/integration.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic)' ; exit $${PIPESTATUS[0]}

# Startup latency (template, cold boot, runc) and idle-sandbox memory.
bench-startup: all
	go run ./hack/bench/startup -rund $(BIN)/rund -out $(BIN)/bench-startup.json

# Rootfs memory: N sandboxes reading one image, virtio-pmem + DAX vs virtio-blk.
bench-dax: all
	go run ./hack/bench/dax -rund $(BIN)/rund -n 20 -out $(BIN)/bench-dax.json

# Cgroup setup: pool vs mkdir+apply+rmdir at 1..200 concurrent workers.
bench-cgpool:
	go run ./hack/bench/cgpool -workers 1,10,50,200 -n 2000 -out $(BIN)/bench-cgpool.json

# Guest kernels: Debian's cloud kernel vs rund's streamlined one.
bench-kernel: all
	go run ./hack/bench/kernel -rund $(BIN)/rund -out $(BIN)/bench-kernel.json

# The OCI runtime-tools validation suite, against runc and rund.
test-oci: all
	hack/test-oci.sh

clean:
	rm -rf $(BIN)
