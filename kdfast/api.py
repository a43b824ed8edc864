"""kdfast's public loss API: argument checks, row layout, reductions.

Every argument is checked here, before any kernel runs, with an error that names the
argument and what was expected. The kernels then see (B, M, V) row views with unit
stride along V (kdfast.backends describes that contract).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from numbers import Real
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .backends import DIVERGENCE_CODES, FORWARD_KL, REVERSE_KL, KernelParams, compute_dtype
from .dispatch import BACKENDS, resolve_backend
from .ops import KDLossFunction

DIVERGENCES = tuple(DIVERGENCE_CODES)
REDUCTIONS = ("batchmean", "sum", "mean", "none")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class KDLossParts(NamedTuple):
    """The result of ``kd_loss(..., return_parts=True)``.

    ``loss`` = soft_weight * kd + hard_weight * hard and carries the gradient; ``kd``
    (the divergence, times T**2 when scale_t2) and ``hard`` (the cross-entropy on hard
    labels at T = 1) are detached, reduced the same way, for logging.
    """

    loss: Tensor
    kd: Tensor
    hard: Tensor


def _check_number(name: str, value, expected: str, ok) -> float:
    """value as a float, if it is a finite real number for which ok(value) holds."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number {expected}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{name} must be finite and {expected}, got {value}")
    return value


def _check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


@dataclass(frozen=True)
class LossOptions:
    """The keyword options of kd_loss, validated once (KDLoss and the fused-linear loss keep one)."""

    temperature: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    ignore_index: int = -100
    reduction: str = "batchmean"
    scale_t2: bool = True
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    vocab_size: Optional[int] = None
    inplace_backward: bool = False
    backend: str = "auto"

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: store the normalised values
        set_(self, "temperature", _check_number("temperature", self.temperature, "> 0", lambda v: v > 0))
        _check_choice("divergence", self.divergence, DIVERGENCES)
        set_(self, "beta", _check_number("beta", self.beta, "in [0, 1]", lambda v: 0 <= v <= 1))
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        _check_choice("reduction", self.reduction, REDUCTIONS)
        for flag in ("scale_t2", "inplace_backward"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        for weight in ("hard_weight", "soft_weight"):
            set_(self, weight, _check_number(weight, getattr(self, weight), ">= 0", lambda v: v >= 0))
        if self.vocab_size is not None and (isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int)
                                            or self.vocab_size < 1):
            raise ValueError(f"vocab_size must be None or a positive int, got {self.vocab_size!r}")
        _check_choice("backend", self.backend, ("auto", *BACKENDS))

    @property
    def kernel_params(self) -> KernelParams:
        divergence = DIVERGENCE_CODES[self.divergence]
        if self.divergence == "jsd" and self.beta in (0.0, 1.0):  # the GKD / Liger convention
            divergence = FORWARD_KL if self.beta == 0.0 else REVERSE_KL
        return KernelParams(self.temperature, divergence, self.beta, self.ignore_index, self.hard_weight > 0)

    @property
    def kd_scale(self) -> float:
        """What the per-row divergence is multiplied by: T**2 when scale_t2."""
        return self.temperature**2 if self.scale_t2 else 1.0


def loss_options(function: str, options: dict, other_keywords: tuple[str, ...] = ()) -> LossOptions:
    """LossOptions(**options) for a call of ``function``, whose error for an unknown option names
    that function, the closest valid name and every valid one."""
    names = tuple(f.name for f in fields(LossOptions))
    unknown = [key for key in options if key not in names]
    if unknown:
        valid = sorted(names + other_keywords)
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}{hint} "
                        f"(valid keywords: {', '.join(valid)})")
    return LossOptions(**options)


def _check_logits(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
                        f"got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape (..., V) with the vocabulary last, got a 0-d tensor")


def check_same_tokens(student_name: str, student: Tensor, teacher_name: str, teacher: Tensor) -> None:
    """Student and teacher tensors of shape (..., D) must cover the same tokens on one device."""
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(f"{student_name} has shape {tuple(student.shape)} and {teacher_name} "
                         f"{tuple(teacher.shape)}: the leading (token) dimensions must match")
    if student.device != teacher.device:
        raise ValueError(f"{student_name} is on {student.device} but {teacher_name} is on {teacher.device}")


