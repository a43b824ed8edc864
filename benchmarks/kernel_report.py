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
POINTER_TYPES = {"labels_ptr": "*i64", "coefs_ptr": "*fp32", "kd_out_ptr": "*fp32", "ce_out_ptr": "*fp32"}
INT_ARGS = ("rows_per_batch", "vocab", "ignore_index")


def kd_kernel_signature(dtype: str) -> dict[str, str]:
    """The loss kernel's argument types, from its argument names: the logits pointers of ``dtype``,
    the integers (sizes, strides, ignore_index) i32, constexprs (upper case) as such, the rest fp32."""
    def kind(name: str) -> str:
        if name.isupper():
            return "constexpr"
        if name.endswith("_ptr"):
            return POINTER_TYPES.get(name, f"*{dtype}")
        return "i32" if name in INT_ARGS or "stride" in name else "fp32"

    return {name: kind(name) for name in tk._kd_rows_kernel.arg_names}


def compile_kd_kernel(divergence: int, block: int, num_warps: int, write_grad: bool = True, hard: bool = False,
                      dtype: str = "bf16"):
    """The loss kernel compiled for sm_90, with the student (and gradient) logits of ``dtype``."""
    names = list(tk._kd_rows_kernel.arg_names)
    # What Triton's launcher infers at run time for 16-aligned pointers, strides and V.
    aligned = [n for n in names if n.endswith("_ptr") or "stride" in n or n == "vocab"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    constexprs = {"DIVERGENCE": divergence, "HARD": hard, "HAS_LABELS": hard, "WRITE_GRAD": write_grad,
                  "BLOCK": block}
    signature = kd_kernel_signature(dtype)
    # constexprs the caller does not vary (e.g. jsd's TEACHER_IS_A) take their launch-time default
    constexprs.update({n: False for n, kind in signature.items() if kind == "constexpr" and n not in constexprs})
    signature["t_ptr"] = "*bf16"  # the teacher stays bf16 in every variant
    source = ASTSource(fn=tk._kd_rows_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def compile_scale_kernel(per_row: bool):
    signature = {"g_ptr": "*bf16", "scale_ptr": "*fp32", "rows_per_batch": "i32", "stride_b": "i32",
                 "stride_m": "i32", "vocab": "i32", "PER_ROW": "constexpr", "BLOCK": "constexpr"}
    return triton.compile(ASTSource(fn=tk._scale_rows_kernel, signature=signature,
                                    constexprs={"PER_ROW": per_row, "BLOCK": 4096}),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def report(divergence: int, block: int, num_warps: int, write_grad: bool = True) -> str:
    kernel = compile_kd_kernel(divergence, block, num_warps, write_grad)
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
    return (f"divergence={divergence} BLOCK={block:5d} warps={num_warps:2d} grad={write_grad!s:5}: "
            f"{regs:3d} regs, {spills} B local, {per_sm} programs/SM, loads {loads}, stores {stores}, "
            f"{sass.count('MUFU.EX2')} MUFU.EX2")


def check() -> list[str]:
    """Compiles every variant of both kernels; returns what is wrong (nothing, normally)."""
    problems = []
    for divergence in (0, 1, 2):
        for hard, write_grad, dtype in ((False, True, "bf16"), (True, True, "fp32"), (True, False, "fp16")):
            name = f"divergence={divergence} hard={hard} grad={write_grad} {dtype}"
            ptx = compile_kd_kernel(divergence, 4096, 16, write_grad, hard, dtype).asm["ptx"]
            if not re.search(r"ld\.global(\.\w+)*\.v4", ptx):
                problems.append(f"{name}: the logits are not loaded 16 bytes at a time")
            if ".local" in ptx:
                problems.append(f"{name}: registers spill to local memory")
    for per_row in (False, True):
        compile_scale_kernel(per_row)
    return problems


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    if "--check" in sys.argv:
        found = check()
        print("\n".join(found) or "all kernel variants compile for sm_90, with 128-bit loads and no spills")
        sys.exit(1 if found else 0)
    for divergence in (0, 1, 2):
        for block, warps in ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)):
            print(report(divergence, block, warps))
