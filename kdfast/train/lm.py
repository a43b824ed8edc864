"""Distillation between two causal LMs, shared by kdfast's trainer and its Hugging Face Trainer.

This is the one place that chooses how the loss is computed:

- ``fused_linear``: both models return their final hidden states and expose the output
  embedding applied to them, so ``kdfast.fused_linear_kd_loss`` computes the loss from
  (hidden states, weight) pairs chunk by chunk, without the N x V logits. Hugging Face
  causal LMs and :class:`kdfast.train.models.GPT` qualify: they take ``output_hidden_states`` and
  ``logits_to_keep`` and have ``get_output_embeddings()``. A soft cap or scale of the logits
  that the model's config sets (Gemma 2, Cohere, Granite...: LOGIT_TRANSFORMS) is passed to
  the kernels, which apply it; models with other transforms take the logits path, and so does
  any whose logits a start-up probe finds are not the (transformed) output embedding of the
  last hidden state. Only that final hidden state is kept from each forward (``run_for_hidden``:
  a hook, not ``output_hidden_states``, which would keep every layer's).
- ``logits``: any model returning logits (a tensor, a tuple starting with them, or an
  object with ``.logits``); the loss is ``kd_loss`` on the full logits.

A teacher given as its sparse distribution (ids and log-probs per position, e.g. read from a
teacher cache) takes ``fused_linear_sparse_kd_loss`` on the fused-linear path, which then needs
only the student to qualify, and ``sparse_kd_loss`` on the logits path.

Targets are aligned with the positions: ``targets[..., t]`` is the token position t must
predict (ignore_index where nothing is to be predicted, e.g. padding or a sequence's end).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdfast

from kdfast import KDLossParts, LossOptions
from kdfast.inputs import check_vocab
from kdfast.options import check_choice

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


def final_hidden_module(model: nn.Module) -> Optional[nn.Module]:
    """The submodule whose output (or its first element) is the final hidden state, the output embedding's
    input: a Hugging Face model's base model, or what the model names itself; None if neither."""
    inner = unwrap(model)
    own = getattr(inner, "final_hidden_module", None)
    if callable(own):
        return own()
    base = getattr(inner, "base_model", None)
    return base if isinstance(base, nn.Module) and base is not inner else None