def check_vocab(v_s: int, v_t: int, vocab_size: Optional[int], student_name: str = "student_logits",
                teacher_name: str = "teacher_logits") -> int:
    """The vocabulary compared: vocab_size if given (checked), else the common V."""
    if vocab_size is not None:
        if vocab_size > min(v_s, v_t):
            raise ValueError(f"vocab_size={vocab_size} exceeds the vocabulary of {student_name} (V={v_s}) or "
                             f"{teacher_name} (V={v_t})")
        return vocab_size
    if v_s != v_t:
        hint = (f"; if the first {min(v_s, v_t)} entries are the shared tokens (e.g. a padded vocabulary), pass "
                f"vocab_size={min(v_s, v_t)}")
        raise ValueError(f"vocabulary sizes differ: {student_name} has V={v_s}, {teacher_name} has V={v_t}{hint}")
    if v_s == 0:
        raise ValueError(f"{student_name} and {teacher_name} have an empty vocabulary dimension (V=0)")
    return v_s


def check_labels(labels, lead_shape: torch.Size, device: torch.device, vocab: int, opts: LossOptions):
    """labels as a contiguous int64 (N,) tensor (or None), after checking them.

    Labels decide which rows count whatever hard_weight is, so their values are checked
    always: on the CPU here (a ValueError); on a GPU that check would wait for the device
    (and break CUDA-graph capture), so there the kernels make a row with a label outside
    [0, V) and not ignore_index a NaN row instead.
    """
    if labels is None:
        if opts.hard_weight > 0:
            raise ValueError(f"hard_weight={opts.hard_weight} needs labels (the hard targets), got labels=None")
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of token ids, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 (or int32) tensor, got {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(f"labels must have the leading (token) shape {tuple(lead_shape)}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the inputs are on {device}")
    labels = labels.reshape(-1).to(torch.int64).contiguous()
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        valid = ((labels >= 0) & (labels < vocab)) | (labels == opts.ignore_index)
        if not bool(valid.all()):
            bad = labels[~valid][0].item()
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={opts.ignore_index}; "
                             f"found {bad} (labels decide which rows count even when hard_weight=0)")
    return labels


def _byte_span(t: Tensor) -> tuple[int, int]:
    """[first, last) addresses of the bytes t can touch."""
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def check_inplace(student_logits: Tensor, student: Tensor, teacher: Tensor) -> None:
    """inplace_backward overwrites the student rows while the kernel reads them: refuse a leaf that
    autograd must keep, and memory that other rows (or the teacher) read too."""
    if student_logits.is_leaf and student_logits.requires_grad:
        raise ValueError("inplace_backward=True would overwrite student_logits, a leaf tensor that requires grad "
                         "(autograd needs its values); pass the output of a layer (e.g. the lm_head's logits), or "
                         "inplace_backward=False")
    if student.numel() == 0:
        return
    if torch._debug_has_internal_overlap(student) == 1:
        raise ValueError("inplace_backward=True cannot write the gradient over student_logits: some of its rows "
                         "share memory (e.g. an expanded tensor), so one row's gradient would overwrite another's "
                         "logits; pass a tensor with its own memory, or inplace_backward=False")
    (s0, s1), (t0, t1) = _byte_span(student), _byte_span(teacher)
    if teacher.numel() and s0 < t1 and t0 < s1:
        raise ValueError("inplace_backward=True cannot write the gradient over student_logits: they share memory "
                         "with teacher_logits (e.g. shifted views of one tensor), whose values would be overwritten "
                         "before they are read; pass inplace_backward=False")


def _leading_dims_collapse(x: Tensor, first: int) -> bool:
    """Whether x's dims first..-2 can be merged into one dimension without a copy."""
    dims = [(size, stride) for size, stride in zip(x.shape[first:-1], x.stride()[first:-1]) if size != 1]
    return all(outer_stride == inner_size * inner_stride
               for (_, outer_stride), (inner_size, inner_stride) in zip(dims, dims[1:]))


