#!/usr/bin/env bash
# Set up latentdiff in ./.venv: CPU PyTorch, the package (editable) and the test-only reference libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: a bare "torch" requirement could pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | { grep -v "^WARNING: Location" || true; }
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
.venv/bin/python -m pip install -q --no-deps torch-fidelity k-diffusion 2>&1 | { grep -v "^WARNING: Location" || true; }
.venv/bin/python -c "import latentdiff, torch; print('latentdiff', latentdiff.__version__, '| torch', torch.__version__)"
