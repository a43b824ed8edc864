"""The contract every kdfast backend implements.

A backend is one module here that ends with ``BACKEND = Backend(...)`` (the record below),
and one line in ``registry.BACKEND_MODULES``. Its record holds:

``name``, ``device_types`` and ``dtypes``
    its name, the tensor device types (None: any) and the logit dtypes it accepts.
``unavailable_reason() -> str | None``
    why it cannot run in this process (``None`` when it can); cached, may build an extension.
``kd_forward(student, teacher, labels, grad, coefs, params) -> (kd_rows, ce_rows)``
    ``student`` and ``teacher`` are (B, M, V) views with unit stride along V (any other
    strides); ``labels`` is a contiguous int64 (B*M,) tensor or None; ``grad`` is None
    (forward only) or a (B, M, V) tensor of the student's dtype that receives
    ``coefs[0] * d(kd_row)/ds + coefs[1] * d(ce_row)/ds`` for every row (it may be the
    student tensor itself); ``coefs`` is a float32 (2,) tensor on the logits' device.
    Returns the per-row divergence (not multiplied by T**2) and the per-row hard-label
    cross-entropy at T = 1 (zeros unless ``params.hard``), float32 (float64 for float64
    inputs), with 0 at rows whose label is ``ignore_index``. Rows whose logits contain
    NaN or +inf, or are all -inf, give NaN, and so do rows whose label is neither
    ``ignore_index`` nor in [0, V), with or without ``params.hard`` (the loss, the
    cross-entropy when hard, and the gradient row): labels decide which rows count, and on
    a GPU they cannot be checked on the host without a sync.
``sparse_kd_forward(student, ids, logprobs, labels, grad, coefs, params)`` (optional)
    the sparse-teacher loss (kdfast.sparse), the same contract with (B*M, K) teacher ids and
    log-probabilities in place of the teacher logits; ``kernel_unavailable_reason(kernel)``
    says when a kernel built on its own cannot run though the backend can.
``vocab_shard`` (optional, a :class:`VocabShardKernels`)
    the per-shard work of the vocabulary-parallel loss (kdfast.distributed): the student's and
    teacher's (B, M, W) slices of the vocabulary, W > 0, reduced to per-row statistics, and the
    slice's gradient from the rows' global normalisers, which the caller combines across ranks.
``gradient_buffer(student) -> Tensor`` and ``empty_cache()`` (optional)
    a buffer of the student's shape and dtype for ``grad`` (contiguous, or laid out as the
    student where the backend's kernel then accesses both alike), which the backend may
    recycle once no tensor refers to it, and the release of what it keeps; backends without
    them get a contiguous ``torch.empty_like``.
``scale_grad_(grad, grad_output)`` (optional)
    grad *= grad_output, a one-element tensor, on the device and without a host sync,
    skipping the pass when it is 1; backends without it get a ``.item()`` check instead.

Logit transforms (``params.student_scale``, ``student_cap`` and the teacher's): each side's
raw logits x become z = cap * tanh(scale * x / cap) (z = scale * x when cap is 0; scale 1 and
cap 0 are off), as the model computes its logits, and everything above (maxima, softmax at
the temperature, the label's logit of the cross-entropy) is computed on z. ``grad`` receives
the gradient with respect to x: that with respect to z times dz/dx = scale (1 - tanh^2(scale
x / cap)). A -inf logit becomes -cap, and with a cap so does +inf (to +cap): such rows are
not NaN, as they are not in the model.

The public API (kdfast.api) validates everything before a backend is called.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

FORWARD_KL, REVERSE_KL, JSD, TVD = 0, 1, 2, 3
DIVERGENCE_CODES = {"forward_kl": FORWARD_KL, "reverse_kl": REVERSE_KL, "jsd": JSD, "tvd": TVD}


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype of the math and of the row losses: float64 when any input is, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


class KernelParams(NamedTuple):
    temperature: float  # the student's; d(loss)/ds carries its 1 / T
    teacher_temperature: float  # the teacher's softmax is taken at it (LossOptions: default temperature)
    divergence: int  # FORWARD_KL, REVERSE_KL, JSD or TVD; jsd with beta 0 or 1 never reaches a backend
    beta: float
    ignore_index: int
    hard: bool  # compute the hard-label cross-entropy (and its gradient) too
    # The logit transforms (see the module docstring): scale 1.0 and cap 0.0 are off.
    student_scale: float = 1.0
    student_cap: float = 0.0
    teacher_scale: float = 1.0
    teacher_cap: float = 0.0


class JsdWeights(NamedTuple):
    """The jsd mixture m = beta p_t + (1 - beta) p_s seen from its lighter side A (the teacher when
    beta <= 0.5, else the student) and its heavier side B, in double precision: at beta = 1 - 1e-6,
    1 - beta formed from a float32 beta is 1.3 % off."""

    teacher_is_a: bool
    w_small: float  # A's weight, <= 0.5
    log_w_small: float
    c: float  # log(w_big / w_small) >= 0: past it, A's term dominates m
    split: float  # max(c, 1): where jsd_log_ratios changes formula
    teacher: float  # beta
    student: float  # 1 - beta


def jsd_weights(beta: float) -> JsdWeights:
    """The weights each backend's jsd_log_ratios takes, 0 < beta < 1."""
    teacher_is_a = beta <= 0.5
    w_small = beta if teacher_is_a else 1.0 - beta  # exact in double for beta > 0.5
    c = math.log1p(-w_small) - math.log(w_small)
    return JsdWeights(teacher_is_a, w_small, math.log(w_small), c, max(c, 1.0), beta,
                      1.0 - beta if teacher_is_a else w_small)


