#!/usr/bin/env bash
# One pass on a GPU machine, most wanted first, within one budget (BUDGET seconds, default 540, so
# that it fits one 10-minute device call): the CUDA tests, the prioritized and graph timings, the
# TD3 agent at 4096 lanes eager and from a CUDA graph, the benchmarks, PPO, the whole suite.
# Each step gets its own limit or what is left of the budget, whichever is less; a step that
# would get under 20 s is skipped (its log says so). Everything is written under $OUT (default
# bench/results/gpu). Usage: [BUDGET=540] bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
END=$((SECONDS + BUDGET))
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
# The kernels folder installs as gpubuffers.kernels; without an install, a link gives the same layout.
[ -e gpubuffers/kernels ] || ln -s ../kernels gpubuffers/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

step() {  # step NAME LIMIT_S LOG COMMAND...
    local name=$1 limit=$2 log=$OUT/$3; shift 3
    local left=$((END - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name (limit ${limit}s)"
    if [ "$limit" -lt 20 ]; then echo "skipped: ${left}s of the budget left" | tee "$log"; return; fi
    timeout "$limit" "$@" >"$log" 2>&1
    echo "exit $? after $((SECONDS - (END - BUDGET)))s of the budget" >>"$log"
    tail -20 "$log"
}

step "CUDA tests" 150 test_cuda.log $PY -m pytest -q tests/test_cuda.py tests/test_graph_cursors.py
step "prioritized at 2^26 and per-call costs" 100 profile.log $PY -m bench.profile_calls
step "graph bench" 60 graph.log $PY -m bench.graph --out "$OUT"
step "TD3 at 4096 lanes, CUDA graph" 60 td3_graph.log $PY examples/td3.py --num-envs 4096 --cuda-graph \
    --iterations 600 --max-minutes 0.75 --quiet --out "$OUT"
step "TD3 at 4096 lanes, eager" 60 td3_eager.log $PY examples/td3.py --num-envs 4096 \
    --iterations 600 --max-minutes 0.75 --quiet --out "$OUT"
step "bench" 150 bench.log $PY -m bench --no-torchrl --out "$OUT"
step "PPO at 4096 lanes" 60 ppo.log $PY examples/ppo.py --num-envs 4096 --quiet --out "$OUT"
step "bench.ops" 60 ops.log $PY -m bench.ops
step "bench.workers (W9: mirror add from CUDA)" 60 workers.log $PY -m bench.workers --quick --workers 0,4 --out "$OUT"
step "whole suite" 300 tests.log $PY -m pytest -q -n 8 tests --deselect tests/test_kernel_compile.py
