"""A small training loop for a student LM distilled from a frozen teacher (or trained alone).

One process or many: under ``torchrun`` the same code runs data-parallel, each process
reading its share of every global batch (kdfast.train.data), with the models replicated
(DDP, ``parallel="ddp"``) or sharded (FSDP2, ``parallel="fsdp"``: the student and the
teacher, per transformer block and then the root). Checkpoints hold all that the next step
depends on (weights, optimizer, schedule, RNG states, step: the data position follows from
the step), so a run killed at any moment and started again with the same command ends with
the same weights as one never interrupted; a sharded run writes its weights and optimizer
with torch.distributed.checkpoint, each process its shards.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from kdfast import LossOptions
from kdfast.options import check_positive_int

from .checkpoint import (STATE, begin_checkpoint, checkpoints, ensure_writable_dir, finish_checkpoint,
                         latest_checkpoint, load_checkpoint, save_checkpoint)
from .data import TokenWindows
from .lm import (LMDistillLoss, check_loss_path, choose_loss_path, choose_sparse_loss_path, evaluate_models,
                 is_sharded)
from .runtime import (MetricsLog, init_distributed, peak_memory, progress_bar, reset_peak_memory, reshard,
                      resolve_device, shard_blocks_then_root)
from .teacher_cache import TeacherCache

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # autocast dtype of each precision setting
TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PARALLEL = ("ddp", "fsdp")  # how several processes hold the models: replicated, or sharded with FSDP2


@dataclass
class TrainConfig:
    out_dir: str = "runs/distill"
    steps: int = 1000
    batch_size: int = 16  # sequences per process and micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    precision: str = "fp32"  # "bf16": the models run under bf16 autocast
    teacher_dtype: str = "fp32"  # what the frozen teacher's floating-point weights are cast to ("bf16" halves them)
    loss_path: str = "auto"  # "auto", "fused_linear" or "logits" (kdfast.train.lm)
    parallel: str = "ddp"  # with several processes: "ddp" replicates the models, "fsdp" shards them (FSDP2)
    seed: int = 0  # the loop's random state (dropout); data order and initial weights are the caller's
    device: str = "auto"  # "auto": this process's GPU when there is one, else the CPU
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    eval_windows: int = 256  # held-out sequences per evaluation
    eval_batch_size: int = 32
    log_every: int = 10
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_last: int = 3
    resume: bool = True  # continue from the newest whole checkpoint in out_dir
    progress: bool = True  # a tqdm progress bar
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed

    def __post_init__(self):
        self.betas = tuple(self.betas)
        positive = ("steps", "batch_size", "grad_accum", "eval_batch_size", "log_every", "keep_last")
        for name in positive:
            check_positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "eval_windows", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("lr must be > 0, min_lr_ratio in [0, 1], weight_decay and grad_clip >= 0; got "
                             f"{self.lr}, {self.min_lr_ratio}, {self.weight_decay}, {self.grad_clip}")
        for name, choices in (("precision", PRECISIONS), ("teacher_dtype", TEACHER_DTYPES), ("parallel", PARALLEL)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        check_loss_path(self.loss_path)

    def run_settings(self) -> dict:
        """The settings a checkpoint must share with the run that resumes it: those that change the weights."""
        cosmetic = {"out_dir", "device", "eval_every", "eval_windows", "eval_batch_size", "log_every",
                    "checkpoint_every", "keep_last", "resume", "progress", "tensorboard",
                    "parallel"}  # the trainer's run settings say whether the checkpoint is sharded
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in cosmetic}


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def setting_differences(then: dict, now: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ, nested keys dotted, as "train.steps: 4 -> 6" lines."""
    unset = object()

    def show(value) -> str:
        return "(unset)" if value is unset else repr(value)

    lines = []
    for key in [*then, *(k for k in now if k not in then)]:
        old, new = then.get(key, unset), now.get(key, unset)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += setting_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: {show(old)} -> {show(new)}")
    return lines


