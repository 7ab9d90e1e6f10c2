#!/usr/bin/env bash
# Builds the tools tests need into a cache keyed by their pinned versions and links them into
# bin/: the local control plane (etcd + kube-apiserver), kubectl and kube-controller-manager
# from tests/controlplane, kube-proxy from tests/datapath/kube-proxy (the same k8s.io/kubernetes
# module, so its build reuses the control plane's compiled packages), CoreDNS with its kubernetes
# plugin from tests/datapath/coredns, helm from tests/helm, and moto's server from PyPI. A second run with
# nothing changed takes a second or two.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$SCM_ROOT"
mkdir -p bin "$SCM_CACHE/tools"

# Key a Go module's build by everything that decides its output.
go_key() {
  (cd "$1" && cat go.mod go.sum $(find . -name '*.go' | sort) | sha256sum | cut -c1-16)
}

build_go_module() { # dir, binaries...
  local dir=$1; shift
  local key; key=$(go_key "$dir")
  local out="$SCM_CACHE/tools/$(basename "$dir")-$key"
  local missing=0
  for b in "$@"; do [ -x "$out/$b" ] || missing=1; done
  if [ "$missing" = 1 ]; then
    echo ">> building $* from $dir (cached in $out; the first build takes several minutes)" >&2
    mkdir -p "$out.tmp"
    (cd "$dir" && go build -trimpath -ldflags='-s -w' -o "$out.tmp/" ./cmd/...)
    rm -rf "$out" && mv "$out.tmp" "$out"
  fi
  for b in "$@"; do ln -sfn "$out/$b" "bin/$b"; done
}

build_go_module tests/controlplane controlplane kubectl kube-controller-manager
build_go_module tests/datapath/kube-proxy kube-proxy
build_go_module tests/datapath/coredns coredns
tests/scripts/datapath-deps.sh
if [ -d tests/helm ]; then
  build_go_module tests/helm helm
fi
if [ -x tests/moto/install.sh ]; then
  moto_server=$(tests/moto/install.sh)
  ln -sfn "$moto_server" bin/moto_server
fi
echo ">> tools ready in bin/: $(ls bin | tr '\n' ' ')" >&2
