#!/usr/bin/env bash
# Build the MONAI Deploy and MONAI Label environments of medir-monai and run each app once (docs/deploy.md).
#
#   scripts/deploy_envs.sh [--root DIR] [--python PYTHON] [--rebuild] [deploy|label|all]
#
# Each environment is a separate virtualenv under --root (default ~/.cache/medir-envs) because the pins conflict
# with the development environment (docs/deploy.md, "Why separate environments"):
#   deploy: the project + monai-deploy-app-sdk 4.0.0 (Holoscan 4.6, CPU-only works), highdicom, SimpleITK, ONNX
#   label:  the project + monailabel 0.8.5, which needs numpy<2 (numpymaxflow) and a torchvision matching torch
# torch is installed first (TORCH_SPEC, default torch==2.13.0; add e.g.
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for the CPU-only wheel).
# Then the demo inputs are made (scripts/make_deploy_demo.py), the Deploy app restores the DICOM series, and the
# Label server is started on localhost, asked for /info/ and /infer/, and stopped; a scan outside the model's
# training data must get the input guard's warning in both apps' logs. Last, tests/test_deploy.py and
# tests/test_export.py run in each environment (the development environment skips the app tests).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${HOME}/.cache/medir-envs"
PYTHON="${PYTHON:-python3}"
REBUILD=0
WHAT="all"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --root) ROOT="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    deploy|label|all) WHAT="$1"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_PIP_ARGS="${TORCH_PIP_ARGS:-}"
DEPLOY_PKGS=(onnx==1.23.2 onnxruntime==1.32.0 monai-deploy-app-sdk==4.0.0 highdicom==0.28.2 SimpleITK==2.5.7)
LABEL_PKGS=(monailabel==0.8.5 torchvision==0.28.0 "numpy<2")
LABEL_PORT="${LABEL_PORT:-8123}"
DEMO="$ROOT/demo"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
ulimit -s 32768 2>/dev/null || true  # Holoscan warns below a 32 MB stack

say() { printf '\n== %s\n' "$*"; }

make_env() {  # make_env NAME: a fresh virtualenv with torch, setuptools and wheel
  local env="$ROOT/$1"
  if [[ $REBUILD == 1 ]]; then rm -rf "$env"; fi
  if [[ ! -x "$env/bin/python" ]]; then
    "$PYTHON" -m venv "$env"
  fi
  # shellcheck disable=SC2086
  "$env/bin/pip" install -q $TORCH_PIP_ARGS "$TORCH_SPEC" wheel "setuptools>=68"
}

build_deploy() {
  say "building $ROOT/deploy"
  make_env deploy
  "$ROOT/deploy/bin/pip" install -q -e "$REPO[dev]" "${DEPLOY_PKGS[@]}"
  "$ROOT/deploy/bin/python" - <<'EOF'
import importlib.metadata as md
print("  " + ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "monai", "monai-deploy-app-sdk", "holoscan-cu13", "highdicom", "SimpleITK", "pydicom", "numpy",
       "onnx", "onnxruntime")))
EOF
}

build_label() {
  say "building $ROOT/label"
  make_env label
  local torch_version
  torch_version="$("$ROOT/label/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
  # sam2 (a monailabel dependency) is a source package that builds against the installed torch: no CUDA build,
  # no build isolation (isolation would fetch the newest torch into the build environment)
  printf 'torch==%s\n' "$torch_version" > "$ROOT/label-constraints.txt"
  SAM2_BUILD_CUDA=0 "$ROOT/label/bin/pip" install -q --no-build-isolation -c "$ROOT/label-constraints.txt" \
    -e "$REPO[dev]" "${LABEL_PKGS[@]}"
  "$ROOT/label/bin/python" - <<'EOF'
import importlib.metadata as md
print("  " + ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "torchvision", "monai", "monailabel", "pydicom", "pydicom-seg", "numpy", "sam2")))
EOF
}

make_demo() {
  say "demo inputs in $DEMO"
  rm -rf "$DEMO"
  "$1/bin/python" "$REPO/scripts/make_deploy_demo.py" --out "$DEMO"
}