class DistillTrainer:
    """Trains ``student`` to match ``teacher`` on ``train_data`` (or on hard labels alone when teacher is None).

    ``loss_options`` holds the kd_loss options (temperature, divergence, hard/soft weights, ...).
    Models are moved to the configured device; the teacher is frozen in eval mode.

    ``teacher`` may be a :class:`~kdfast.train.teacher_cache.TeacherCache` of ``train_data``'s windows instead
    of a model: no teacher runs, each batch reads its windows' cached ids and log-probs and the loss is
    kdfast.sparse_kd_loss (fused_linear_sparse_kd_loss on the fused-linear path) with the cache's tail. A cache
    of other windows, vocabulary or temperature is refused; held-out metrics then have no teacher columns.

    Targets may be ignore_index (e.g. :class:`~kdfast.train.data.MaskedWindows`' prompts). With the averaging
    reductions ("batchmean", the default, and "mean"; the plain cross-entropy without a teacher too) the loss of
    an optimizer step is the mean over the counted targets of all its micro-batches and processes, so that
    gradient accumulation and DDP give the gradient of the one big batch; reduction="sum" averages the
    micro-batches' sums.

    With several processes and ``config.parallel == "fsdp"`` both models are sharded with FSDP2's fully_shard
    (each transformer block: a GPT's ``blocks``, a Hugging Face model's ``_no_split_modules`` classes; then the
    root), with bf16 mixed precision under ``precision="bf16"``; the loss path is then "logits" (the output
    embedding is whole only inside the forward). Pass models that are not sharded yet, the same weights on
    every process (rank 0's are broadcast first, as DDP does).
    """

    def __init__(self, student: nn.Module, train_data: TokenWindows, config: TrainConfig,
                 teacher: Optional[Union[nn.Module, TeacherCache]] = None, eval_data: Optional[TokenWindows] = None,
                 loss_options: Optional[LossOptions] = None):
        for role, model in (("student", student), ("teacher", teacher)):
            if isinstance(model, nn.Module) and is_sharded(model):
                raise ValueError(f"the {role} is already sharded with FSDP: pass the whole model, DistillTrainer "
                                 "shards it itself with parallel='fsdp' (or use kdfast.integrations.hf.KDTrainer)")
        self.cfg = config
        self.rank, self.world, local_rank = init_distributed()
        self.device = resolve_device(config.device, local_rank)
        self.sharded = config.parallel == "fsdp" and self.world > 1
        torch.manual_seed(config.seed + self.rank)  # dropout; a resumed run restores the states it saved
        random.seed(config.seed + self.rank)
        self.out_dir = Path(config.out_dir)
        if self.rank == 0:
            ensure_writable_dir(self.out_dir)
        loss_options = loss_options or LossOptions()
        self.train_data, self.eval_data, self.loss_options = train_data, eval_data, loss_options
        self.student = student.to(self.device)
        if self.sharded:
            self._shard(self.student, root_reshards=False)
        self.teacher, self.cache = None, None
        if isinstance(teacher, TeacherCache):
            teacher.check(windows=train_data, temperature=loss_options.temperature)
            self.cache = teacher
            path = choose_sparse_loss_path(self.student, teacher.vocab_size, loss_options, config.loss_path)
        elif teacher is not None:
            teacher = teacher.to(self.device, dtype=TEACHER_DTYPES[config.teacher_dtype])
            self.teacher = teacher.eval().requires_grad_(False)
            if self.sharded:  # forward only: every module, the root too, reshards after its forward
                self._shard(self.teacher, root_reshards=True)
            path = choose_loss_path(self.student, self.teacher, loss_options, config.loss_path)
        else:
            path = "logits"
        for data in (train_data, eval_data):
            if getattr(data, "ignore_index", loss_options.ignore_index) != loss_options.ignore_index:
                raise ValueError(f"the data's targets mark what is not counted with {data.ignore_index}, the loss's "
                                 f"ignore_index is {loss_options.ignore_index}: make them the same")
        self.plain = self.teacher is None and self.cache is None  # the cross-entropy of LMDistillLoss, a mean
        self.token_mean = self.plain or loss_options.reduction in ("batchmean", "mean")
        # What each micro-batch's loss is multiplied by before backward (see _train_step); the kdfast losses
        # weigh the gradient they compute in forward by it (expected_grad_output), so backward needs no pass.
        self.grad_scale = float(self.world) if self.token_mean else 1 / config.grad_accum
        self.distill_loss = LMDistillLoss(replace(loss_options, expected_grad_output=self.grad_scale), path,
                                          PRECISIONS[config.precision],
                                          self.cache.tail if self.cache is not None else "bucket")
        self.model = self.student
        if self.sharded:
            # The probe's no-grad forward left the root's parameters whole (FSDP reshards the root after the
            # backward, and there was none): the optimizer must hold the shards, all of them.
            self._reshard()
            whole = [name for name, p in self.student.named_parameters() if not _is_dtensor(p)]
            if whole:
                raise RuntimeError(f"FSDP left parameters of the student unsharded: {', '.join(whole)}")
        elif self.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.student, device_ids=device_ids)
        decay = [p for p in self.student.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.student.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=config.lr, betas=config.betas)
        schedule = partial(lr_factor, warmup=config.warmup_steps, total=config.steps, min_ratio=config.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.step = 0
        self.saved_step = None  # the step of the newest checkpoint written or resumed from
        self.train_seconds = 0.0  # time in training steps, summed over resumed segments
        self.run_settings = {"train": config.run_settings(), "loss": asdict(loss_options), "world_size": self.world,
                             "teacher": self.cache.identity() if self.cache is not None else teacher is not None,
                             "loss_path": path}
        if self.sharded:  # its checkpoints are torch.distributed.checkpoint's, those of DDP are not
            self.run_settings["sharded"] = True

    # --- sharding (parallel="fsdp") ---

    def _shard(self, model: nn.Module, root_reshards: bool) -> None:
        """fully_shard on each transformer block, then on the root, from rank 0's weights. root_reshards: the
        root's parameters are resharded after its forward too (FSDP's default keeps them for the backward)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
        mesh = init_device_mesh(self.device.type, (self.world,))
        dtype = PRECISIONS[self.cfg.precision]
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
        shard_blocks_then_root(model, mesh, policy, root_reshards)

    def _reshard(self) -> None:
        """Reshards what a no-grad forward (the start-up probe, evaluation) left whole."""
        for model in (self.student, self.teacher):
            if model is not None:
                reshard(model)

    def student_state_dict(self) -> Optional[dict]:
        """The student's whole state dict on rank 0, None on the others; every process must call it (under FSDP
        the shards are gathered, to the CPU). Tied weights stay one tensor, as in student.state_dict()."""
        if not self.sharded:
            return self.student.state_dict() if self.rank == 0 else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        names = {}
        for name, param in self.student.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        for first, *aliases in names.values():
            for alias in aliases:
                state[alias] = state[first]
        return state

    def state_bytes(self) -> dict:
        """This process's bytes of the student's parameters, of the optimizer's state and of the teacher's
        parameters (their shards under FSDP)."""
        def size(tensors) -> int:
            local = [t.to_local() if _is_dtensor(t) else t for t in tensors]
            return sum(t.numel() * t.element_size() for t in local)

        optimizer = [v for state in self.optimizer.state.values() for v in state.values()
                     if isinstance(v, torch.Tensor) and v.dim() > 0]
        return {"parameter_bytes": size(self.student.parameters()), "optimizer_state_bytes": size(optimizer),
                "teacher_parameter_bytes": size(self.teacher.parameters()) if self.teacher is not None else 0}

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world * self.train_data.context

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    # --- checkpoints ---

    def _rng_states(self) -> list[dict]:
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        if self.world == 1:
            return [state]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, state)
        return gathered

    def save(self) -> None:
        rng = self._rng_states()  # a collective: every rank takes part
        state = {"step": self.step, "train_seconds": self.train_seconds, "run": self.run_settings,
                 "scheduler": self.scheduler.state_dict(), "rng": rng}
        if self.sharded:
            self._save_sharded(state)
        elif self.rank == 0:
            state.update(model=self.student.state_dict(), optimizer=self.optimizer.state_dict())
            save_checkpoint(self.checkpoint_dir, self.step, state, self.cfg.keep_last)
        self.saved_step = self.step

    def _sharded_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.student, self.optimizer)
        return {"model": model, "optimizer": optimizer}

    def _save_sharded(self, state: dict) -> None:
        """The checkpoint of a sharded run: each process writes its shards of the weights and the optimizer's
        state with torch.distributed.checkpoint into the temporary directory, rank 0 the rest (state.pt); once
        all have written, rank 0 publishes it as checkpoint.save_checkpoint does (manifest, then rename)."""
        from torch.distributed import checkpoint as dcp

        tmp = self._broadcast(begin_checkpoint(self.checkpoint_dir, self.step) if self.rank == 0 else None)
        dcp.save(self._sharded_state(), checkpoint_id=str(tmp))
        if self.rank == 0:
            torch.save(state, tmp / STATE)
        dist.barrier()
        if self.rank == 0:
            finish_checkpoint(tmp, self.step, self.cfg.keep_last)
        dist.barrier()  # the checkpoint is in place on every process's return

    def _broadcast(self, value):
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def resume(self) -> Optional[Path]:
        """Loads the newest whole checkpoint of out_dir, if any, and returns its path."""
        if not self.cfg.resume:
            if self.rank == 0 and checkpoints(self.checkpoint_dir):
                raise FileExistsError(f"{self.checkpoint_dir} holds checkpoints of an earlier run: resume it "
                                      f"(resume: true) or choose another out_dir")
            return None
        path = self._broadcast(latest_checkpoint(self.checkpoint_dir) if self.rank == 0 else None)
        if path is None:
            return None
        state = load_checkpoint(path)
        if state["run"] != self.run_settings:
            changed = "".join(f"\n  {line}" for line in setting_differences(state["run"], self.run_settings))
            raise ValueError(f"checkpoint {path} was written with other settings (then -> now):{changed}\n"
                             f"run with the same settings to resume it, or choose another out_dir")
        if self.sharded:
            from torch.distributed import checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_state_dict

            sharded = self._sharded_state()
            dcp.load(sharded, checkpoint_id=str(path))
            set_state_dict(self.student, self.optimizer, model_state_dict=sharded["model"],
                           optim_state_dict=sharded["optimizer"])
        else:
            self.student.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = self.saved_step = state["step"]
        self.train_seconds = state["train_seconds"]
        rng = state["rng"][self.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        return path

    # --- training ---

    def _train_step(self) -> tuple[torch.Tensor, Optional[float]]:
        """One optimizer step; returns (loss, kd, hard) and the gradient norm. The parts are this process's
        share: their mean over the processes is the step's (the mean over its counted targets, or with
        reduction="sum" over its micro-steps)."""
        cfg = self.cfg
        all_windows = [self.train_data.batch_windows(self.step * cfg.grad_accum + micro, cfg.batch_size, self.rank,
                                                     self.world) for micro in range(cfg.grad_accum)]
        batches = [[x.to(self.device) for x in self.train_data.rows(windows)] for windows in all_windows]
        counted = [targets.ne(self.loss_options.ignore_index).sum() for _, targets in batches]
        # The step's counted targets, all micro-batches of all processes (on the device: no host sync). Each
        # micro-batch's loss is its sum over targets / num_items, so that the micro-batches' gradients add up to
        # the gradient of the step's token mean. DDP then averages the processes' gradients, dividing by the
        # world size: the loss is multiplied by it (grad_scale) to undo that.
        num_items = self._all_reduce(torch.stack(counted).sum(), mean=False) if self.token_mean else None
        parts_sum = torch.zeros(3, device=self.device)
        for micro, (windows, (inputs, targets)) in enumerate(zip(all_windows, batches)):
            sparse = {}
            if self.cache is not None:
                sparse = dict(zip(("teacher_ids", "teacher_logprobs"),
                                  (x.to(self.device) for x in self.cache.lookup(windows))))
            last = micro == cfg.grad_accum - 1
            # DDP averages gradients across processes only on the last micro-step. FSDP reduce-scatters them on
            # every one: skipping that would keep the whole gradient on each process until the last.
            sync = nullcontext() if last or self.world == 1 or self.sharded else self.model.no_sync()
            with sync:
                parts = self.distill_loss(self.model, self.teacher, inputs, targets, num_items_in_batch=num_items,
                                          **sparse)
                weight = self.grad_scale
                if self.plain:  # its cross-entropy is the micro-batch's mean (it takes no num_items_in_batch)
                    weight = weight * counted[micro] / num_items.clamp(min=1)
                (parts.loss * weight).backward()
            contribution = torch.stack([parts.loss.detach(), parts.kd, parts.hard]).float() * weight
            if self.plain:  # the mean of no targets is NaN (its gradient is 0): this micro-batch adds nothing
                contribution = torch.where(counted[micro] > 0, contribution, 0.0)
            parts_sum += contribution
        grad_norm = None
        if cfg.grad_clip > 0:
            norm = nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
            grad_norm = float(norm.full_tensor() if _is_dtensor(norm) else norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return parts_sum, grad_norm

    def _all_reduce(self, tensor: torch.Tensor, mean: bool) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
            if mean:
                tensor /= self.world
        return tensor

    def evaluate(self) -> dict:
        """Held-out metrics of the student, with the teacher's loss and their top-1 agreement when distilling."""
        if self.eval_data is None or not self.cfg.eval_windows:
            return {}
        batches = ((x.to(self.device), y.to(self.device)) for x, y in self._eval_batches())
        results = evaluate_models({"student": self.student}, self.teacher, batches, self.loss_options,
                                  PRECISIONS[self.cfg.precision], dist.all_reduce if self.world > 1 else None)
        if self.sharded:
            self._reshard()
        metrics = results["student"]
        if "teacher" in results:
            metrics.update(teacher_loss=results["teacher"]["loss"], teacher_ppl=results["teacher"]["ppl"])
        return metrics

    def _eval_batches(self):
        """This process's held-out batches. Sharded models forward in step on every process (each forward
        gathers parameters from all): a process with fewer batches then adds batches with no counted targets,
        which add nothing to the metrics."""
        cfg, data = self.cfg, self.eval_data
        yield from data.spread(cfg.eval_windows, cfg.eval_batch_size, self.rank, self.world)
        if self.sharded:
            count = min(cfg.eval_windows, data.n_windows)

            def batches(rank: int) -> int:
                return -(-len(range(rank, count, self.world)) // cfg.eval_batch_size)

            for _ in range(batches(0) - batches(self.rank)):  # rank 0 has the most
                inputs, targets = data.rows(torch.zeros(1, dtype=torch.long))
                yield inputs, torch.full_like(targets, self.loss_options.ignore_index)

    def train(self) -> dict:
        """Runs (or resumes) training to cfg.steps; returns the run's summary, also written to summary.json."""
        cfg = self.cfg
        self.resume()
        log = MetricsLog(self.out_dir, self.step, cfg.tensorboard) if self.rank == 0 else None
        bar = progress_bar(cfg.progress and self.rank == 0, cfg.steps, self.step)
        reset_peak_memory(self.device)
        self.student.train()
        interval_sums, interval_steps, interval_start = torch.zeros(3, device=self.device), 0, self.train_seconds
        while self.step < cfg.steps:
            started = time.perf_counter()
            parts, grad_norm = self._train_step()
            self.step += 1
            interval_sums += parts
            interval_steps += 1
            self.train_seconds += time.perf_counter() - started
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                loss, kd, hard = (self._all_reduce(interval_sums, mean=True) / interval_steps).tolist()
                speed = interval_steps * self.tokens_per_step / max(self.train_seconds - interval_start, 1e-9)
                record = {"loss": loss, "kd": kd, "hard": hard, "lr": self.scheduler.get_last_lr()[0],
                          "tokens_per_s": speed, "tokens": self.step * self.tokens_per_step}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                if log is not None:
                    log.write(self.step, "train", record)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:,.0f}")
                interval_sums.zero_()
                interval_steps, interval_start = 0, self.train_seconds
            if bar is not None:
                bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                metrics = self.evaluate()
                if log is not None and metrics:
                    log.write(self.step, "eval", metrics)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self.save()
        if bar is not None:
            bar.close()
        if self.saved_step != self.step:
            self.save()
        final = self.evaluate()
        summary = {"steps": self.step, "tokens": self.step * self.tokens_per_step, "train_seconds": self.train_seconds,
                   "tokens_per_s": self.step * self.tokens_per_step / max(self.train_seconds, 1e-9),
                   "world_size": self.world, "parallel": self.cfg.parallel if self.world > 1 else None,
                   "loss_path": self.distill_loss.path, "eval": final, **self.state_bytes(), **peak_memory(self.device)}
        if log is not None:
            if final:
                log.write(self.step, "eval", final)
            log.close()
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
