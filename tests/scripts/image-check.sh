#!/usr/bin/env bash
# No Docker engine runs on our machines, so this checks what the Dockerfile would copy into the
# image instead: it builds the manager with the Dockerfile's command (static, --release), then
# checks with `file` and `ldd` that it is statically linked, and that it starts (`--version`)
# with an empty environment and as the image's non-root UID 65532.
#
#   tests/scripts/image-check.sh [--profile release|dev]   (dev: quicker, same link mode)
#
# The Dockerfile's default target is musl: the script uses it when installed, else adds it with
# rustup (and musl-tools from Debian for musl-gcc). Where rustup cannot add it, the check builds
# the Dockerfile's TARGET=x86_64-unknown-linux-gnu variant instead: glibc, static via crt-static.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$SCM_ROOT"

PROFILE=release
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE=$2; shift 2 ;;
    --profile=*) PROFILE=${1#--profile=}; shift ;;
    *) echo "image-check.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

MUSL=x86_64-unknown-linux-musl
GNU=x86_64-unknown-linux-gnu
if rustup target list --installed 2>/dev/null | grep -qx "$MUSL"; then
  TARGET=$MUSL
elif timeout 120 rustup target add "$MUSL" >/dev/null 2>&1; then
  TARGET=$MUSL
else
  TARGET=$GNU
  echo ">> $MUSL is not installed and rustup could not add it here; checking the Dockerfile's" >&2
  echo ">> TARGET=$GNU variant (glibc, static via crt-static)" >&2
fi
if [ "$TARGET" = "$MUSL" ] && ! command -v musl-gcc >/dev/null; then
  # aws-lc-sys compiles C for the target: it needs musl's gcc wrapper (as the Dockerfile installs).
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo ">> installing musl-tools (musl-gcc) from Debian's packages" >&2
    apt-get install -y --no-install-recommends musl-tools >/dev/null 2>&1 ||
      { apt-get update >/dev/null && apt-get install -y --no-install-recommends musl-tools >/dev/null; }
  else
    echo "image-check: the musl target needs musl-gcc (apt-get install musl-tools)" >&2
    exit 1
  fi
fi

echo ">> cargo build --profile $PROFILE --target $TARGET (static); a cold release build takes well over 10 min" >&2
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --locked --profile "$PROFILE" --bin service-controller-manager --target "$TARGET"
dir=$PROFILE; [ "$PROFILE" = dev ] && dir=debug
BIN="$CARGO_TARGET_DIR/$TARGET/$dir/service-controller-manager"

fail() { echo "image-check: FAIL: $*" >&2; exit 1; }
desc=$(file -L "$BIN")
echo "file: $desc"
case "$desc" in
  *"statically linked"*|*"static-pie linked"*) ;;
  *) fail "not statically linked" ;;
esac
lddout=$(ldd "$BIN" 2>&1 || true)
echo "ldd: $lddout"
case "$lddout" in
  *"not a dynamic executable"*|*"statically linked"*) ;;
  *) fail "ldd lists shared libraries" ;;
esac
version=$(env -i "$BIN" --version) || fail "--version did not run"
echo "--version: $version"
case "$version" in service-controller-manager\ *) ;; *) fail "unexpected --version output" ;; esac
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null; then
  # The image runs it as 65532 with no other files around; it must need nothing but itself.
  tmp=$(mktemp -d); cp "$BIN" "$tmp/"; chmod 755 "$tmp" "$tmp/service-controller-manager"
  setpriv --reuid 65532 --regid 65532 --clear-groups env -i "$tmp/service-controller-manager" --version >/dev/null \
    || { rm -rf "$tmp"; fail "--version as UID 65532"; }
  rm -rf "$tmp"
  echo "runs as UID 65532: ok"
fi
echo "size: $(du -h "$BIN" | cut -f1)"
echo "image-check: ok ($TARGET, $PROFILE)"
