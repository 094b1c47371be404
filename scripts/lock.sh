#!/usr/bin/env bash
# Re-resolve the lock files from pyproject.toml; setup.sh (CI) and the Dockerfile install from them.
#   requirements.lock       the runtime dependencies (the Dockerfile)
#   requirements-dev.lock   runtime + the dev extra, the runtime pins unchanged (setup.sh, CI)
# Both are universal (any OS/arch, Python 3.11+) with hashes. Existing pins are kept unless
# `--upgrade` (or `--upgrade-package NAME`) is passed through. torch is in neither: setup.sh and the
# Dockerfile install its CPU build first, pinned (a bare `torch` would pull CUDA wheels).
# Needs uv (`pip install uv`; uv ignores pip.conf, so it resolves against PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
common=(--universal --python-version 3.11 --generate-hashes --quiet "$@")
"$UV" pip compile pyproject.toml "${common[@]}" -o requirements.lock
"$UV" pip compile pyproject.toml --extra dev -c requirements.lock "${common[@]}" -o requirements-dev.lock
echo "lock: $(grep -c '==' requirements.lock) runtime, $(grep -c '==' requirements-dev.lock) runtime+dev packages"
