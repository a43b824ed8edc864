#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (an H200; see the device tool's METHOD.md):
# the GPU test-suite against the float64 reference at full size, then the GPU headline
# benchmarks, printing a short table last. Logs and results go under $OUT.
#   run: bash scripts/device_check.sh      (the kernels JIT-compile on first use)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
OUT=${OUT:-/tmp/kdfast-device}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "import kdfast; print(kdfast.available_backends())" | tee -a "$OUT/gpu.txt"

# Correctness first: every GPU backend (triton, cuda, torch on cuda tensors).
timeout 240 python3 -m pytest -q -p no:cacheprovider -k cuda \
    tests/backends/test_gpu.py tests/loss/test_correctness.py tests/loss/test_edge_cases.py tests/loss/test_fused_linear.py \
    > "$OUT/tests.log" 2>&1
echo "tests: $(tail -1 "$OUT/tests.log")"

# Then speed: the issue-3/4 headline (N=8192, V in {32000, 128256, 262144}) and the fused linear.
timeout 300 python3 -m benchmarks.run --suite gpu-core --device cuda --out "$OUT/bench" > "$OUT/bench.log" 2>&1
timeout 150 python3 -m benchmarks.run --suite fused-linear --device cuda --out "$OUT/bench" > "$OUT/fused.log" 2>&1
tail -30 "$OUT/fused.log"
tail -40 "$OUT/bench.log"
