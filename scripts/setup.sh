#!/usr/bin/env bash
# Create .venv in the repository root and install guie with its dependencies (CPU machines included).
# torch/torchvision are pinned by constraints.txt to releases known to work with timm and open_clip here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Debian's chromium + chromedriver: the search page test drives the page in a real headless browser. Installed when
# running as root (CI does); elsewhere, install them once with the same command, or that one test skips.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# System library: libcairo2, which CairoSVG needs to draw the icon benchmark's SVG themes. (The glyph and icon
# benchmarks fetch Debian packages at run time with apt-get + dpkg-deb, present on Debian/Ubuntu.)
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && ! ldconfig -p | grep -q 'libcairo\.so\.2'; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends libcairo2 >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt "torch" "torchvision"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
.venv/bin/guie --help >/dev/null
echo "guie installed in .venv (run: .venv/bin/guie --help)"
