"""Hugging Face ``transformers`` integration: :class:`KDTrainer`, a ``transformers.Trainer`` that distils.

::

    from kdfast import LossOptions
    from kdfast.integrations.hf import KDTrainer

    trainer = KDTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                        train_dataset=dataset, data_collator=collator,
                        loss_options=LossOptions(temperature=2.0, hard_weight=0.5, soft_weight=0.5))
    trainer.train()

Batches hold ``input_ids`` and, optionally, ``attention_mask`` and ``labels`` (unshifted, as
for Hugging Face causal LMs, -100 where nothing is to be predicted; without labels the
input ids are the targets, padding excluded) or ``shift_labels`` (the targets aligned with
the positions: position t predicts ``shift_labels[..., t]``). The loss is kdfast's fused-linear
KD loss when both models allow it, else kd_loss on their logits: kdfast.train.lm decides at the
first step, on the model as the Trainer has wrapped it (an FSDP-sharded model takes the logits
path). Logs gain the two parts of the loss, ``kd`` and ``hard``.

Under FSDP the teacher is sharded as the student: when the Trainer runs FSDP, KDTrainer does not move
the teacher to the device, and at the first step whose model is FSDP-sharded it shards the teacher
with FSDP2 (each transformer block, then the root, on the student's device mesh, in the parameter
dtype of the Trainer's FSDP mixed precision), frozen, in eval mode, resharded after each forward.
Every process must hold the same teacher weights (they are not broadcast); a teacher the caller
sharded is left as it is.

From a teacher cache (kdfast.train.teacher_cache), with no teacher model::

    cache, windows = TeacherCache("runs/teacher-cache"), TokenWindows(tokens, context=128)
    trainer = KDTrainer(model=student, args=TrainingArguments(...), train_dataset=WindowExamples(windows),
                        data_collator=TeacherCacheCollator(cache, windows), loss_options={"temperature": 2.0})

the collator adds each sequence's cached ``teacher_ids`` / ``teacher_logprobs`` to its batch, and
the loss is sparse_kd_loss (fused_linear_sparse_kd_loss when the student qualifies).

Gradient accumulation averages over the tokens of the whole optimizer step: KDTrainer counts the
targets of the step's batches and passes the count to the loss as ``num_items_in_batch``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast import LossOptions

from ..train.config import require
from ..train.data import TokenWindows
from ..train.lm import LMDistillLoss, check_loss_path, choose_loss_path, choose_sparse_loss_path, is_sharded
from ..train.runtime import shard_blocks_then_root
from ..train.teacher_cache import TeacherCache

transformers = require("transformers", "hf", "kdfast.integrations.hf")
require("accelerate", "hf", "transformers.Trainer")

SEQUENCE_INDEX = "sequence_index"  # an example's sequence (window) in the teacher cache
TEACHER_KEYS = ("teacher_ids", "teacher_logprobs")
# Batch keys the loss reads besides the model's own arguments: the Trainer must not drop them.
BATCH_KEYS = ("shift_labels", *TEACHER_KEYS, SEQUENCE_INDEX)


class WindowExamples(torch.utils.data.Dataset):
    """The windows of a :class:`~kdfast.train.data.TokenWindows` as examples for the Hugging Face Trainer:
    example w is ``{"input_ids": window w's inputs, "sequence_index": w}``, read when asked for. The same as a
    ``datasets.Dataset``: ``Dataset.from_dict({"input_ids": windows.rows(torch.arange(windows.n_windows))[0]
    .tolist(), "sequence_index": list(range(windows.n_windows))})``."""

    def __init__(self, windows: TokenWindows):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.n_windows

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        return {"input_ids": self.windows.rows(torch.tensor([index]))[0][0], SEQUENCE_INDEX: index}


class TeacherCacheCollator:
    """A data collator that reads each example's teacher from a :class:`~kdfast.train.teacher_cache.TeacherCache`.

    ``windows`` are the sequences the cache was captured on (refused, naming the difference, when they are not).
    Each example names its window in the cache with ``sequence_index`` and carries its ``input_ids``, which must
    be that window's inputs: an example whose tokens differ is refused, never trained on with another sequence's
    teacher. A batch holds ``input_ids``, ``shift_labels`` (the window's targets: position t predicts token t + 1,
    the last position the token after the window, as the cache is aligned), ``labels`` (the same, unshifted, for
    the Trainer's evaluation), and ``teacher_ids`` / ``teacher_logprobs`` (batch, T, K) from the cache.
    """

    def __init__(self, cache: TeacherCache, windows: TokenWindows):
        cache.check(windows=windows)
        self.cache, self.windows = cache, windows
        self.ignore_index = getattr(windows, "ignore_index", -100)  # MaskedWindows' mark of targets not learnt

    def __call__(self, features: list[dict]) -> dict[str, Tensor]:
        for feature in features:
            missing = [key for key in ("input_ids", SEQUENCE_INDEX) if key not in feature]
            if missing:
                raise ValueError(f"TeacherCacheCollator: an example lacks {' and '.join(map(repr, missing))} (it has "
                                 f"{sorted(feature)}): each example needs its input_ids and its {SEQUENCE_INDEX!r} in "
                                 "the teacher cache (WindowExamples(windows) makes such examples)")
        index = torch.tensor([int(feature[SEQUENCE_INDEX]) for feature in features])
        outside = index[(index < 0) | (index >= self.cache.sequences)]
        if len(outside):
            raise ValueError(f"TeacherCacheCollator: {SEQUENCE_INDEX} {int(outside[0])} is not a sequence of the "
                             f"teacher cache, which holds {self.cache.sequences}")
        inputs, targets = self.windows.rows(index)
        for row, window, feature in zip(inputs, index.tolist(), features):
            given = torch.as_tensor(feature["input_ids"])
            if given.shape != row.shape or not torch.equal(given.to(row.dtype), row):
                raise ValueError(f"TeacherCacheCollator: the example with {SEQUENCE_INDEX} {window} has input_ids "
                                 f"(shape {tuple(given.shape)}) other than the teacher cache's sequence {window} "
                                 f"(shape {tuple(row.shape)}): the data set is not the cache's sequences")
        teacher_ids, teacher_logprobs = self.cache.lookup(index)
        return {"input_ids": inputs, "labels": F.pad(targets[:, :-1], (1, 0), value=self.ignore_index),
                "shift_labels": targets, "teacher_ids": teacher_ids, "teacher_logprobs": teacher_logprobs}


class KDTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose loss distils a teacher into ``model``: ``teacher_model`` (frozen, eval
    mode), or a teacher cache whose ids and log-probs each batch carries.

    Args (besides Trainer's):
        teacher_model: a causal LM with the student's vocabulary (or set ``vocab_size``); None to distil from a
            teacher cache.
        teacher_cache: the :class:`~kdfast.train.teacher_cache.TeacherCache` that the batches' ``teacher_ids`` /
            ``teacher_logprobs`` come from (its vocabulary and temperature are checked, its tail is the loss's);
            by default that of a :class:`TeacherCacheCollator` given as ``data_collator``.
        loss_options: a :class:`kdfast.LossOptions` or a dict of its fields.
        loss_path: "auto", "fused_linear" or "logits" (see kdfast.train.lm).

    ``trainer.distill_loss``, the loss (``trainer.distill_loss.path`` the path taken), is set at the first step.
    """

    def __init__(self, *args, teacher_model: Optional[torch.nn.Module] = None,
                 teacher_cache: Optional[TeacherCache] = None,
                 loss_options: Union[LossOptions, dict, None] = None, loss_path: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        check_loss_path(loss_path)
        self.loss_options = loss_options if isinstance(loss_options, LossOptions) else \
            LossOptions(**(loss_options or {}))
        # The loss averages over the tokens of the optimizer step (num_items_in_batch, counted in
        # get_batch_samples); the Trainer then leaves it undivided by the accumulation steps. A summed loss
        # takes no count: the Trainer divides it by the accumulation steps.
        self.model_accepts_loss_kwargs = self.loss_options.reduction in ("batchmean", "mean")
        self._loss_shifts_labels = True  # so transformers >= 5 counts labels[..., 1:] for evaluation's loss too
        self.loss_path = loss_path
        if teacher_cache is None and isinstance(self.data_collator, TeacherCacheCollator):
            teacher_cache = self.data_collator.cache
        if (teacher_model is None) == (teacher_cache is None):
            raise ValueError("KDTrainer needs one teacher: teacher_model=..., or (teacher_model=None) batches with "
                             f"{' / '.join(TEACHER_KEYS)} from a teacher cache: data_collator=TeacherCacheCollator("
                             "cache, windows), or teacher_cache=cache with a collator of your own"
                             if teacher_model is None else
                             "KDTrainer was given a teacher_model and a teacher cache (teacher_cache, or a "
                             "TeacherCacheCollator): give one of them")
        if teacher_cache is not None:
            teacher_cache.check(temperature=self.loss_options.temperature)
        self.teacher_cache = teacher_cache
        if teacher_model is not None:
            teacher_model = teacher_model.eval().requires_grad_(False)
            if not self.is_fsdp_enabled:  # under FSDP it is sharded at the first step (_place_teacher), not copied
                teacher_model = teacher_model.to(self.args.device)
        self.teacher_model = teacher_model
        # Chosen in compute_loss, on the model the Trainer passes there: it wraps (and FSDP shards) the model
        # given here only later, and a sharded output embedding rules out the fused path.
        self.distill_loss: Optional[LMDistillLoss] = None
        self._distill_loss_model = None  # the model self.distill_loss was chosen for
        self._part_sums, self._part_count = None, 0  # kd and hard, summed on the device between logs

    def _set_signature_columns_if_needed(self) -> None:
        # The Trainer keeps only the columns the model's forward takes (remove_unused_columns): keep the loss's too.
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *BATCH_KEYS]))

    def _targets(self, inputs: dict) -> Tensor:
        """targets[..., t]: the token position t predicts, ignore_index where none counts."""
        if inputs.get("shift_labels") is not None:
            return torch.as_tensor(inputs["shift_labels"])
        ignore = self.loss_options.ignore_index
        input_ids, attention_mask = torch.as_tensor(inputs["input_ids"]), inputs.get("attention_mask")
        labels = inputs.get("labels")
        if labels is None:
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore)
        return F.pad(torch.as_tensor(labels)[..., 1:], (0, 1), value=ignore)  # position t predicts token t + 1

    def _averages_over_processes(self) -> bool:
        return bool(getattr(self.args, "average_tokens_across_devices", False)) and self.args.world_size > 1

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The optimizer step's batches and num_items_in_batch, the number of targets the loss counts in them
        (over every process when average_tokens_across_devices): the Trainer's own count is of ``labels``, which
        a batch may lack, and of all of them before transformers 5 (the loss predicts labels[..., 1:])."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples or not self.model_accepts_loss_kwargs:
            return batch_samples, None
        ignore = self.loss_options.ignore_index
        count = sum(self._targets(batch).ne(ignore).sum() for batch in batch_samples).to(device)
        if self._averages_over_processes():
            count = self.accelerator.gather(count).sum()
        return batch_samples, count

    def _teacher_inputs(self, inputs: dict) -> dict:
        """The batch's teacher_ids / teacher_logprobs when the teacher is a cache ({} for a teacher model)."""
        present = [key for key in TEACHER_KEYS if inputs.get(key) is not None]
        if self.teacher_model is not None:
            if present:
                raise ValueError(f"the batch carries {' and '.join(present)} but KDTrainer has a teacher_model: give "
                                 "one teacher, the model or the batches' teacher_ids / teacher_logprobs (with "
                                 "teacher_model=None)")
            return {}
        if len(present) < len(TEACHER_KEYS):
            raise ValueError(f"KDTrainer has no teacher_model, so every batch must carry {' and '.join(TEACHER_KEYS)}"
                             f" (e.g. from a TeacherCacheCollator); this one has {sorted(inputs)}")
        return {key: inputs[key] for key in TEACHER_KEYS}

    def _teacher_param_dtype(self) -> Optional[torch.dtype]:
        """The parameter dtype of the Trainer's FSDP mixed precision: accelerate's FSDP plugin holds the policy it
        gives FSDP (public, None: no mixed precision); without the Trainer's FSDP, that of args.bf16 / fp16."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is not None:
            return getattr(plugin.mixed_precision_policy, "param_dtype", None)
        return torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None

    def _place_teacher(self, model: torch.nn.Module) -> None:
        """Shards the teacher as the student when FSDP shards the student and not yet the teacher (else, under the
        Trainer's FSDP, moves it to the device whole, as without FSDP)."""
        if self.teacher_model is None or is_sharded(self.teacher_model):
            return
        if not is_sharded(model):
            if self.is_fsdp_enabled:
                self.teacher_model.to(self.args.device)
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy
        from torch.distributed.tensor import DTensor

        meshes = [p.device_mesh for p in model.parameters() if isinstance(p, DTensor)]
        # FSDP1 (flat parameters, no DTensors) shards over every process.
        mesh = meshes[0] if meshes else init_device_mesh(self.args.device.type, (self.args.world_size,))
        # Forward only: the root reshards after its forward too, so the teacher stays sharded between steps.
        shard_blocks_then_root(self.teacher_model, mesh, MixedPrecisionPolicy(param_dtype=self._teacher_param_dtype()),
                               root_reshards=True)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        teacher = self._teacher_inputs(inputs)
        if model is not self._distill_loss_model:
            self._place_teacher(model)
            if self.teacher_cache is not None:
                path = choose_sparse_loss_path(model, self.teacher_cache.vocab_size, self.loss_options,
                                               self.loss_path)
                loss = LMDistillLoss(self.loss_options, path, tail=self.teacher_cache.tail)
            else:
                loss = LMDistillLoss(self.loss_options, choose_loss_path(model, self.teacher_model, self.loss_options,
                                                                         self.loss_path))
            self.distill_loss, self._distill_loss_model = loss, model
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None
        parts = self.distill_loss(model, self.teacher_model, inputs["input_ids"], self._targets(inputs),
                                  inputs.get("attention_mask"), num_items_in_batch, **teacher)
        # Over processes, num_items_in_batch counts every process's tokens and gradients are averaged: as the
        # Trainer does, multiply by the number of processes.
        scale = self.accelerator.num_processes if num_items_in_batch is not None and \
            self._averages_over_processes() else 1
        loss = parts.loss * scale
        if model.training:
            # Logged per optimizer step, as the Trainer logs the loss: a micro-batch's parts are a share of the
            # step's (divided by the step's count) or a mean over the micro-batch.
            steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            weight = scale * (steps if num_items_in_batch is not None else 1)
            both = torch.stack([parts.kd, parts.hard]).float() * weight
            self._part_sums = both if self._part_sums is None else self._part_sums + both
            self._part_count += 1
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._part_count and "loss" in logs:
            kd, hard = (self._part_sums / self._part_count).tolist()
            logs = {**logs, "kd": kd, "hard": hard}
            self._part_sums, self._part_count = None, 0
        super().log(logs, *args, **kwargs)