def as_rows(*tensors: Tensor) -> list[Tensor]:
    """(..., V) tensors of one leading shape as (B, M, V) views with unit stride along V.

    All get the same (B, M): B = 1 when every tensor's leading dims merge into one, else
    B = the first leading dim when the others merge (slices such as ``logits[:, :-1]`` of
    a (batch, seq, V) tensor); a tensor that fits neither is copied (contiguous).
    """
    tensors = [t.unsqueeze(0) if t.dim() == 1 else t for t in tensors]
    tensors = [t.contiguous() if t.stride(-1) != 1 and t.shape[-1] > 1 else t for t in tensors]
    lead, vocab = tensors[0].shape[:-1], tensors[0].shape[-1]
    if all(_leading_dims_collapse(t, 0) for t in tensors):
        return [t.reshape(1, math.prod(lead), vocab) for t in tensors]
    if all(_leading_dims_collapse(t, 1) for t in tensors):
        return [t.reshape(lead[0], math.prod(lead[1:]), vocab) for t in tensors]
    return [(t if _leading_dims_collapse(t, 0) else t.contiguous()).reshape(1, math.prod(lead), vocab)
            for t in tensors]


class ReductionWeights(NamedTuple):
    """How the reduction weighs each row's divergence and cross-entropy."""

    row_weight: Tensor  # 1, or 1 / (counted rows) for "batchmean" and "mean"
    kd_row_weight: Tensor  # row_weight, and also / V for "mean"
    coefs: Tensor  # d(loss)/d(row divergence), d(loss)/d(row cross-entropy): what the kernels weight gradients by

    @staticmethod
    def of(labels: Optional[Tensor], n_rows: int, vocab: int, opts: LossOptions, device: torch.device,
           dtype: torch.dtype) -> ReductionWeights:
        # The rows counted stay a tensor, so that no device sync is needed.
        counted = n_rows if labels is None else labels.ne(opts.ignore_index).sum()
        counted = torch.as_tensor(counted, dtype=dtype, device=device).clamp(min=1)
        row_weight = torch.ones((), dtype=dtype, device=device) if opts.reduction in ("none", "sum") else 1 / counted
        kd_row_weight = row_weight / vocab if opts.reduction == "mean" else row_weight
        coefs = torch.stack([opts.soft_weight * opts.kd_scale * kd_row_weight, opts.hard_weight * row_weight])
        return ReductionWeights(row_weight, kd_row_weight, coefs.to(dtype))

    def finish(self, loss: Tensor, kd_rows: Tensor, ce_rows: Tensor, lead_shape: torch.Size, opts: LossOptions,
               return_parts: bool):
        """The loss in the reduction's shape, with the detached parts when asked."""
        if opts.reduction == "none":
            loss = loss.view(lead_shape)
        if not return_parts:
            return loss
        if opts.reduction == "none":
            return KDLossParts(loss, opts.kd_scale * kd_rows.view(lead_shape), ce_rows.view(lead_shape))
        return KDLossParts(loss, opts.kd_scale * self.kd_row_weight * kd_rows.sum(), self.row_weight * ce_rows.sum())


