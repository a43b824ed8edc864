#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (an H200, one command of <= 10 min, <= 8 files back):
# correctness of both GPU backends (edge cases first, then full size), compute-sanitizer over the
# small cases, then every kdfast kernel's benchmark cells under time budgets; a short table last.
#
#   bash scripts/device_check.sh            # on the GPU machine; results in $OUT (<= 8 files)
#   bash scripts/device_check.sh --dry-run  # the same steps on the CPU: tiny sizes, Triton's
#                                           # interpreter, no compute-sanitizer (tests/backends/test_device_check.py)
#
# Every step runs under `timeout`, capped by what is left of the whole run's budget (TOTAL_S): a step
# that would start too late is recorded as skipped, so the run always ends, and packs, in time.
# Steps are ordered by what the first GPU run must not miss. Exit status 1 when any step failed.
set -uo pipefail

DRY=0
[[ ${1:-} == --dry-run ]] && DRY=1
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/kdfast-device}
PY=${PYTHON:-python3}
# 470 s of steps + packing leaves the 600 s command limit room for the machine's own start-up.
TOTAL_S=${DEVICE_CHECK_TOTAL_S:-$([[ $DRY == 1 ]] && echo 240 || echo 470)}
RESERVE_S=15  # kept for packing
WORK=$(mktemp -d /tmp/kdfast-check.XXXXXX)
LOGS=$WORK/logs BENCH=$WORK/bench
mkdir -p "$OUT" "$LOGS" "$BENCH"
STEPS=$WORK/steps.tsv
: > "$STEPS"
export KDFAST_CACHE=${KDFAST_CACHE:-$HOME/.cache/kdfast}
export KDFAST_VERBOSE_BUILD=1  # the nvcc command lines land in the build log

if [[ $DRY == 1 ]]; then
    export TRITON_INTERPRET=1 DEVICE=cpu
    CASES=(--device cpu --quick)
else
    export DEVICE=cuda
    CASES=(--device cuda)
fi
# A per-test limit where pytest-timeout is installed (it is on the H200 image), on top of the
# per-invocation `timeout`.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --no-header -rfE)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 60)

# step NAME BUDGET_S CMD...: run CMD under timeout min(BUDGET_S, time left), log to logs/NAME.log
step() {
    local name=$1 budget=$2
    shift 2
    local left=$((TOTAL_S - RESERVE_S - SECONDS)) start=$SECONDS rc status
    local t=$((budget < left ? budget : left))
    if ((t < 10)); then
        printf '%s\tskipped\t0\t%s\tno time left\n' "$name" "$budget" >> "$STEPS"
        echo "== $name: skipped, no time left"
        return 0
    fi
    echo "== $name (limit ${t} s): $*"
    timeout -k 5 "$t" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        5) status=$([[ $DRY == 1 ]] && echo ok || echo FAIL) ;;  # pytest: no test selected (expected on a CPU)
        *) status=FAIL ;;
    esac
    local last
    if [[ $name == bench_* ]]; then  # its last line only lists the files written
        last="cells: $(grep -c ': ok' "$LOGS/$name.log") ok, $(grep -c ': skipped' "$LOGS/$name.log") skipped, $(grep -cE ': (WRONG|error)' "$LOGS/$name.log") wrong or failed"
    else
        last=$(grep -v '^\s*$' "$LOGS/$name.log" | tail -1 | tr '\t' ' ' | cut -c1-110)
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" $((SECONDS - start)) "$t" "$last" >> "$STEPS"
    echo "   $status in $((SECONDS - start)) s: $last"
}

# sanitize TOOL BUDGET BACKENDS [--quick]: the small cases under compute-sanitizer (skipped in the dry run).
sanitize() {
    local tool=$1 budget=$2 backends=$3
    shift 3
    local cmd=(compute-sanitizer --tool "$tool" --error-exitcode 86 --print-limit 20 "$PY" scripts/gpu_cases.py
               --device cuda --backends "$backends" "$@")
    if [[ $DRY == 1 ]]; then
        step "${tool}_${backends//,/_}" "$budget" echo "dry run: would run ${cmd[*]}"
    else
        # No caching allocator: each tensor is its own cudaMalloc, so memcheck sees every overrun.
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "${tool}_${backends//,/_}" "$budget" "${cmd[@]}"
    fi
}

