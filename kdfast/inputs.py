"""Checks of the tensors a loss is given, and their layout as rows for the kernels.

Every check raises an error that names the argument and what was expected, before any
kernel runs. The kernels then see (B, M, V) row views with unit stride along V
(kdfast.backends describes that contract): ``as_rows`` makes them, without a copy
wherever the strides allow (e.g. ``logits[:, :-1]``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .options import LossOptions

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_logits(name: str, x) -> None:
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
    # Labels of another shape with one entry per row are read in row-major order, e.g. (B, S)
    # labels for logits flattened to (B * S, V), as torchtune passes them.
    if labels.shape != lead_shape and labels.numel() != math.prod(lead_shape):
        raise ValueError(f"labels must have one entry per row of logits: the leading (token) shape "
                         f"{tuple(lead_shape)} ({math.prod(lead_shape)} rows), got shape {tuple(labels.shape)} "
                         f"({labels.numel()} entries); reshape them to {tuple(lead_shape)}, or drop the "
                         "positions the logits do not have (e.g. labels[:, 1:] for logits[:, :-1])")
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


def check_num_items(num_items_in_batch, opts: LossOptions):
    """num_items_in_batch: None, or an int >= 0 or a one-element tensor, for the averaging reductions."""
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.numel() != 1 or num_items_in_batch.dtype == torch.bool or \
                num_items_in_batch.is_complex():
            raise ValueError("num_items_in_batch must be an int or a one-element real tensor, got a tensor of "
                             f"shape {tuple(num_items_in_batch.shape)} and dtype {num_items_in_batch.dtype}")
        num_items_in_batch = num_items_in_batch.reshape(())
    elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int) or num_items_in_batch < 0:
        raise ValueError(f"num_items_in_batch must be None, an int >= 0 or a one-element tensor, got "
                         f"{num_items_in_batch!r}")
    if opts.reduction not in ("batchmean", "mean"):
        raise ValueError(f"num_items_in_batch sets the divisor of reduction='batchmean' (or 'mean'), but "
                         f"reduction={opts.reduction!r} divides by nothing")
    return num_items_in_batch


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
