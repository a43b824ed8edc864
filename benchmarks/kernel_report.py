"""Compile kdfast's Triton kernels for an H100/H200 (sm_90) without a GPU and report, per
launch configuration, the registers, local-memory spills, load/store widths and MUFU.EX2
count from the SASS: what costs no device time to know before a GPU run.

    python -m benchmarks.kernel_report           # the table
    python -m benchmarks.kernel_report --check   # every variant compiles, 128-bit accesses, no spills

tests/backends/test_triton_compile.py runs --check in CI (in a process without TRITON_INTERPRET,
which would make the kernels interpreted ones): the interpreter accepts code that the GPU
compiler rejects.
"""

import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kdfast.backends.triton_kernels as tk

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# The pointer arguments that are not logits, and the integer arguments besides strides, of the kernels.
POINTER_TYPES = {"labels_ptr": "*i64", "coefs_ptr": "*fp32", "kd_out_ptr": "*fp32", "ce_out_ptr": "*fp32",
                 "ids_ptr": "*i64", "lq_ptr": "*fp32", "shift_ptr": "*fp32", "out_ptr": "*fp32", "rows_ptr": "*fp32"}
INT_ARGS = ("rows_per_batch", "vocab", "ignore_index", "n_ids", "n_blocks", "n_rows", "width")
# The vocab_shard kernels (the vocabulary-parallel loss) and the (divergence, hard) variants --check compiles.
SHARD_KERNELS = {"stats": (tk._shard_stats_kernel, ((0, True), (1, False), (2, False))),
                 "mixture": (tk._shard_mixture_kernel, ((2, False), (3, False))),
                 "gradient": (tk._shard_gradient_kernel, ((0, True), (1, False), (2, False), (3, True)))}


def kernel_signature(kernel, dtype: str) -> dict[str, str]:
    """A kernel's argument types, from its argument names: the logits pointers of ``dtype``, the integers
    (sizes, strides, ignore_index) i32, constexprs (upper case) as such, the rest fp32."""
    def kind(name: str) -> str:
        if name.isupper():
            return "constexpr"
        if name.endswith("_ptr"):
            return POINTER_TYPES.get(name, f"*{dtype}")
        return "i32" if name in INT_ARGS or "stride" in name else "fp32"

    return {name: kind(name) for name in kernel.arg_names}


def compile_kd_kernel(divergence: int, block: int, num_warps: int, write_grad: bool = True, hard: bool = False,
                      dtype: str = "bf16", aligned_vocab: bool = True, caps: bool = False, aligned_rows: bool = True,
                      num_stages=None):
    """The loss kernel compiled for sm_90, with the student (and gradient) logits of ``dtype``; V a multiple
    of 16 or not (GPT-2's 50257, a vocab_size slice), both sides soft-capped or not."""
    # Rows off a 16-byte boundary are read from the boundary below them (PEEL, kd_forward's peel_rows).
    constexprs = {"DIVERGENCE": divergence, "HARD": hard, "HAS_LABELS": hard, "WRITE_GRAD": write_grad,
                  "CAP_S": caps, "CAP_T": caps, "BLOCK": block, "NUM_STAGES": num_stages, "PEEL": not aligned_rows,
                  "ALIGN": 4 if dtype == "fp32" else 8}
    return _compile_sm90(tk._kd_rows_kernel, dtype, constexprs, num_warps, "vocab" if aligned_vocab else None,
                         aligned_rows)


def compile_shard_kernel(kernel, divergence: int, hard: bool, dtype: str = "bf16"):
    """A vocab_shard kernel compiled for sm_90, on a slice whose width is a multiple of 16 (a tensor-parallel
    shard of a padded vocabulary)."""
    constexprs = {"DIVERGENCE": divergence, "HARD": hard, "BLOCK": 4096, "NUM_STAGES": None}
    return _compile_sm90(kernel, dtype, {k: v for k, v in constexprs.items() if k in kernel.arg_names}, 16, "width")


def _compile_sm90(kernel, dtype: str, constexprs: dict, num_warps: int, aligned_size: str = None,
                  aligned_rows: bool = True):
    """kernel compiled for sm_90 with the student (and gradient) logits of ``dtype`` and a bf16 teacher, its
    pointers and (when aligned_rows) strides, and the size argument aligned_size, known to be multiples of 16."""
    names = list(kernel.arg_names)
    # What Triton's launcher infers at run time for 16-aligned pointers, strides and sizes.
    aligned = [n for n in names if n.endswith("_ptr") or ("stride" in n and aligned_rows) or n == aligned_size]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    signature = kernel_signature(kernel, dtype)
    # constexprs the caller does not vary (e.g. jsd's TEACHER_IS_A) take their launch-time default
    constexprs = {**constexprs, **{n: False for n, kind in signature.items()
                                   if kind == "constexpr" and n not in constexprs}}
    signature["t_ptr"] = "*bf16"  # the teacher stays bf16 in every variant
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def compile_sparse_kernel(divergence: int, tail: int, hard: bool, caps: bool, dtype: str = "bf16"):
    """The sparse-teacher kernel compiled for sm_90 (int64 ids, fp32 log-probabilities)."""
    from kdfast.backends import triton_sparse

    kernel = triton_sparse._sparse_rows_kernel
    signature = kernel_signature(kernel, dtype)
    constexprs = {"DIVERGENCE": divergence, "TAIL": tail, "HARD": hard, "HAS_LABELS": hard, "WRITE_GRAD": True,
                  "CAP": caps, "BLOCK": 4096, "K_BLOCK": 64}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})