# bench NAME BUDGET CELL_BUDGET SUITE IMPLS: one benchmark run (the dry run: the quick suite on the CPU)
bench() {
    local name=$1 budget=$2 cells=$3 suite=$4 impls=$5
    if [[ $DRY == 1 ]]; then
        suite=quick impls='kdfast-torch' cells=1  # the mechanics, not the cells: a few tiny ones
    fi
    step "bench_$name" "$budget" "$PY" -m benchmarks.run --suite "$suite" --device "$DEVICE" --impls "$impls" \
        --budget-s "$cells" --out "$BENCH/$name"
}

# --- 0. the machine, and the two background jobs: the CUDA build (minutes of nvcc) and the SASS report
{
    date -u
    [[ $DRY == 1 ]] && echo "DRY RUN on the CPU"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv 2>&1
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__)"
    nvcc --version 2>&1 | tail -1
    compute-sanitizer --version 2>&1 | head -1
} > "$LOGS/env.log" 2>&1
cat "$LOGS/env.log"
# Starts at once, runs while the Triton steps use the GPU; timeout so it cannot outlive the run.
(timeout 300 "$PY" -c "from kdfast.backends import cuda_ext; print('cuda backend:', cuda_ext.unavailable_reason() or 'built')" \
    > "$LOGS/cuda_build.log" 2>&1; echo $? > "$WORK/build.rc") &
