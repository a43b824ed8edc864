"""Elementwise helpers that the Triton kernels (triton_kernels, triton_sparse) share: exact log1p,
expm1 and tanh of small arguments, and the logit transforms of kdfast.backends."""

from __future__ import annotations

import os

import triton
import triton.language as tl


@triton.jit
def _log1p(x):
    """log(1 + x), accurate for small x (Goldberg's: the rounding of 1 + x divides out)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))


@triton.jit
def _expm1(x):
    """exp(x) - 1, accurate for small x."""
    u = tl.exp(x)
    return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, tl.where(u == float("inf"), u,
                                                                         (u - 1.0) * x / tl.log(u))))


@triton.jit
def _tanh(x):
    """tanh from expm1 of -2|x| (in [-1, 0]: no overflow, and no cancellation for small x)."""
    u = _expm1(-2.0 * tl.abs(x))
    t = -u / (u + 2.0)
    return tl.where(x < 0, -t, t)


# log1p, expm1 and tanh of fp32 arguments: libdevice's on a GPU (tl.log and tl.exp may be the
# approximate hardware ones there, which the Goldberg / Kahan forms would turn into a relative
# error of 1e-7 / x); the interpreter has no libdevice, and its numpy log and exp are exact.
if os.environ.get("TRITON_INTERPRET") == "1":
    log1p_f32, expm1_f32, tanh_f32 = _log1p, _expm1, _tanh
else:
    from triton.language.extra import libdevice

    log1p_f32, expm1_f32, tanh_f32 = libdevice.log1p, libdevice.expm1, libdevice.tanh


@triton.jit
def load_logits(row_ptr, offs, mask, scale, cap, CAP: tl.constexpr, MASKED: tl.constexpr = True,
                LAST_READ: tl.constexpr = False):
    """(z, dz/dx) of the fp32 logits x at offs, through the logit transforms: z = scale x, then
    cap tanh(z / cap) when CAP; z = -inf where mask is false, where nothing is read. Without MASKED
    the mask is not applied (a block inside the row: a uniform access, which can be 16 bytes wide
    whatever V is). LAST_READ: the row's last sweep, whose lines L2 may evict first."""
    eviction: tl.constexpr = "evict_first" if LAST_READ else ""
    if MASKED:
        x = tl.load(row_ptr + offs, mask=mask, other=0.0, eviction_policy=eviction).to(tl.float32)
    else:
        x = tl.load(row_ptr + offs, eviction_policy=eviction).to(tl.float32)
    z, slope = transform_logits(x, scale, cap, CAP)
    if MASKED:
        z = tl.where(mask, z, float("-inf"))
    return z, slope


@triton.jit
def transform_logits(x, scale, cap, CAP: tl.constexpr):
    """(z, dz/dx) of the logit transforms at x (scale 1 multiplies exactly: without them z is x).
    Without a cap dz/dx is the scalar scale (a product with x would make it NaN at x = -inf)."""
    z = x * scale
    slope = scale
    if CAP:  # (one return statement: the compiler types every return, even in a branch not taken)
        u = z / cap
        # 1 - tanh^2(u) as 4 e / (1 + e)^2, e = exp(-2|u|): 1 - t * t would cancel where the cap saturates.
        e = tl.exp(-2.0 * tl.abs(u))
        z = cap * tanh_f32(u)
        slope = scale * (4.0 * e / ((1.0 + e) * (1.0 + e)))
    return z, slope


@triton.jit
def fill_row(g_row, vocab, BLOCK: tl.constexpr):
    """Zeros over a gradient row: an ignored row's, which is not read at all."""
    for blk in range(0, tl.cdiv(vocab, BLOCK)):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        tl.store(g_row + offs, tl.zeros([BLOCK], dtype=g_row.dtype.element_ty), mask=offs < vocab)


@triton.jit
def row_label(labels_ptr, row, ignore_index, HAS_LABELS: tl.constexpr):
    """(label, ignored) of a row: (ignore_index, False) without labels."""
    label = ignore_index
    ignored = False
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        ignored = label == ignore_index
    return label, ignored


@triton.jit
def store_ignored_row(kd_out_ptr, ce_out_ptr, row, g_row, vocab, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """An ignored row's results, without reading it: losses 0 and a zero gradient."""
    tl.store(kd_out_ptr + row, 0.0)
    tl.store(ce_out_ptr + row, 0.0)
    if WRITE_GRAD:
        fill_row(g_row, vocab, BLOCK)
