#!/usr/bin/env bash
# One prepared run on a lent GPU machine (its own torch, no network): the CPU test suite under
# that torch version, then the CUDA smoke check. Wheels for pytest come from .device/wheels
# (pip download them here; the folder is carried, not committed).
set -u
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 --version; python3 -c "import torch; print('torch', torch.__version__)"
python3 -m pip install -q --no-index --find-links .device/wheels --target /tmp/pylibs pytest tqdm safetensors || true

export PYTHONPATH=$PWD/src:/tmp/pylibs
echo "== CUDA smoke"
timeout 150 python3 scripts/cuda_smoke.py 2>&1 | tail -20
echo "== CPU test suite under this torch"
timeout 330 python3 -m pytest -q -x -p no:cacheprovider --deselect tests/test_simulate.py --deselect tests/test_bench_smoke.py \
    -k "not render and not timeline" tests 2>&1 | tail -25