def compile_scale_kernel(per_row: bool):
    signature = {"g_ptr": "*bf16", "scale_ptr": "*fp32", "rows_per_batch": "i32", "stride_b": "i32",
                 "stride_m": "i32", "vocab": "i32", "PER_ROW": "constexpr", "BLOCK": "constexpr"}
    return triton.compile(ASTSource(fn=tk._scale_rows_kernel, signature=signature,
                                    constexprs={"PER_ROW": per_row, "BLOCK": 4096}),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def report(divergence: int, block: int, num_warps: int, write_grad: bool = True, aligned_vocab: bool = True,
           caps: bool = False, aligned_rows: bool = True) -> str:
    kernel = compile_kd_kernel(divergence, block, num_warps, write_grad, aligned_vocab=aligned_vocab, caps=caps,
                               aligned_rows=aligned_rows)
    variant = ("" if aligned_vocab else " any V") + ("" if aligned_rows else " any row stride") + \
        (" capped" if caps else "")
    return (f"divergence={divergence} BLOCK={block:5d} warps={num_warps:2d} grad={write_grad!s:5}{variant}: "
            f"{resources(kernel, num_warps)}")


def resources(kernel, num_warps: int) -> str:
    """Registers, spills, programs per SM, access widths and MUFU.EX2 count of a compiled kernel, from its SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    loads = sorted({m or ".32/.16" for m in re.findall(r"LDG\.E((?:\.\w+)*)", sass)})
    stores = sorted({m or ".32/.16" for m in re.findall(r"STG\.E((?:\.\w+)*)", sass)})
    per_sm = min(65536 // (regs * 32 * num_warps), 64 // num_warps)
    return (f"{regs:3d} regs, {spills} B local, {per_sm} programs/SM, loads {loads}, stores {stores}, "
            f"{sass.count('MUFU.EX2')} MUFU.EX2")


def ptx_problems(name: str, ptx: str, stores_gradient: bool) -> list[str]:
    """What is wrong with a streaming kernel's PTX: logits not loaded (or the gradient not stored) 16 bytes
    at a time, or registers spilled."""
    problems = []
    if not re.search(r"ld\.global[\w.:]*\.v4", ptx):  # e.g. ld.global.L1::evict_first.v4.b32
        problems.append(f"{name}: the logits are not loaded 16 bytes at a time")
    if stores_gradient and not re.search(r"st\.global[\w.:]*\.v4", ptx):
        problems.append(f"{name}: the gradient is not stored 16 bytes at a time")
    if ".local" in ptx:
        problems.append(f"{name}: registers spill to local memory")
    return problems


def check() -> list[str]:
    """Compiles every variant of the kernels (loss, scale, sparse, vocab_shard); returns what is wrong
    (nothing, normally)."""
    problems = []
    # (hard, write_grad, dtype, V % 16 == 0, capped, rows at 16-byte boundaries)
    variants = ((False, True, "bf16", True, False, True), (True, True, "fp32", True, False, True),
                (True, False, "fp16", True, False, True),
                (False, True, "bf16", False, False, True), (True, True, "bf16", False, True, True),
                (True, True, "bf16", False, False, False))
    for divergence in (0, 1, 2, 3):
        for hard, write_grad, dtype, aligned_vocab, caps, aligned_rows in variants:
            name = (f"divergence={divergence} hard={hard} grad={write_grad} {dtype} "
                    f"{'V % 16 == 0' if aligned_vocab else 'any V'}{' capped' if caps else ''}"
                    f"{'' if aligned_rows else ' any row stride'}")
            ptx = compile_kd_kernel(divergence, 4096, 16, write_grad, hard, dtype, aligned_vocab, caps,
                                    aligned_rows).asm["ptx"]
            problems += ptx_problems(name, ptx, write_grad)
    for per_row in (False, True):
        compile_scale_kernel(per_row)
    for divergence, tail in ((0, 0), (0, 1), (0, 2), (1, 0), (2, 0)):
        for hard, caps in ((False, False), (True, True)):
            if ".local" in compile_sparse_kernel(divergence, tail, hard, caps).asm["ptx"]:
                problems.append(f"sparse divergence={divergence} tail={tail} hard={hard} caps={caps}: spills")
    for name, (kernel, variants) in SHARD_KERNELS.items():
        for divergence, hard in variants:
            ptx = compile_shard_kernel(kernel, divergence, hard).asm["ptx"]
            problems += ptx_problems(f"vocab_shard {name} divergence={divergence} hard={hard}", ptx,
                                     name == "gradient")
    return problems


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    if "--check" in sys.argv:
        found = check()
        print("\n".join(found) or "all kernel variants compile for sm_90, with 128-bit loads and no spills")
        sys.exit(1 if found else 0)
    for divergence in (0, 1, 2, 3):
        for block, warps in ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)):
            print(report(divergence, block, warps))
    for aligned_vocab, caps in ((False, False), (True, True)):
        print(report(0, 4096, 16, aligned_vocab=aligned_vocab, caps=caps))
    # Rows whose stride is not a multiple of 16 bytes (logits[:, :-1] of an odd V in bf16), read from the
    # 16-byte boundary below each row's start.
    print(report(0, 4096, 16, aligned_vocab=False, aligned_rows=False))
    for name, (kernel, variants) in SHARD_KERNELS.items():
        for divergence, hard in variants:
            print(f"vocab_shard {name} divergence={divergence} hard={hard!s:5} BLOCK= 4096 warps=16: "
                  f"{resources(compile_shard_kernel(kernel, divergence, hard), 16)}")
