#!/usr/bin/env bash
# Create .venv and install specdecode with its test extras. Installs torch 2.13.0 first when the
# venv has none: on these machines that wheel is a CPU build on local disk, and pinning it keeps
# pip from resolving an open requirement to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
fi
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import specdecode, torch; print('specdecode', specdecode.__version__, '| torch', torch.__version__)"
