#!/usr/bin/env bash
# The whole test suite from a fresh clone: set-up, generated-code check, lint, type check, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
VPY=.venv/bin/python
echo "== proto: generated code is current"
"$VPY" scripts/gen_proto.py --check
echo "== ruff (lint, then formatting)"
"$VPY" -m ruff check .
"$VPY" -m ruff format --check .
echo "== mypy (every package: pyproject [tool.mypy] files)"
"$VPY" -m mypy
echo "== scanners (checkov, hadolint) on k8s overlays and the Dockerfile"
bash scripts/scan.sh
echo "== pytest"
"$VPY" -m pytest -q "$@"
