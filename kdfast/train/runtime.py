"""What a training process needs from its surroundings: the process group under torchrun,
the device, FSDP sharding, peak memory, the metrics log and the progress bar."""

from __future__ import annotations

import gc
import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group torchrun set up in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return 0, 1, 0


def leave_distributed(finished: bool = True) -> None:
    """Leaves the process group, if any: call it once at the end of a script run under torchrun,
    after the trainer (and so its DDP wrapper) has been freed.

    gloo can hang in its teardown otherwise. In the two-process CPU test a rank hung at exit in
    6 runs of 20 when the ranks left out of step, in 1 of 30 when the DDP wrapper outlived the
    group, and in none of 60 in this order. After a finished run every rank first waits for the
    others; after a failure they may never arrive, so then it does not wait.
    """
    if not dist.is_initialized():
        return
    gc.collect()  # a DDP wrapper caught in a reference cycle goes now, before the group
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def shard_blocks_then_root(model: torch.nn.Module, mesh, policy, root_reshards: bool) -> None:
    """FSDP2's fully_shard on each transformer block (the classes the model's ``_no_split_modules`` names, else
    its ``blocks``), then on the root, on ``mesh`` with the MixedPrecisionPolicy ``policy``. root_reshards: the
    root's parameters are resharded after its forward too (FSDP's default keeps them for the backward), as a
    model used only forward (a teacher) needs."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = ([m for m in model.modules() if type(m).__name__ in names] if names
              else list(getattr(model, "blocks", None) or ()))
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True if root_reshards else None)


def reshard(model: torch.nn.Module) -> None:
    """Reshards every FSDP2 module of the model: what a no-grad forward may have left whole."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def reset_peak_rss() -> bool:
    """Resets the process's peak resident set size (VmHWM) to its current one; False where Linux's
    /proc/self/clear_refs is not there to do it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def process_memory_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB: "VmRSS" (resident now) or "VmHWM" (its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_memory(device: torch.device) -> dict:
    """Peak memory since reset_peak_memory: CUDA memory allocated by tensors, or the process's peak RSS."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda_allocated"}
    try:
        kib = process_memory_kib("VmHWM")
    except (OSError, KeyError):
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_bytes": kib * 1024, "peak_memory_kind": "process_rss"}


class MetricsLog:
    """Metrics as JSON lines in out_dir/metrics.jsonl, and as TensorBoard events when installed.

    On resume, records past the resumed step (written before the interruption, and about
    to be written again) are dropped so that the log reads as one run.
    """

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool):
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: `pip install tensorboard`
                pass
            else:
                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, split: str, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        if self.tb is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("kdfast: no progress bar without tqdm: pip install 'kdfast[demo]'", stacklevel=3)
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