def _hidden_of(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    return output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state


def run_for_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """The final hidden states of one forward (its logits only at the last position): captured by a forward hook
    on final_hidden_module, so that only that tensor is kept, not every layer's output as
    output_hidden_states keeps them (for an 80-layer teacher at 8k tokens x 8192 in bf16, 10 GB)."""
    module = final_hidden_module(model)
    if module is None:
        return _run(model, input_ids, attention_mask, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    captured = []
    handle = module.register_forward_hook(lambda _module, _args, output: captured.append(_hidden_of(output)))
    try:
        _run(model, input_ids, attention_mask, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


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


# Config attributes with which Hugging Face causal LMs change the logits after the output embedding
# (or the hidden state fed to it), so that their logits are not lm_head(hidden_states[-1]); each maps
# to the value that changes nothing (None: any value set is a change). Found in transformers' models:
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # cap * tanh(logits / cap): Gemma 2/3/3n/4, PaliGemma, VaultGemma, nanochat...
    "logits_soft_cap": None,  # the same: RecurrentGemma
    "output_logit_soft_cap": None,  # the same: xLSTM
    "logit_scale": 1.0,  # logits * scale: Cohere, Cohere2, Cohere2 MoE
    "logits_scaling": 1.0,  # logits / s: Granite, GraniteMoE...; logits * s: HyperCLOVA X; hidden / s: MiniCPM3
    "lm_head_multiplier": 1.0,  # logits * m: Falcon-H1
    "output_multiplier": 1.0,  # logits * m before the soft cap: Muse Spark
    "logits_mup_width_multiplier": 1.0,  # hidden / m: Inkling
}
# Those the fused-linear kernels apply (kdfast's softcap and logit_scale): a soft cap, or a factor on the logits.
# logits_scaling means a division only in Granite models; elsewhere it is left to the logits path.
SOFT_CAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
LOGIT_FACTORS = ("logit_scale", "lm_head_multiplier", "output_multiplier")
SPECIAL_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "sep_token_id", "cls_token_id",
                  "mask_token_id", "decoder_start_token_id")
PROBE_LENGTH = 8


class LogitTransform(NamedTuple):
    """How a model turns lm_head(hidden) into its logits: scale, then cap * tanh(z / cap) (None: off)."""

    scale: Optional[float] = None
    cap: Optional[float] = None

    def __call__(self, logits: Tensor) -> Tensor:
        if self.scale is not None:
            logits = logits * self.scale
        return logits if self.cap is None else self.cap * torch.tanh(logits / self.cap)


def _configs(model: nn.Module) -> list:
    """The model's config and, for composite models, the config of its text decoder."""
    config = getattr(unwrap(model), "config", None)
    if config is None:
        return []
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    return [config] if text is config else [config, text]


def logit_transform(model: nn.Module) -> tuple[LogitTransform, Optional[str]]:
    """The transform of the logits after the output embedding that the model's config sets (LOGIT_TRANSFORMS),
    as the fused-linear kernels apply it, and why they cannot (None if they can)."""
    scale, cap = None, None
    for config in _configs(model):
        for attribute, unchanged in LOGIT_TRANSFORMS.items():
            value = getattr(config, attribute, None)
            if value is None or value == unchanged:
                continue
            if attribute in SOFT_CAPS:
                cap = float(value)
            elif attribute in LOGIT_FACTORS:
                scale = (scale or 1.0) * value
            elif attribute == "logits_scaling" and str(getattr(config, "model_type", "")).startswith("granite"):
                scale = (scale or 1.0) / value
            else:
                return LogitTransform(), (f"its config sets {attribute}={value!r}, which transforms the logits after "
                                          "the output embedding in a way the fused-linear kernels do not apply")
    return LogitTransform(scale, cap), None


def _first_int(configs: list, names: tuple[str, ...]) -> Optional[int]:
    return next((getattr(c, n) for c in reversed(configs) for n in names if isinstance(getattr(c, n, None), int)),
                None)


def _probe_ids(model: nn.Module, head: Optional[nn.Module]) -> Tensor:
    """(1, PROBE_LENGTH) fixed pseudo-random ids from the model's vocabulary, none of them a special token:
    a padding token's embedding is often zero, and all-zero hidden states give all-zero logits on both routes."""
    inner, configs = unwrap(model), _configs(model)
    vocab = _first_int(configs, ("vocab_size",)) or (head.weight.shape[0] if head is not None else 1)
    embeddings = inner.get_input_embeddings() if callable(getattr(inner, "get_input_embeddings", None)) else None
    special = {getattr(embeddings, "padding_idx", None)}
    for config in configs:
        for name in SPECIAL_TOKENS:
            ids = getattr(config, name, None)
            special.update(ids if isinstance(ids, (list, tuple)) else [ids])
    allowed = torch.tensor([i for i in range(vocab) if i not in special] or [0])
    length = min(PROBE_LENGTH, _first_int(configs, ("max_position_embeddings", "n_positions", "context")) or
                 PROBE_LENGTH)
    picks = torch.randint(len(allowed), (1, length), generator=torch.Generator().manual_seed(0))
    device = next((p.device for p in inner.parameters()), torch.device("cpu"))
    return allowed[picks].to(device)


def _head_mismatch(model: nn.Module, out, head: nn.Module, transform: LogitTransform) -> Optional[str]:
    """Why the model's logits are not its output embedding applied to its last hidden state (then transformed),
    or None if they are."""
    logits = logits_of(out)
    expected = transform(F.linear(out.hidden_states[-1], head.weight, getattr(head, "bias", None)))
    if expected.shape != logits.shape:
        return (f"its logits (shape {tuple(logits.shape)}) are not its output embedding applied to its last hidden "
                f"state (shape {tuple(expected.shape)})")
    # Relative to the largest logit, so that a scale changes the error as much as the logits; a few roundings
    # of the coarsest dtype involved. Autocast may compute in bf16 what a model returns in fp32: so does a
    # model that accelerate prepared for mixed precision (it keeps the plain forward as _original_forward).
    dtypes = [logits.dtype, expected.dtype] + ([torch.bfloat16] if hasattr(model, "_original_forward") else [])
    rtol = max(1e-4, *(4 * torch.finfo(d).eps for d in dtypes))
    logits, expected = logits.float(), expected.float()
    spread = expected.amax() - expected.amin()
    if not torch.isfinite(spread) or spread == 0:
        return ("its logits on the probe tokens are all equal (or not finite), so the probe cannot tell whether "
                "they are its output embedding applied to its last hidden state")
    if (logits - expected).abs().max() > rtol * expected.abs().max():
        return "its logits are not its output embedding applied to its last hidden state"
    return None


@torch.no_grad()
def _probe(model: nn.Module) -> tuple[int, Optional[str]]:
    """The model's vocabulary size, and why the fused-linear path cannot use it (None if it can)."""
    inner = unwrap(model)
    head, (transform, unsupported) = output_head(inner), logit_transform(inner)
    ids = _probe_ids(inner, head)
    was_training = inner.training
    inner.eval()
    try:
        if is_sharded(inner):
            reason = "FSDP shards its parameters, so its output embedding is whole only inside its forward"
        elif head is None:
            reason = "it lacks get_output_embeddings() or a forward taking output_hidden_states and logits_to_keep"
        elif unsupported is not None:
            reason = unsupported
        else:
            out = inner(ids, output_hidden_states=True)
            if not getattr(out, "hidden_states", None):
                return logits_of(out).shape[-1], "it returns no hidden_states when asked for them"
            captured = run_for_hidden(inner, ids, None)
            if captured.shape != out.hidden_states[-1].shape or not torch.allclose(captured, out.hidden_states[-1]):
                return logits_of(out).shape[-1], (f"the output of its {type(final_hidden_module(inner)).__name__} "
                                                  "is not its last hidden state")
            return logits_of(out).shape[-1], _head_mismatch(inner, out, head, transform)
        return logits_of(inner(ids)).shape[-1], reason
    finally:
        inner.train(was_training)


def choose_loss_path(student: nn.Module, teacher: nn.Module, options: LossOptions, requested: str = "auto") -> str:
    """Checks that the pair can be distilled (vocabularies) and returns "fused_linear" or "logits".

    "auto" takes the fused-linear path when both models qualify: each has an output embedding
    and hidden states to apply it to, no transform of its logits after the output embedding in
    its config (LOGIT_TRANSFORMS) but those the kernels apply (a soft cap, a scale: passed to them
    by LMDistillLoss), and a probe forward on a few tokens gives logits equal to the output
    embedding applied to the last hidden state, then transformed. Asking for "fused_linear" when
    they do not is an error that says why.
    """
    check_loss_path(requested)
    check_no_logit_options(options)
    v_student, student_reason = _probe(student)
    v_teacher, teacher_reason = _probe(teacher)
    check_vocab(v_student, v_teacher, options.vocab_size, "the student's output", "the teacher's output")
    if requested == "logits":
        return "logits"
    if not (student_reason or teacher_reason):
        return "fused_linear"
    reason = f"the student: {student_reason}" if student_reason else f"the teacher: {teacher_reason}"
    if requested == "fused_linear":
        raise ValueError(f"loss_path='fused_linear' cannot be used: {reason}; use loss_path='logits' or 'auto'")
    return "logits"


def choose_sparse_loss_path(student: nn.Module, teacher_vocab: int, options: LossOptions,
                            requested: str = "auto") -> str:
    """choose_loss_path for a sparse teacher (no teacher model): the student alone decides, and its vocabulary
    must be the teacher's."""
    check_loss_path(requested)
    check_no_logit_options(options)
    if options.vocab_size is not None:
        raise ValueError("loss.vocab_size does not apply to a sparse teacher: its ids say which tokens it covers")
    if options.teacher_temperature not in (None, options.temperature):
        raise ValueError("a sparse teacher's log-probs are at one temperature, the loss's: leave teacher_temperature "
                         "unset")
    v_student, reason = _probe(student)
    if v_student != teacher_vocab:
        raise ValueError(f"vocabulary sizes differ: the student's output has V={v_student}, the teacher's "
                         f"V={teacher_vocab}")
    if requested == "logits" or (requested == "auto" and reason):
        return "logits"
    if reason:
        raise ValueError(f"loss_path='fused_linear' cannot be used: the student: {reason}; use loss_path='logits' "
                         "or 'auto'")
    return "fused_linear"


# The loss options that the sparse losses take (not vocab_size or teacher_temperature, checked above).
SPARSE_OPTIONS = ("temperature", "divergence", "beta", "ignore_index", "reduction", "scale_t2", "hard_weight",
                  "soft_weight", "expected_grad_output", "backend")


def check_loss_path(requested: str) -> None:
    check_choice("loss_path", requested, LOSS_PATHS)


def check_no_logit_options(options: LossOptions) -> None:
    """A model's own soft cap or scale is read from its config (and its logits have them already)."""
    for name in ("softcap", "logit_scale"):
        if getattr(options, name) is not None:
            raise ValueError(f"{name}={getattr(options, name)!r} cannot be given to the trainer: it reads each "
                             "model's soft cap and logit scale from its config (and applies them on the fused-linear "
                             "path; the logits path gets logits that have them already), so leave it unset")


def fused_logit_options(student: nn.Module, teacher: Optional[nn.Module]) -> dict:
    """softcap and logit_scale, (student, teacher), for the fused-linear losses: the models' own."""
    sides = [logit_transform(student)[0], logit_transform(teacher)[0] if teacher is not None else LogitTransform()]
    return {"softcap": tuple(side.cap for side in sides), "logit_scale": tuple(side.scale for side in sides)}


class LMDistillLoss:
    """loss(student, teacher, input_ids, targets) -> KDLossParts(loss, kd, hard).

    The teacher runs under no_grad. With teacher=None it is the plain language-modelling
    cross-entropy (kd = 0, hard = the loss), so one training loop trains teachers,
    baselines and students. Model forwards run under autocast to ``autocast_dtype`` when
    it is set; the loss itself is computed by kdfast in its own precision.
    """

    def __init__(self, loss_options: LossOptions, path: str = "logits", autocast_dtype: Optional[torch.dtype] = None,
                 tail: str = "bucket"):
        if path not in ("fused_linear", "logits"):
            raise ValueError(f"path must be 'fused_linear' or 'logits', got {path!r}")
        self.loss_options = loss_options
        self.path = path
        self.autocast_dtype = autocast_dtype
        self.tail = tail  # how a sparse teacher's rest counts (kdfast.sparse_kd_loss)

    def __call__(self, student: nn.Module, teacher: Optional[nn.Module], input_ids: Tensor, targets: Tensor,
                 attention_mask: Optional[Tensor] = None, num_items_in_batch=None,
                 teacher_ids: Optional[Tensor] = None, teacher_logprobs: Optional[Tensor] = None) -> KDLossParts:
        """With teacher_ids and teacher_logprobs (..., K) (and teacher None), the teacher is that sparse
        distribution: the loss is sparse_kd_loss, or fused_linear_sparse_kd_loss on the fused-linear path."""
        if teacher_ids is not None:
            return self._sparse(student, input_ids, targets, attention_mask, num_items_in_batch, teacher_ids,
                                teacher_logprobs)
        fused = teacher is not None and self.path == "fused_linear"
        run = run_for_hidden if fused else _run  # fused: the final hidden states, else the outputs
        with autocast(input_ids.device, self.autocast_dtype):
            student_out = run(student, input_ids, attention_mask)
            if teacher is not None:
                with torch.no_grad():
                    teacher_out = run(teacher, input_ids, attention_mask)
        if teacher is None:
            logits = logits_of(student_out)
            loss = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(),
                                   ignore_index=self.loss_options.ignore_index)
            return KDLossParts(loss, torch.zeros_like(loss.detach()), loss.detach())
        if fused:
            s_head, t_head = output_head(student), output_head(teacher)
            options = {**self.loss_options.as_kwargs(), **fused_logit_options(student, teacher)}
            return kdfast.fused_linear_kd_loss(
                student_out, s_head.weight, teacher_out, t_head.weight,
                student_bias=getattr(s_head, "bias", None), teacher_bias=getattr(t_head, "bias", None),
                labels=targets, num_items_in_batch=num_items_in_batch, return_parts=True, **options)
        return kdfast.kd_loss(logits_of(student_out), logits_of(teacher_out), labels=targets,
                              num_items_in_batch=num_items_in_batch, return_parts=True,
                              **self.loss_options.as_kwargs())

    def _sparse(self, student: nn.Module, input_ids: Tensor, targets: Tensor, attention_mask: Optional[Tensor],
                num_items_in_batch, teacher_ids: Tensor, teacher_logprobs: Tensor) -> KDLossParts:
        fused = self.path == "fused_linear"
        with autocast(input_ids.device, self.autocast_dtype):
            out = (run_for_hidden if fused else _run)(student, input_ids, attention_mask)
        options = {name: getattr(self.loss_options, name) for name in SPARSE_OPTIONS}
        common = dict(labels=targets, tail=self.tail, num_items_in_batch=num_items_in_batch, return_parts=True)
        if fused:
            head = output_head(student)
            return kdfast.fused_linear_sparse_kd_loss(out, head.weight, teacher_ids,
                                                      teacher_logprobs, student_bias=getattr(head, "bias", None),
                                                      **common, **options, **fused_logit_options(student, None))
        return kdfast.sparse_kd_loss(logits_of(out), teacher_ids, teacher_logprobs,
                                     inplace_backward=self.loss_options.inplace_backward, **common, **options)


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
