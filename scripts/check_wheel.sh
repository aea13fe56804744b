#!/usr/bin/env bash
# Build guie's wheel and use it from an install outside the checkout: `guie demo --help` and every shipped recipe
# loaded by name (`guie recipes`). The install is a fresh venv whose site-packages gets one .pth line pointing at
# .venv's site-packages, so it reuses the dependencies already installed (seconds, not a second torch install); the
# .pth files in there (guie's editable install) are not processed, so `import guie` finds the wheel's copy only.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-$PWD/.venv}  # the environment whose dependencies are reused
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/source"  # build from a clean copy: no stale build/ files in the wheel, nothing left in the checkout
tar --exclude=__pycache__ --exclude='*.egg-info' -cf - pyproject.toml README.md src | tar -xf - -C "$WORK/source"
ISOLATION=--no-build-isolation  # setuptools from $VENV when it has one (Python < 3.12 venvs do), else pip fetches it
"$VENV/bin/python" -c 'import setuptools' 2>/dev/null || ISOLATION=
"$VENV/bin/python" -m pip wheel --quiet --no-deps $ISOLATION -w "$WORK/dist" "$WORK/source"
BASE_PY=$("$VENV/bin/python" -c 'import sys; print(sys._base_executable)')
"$BASE_PY" -m venv --without-pip "$WORK/venv"
DEPS=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
SITE=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$DEPS" > "$SITE/_guie_reuse_deps.pth"
"$WORK/venv/bin/python" -m pip install --quiet --no-deps --no-index "$WORK"/dist/guie-*.whl
cd "$WORK"  # outside the checkout
"$WORK/venv/bin/python" - "$SITE" <<'PY'
import sys
from pathlib import Path

import guie

where = Path(guie.__file__).resolve()
assert where.is_relative_to(Path(sys.argv[1]).resolve()), f"guie imported from {where}, not from the wheel"
print(f"guie {guie.__version__} from the wheel: {where.parent}")
PY
"$WORK/venv/bin/guie" demo --help >/dev/null
"$WORK/venv/bin/guie" recipes
echo "wheel OK: $(basename "$WORK"/dist/guie-*.whl)"
