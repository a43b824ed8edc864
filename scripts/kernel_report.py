"""Compile kdfast's Triton kernels for an H100/H200 (sm_90) without a GPU and report, per
launch configuration, the registers, local-memory spills, load/store widths and MUFU.EX2
count from the SASS: what costs no device time to know before a GPU run.

    python scripts/kernel_report.py
"""

import re
import subprocess
import tempfile
import warnings
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kdfast.backends.triton_kernels as tk

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
SIGNATURE = {
    "s_ptr": "*bf16", "t_ptr": "*bf16", "g_ptr": "*bf16", "labels_ptr": "*i64", "coefs_ptr": "*fp32",
    "kd_out_ptr": "*fp32", "ce_out_ptr": "*fp32", "rows_per_batch": "i32", "s_stride_b": "i32",
    "s_stride_m": "i32", "t_stride_b": "i32", "t_stride_m": "i32", "g_stride_b": "i32", "g_stride_m": "i32",
    "vocab": "i32", "inv_temp": "fp32", "beta": "fp32", "ignore_index": "i32", "DIVERGENCE": "constexpr",
    "HARD": "constexpr", "HAS_LABELS": "constexpr", "WRITE_GRAD": "constexpr", "BLOCK": "constexpr",
}


def report(divergence: int, block: int, num_warps: int, write_grad: bool = True) -> str:
    names = list(tk._kd_rows_kernel.arg_names)
    # What Triton's launcher infers at run time for 16-aligned pointers, strides and V.
    aligned = [n for n in names if n.endswith("_ptr") or "stride" in n or n == "vocab"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    constexprs = {"DIVERGENCE": divergence, "HARD": False, "HAS_LABELS": False, "WRITE_GRAD": write_grad,
                  "BLOCK": block}
    kernel = triton.compile(ASTSource(fn=tk._kd_rows_kernel, signature=SIGNATURE, constexprs=constexprs,
                                      attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
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


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    for divergence in (0, 1, 2):
        for block, warps in ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)):
            print(report(divergence, block, warps))
