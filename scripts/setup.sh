#!/usr/bin/env bash
# Set up latentdiff in ./.venv: CPU PyTorch, the package (editable) with its server, the test-only
# reference libraries, and Chromium for the page test.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: a bare "torch" requirement could pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | { grep -v "^WARNING: Location" || true; }
.venv/bin/python -m pip install -q -e ".[server,test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
.venv/bin/python -m pip install -q --no-deps torch-fidelity k-diffusion 2>&1 | { grep -v "^WARNING: Location" || true; }
# Chromium for the web page's browser test (Debian's package; Playwright uses it, never its own download).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
            || echo "setup: could not install chromium; the page test will be skipped" >&2
    else
        echo "setup: chromium is not installed (apt-get install chromium as root); the page test will be skipped" >&2
    fi
fi
.venv/bin/python -c "import latentdiff, torch; print('latentdiff', latentdiff.__version__, '| torch', torch.__version__)"
