#!/usr/bin/env bash
# One prepared run on a lent GPU machine (its own torch, no network):
#   1. bench/gpu_check.py: CUDA gradient equality (single-process and two host-staged processes
#      sharing the GPU) and per-step time of each mode; the markdown goes to $OUT/gpu_check.md
#   2. bench/gpu_profile.py: unsplit (whole and accumulated), local and two-process step times and
#      profiler tables (checks the pinned tied-gradient exchange, unmeasured on a GPU so far)
#   3. tests/test_gpu.py: the CUDA tests that CI skips
#   4. with --cpu-suite: the CPU test suite under this torch (tests/conftest.py hides the GPU)
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
echo "== Where the GPU step's time goes (profiler tables to \$OUT/gpu_profile.txt)"
OUT=$OUT timeout 200 python3 bench/gpu_profile.py 2>&1 | grep -v USDT | head -8
echo "== CUDA tests"
CONVEYOR_TEST_CUDA=1 timeout 180 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tail -15
if [ "${1:-}" = "--cpu-suite" ]; then
    echo "== CPU test suite under this torch (GPU hidden)"
    timeout 330 python3 -m pytest -q -x -p no:cacheprovider --deselect tests/test_simulate.py \
        --deselect tests/test_bench_smoke.py -k "not render and not timeline" tests 2>&1 | tail -25
fi
