#!/usr/bin/env bash
# amigafuse bootstrap: installs everything it needs on Debian/Ubuntu, then runs a job.
#   ./bootstrap.sh demo    set up, make a sample disk, mount it through the driver, show it
#   ./bootstrap.sh test    set up, run ruff, mypy and the whole test suite
#   ./bootstrap.sh setup   set up only (apt packages + .venv with amigafuse installed)
set -euo pipefail
cd "$(dirname "$0")"
job="${1:-setup}"; shift || true

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

APT_PACKAGES=(qemu-system-x86 qemu-utils fuse3 libfuse3-dev pkg-config gcc python3-dev
              python3-venv attr util-linux mount man-db busybox-static cpio)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bootstrap: installing apt packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.amigafuse-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing amigafuse and its Python dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test,fuse]'
  touch "$stamp"
fi

case "$job" in
  setup) echo "bootstrap: ready. Activate with: . .venv/bin/activate" ;;
  test)
    .venv/bin/ruff check amigafuse tests benchmarks
    .venv/bin/mypy
    exec .venv/bin/python -m pytest "$@"
    ;;
  demo) exec ./scripts/demo.sh "$@" ;;
  *) echo "usage: $0 demo|test|setup" >&2; exit 2 ;;
esac
