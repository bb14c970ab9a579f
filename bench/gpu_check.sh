#!/usr/bin/env bash
# One pass on a GPU machine: install, the CUDA tests and the whole suite, then the benchmarks.
# Everything is written under $OUT (default bench/results/gpu). Usage: bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
# The kernels folder installs as gpubuffers.kernels; without an install, a link gives the same layout.
[ -e gpubuffers/kernels ] || ln -s ../kernels gpubuffers/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
echo "== CUDA tests"; timeout 240 $PY -m pytest -q tests/test_cuda.py tests/test_graph_cursors.py 2>&1 | tee "$OUT/test_cuda.log" | tail -25
echo "== graph bench"; { timeout 120 $PY -m bench.graph --out "$OUT"; timeout 150 $PY -m bench.profile_calls; } 2>&1 | tee "$OUT/graph.log" | tail -30
echo "== whole suite"; timeout 300 $PY -m pytest -q -n 8 tests --deselect tests/test_kernel_compile.py 2>&1 | tee "$OUT/tests.log" | tail -12
echo "== bench"; timeout 200 $PY -m bench --no-torchrl --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30
echo "== bench.workers (W9: mirror add from CUDA)"; timeout 90 $PY -m bench.workers --quick --workers 0,4 --out "$OUT" 2>&1 | tee "$OUT/workers.log" | tail -8
echo "== bench.ops"; timeout 100 $PY -m bench.ops 2>&1 | tee "$OUT/ops.log" | tail -25
echo "== PPO example"; timeout 120 $PY examples/ppo.py --num-envs 4096 --quiet --out "$OUT" 2>&1 | tee "$OUT/ppo.log" | tail -3
