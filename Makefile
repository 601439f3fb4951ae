# Aspire: `make run` serves the MNIST demo, `make test` runs every test.
# Both install what is missing first (scripts/setup.sh).

SHELL := /bin/bash
CARGO ?= cargo
PORT ?= 8500
DEMO_DIR ?= .aspire/demo
RELEASE_BIN := target/release

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

.PHONY: setup
setup: ## Install what is missing: Debian packages, the torch venv, MNIST data
	@bash scripts/setup.sh

.PHONY: build
build: setup ## Build every binary (release)
	$(CARGO) build --release --workspace --bins

.PHONY: run
run: build ## Start etcd, discovery, two workers and the router (127.0.0.1:$(PORT)) serving mnist v1, until Ctrl-C
	@bash scripts/run_stack.sh $(RELEASE_BIN) $(DEMO_DIR) $(PORT)

.PHONY: run-server
run-server: build ## The one-process way: aspire-server serving mnist v1 on 127.0.0.1:$(PORT), until Ctrl-C
	@bash scripts/run_demo.sh $(RELEASE_BIN) $(DEMO_DIR) $(PORT)

.PHONY: test
test: setup ## Install what is missing, then run every test, clippy and rustfmt
	$(CARGO) fmt --all --check
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: bench
bench: setup ## Benchmark on loopback (direct/router, batching off/on, ceilings) into BENCHMARKS.md; BENCH_SECONDS=5 per run
	@bash scripts/bench.sh

.PHONY: soak
soak: setup ## Soak the stack: load through the router while versions arrive, etcd restarts and freezes, a worker dies; SOAK_MINUTES=10; not part of make test
	@bash scripts/soak.sh

FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= tensor_codec wire_split signature_json etcd_values text_config

.PHONY: fuzz
fuzz: setup ## Fuzz every parser of untrusted input, FUZZ_SECONDS=60 each (FUZZ_TARGETS=... for some); not part of make test
	@bash scripts/fuzz.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

.PHONY: fmt
fmt: ## Format the code
	$(CARGO) fmt --all

.PHONY: clean
clean: ## Remove build outputs and the demo directory
	$(CARGO) clean
	rm -rf .aspire
