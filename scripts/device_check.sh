#!/usr/bin/env bash
# One prepared run on a lent GPU machine (its own torch, no network): the CPU test suite under
# that torch version, then the CUDA smoke check. Wheels for pytest come from .device/wheels
# (pip download them here; the folder is carried, not committed).
set -u
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 --version; python3 -c "import torch; print('torch', torch.__version__)"
python3 -m venv --system-site-packages /tmp/venv
/tmp/venv/bin/pip install -q --no-index --find-links .device/wheels pytest tqdm
export PYTHONPATH=$PWD/src
echo "== CUDA smoke"
timeout 150 /tmp/venv/bin/python scripts/cuda_smoke.py 2>&1 | tail -20
echo "== CPU test suite under this torch"
timeout 330 /tmp/venv/bin/python -m pytest -q -x -p no:cacheprovider --deselect tests/test_simulate.py \
    -k "not render and not timeline" tests 2>&1 | tail -25
