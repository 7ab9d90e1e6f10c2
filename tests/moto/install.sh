#!/usr/bin/env bash
# Installs moto's server (the AWS emulator the cloud-lb integration tests and benchmark run
# against) into a virtualenv outside the repository, keyed by its pinned version, and prints the
# path of its `moto_server` executable. Idempotent: a second run only checks a stamp file.
#
#   MOTO_VERSION   pinned version (default below; bump it here, the cache key follows)
#   SCM_CACHE      cache root (default ~/.cache/service-controller-manager)
#   PYTHON         interpreter to build the venv with (default python3)
set -euo pipefail

MOTO_VERSION="${MOTO_VERSION:-5.2.5}"
CACHE_ROOT="${SCM_CACHE:-${HOME}/.cache/service-controller-manager}"
VENV="${CACHE_ROOT}/moto-${MOTO_VERSION}"
STAMP="${VENV}/.installed"
PY="${PYTHON:-python3}"

if [[ -f "${STAMP}" && -x "${VENV}/bin/moto_server" ]]; then
  echo "${VENV}/bin/moto_server"
  exit 0
fi

mkdir -p "${CACHE_ROOT}"
# The stamp is written last: a venv without it is a leftover of an interrupted install and is
# rebuilt from scratch. (venv scripts carry absolute shebangs, so build in place, not elsewhere
# and move.)
rm -rf "${VENV}"
"${PY}" -m venv "${VENV}" >&2
"${VENV}/bin/python" -m pip install --quiet --disable-pip-version-check \
  "moto[server]==${MOTO_VERSION}" >&2
"${VENV}/bin/moto_server" --help >/dev/null
touch "${STAMP}"
echo "${VENV}/bin/moto_server"