BUILD_PID=$!
# available_backends() (every test run and benchmark asks it) also JIT-builds the CPU extensions (the dense
# one, and the sparse one on the first sparse cell), which no GPU step needs but all would wait for: build
# both beside nvcc, not in the first test's collection or the first benchmark's budget.
(timeout 300 "$PY" -c "from kdfast.backends import cpu_ext
print('cpu backend:', cpu_ext.unavailable_reason() or 'built')
print('cpu sparse kernel:', cpu_ext.kernel_unavailable_reason('sparse_kd_forward') or 'built')" \
    > "$LOGS/cpu_build.log" 2>&1) &
CPU_BUILD_PID=$!
# Registers, spills and access widths of the Triton kernels from this machine's own Triton (no GPU needed;
# TRITON_INTERPRET would make them interpreted kernels).
(env -u TRITON_INTERPRET timeout 150 "$PY" -m benchmarks.kernel_report > "$LOGS/kernel_report.txt" 2>&1) &
REPORT_PID=$!

# --- 1. Triton while nvcc builds: the small edge cases plainly (warms Triton's cache), then memcheck
step cases_triton 45 "$PY" scripts/gpu_cases.py "${CASES[@]}" --backends triton
sanitize memcheck 45 triton

# --- 2. the CUDA build must be done (and both GPU backends there) before anything else: fail loudly
left=$((TOTAL_S - RESERVE_S - SECONDS - 200))  # keep >= 200 s for tests and benchmarks
step wait_build $((left > 10 ? left : 10)) bash -c "while kill -0 $BUILD_PID $CPU_BUILD_PID 2>/dev/null; do sleep 1; done
    cat $LOGS/cpu_build.log $LOGS/cuda_build.log"
step backends 30 "$PY" scripts/check_gpu_backends.py
if grep -q ERROR "$LOGS/backends.log"; then
    echo "!!!!! A GPU BACKEND IS MISSING: $(grep ERROR "$LOGS/backends.log" | tr '\n' ' ')"
fi

# --- 3. the small edge tests first, then the CUDA kernel's small cases and memcheck
step tests_edge 60 "${PYTEST[@]}" -m gpu tests/loss/test_edge_cases.py --junitxml "$LOGS/tests_edge.xml"
if [[ $DRY == 1 ]]; then  # the CUDA kernel has no CPU form
    step cases_cuda 25 echo "dry run: would run $PY scripts/gpu_cases.py ${CASES[*]} --backends cuda"
else
    step cases_cuda 25 "$PY" scripts/gpu_cases.py "${CASES[@]}" --backends cuda
fi
sanitize memcheck 35 cuda

# --- 4. full size: real vocabularies, the benchmark shape, > 2^31 offsets, in place, streams, sparse
step tests_full 120 "${PYTEST[@]}" -m gpu tests/backends/test_gpu.py --junitxml "$LOGS/tests_full.xml"

# --- 5. every kdfast kernel's benchmark cells (budget-s: start no cell after; the step's limit on top)
bench gpu-core 75 40 gpu-core 'kdfast-triton*,kdfast-cuda*'
bench sparse 45 15 sparse 'kdfast-triton*'
bench fused-linear 40 10 fused-linear 'kdfast-fused,mm+kdfast'
bench gpu-extra 45 15 gpu-extra 'kdfast-*'  # V=50257 (unaligned) and fp32
# the Triton launch grid: BLOCK x warps x pipelining depth, from which launch_config is to be picked
if [[ $DRY == 1 ]]; then
    step triton_grid 60 "$PY" -m benchmarks.triton_grid --device cpu --n 2 --vocabs 300 --repeats 1
else
    step triton_grid 60 "$PY" -m benchmarks.triton_grid --device cuda
fi
# the vocabulary-parallel loss: its per-shard kernels on a tensor-parallel slice (128256 / 8) and the whole loss
# in an NCCL group of one, against float64; then one rank's slice timed against kd_loss on the slice. (The small
# per-shard cases of tests/backends/test_vocab_shard.py compile too many Triton variants for this run.)
step tests_vocab_parallel 60 "${PYTEST[@]}" -m gpu tests/backends/test_vocab_shard.py \
    tests/loss/test_vocab_parallel.py -k "tensor_parallel or group_of_one" --junitxml "$LOGS/tests_vocab_parallel.xml"
if [[ $DRY == 1 ]]; then
    step vocab_parallel 60 "$PY" -m benchmarks.vocab_parallel --device cpu --rows 64 --vocab 2048 --tp 2
else
    step vocab_parallel 60 "$PY" -m benchmarks.vocab_parallel --device cuda
fi

# --- 6. the races and barriers, the remaining GPU tests, then the peers with what time is left
sanitize racecheck 40 triton,cuda --quick
sanitize synccheck 30 triton,cuda --quick
step tests_more 50 "${PYTEST[@]}" -m gpu tests/loss --ignore tests/loss/test_edge_cases.py \
    --junitxml "$LOGS/tests_more.xml"
bench peers 60 25 gpu-core 'classic,eager,compile,liger-*'

# --- 6b. the trainers' side: TRL's GKDTrainer step with its own loss against kdfast's (TRL and datasets come
# as wheels in .whl/: scripts/device_wheels.sh, carried with the run), and the fused-linear path's teacher
# forward memory (every layer's hidden states kept, against the final one captured by a hook)
if [[ $DRY == 1 ]]; then
    TRL_ARGS=(--device cpu --vocab 512 --width 32 --seq 32 --batch 2 --steps 2)
    MEMORY_ARGS=(--device cpu --layers 2 --width 64 --seq 64 --batch 2 --vocab 512 --models gpt)
else
    TRL_ARGS=(--device cuda --vocab 128256 --width 1024 --seq 1024 --batch 4 --steps 4)
    MEMORY_ARGS=(--device cuda --layers 16 --width 2048 --seq 4096 --batch 4 --vocab 128256)
fi
if ! "$PY" -c "import trl" 2>/dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl > "$LOGS/wheels.log" 2>&1
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
if "$PY" -c "import trl" 2>/dev/null; then
    step trl_step 90 "$PY" -m benchmarks.trl_step "${TRL_ARGS[@]}"
else
    printf 'trl_step\tskipped\t0\t90\tTRL is not installed (scripts/device_wheels.sh, then carry .whl)\n' >> "$STEPS"
fi
step teacher_memory 60 "$PY" -m benchmarks.teacher_memory "${MEMORY_ARGS[@]}"

# --- 7. registers and spills of the CUDA kernel from this machine's cuobjdump, beside the Triton report
wait "$REPORT_PID" 2>/dev/null
so=$(find "$KDFAST_CACHE" -name '_kd_cuda*.so' 2>/dev/null | head -1)
if [[ -n $so ]] && command -v cuobjdump > /dev/null; then
    step cuda_resources 15 bash -c "cuobjdump -res-usage '$so' | grep -E 'Function|REG'"
    cat "$LOGS/cuda_resources.log" >> "$LOGS/kernel_report.txt"
fi

# --- pack: at most 8 files (summary.md, logs.tar.gz, kernel_report.txt, the 5 benchmarks' JSON)
kill "$BUILD_PID" "$CPU_BUILD_PID" 2>/dev/null
for dir in "$BENCH"/*/; do
    name=$(basename "$dir")
    json=$(ls "$dir"*.json 2>/dev/null | head -1)  # a run killed at its limit leaves its .partial.json
    [[ -n $json ]] && cp "$json" "$OUT/bench-$name.json"
done
cp "$LOGS/kernel_report.txt" "$OUT/kernel_report.txt" 2>/dev/null
failures=$(grep -hE '^(FAIL|FAILED|ERROR)|kdfast FAILED|ERROR:|========= (Invalid|Race|Barrier|Error)' "$LOGS"/*.log 2>/dev/null | head -60)
{
    echo "# kdfast device check $([[ $DRY == 1 ]] && echo '(dry run, CPU)') — $(date -u +%FT%TZ), ${SECONDS} s"
    echo
    echo '```'
    cat "$LOGS/env.log"
    echo '```'
    echo
    echo "| step | status | s | limit s | last line |"
    echo "| --- | --- | --- | --- | --- |"
    awk -F'\t' '{gsub(/\|/, "/", $5); printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5}' "$STEPS"
    echo
    echo "## Failures (first 60 lines; the full logs are in logs.tar.gz)"
    echo '```'
    echo "${failures:-none}"
    echo '```'
    echo
    for name in triton_grid vocab_parallel trl_step teacher_memory; do  # their tables are their logs' last lines
        [[ -s $LOGS/$name.log ]] && { echo "## $name"; echo; grep '^|' "$LOGS/$name.log"; echo; }
    done
    echo "## kdfast benchmark cells"
    echo '```'
    grep -h '^\[[a-z-]*\] kdfast' "$LOGS"/bench_*.log 2>/dev/null | grep -v skipped | cut -c1-150
    echo '```'
} > "$OUT/summary.md"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs bench
# Never more than 8 files back: anything beyond goes into a second archive.
mapfile -t files < <(cd "$OUT" && ls -1)
if ((${#files[@]} > 8)); then
    (cd "$OUT" && tar -czf extra.tar.gz "${files[@]:7}" && rm -f "${files[@]:7}")
fi

# --- the short table, last
echo
echo "kdfast device check: ${SECONDS} s of ${TOTAL_S} s, $(ls "$OUT" | wc -l) files in $OUT"
awk -F'\t' '{printf "%-22s %-8s %4s s / %4s  %s\n", $1, $2, $3, $4, substr($5, 1, 70)}' "$STEPS"
grep -h '^\[[a-z-]*\] kdfast' "$OUT/summary.md" | grep -E ' ms' | sed -E 's/\(errors [^)]*\), //' | cut -c1-110 | head -24
failed=$(awk -F'\t' '$2 ~ /FAIL|TIMEOUT/' "$STEPS" | wc -l)
rm -rf "$WORK"
((failed == 0))