def compute_kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor], opts: LossOptions,
                    return_parts: bool = False):
    """kd_loss with validated options: checks the tensors, then runs the chosen backend."""
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    check_same_tokens("student_logits", student_logits, "teacher_logits", teacher_logits)
    vocab = check_vocab(student_logits.shape[-1], teacher_logits.shape[-1], opts.vocab_size)
    lead_shape = student_logits.shape[:-1]
    labels = check_labels(labels, lead_shape, student_logits.device, vocab, opts)
    student, teacher = as_rows(student_logits[..., :vocab], teacher_logits.detach()[..., :vocab])
    backend = resolve_backend(opts.backend, student.device, (student.dtype, teacher.dtype))
    n_rows = student.shape[0] * student.shape[1]
    if n_rows == 0:
        backend = "torch"  # nothing to launch a kernel for

    weights = ReductionWeights.of(labels, n_rows, vocab, opts, student.device,
                                  compute_dtype(student.dtype, teacher.dtype))
    inplace = opts.inplace_backward and student.requires_grad and torch.is_grad_enabled()
    if inplace:
        check_inplace(student_logits, student, teacher)
    loss, kd_rows, ce_rows = KDLossFunction.apply(student, teacher, labels, weights.coefs, opts.kernel_params,
                                                  backend, opts.reduction == "none", inplace)
    return weights.finish(loss, kd_rows, ce_rows, lead_shape, opts, return_parts)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
            divergence: str = "forward_kl", beta: float = 0.5, labels: Optional[Tensor] = None,
            ignore_index: int = -100, reduction: str = "batchmean", scale_t2: bool = True, hard_weight: float = 0.0,
            soft_weight: float = 1.0, vocab_size: Optional[int] = None, inplace_backward: bool = False,
            return_parts: bool = False, backend: str = "auto"):
    """Knowledge-distillation loss between temperature-softened student and teacher distributions.

    Args:
        student_logits: (..., V) float32/bfloat16/float16 (or float64) logits; the tensor that gets a gradient.
        teacher_logits: (..., V') logits with the same leading shape; never receives a gradient.
        temperature: T > 0; both sides are divided by T before the softmax.
        divergence: "forward_kl" = KL(p_t || p_s), "reverse_kl" = KL(p_s || p_t), or "jsd", the
            generalised Jensen-Shannon divergence of TRL's GKD and Liger with mixture
            m = beta p_t + (1 - beta) p_s; beta = 0 is exactly forward_kl and beta = 1 reverse_kl.
        beta: jsd only, in [0, 1].
        labels: optional (...,) int64 token ids; rows whose label is ignore_index are not counted
            (and not read). Required when hard_weight > 0.
        reduction: "batchmean" (sum over counted rows / their number), "sum", "mean" (sum / (rows x V),
            torch's KLDivLoss meaning; the hard part is averaged over rows), or "none" (per-row, 0 at ignored rows).
        scale_t2: multiply the divergence by T**2 (Hinton et al.) so gradients keep their size as T changes.
        hard_weight: adds hard_weight * cross_entropy(student_logits at T = 1, labels).
        soft_weight: scales the distillation part.
        vocab_size: compare only the first vocab_size entries (e.g. a teacher with a padded vocabulary).
        inplace_backward: let kdfast write the gradient over student_logits during the forward pass,
            saving an N x V buffer; student_logits' values are then consumed (do not use them afterwards).
        return_parts: return KDLossParts(loss, kd, hard), the two parts detached for logging.
        backend: "auto", "triton", "cuda", "cpu" or "torch".

    Returns:
        A float32 scalar (float64 for float64 logits), or per-row losses of shape (...) for reduction="none".
        The gradient is computed during the forward pass when student_logits requires grad.
    """
    opts = LossOptions(temperature=temperature, divergence=divergence, beta=beta, ignore_index=ignore_index,
                       reduction=reduction, scale_t2=scale_t2, hard_weight=hard_weight, soft_weight=soft_weight,
                       vocab_size=vocab_size, inplace_backward=inplace_backward, backend=backend)
    return compute_kd_loss(student_logits, teacher_logits, labels, opts, return_parts)


class KDLoss(torch.nn.Module):
    """Module form of :func:`kd_loss`: ``KDLoss(temperature=2.0)(student_logits, teacher_logits, labels)``."""

    def __init__(self, *, return_parts: bool = False, **options):
        super().__init__()
        self.options = loss_options("KDLoss", options, ("return_parts",))
        self.return_parts = return_parts

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None):
        return compute_kd_loss(student_logits, teacher_logits, labels, self.options, self.return_parts)

    def extra_repr(self) -> str:
        defaults = LossOptions()
        changed = {k: v for k, v in vars(self.options).items() if getattr(defaults, k) != v}
        return ", ".join(f"{k}={v!r}" for k, v in changed.items())
