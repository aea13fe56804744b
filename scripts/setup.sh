#!/usr/bin/env bash
# Create .venv in the repository root and install guie with its dependencies (CPU machines included).
# torch/torchvision are pinned by constraints.txt to releases known to work with timm and open_clip here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt "torch" "torchvision"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
.venv/bin/guie --help >/dev/null
echo "guie installed in .venv (run: .venv/bin/guie --help)"