run_deploy() {
  say "MONAI Deploy app: python -m medir_monai.deploy.app -i $DEMO/ct_series -o $DEMO/deploy_out -m $DEMO/amir.ts"
  HOLOSCAN_LOG_LEVEL=WARN "$ROOT/deploy/bin/python" -m medir_monai.deploy.app -i "$DEMO/ct_series" \
    -o "$DEMO/deploy_out" -m "$DEMO/amir.ts" -l WARN 2>&1 | tee "$DEMO/deploy.log"
  if grep -q "outside the model's training data" "$DEMO/deploy.log"; then
    echo "  FAIL: the input guard warned on a scan inside the training data" >&2; return 1
  fi
  say "MONAI Deploy app on a scan outside the training data (0.1 mm pixels): the guard's warning must reach the log"
  HOLOSCAN_LOG_LEVEL=WARN "$ROOT/deploy/bin/python" -m medir_monai.deploy.app -i "$DEMO/ct_series_fine" \
    -o "$DEMO/deploy_out" -m "$DEMO/amir.ts" -l WARN 2>&1 | tee "$DEMO/deploy_fine.log"
  if ! grep -q "outside the model's training data" "$DEMO/deploy_fine.log"; then
    echo "  FAIL: no input-guard warning for ct_series_fine" >&2; return 1
  fi
  "$ROOT/deploy/bin/python" - "$DEMO" <<'EOF'
import sys
from pathlib import Path
import numpy as np, pydicom
from pydicom.pixels import apply_modality_lut
demo = Path(sys.argv[1])
src = [pydicom.dcmread(p) for p in sorted((demo / "ct_series").iterdir())]
out = [pydicom.dcmread(p) for p in sorted((demo / "deploy_out" / "ct_series_restored").iterdir())]
print(f"  input : {len(src)} files, series {src[0].SeriesInstanceUID}, '{src[0].SeriesDescription}', {src[0].ImageType}")
print(f"  output: {len(out)} files, series {out[0].SeriesInstanceUID}, '{out[0].SeriesDescription}', {list(out[0].ImageType)}")
print(f"  same study / patient: {out[0].StudyInstanceUID == src[0].StudyInstanceUID} / {out[0].PatientID == src[0].PatientID};"
      f" new SOP UIDs: {not {d.SOPInstanceUID for d in out} & {d.SOPInstanceUID for d in src}}")
hu_in = np.stack([apply_modality_lut(d.pixel_array, d) for d in src])
hu_out = np.stack([apply_modality_lut(d.pixel_array, d) for d in out])
print(f"  HU in [{hu_in.min():.0f}, {hu_in.max():.0f}] -> out [{hu_out.min():.1f}, {hu_out.max():.1f}], "
      f"slope {out[0].RescaleSlope} intercept {out[0].RescaleIntercept}, mean |out - in| {np.abs(hu_out - hu_in).mean():.1f} HU")
assert len(out) == len(src) and out[0].SeriesInstanceUID != src[0].SeriesInstanceUID, "not a new series of all slices"
assert 0 < np.abs(hu_out - hu_in).mean() < 100, "the restored series is unchanged or far from its input"
EOF
}

run_label() {
  say "MONAI Label server: python -m medir_monai.deploy.label start_server (port $LABEL_PORT)"
  local log="$DEMO/label_server.log"
  "$ROOT/label/bin/python" -m medir_monai.deploy.label start_server --app "$REPO/medir_monai/deploy/label" \
    --studies "$DEMO/studies" --conf models "amir=$DEMO/amir.ts" --conf task ct_denoise \
    --host 127.0.0.1 --port "$LABEL_PORT" > "$log" 2>&1 &
  local pid=$!
  trap 'kill "$pid" 2>/dev/null || true' EXIT
  for _ in $(seq 1 90); do
    if "$ROOT/label/bin/python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$LABEL_PORT/info/', timeout=2)" 2>/dev/null; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then tail -30 "$log"; echo "label server exited" >&2; return 1; fi
    sleep 2
  done
  "$ROOT/label/bin/python" - "$LABEL_PORT" "$DEMO" <<'EOF'
import json, sys, urllib.request
from pathlib import Path
import nibabel as nib, numpy as np
port, demo = sys.argv[1], Path(sys.argv[2])
info = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/info/"))
print(f"  /info/: app '{info['name']}', models {json.dumps({k: v['type'] for k, v in info['models'].items()})}")
req = urllib.request.Request(f"http://127.0.0.1:{port}/infer/amir?image=ct_volume&output=all", method="POST")
with urllib.request.urlopen(req, timeout=600) as r:
    body = r.read()
    ctype = r.headers.get("content-type", "")
print(f"  /infer/amir?image=ct_volume: HTTP 200, {ctype.split(';')[0]}, {len(body)} bytes")
req = urllib.request.Request(f"http://127.0.0.1:{port}/infer/amir?image=ct_volume&output=image", method="POST")
out = demo / "label_restored.nii.gz"
out.write_bytes(urllib.request.urlopen(req, timeout=600).read())
img, src = nib.load(str(out)), nib.load(str(demo / "studies" / "ct_volume.nii.gz"))
a = img.get_fdata(dtype=np.float32)
print(f"  restored volume: shape {img.shape}, dtype {img.get_data_dtype()}, same affine {np.allclose(img.affine, src.affine)},"
      f" HU [{a.min():.1f}, {a.max():.1f}]")
assert img.shape == src.shape and np.allclose(img.affine, src.affine), "restored volume not on the input grid"
req = urllib.request.Request(f"http://127.0.0.1:{port}/infer/amir?image=ct_volume_fine&output=image", method="POST")
urllib.request.urlopen(req, timeout=600).read()
print("  /infer/amir?image=ct_volume_fine (0.1 mm pixels, outside the training data): HTTP 200")
EOF
  sleep 1
  if ! grep -q "outside the model's training data" "$log"; then
    echo "  FAIL: no input-guard warning in the Label server log for ct_volume_fine" >&2; return 1
  fi
  grep -m1 "outside the model's training data" "$log" | sed 's/^/  server log: /'
  if [[ $(grep -c "outside the model's training data" "$log") -ne 1 ]]; then
    echo "  FAIL: the input guard warned on ct_volume (inside the training data)" >&2; return 1
  fi
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  trap - EXIT
}

run_tests() {  # run_tests NAME: the deploy / export tests, which the development environment skips, in NAME's env
  say "tests in $ROOT/$1: tests/test_deploy.py tests/test_export.py"
  (cd "$REPO" && "$ROOT/$1/bin/python" -m pytest -q -p no:cacheprovider tests/test_deploy.py tests/test_export.py \
    2>&1 | tail -3)
}

mkdir -p "$ROOT"
case "$WHAT" in
  deploy) build_deploy; make_demo "$ROOT/deploy"; run_deploy; run_tests deploy ;;
  label)  build_label;  make_demo "$ROOT/label";  run_label; run_tests label ;;
  all)    build_deploy; build_label; make_demo "$ROOT/deploy"; run_deploy; run_label; run_tests deploy; run_tests label ;;
esac
say "done"
