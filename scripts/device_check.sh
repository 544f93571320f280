#!/usr/bin/env bash
# One prepared run on a lent GPU machine (its own torch, no network):
#   1. bench/gpu_check.py: CUDA gradient equality (single-process and two host-staged processes
#      sharing the GPU) and per-step time of each mode; the markdown goes to $OUT/gpu_check.md
#   2. tests/test_gpu.py: the CUDA tests that CI skips
#   3. with --cpu-suite: the CPU test suite under this torch (tests/conftest.py hides the GPU)
# Wheels for pytest come from .device/wheels (pip download them here; the folder is carried, not
# committed). The older scripts/cuda_smoke.py is still there to run by hand.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 --version; python3 -c "import torch; print('torch', torch.__version__)"
python3 -m pip install -q --no-index --find-links .device/wheels --target /tmp/pylibs pytest tqdm safetensors || true

export PYTHONPATH=$PWD/src:$PWD:/tmp/pylibs
echo "== GPU check"
OUT=$OUT timeout 480 python3 bench/gpu_check.py --out "$OUT/gpu_check.md" 2>&1 | tail -40
echo "== CUDA tests"
CONVEYOR_TEST_CUDA=1 timeout 180 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tail -15
if [ "${1:-}" = "--cpu-suite" ]; then
    echo "== CPU test suite under this torch (GPU hidden)"
    timeout 330 python3 -m pytest -q -x -p no:cacheprovider --deselect tests/test_simulate.py \
        --deselect tests/test_bench_smoke.py -k "not render and not timeline" tests 2>&1 | tail -25
fi
