# Shared settings for the repo's scripts: where caches live (outside the clone, so a fresh CI
# clone reuses them) and which Go toolchain to use.
# shellcheck shell=bash
export SCM_CACHE="${SCM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/scm}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SCM_CACHE/target}"
# k8s.io/kubernetes v1.37 needs Go 1.26; the machine's Go is new enough, so no GOTOOLCHAIN pin.
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
SCM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export SCM_ROOT
