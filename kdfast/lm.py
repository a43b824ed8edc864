"""Distillation between two causal LMs, shared by kdfast's trainer and its Hugging Face Trainer.

This is the one place that chooses how the loss is computed:

- ``fused_linear``: both models return their final hidden states and expose the output
  embedding applied to them, so ``kdfast.fused_linear_kd_loss`` computes the loss from
  (hidden states, weight) pairs chunk by chunk, without the N x V logits. Hugging Face
  causal LMs and :class:`kdfast.models.GPT` qualify: they take ``output_hidden_states`` and
  ``logits_to_keep`` and have ``get_output_embeddings()``.
- ``logits``: any model returning logits (a tensor, a tuple starting with them, or an
  object with ``.logits``); the loss is ``kd_loss`` on the full logits.

Targets are aligned with the positions: ``targets[..., t]`` is the token position t must
predict (ignore_index where nothing is to be predicted, e.g. padding or a sequence's end).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdfast

from .api import KDLossParts, LossOptions, check_vocab, compute_kd_loss
from .fused_linear import compute_fused_linear_kd_loss

LOSS_PATHS = ("auto", "fused_linear", "logits")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def logits_of(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.logits


def _run(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor], **kwargs):
    if attention_mask is not None:  # plain modules need not take one
        kwargs["attention_mask"] = attention_mask
    return model(input_ids, **kwargs)


def output_head(model: nn.Module) -> Optional[nn.Module]:
    """The model's output embedding when it can also return the hidden states fed to it, else None."""
    inner = unwrap(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    params = inspect.signature(inner.forward).parameters
    takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())  # transformers >= 5
    if "logits_to_keep" not in params or not ("output_hidden_states" in params or takes_any):
        return None
    return head


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP shards some of the model's parameters (whole only inside its forward)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed import fsdp

    kinds = tuple(k for k in (getattr(fsdp, "FSDPModule", None), getattr(fsdp, "FullyShardedDataParallel", None))
                  if k is not None)
    return any(isinstance(module, kinds) for module in model.modules())


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def _probe(model: nn.Module, probe_ids: Tensor) -> tuple[int, Optional[str]]:
    """The model's vocabulary size, and why the fused-linear path cannot use it (None if it can)."""
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    try:
        head = output_head(inner)
        if is_sharded(inner):
            return logits_of(inner(probe_ids)).shape[-1], (
                "FSDP shards its parameters, so its output embedding is whole only inside its forward")
        if head is None:
            return logits_of(inner(probe_ids)).shape[-1], (
                "it lacks get_output_embeddings() or a forward taking output_hidden_states and logits_to_keep")
        out = inner(probe_ids, output_hidden_states=True)
        if not getattr(out, "hidden_states", None):
            return logits_of(out).shape[-1], "it returns no hidden_states when asked for them"
        logits = logits_of(out).float()
        # Models that scale or soft-cap logits after the output embedding cannot use the fused path.
        expected = F.linear(out.hidden_states[-1], head.weight, getattr(head, "bias", None)).float()
        if expected.shape != logits.shape or not torch.allclose(logits, expected, rtol=1e-3, atol=1e-3):
            return logits.shape[-1], "its logits are not its output embedding applied to its last hidden state"
        return logits.shape[-1], None
    finally:
        inner.train(was_training)


def choose_loss_path(student: nn.Module, teacher: nn.Module, options: LossOptions, requested: str = "auto",
                     probe_ids: Optional[Tensor] = None) -> str:
    """Checks that the pair can be distilled (vocabularies) and returns "fused_linear" or "logits".

    "auto" takes the fused-linear path when both models qualify; asking for
    "fused_linear" when they do not is an error that says why.
    """
    if requested not in LOSS_PATHS:
        raise ValueError(f"loss_path must be one of {', '.join(map(repr, LOSS_PATHS))}; got {requested!r}")
    if probe_ids is None:
        device = next(unwrap(student).parameters()).device
        probe_ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    v_student, student_reason = _probe(student, probe_ids)
    v_teacher, teacher_reason = _probe(teacher, probe_ids)
    check_vocab(v_student, v_teacher, options.vocab_size, "the student's output", "the teacher's output")
    if requested == "logits":
        return "logits"
    if not (student_reason or teacher_reason):
        return "fused_linear"
    reason = f"the student: {student_reason}" if student_reason else f"the teacher: {teacher_reason}"
    if requested == "fused_linear":
        raise ValueError(f"loss_path='fused_linear' cannot be used: {reason}; use loss_path='logits' or 'auto'")
    return "logits"