def on_device_of(tensor: torch.Tensor):
    """A context in which kernels launch on tensor's CUDA device: Triton launches on the current
    device, which need not be the tensors' (nothing to do for CPU tensors)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


# How a sparse teacher's mass outside its ids is treated (kdfast.sparse documents each).
TAIL_BUCKET, TAIL_RENORM, TAIL_RAW = 0, 1, 2
TAIL_CODES = {"bucket": TAIL_BUCKET, "renorm": TAIL_RENORM, "raw": TAIL_RAW}


class SparseKernelParams(NamedTuple):
    """The parameters of ``sparse_kd_forward``: the student's softmax against a teacher given
    as (ids, log-probabilities) per row; ids -1 are padding."""

    temperature: float
    divergence: int  # FORWARD_KL, REVERSE_KL or JSD (0 < beta < 1); tails other than bucket: FORWARD_KL
    beta: float
    tail: int  # TAIL_BUCKET, TAIL_RENORM or TAIL_RAW
    mass_tolerance: float  # a teacher tail 1 - sum(q) at most this is no tail: rounding of the log-probs
    ignore_index: int
    hard: bool
    student_scale: float = 1.0  # the student's logit transforms, as in KernelParams
    student_cap: float = 0.0


# The per-row statistics of a slice, vocab_shard.stats's rows: with a = (x - shift) / T, shift the slice's
# maximum (0 where it is -inf), the maxima, the exp-sums of a, the student's exp-sum at T = 1 (params.hard),
# and cross = sum e^a_t (a_t - a_s) (forward KL) or sum e^a_s (a_s - a_t) (reverse KL), else 0.
SHARD_STATS = ("max_s", "max_t", "sum_s", "sum_t", "sum_s1", "cross")
# The per-row values vocab_shard.mixture and .gradient read, a (len(SHARD_ROWS), B*M) tensor: on the slice,
# log p = (x - shift) / T - offset for each side, and (x_s - shift_s) - offset_s1 at T = 1; the row's global
# kd and kl_student_mix (jsd: KL(p_s || m)) or mass_below / mass_above (tvd: see tvd_factor); the gradient's
# weights of d(kd)/d(s / T) (NaN for an undefined row) and of d(ce)/ds; ignored != 0: a zero gradient row.
SHARD_ROWS = ("shift_s", "shift_t", "offset_s", "offset_t", "offset_s1", "kd", "kl_student_mix", "mass_below",
              "mass_above", "coef_kd", "coef_ce", "ignored")


class VocabShardKernels(NamedTuple):
    """The per-shard kernels of the vocabulary-parallel loss, on (B, M, W) slices as kd_forward's.

    ``stats(student, teacher, params) -> Tensor``: (len(SHARD_STATS), B*M), float32 or float64.
    ``mixture(student, teacher, rows, params) -> Tensor``: (3, B*M), the slice's share of sums that
    need the global normalisers: jsd, [KL(p_t || m), KL(p_s || m), 0]; tvd, [0.5 sum |p_t - p_s|,
    mass_below, mass_above] (see SHARD_ROWS).
    ``gradient(student, teacher, labels, grad, rows, params)``: writes coef_kd * d(kd)/d(s / T) +
    coef_ce * d(ce)/ds into grad (possibly the student); labels: each row's label as a column of the
    slice, W where another rank owns it.
    """

    stats: Callable
    mixture: Callable
    gradient: Callable


def _always_available(kernel: str) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Backend:
    """One backend's record (see the module docstring for each field's contract)."""

    name: str
    device_types: Optional[tuple[str, ...]]  # None: any device torch supports
    dtypes: tuple[torch.dtype, ...]
    unavailable_reason: Callable[[], Optional[str]]
    kd_forward: Callable
    sparse_kd_forward: Optional[Callable] = None
    kernel_unavailable_reason: Callable[[str], Optional[str]] = _always_available
    gradient_buffer: Optional[Callable] = None
    empty_cache: Optional[Callable] = None
    scale_grad_: Optional[Callable] = None
    vocab_shard: Optional[VocabShardKernels] = None

    def kernel(self, name: str):
        """The kernel called ``name`` (one of KERNELS), or None if this backend lacks it."""
        return {"kd_forward": self.kd_forward, "sparse_kd_forward": self.sparse_kd_forward,
                "vocab_shard": self.vocab_shard}[name]


KERNELS = ("kd_forward", "sparse_kd_forward", "vocab_shard")
