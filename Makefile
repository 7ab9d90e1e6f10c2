# Entry points, in the kubebuilder tradition. `make test` is what CI runs.
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
ENV := source tests/scripts/env.sh &&
UP_DIR := .scm/up

.PHONY: help tools build test lint unit chaos e2e run up down demo image-check clean-tools

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

tools: ## build the control plane, kubectl, kube-controller-manager, kube-proxy, CoreDNS, helm and moto into bin/
	@tests/scripts/tools.sh

build: ## build the manager (debug)
	@$(ENV) cargo build --locked --bin service-controller-manager

lint: ## rustfmt and clippy, warnings are errors
	@$(ENV) cargo fmt --all -- --check && cargo clippy --locked --workspace --all-targets -- -D warnings

test: tools lint ## everything CI runs: lint, unit, property and integration tests
	@$(ENV) cargo test --locked --workspace --no-fail-fast

unit: ## only the fast tests that need no control plane
	@$(ENV) cargo test --locked --workspace --lib --bins

# Every scenario appends its row (test_support::chaos: "-" where an invariant does not apply);
# the failed tests are listed below the table, since one that fails early writes no row.
chaos: tools ## the failure scenarios (tests/faults; rule quota, throttling, deletion protection and a full address pool in tests/cloud_lb) and a table of their invariants
	@$(ENV) rc=0; export SCM_CHAOS_REPORT="$$CARGO_TARGET_DIR/chaos.tsv"; log="$$CARGO_TARGET_DIR/chaos.log"; \
	  rm -f "$$SCM_CHAOS_REPORT" "$$log"; \
	  cargo test --locked --test faults -- --include-ignored 2>&1 | tee -a "$$log" || rc=1; \
	  cargo test --locked --test cloud_lb -- --include-ignored quota throttle deletion_protection pool_exhausted 2>&1 | tee -a "$$log" || rc=1; \
	  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' scenario faults outcome slices-differ double-allocations leaked panics converged; \
	  cat "$$SCM_CHAOS_REPORT" 2>/dev/null; \
	  failed=$$(sed -n 's/^test \(.*\) \.\.\. FAILED$$/\1/p' "$$log"); \
	  if [ -n "$$failed" ]; then printf '\nfailed (one that failed before its invariants has no row; output above):\n%s\n' "$$failed"; fi; \
	  exit $$rc

# tests/datapath: every scenario in iptables and nftables mode with our slices, then the control
# runs with kube-controller-manager's slice controllers in place of ours (ignored in make test),
# and one table of all rows (a test that stopped before its table has none: see the failures).
e2e: tools ## the data-path scenarios (kube-proxy iptables/nftables, CoreDNS), with our slices and kube-controller-manager's as the control, and a table of them
	@$(ENV) rc=0; log="$$CARGO_TARGET_DIR/e2e.log"; rm -f "$$log"; \
	  cargo test --locked --test datapath -- --include-ignored --test-threads=1 --nocapture 2>&1 | tee "$$log" || rc=1; \
	  printf '\n%-32s %-9s %-7s %-7s %s\n' scenario mode slices result time-to-traffic; \
	  grep -a -P '^datapath-row\t(?!scenario\t)' "$$log" | \
	    awk -F'\t' '{printf "%-32s %-9s %-7s %-7s %s\n", $$2, $$3, $$4, $$5, $$6}' || true; \
	  failed=$$(sed -n 's/^test \(.*\) \.\.\. FAILED$$/\1/p' "$$log"); \
	  if [ -n "$$failed" ]; then printf '\nfailed:\n%s\n' "$$failed"; fi; \
	  exit $$rc

run: build ## run the manager against $$KUBECONFIG (make up prints one)
	@$(ENV) "$$CARGO_TARGET_DIR/debug/service-controller-manager" --kubeconfig "$${KUBECONFIG:?set KUBECONFIG, e.g. from make up}" $(ARGS)

up: tools ## start the local control plane in the background and print its KUBECONFIG
	@mkdir -p $(UP_DIR)
	@if [ -f $(UP_DIR)/pid ] && kill -0 $$(cat $(UP_DIR)/pid) 2>/dev/null; then \
	  echo "already up"; else \
	  rm -f $(UP_DIR)/ready; \
	  (nohup bin/controlplane --data-dir $(UP_DIR)/data --kubeconfig $(UP_DIR)/admin.kubeconfig \
	     --pid-file $(UP_DIR)/pid $(CONTROLPLANE_ARGS) > $(UP_DIR)/ready 2> $(UP_DIR)/controlplane.log &); \
	  for i in $$(seq 1 900); do grep -q '^controlplane ready' $(UP_DIR)/ready 2>/dev/null && break; \
	    if [ $$i -gt 10 ] && ! { [ -f $(UP_DIR)/pid ] && kill -0 $$(cat $(UP_DIR)/pid) 2>/dev/null; }; then break; fi; sleep 0.2; done; \
	  grep -q '^controlplane ready' $(UP_DIR)/ready || { echo "control plane failed; see $(UP_DIR)/controlplane.log"; tail -20 $(UP_DIR)/controlplane.log; exit 1; }; \
	fi
	@echo "export KUBECONFIG=$(CURDIR)/$(UP_DIR)/admin.kubeconfig"

down: ## stop the local control plane started by make up
	@if [ -f $(UP_DIR)/pid ]; then pid=$$(cat $(UP_DIR)/pid); kill $$pid 2>/dev/null || true; \
	  for i in $$(seq 1 100); do kill -0 $$pid 2>/dev/null || break; sleep 0.1; done; fi; \
	  rm -rf $(UP_DIR); echo "down"

demo: tools ## build, start a control plane, run the manager and show Services end to end
	@tests/scripts/demo.sh $(ARGS)

image-check: ## build the static binary the Dockerfile copies and check it is static and starts
	@tests/scripts/image-check.sh

clean-tools: ## forget the bin/ links (the cache outside the clone stays)
	@rm -rf bin