class LMDistillLoss:
    """loss(student, teacher, input_ids, targets) -> KDLossParts(loss, kd, hard).

    The teacher runs under no_grad. With teacher=None it is the plain language-modelling
    cross-entropy (kd = 0, hard = the loss), so one training loop trains teachers,
    baselines and students. Model forwards run under autocast to ``autocast_dtype`` when
    it is set; the loss itself is computed by kdfast in its own precision.
    """

    def __init__(self, options: LossOptions, path: str = "logits", autocast_dtype: Optional[torch.dtype] = None):
        if path not in ("fused_linear", "logits"):
            raise ValueError(f"path must be 'fused_linear' or 'logits', got {path!r}")
        self.options = options
        self.path = path
        self.autocast_dtype = autocast_dtype

    def __call__(self, student: nn.Module, teacher: Optional[nn.Module], input_ids: Tensor, targets: Tensor,
                 attention_mask: Optional[Tensor] = None) -> KDLossParts:
        fused = teacher is not None and self.path == "fused_linear"
        extra = {"output_hidden_states": True, "logits_to_keep": 1} if fused else {}
        with autocast(input_ids.device, self.autocast_dtype):
            student_out = _run(student, input_ids, attention_mask, **extra)
            if teacher is not None:
                with torch.no_grad():
                    teacher_out = _run(teacher, input_ids, attention_mask, **extra)
        if teacher is None:
            logits = logits_of(student_out)
            loss = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(),
                                   ignore_index=self.options.ignore_index)
            return KDLossParts(loss, torch.zeros_like(loss.detach()), loss.detach())
        if fused:
            s_head, t_head = output_head(student), output_head(teacher)
            return compute_fused_linear_kd_loss(
                student_out.hidden_states[-1], s_head.weight, teacher_out.hidden_states[-1], t_head.weight,
                getattr(s_head, "bias", None), getattr(t_head, "bias", None), targets, self.options,
                chunk_size=None, return_parts=True)
        return compute_kd_loss(logits_of(student_out), logits_of(teacher_out), targets, self.options,
                               return_parts=True)


def _eval_sums(logits: Tensor, teacher_logits: Optional[Tensor], targets: Tensor, options: LossOptions) -> Tensor:
    """Sums over the counted positions: negative log-likelihood, top-1 agreement with the teacher,
    KL(teacher || model) at T = 1, and the number of positions."""
    counted = targets.ne(options.ignore_index)
    nll = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=options.ignore_index,
                          reduction="sum")
    agree = kl = torch.zeros((), device=logits.device)
    if teacher_logits is not None:
        agree = (logits.argmax(-1).eq(teacher_logits.argmax(-1)) & counted).sum()
        kl = kdfast.kd_loss(logits, teacher_logits, labels=targets, ignore_index=options.ignore_index,
                            reduction="sum")
    return torch.stack([nll.double(), agree.double(), kl.double(), counted.sum().double()])


@torch.no_grad()
def evaluate_models(models: dict[str, nn.Module], teacher: Optional[nn.Module],
                    batches: Iterable[tuple[Tensor, Tensor]], options: LossOptions,
                    autocast_dtype: Optional[torch.dtype] = None,
                    all_reduce: Optional[Callable[[Tensor], object]] = None) -> dict[str, dict]:
    """Held-out metrics of each named model and of the teacher (under "teacher"), on the same batches
    of (input_ids, targets): loss (mean NLL) and perplexity, and for the models, top-1
    agreement with the teacher and KL(teacher || model). The teacher runs once per batch.
    ``all_reduce`` sums the totals across processes."""
    vocab = options.vocab_size
    everyone = {**models, **({"teacher": teacher} if teacher is not None else {})}
    modes = {name: model.training for name, model in everyone.items()}
    for model in everyone.values():
        model.eval()
    sums = {name: None for name in everyone}
    for inputs, targets in batches:
        with autocast(inputs.device, autocast_dtype):
            teacher_logits = logits_of(teacher(inputs)).float()[..., :vocab] if teacher is not None else None
            for name, model in models.items():
                part = _eval_sums(logits_of(model(inputs)).float()[..., :vocab], teacher_logits, targets, options)
                sums[name] = part if sums[name] is None else sums[name] + part
        if teacher_logits is not None:
            part = _eval_sums(teacher_logits, None, targets, options)
            sums["teacher"] = part if sums["teacher"] is None else sums["teacher"] + part
    for name, model in everyone.items():
        model.train(modes[name])
    results = {}
    for name, total in sums.items():
        if total is None:
            raise ValueError("no held-out batches to evaluate on")
        if all_reduce is not None:
            all_reduce(total)
        nll, agree, kl, tokens = total.tolist()
        tokens = max(tokens, 1.0)
        results[name] = {"loss": nll / tokens, "ppl": math.exp(nll / tokens), "tokens": int(tokens)}
        if teacher is not None and name != "teacher":
            results[name].update(agreement=agree / tokens, kl=kl / tokens)
    return results
