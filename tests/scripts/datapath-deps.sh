#!/usr/bin/env bash
# The system tools the data-path tests (tests/datapath) need beside kube-proxy: iproute2 for
# network namespaces, iptables (iptables-save/-restore) and nft for kube-proxy's two modes,
# conntrack for its stale-flow cleanup. Installs the missing ones from Debian's packages when
# run as root with apt-get; otherwise says what is missing and leaves it to the tests to skip.
set -euo pipefail
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v iptables-restore >/dev/null || missing+=(iptables)
command -v nft >/dev/null || missing+=(nftables)
command -v conntrack >/dev/null || missing+=(conntrack)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo ">> installing ${missing[*]} for the data-path tests" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
else
  echo ">> data-path tests need ${missing[*]} (not root or no apt-get: they will be skipped)" >&2
fi
