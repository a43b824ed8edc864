"""One rank of the vocab-parallel loss tests (tests/loss/test_vocab_parallel.py starts WORLD of them):

    python tests/loss/vocab_parallel_worker.py RANK WORLD STORE_FILE OUT_DIR SEED

Every rank builds the same full logits, takes its slice of the columns, and checks
vocab_parallel_kd_loss's loss and its own gradient slice against the float64 reference on the
full logits, case by case, with backend "auto" (the cpu backend's per-shard kernels, the torch
backend's for float64) and "triton" (in its interpreter: the test sets TRITON_INTERPRET=1), and
vocab_parallel_sparse_kd_loss's against sparse_kd_loss_reference; each case's error (or "") goes
to OUT_DIR/rank{RANK}.json, with the loss and the collective calls counted in forward and in
backward.
"""

from __future__ import annotations

import json
import math
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers import make_labels, make_logits, rel_err, stored_as  # noqa: E402

import kdfast  # noqa: E402
from kdfast.distributed import vocab_parallel_kd_loss, vocab_parallel_sparse_kd_loss  # noqa: E402
from kdfast.reference import kd_loss_reference, sparse_kd_loss_reference  # noqa: E402

# Every public torch.distributed function that communicates; each call is counted.
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object", "all_gather_coalesced",
               "all_reduce", "all_reduce_coalesced", "all_to_all", "all_to_all_single", "barrier", "batch_isend_irecv",
               "broadcast", "broadcast_object_list", "gather", "gather_object", "irecv", "isend", "monitored_barrier",
               "recv", "reduce", "reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor", "scatter",
               "scatter_object_list", "send", "_all_gather_base", "_reduce_scatter_base")
CALLS = []


def count_collectives():
    for name in COLLECTIVES:
        if hasattr(dist, name):
            original = getattr(dist, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                CALLS.append(_name)
                return _original(*args, **kwargs)

            setattr(dist, name, counted)


DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0),
               ("tvd", 0.5)]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]
FP32_TOL = 1e-5


def split(widths, x):
    """The column slices of x, one per width, in order."""
    return list(torch.split(x, widths, dim=-1))


def check_one(name, results, rank, member_rank, widths, s_full, t_full, *, group=None, labels=None, grad_scale=None,
          loss_tol=None, grad_tol=None, slicer=None, inplace=False, sparse=None, **options):
    """vocab_parallel_kd_loss on this rank's slice against the reference on the full logits; with
    sparse=(ids, logprobs) and t_full None, vocab_parallel_sparse_kd_loss against its reference."""
    try:
        dtype = s_full.dtype
        s_part = split(widths, s_full)[member_rank].detach().clone()
        t_part = None if sparse else split(widths, t_full)[member_rank]
        leaf = s_part.requires_grad_() if slicer is None else s_part
        if slicer is not None:  # strided views of a bigger tensor
            big = slicer(s_part)
            leaf = big.requires_grad_()
            s_in, t_in = slicer.view(big), None if sparse else slicer.view(slicer(t_part))
        else:
            s_in, t_in = (leaf * 1.0 if inplace else leaf), t_part  # inplace_backward needs a non-leaf
        CALLS.clear()
        if sparse:
            loss = vocab_parallel_sparse_kd_loss(s_in, *sparse, group=group, labels=labels, inplace_backward=inplace,
                                                 **options)
        else:
            loss = vocab_parallel_kd_loss(s_in, t_in, group=group, labels=labels, inplace_backward=inplace, **options)
        forward_calls = list(CALLS)
        scale = torch.ones(()) if grad_scale is None else grad_scale
        CALLS.clear()
        (loss.double() * scale).sum().backward()
        backward_calls = list(CALLS)
        grad = leaf.grad if slicer is None else slicer.view(leaf.grad)

        ref_leaf = s_full.detach().double().requires_grad_()
        ref_options = {k: v for k, v in options.items() if k not in ("inplace_backward", "expected_grad_output",
                                                                      "backend", "num_items_in_batch")}
        if "num_items_in_batch" in options:  # kd_loss(..., num_items_in_batch=n) = kd_loss(..., "sum") / n
            ref_options["reduction"] = "sum"
        if sparse:
            ref = sparse_kd_loss_reference(ref_leaf, *sparse, labels=labels, **ref_options)
        else:
            ref = kd_loss_reference(ref_leaf, t_full, labels=labels, **ref_options)
        ref = ref / options.get("num_items_in_batch", 1)
        (ref * scale.double()).sum().backward()
        ref_grad = split(widths, ref_leaf.grad)[member_rank]

        errors = []
        if loss.dtype != (torch.float64 if dtype == torch.float64 else torch.float32):
            errors.append(f"loss dtype {loss.dtype}")
        if grad is None or grad.dtype != dtype or grad.shape != s_part.shape:
            errors.append(f"gradient {None if grad is None else (grad.dtype, tuple(grad.shape))}")
        else:
            ltol = loss_tol if loss_tol is not None else FP32_TOL
            gtol = grad_tol if grad_tol is not None else FP32_TOL
            if dtype != torch.float32 and grad_tol is None:  # the gradient is stored in bf16 (by truncation in
                truncated = options.get("backend") == "triton"  # Triton's interpreter)
                gtol += 3 * rel_err(stored_as(ref_grad, dtype, truncated), ref_grad)
            loss_err, grad_err = rel_err(loss, ref), rel_err(grad, ref_grad)
            if loss_err > ltol:
                errors.append(f"loss {loss.tolist()} vs {ref.tolist()}: relative error {loss_err:.2e} > {ltol:.1e}")
            if grad_err > gtol:
                errors.append(f"gradient relative error {grad_err:.2e} > {gtol:.1e}")
        results[name] = {"error": "; ".join(errors), "loss": loss.detach().double().reshape(-1).tolist(),
                         "forward_calls": forward_calls, "backward_calls": backward_calls}
    except Exception:
        results[name] = {"error": traceback.format_exc(), "loss": [], "forward_calls": [], "backward_calls": []}


def outcome(name, results, run):
    try:
        error = run()
    except Exception:
        error = traceback.format_exc()
    results[name] = {"error": error}


def parts_and_nan_rows(member_rank, widths, s, t, labels, group, sparse=None, backend="auto") -> str:
    """return_parts against kd_loss on the full logits, and a row holding NaN on the last rank
    only: NaN on every rank (loss and gradient), as kd_loss gives, the other rows unchanged; with
    sparse=(ids, logprobs), the sparse loss against sparse_kd_loss."""
    options = dict(labels=labels, divergence="jsd", beta=0.3, hard_weight=0.4, temperature=2.0)
    if sparse:
        def ours(part, **kwargs):
            return vocab_parallel_sparse_kd_loss(part, *sparse, group=group, **kwargs)

        def theirs(full, **kwargs):
            return kdfast.sparse_kd_loss(full, *sparse, backend="torch", **kwargs)
    else:
        def ours(part, **kwargs):
            return vocab_parallel_kd_loss(part, split(widths, t)[member_rank], group=group, backend=backend, **kwargs)

        def theirs(full, **kwargs):
            return kdfast.kd_loss(full, t, backend="torch", **kwargs)
    got = ours(split(widths, s)[member_rank], return_parts=True, **options)
    want = theirs(s, return_parts=True, **options)
    for part, a, b in zip(("loss", "kd", "hard"), got, want):
        if rel_err(a, b) > FP32_TOL:
            return f"{part}: {a.item()} vs kd_loss {b.item()}"
    nan_s = s.clone()
    nan_s[1, 2, -1] = math.nan
    leaf = split(widths, nan_s)[member_rank].clone().requires_grad_()
    rows = ours(leaf, reduction="none", **options)
    rows.sum().backward()
    want = theirs(nan_s, reduction="none", **options)
    nan_row = torch.zeros(rows.shape, dtype=torch.bool)
    nan_row[1, 2] = labels[1, 2] != -100
    if not (torch.equal(rows.isnan(), nan_row) and torch.equal(want.isnan(), nan_row)):
        return f"NaN rows {rows.isnan().nonzero().tolist()}, kd_loss's {want.isnan().nonzero().tolist()}"
    if not torch.equal(leaf.grad.isnan().any(-1), nan_row):
        return f"NaN gradient rows {leaf.grad.isnan().any(-1).nonzero().tolist()}"
    if rel_err(rows[~nan_row], want[~nan_row]) > FP32_TOL:
        return "the other rows differ from kd_loss's"
    return ""


class Strided:
    """Each slice as logits[:, :-1] of a (B, S + 1, V_rank) tensor: rows not contiguous."""

    def __call__(self, x):
        return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)

    @staticmethod
    def view(x):
        return x[:, :-1]


def run_cases(results, rank, member_rank, widths, group, prefix, seed, backend="auto"):
    """Every divergence and reduction, and the edge cases, on the per-shard kernels of backend."""
    gen = torch.Generator().manual_seed(seed)

    def check(*args, **kwargs):
        check_one(*args, backend=backend, **kwargs)

    vocab = sum(widths)
    lead = (3, 5)
    s, t = make_logits(gen, (*lead, vocab))
    labels = make_labels(gen, lead, vocab)
    for divergence, beta in DIVERGENCES:
        for reduction in REDUCTIONS:
            grad_scale = torch.rand(lead if reduction == "none" else (), generator=gen, dtype=torch.float64) + 0.5
            check(f"{prefix}{divergence}-{beta}-{reduction}", results, rank, member_rank, widths, s, t, group=group,
                  labels=labels, temperature=2.0, divergence=divergence, beta=beta, reduction=reduction,
                  grad_scale=grad_scale)
        check(f"{prefix}{divergence}-{beta}-hard", results, rank, member_rank, widths, s, t, group=group,
              labels=labels, temperature=1.5, divergence=divergence, beta=beta, hard_weight=0.7, soft_weight=0.3,
              scale_t2=False)
        check(f"{prefix}{divergence}-{beta}-hard-T1", results, rank, member_rank, widths, s, t, group=group,
              labels=labels, divergence=divergence, beta=beta, hard_weight=0.5)
        check(f"{prefix}{divergence}-{beta}-nolabels", results, rank, member_rank, widths, s, t, group=group,
              divergence=divergence, beta=beta)
        bs, bt = s.to(torch.bfloat16), t.to(torch.bfloat16)
        check(f"{prefix}{divergence}-{beta}-bf16", results, rank, member_rank, widths, bs, bt, group=group,
              labels=labels, temperature=2.0, divergence=divergence, beta=beta, hard_weight=0.5)
    # Labels in the last rank's columns only, and in the first's only: the others read none.
    for where, ids in (("last", (vocab - widths[-1], vocab)), ("first", (0, widths[0]))):
        owned = torch.randint(*ids, lead, generator=gen)
        owned[0, 0] = -100
        check(f"{prefix}labels-on-{where}-rank", results, rank, member_rank, widths, s, t, group=group,
              labels=owned, hard_weight=1.0, divergence="jsd", beta=0.3)
    all_ignored = torch.full(lead, -100)
    for reduction in REDUCTIONS:
        check(f"{prefix}all-ignored-{reduction}", results, rank, member_rank, widths, s, t, group=group,
              labels=all_ignored, hard_weight=1.0, reduction=reduction, loss_tol=0.0, grad_tol=0.0)
    # -inf padding: the teacher's last columns, and the last rank's whole slice of the student and teacher.
    padded_t = t.clone()
    padded_t[..., -3:] = -math.inf
    for divergence, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.4)):
        if divergence != "reverse_kl":  # KL(p_s || p_t) is infinite where only the teacher is -inf
            check(f"{prefix}teacher-padding-{divergence}", results, rank, member_rank, widths, s, padded_t,
                  group=group, labels=labels, divergence=divergence, beta=beta, hard_weight=0.2)
        padded_s, padded_both = s.clone(), t.clone()
        padded_s[..., vocab - widths[-1]:] = -math.inf
        padded_both[..., vocab - widths[-1]:] = -math.inf
        no_last = torch.randint(0, vocab - widths[-1], lead, generator=gen)
        check(f"{prefix}padded-last-rank-{divergence}", results, rank, member_rank, widths, padded_s, padded_both,
              group=group, labels=no_last, divergence=divergence, beta=beta, hard_weight=0.2, temperature=3.0)
    check(f"{prefix}strided", results, rank, member_rank, widths, s, t, group=group, labels=labels,
          slicer=Strided(), divergence="reverse_kl", hard_weight=0.3)
    check(f"{prefix}flat-rows", results, rank, member_rank, widths, s.reshape(-1, vocab), t.reshape(-1, vocab),
          group=group, labels=labels, divergence="jsd")
    check(f"{prefix}expected-grad-output", results, rank, member_rank, widths, s, t, group=group, labels=labels,
          expected_grad_output=0.25, grad_scale=torch.tensor(0.25, dtype=torch.float64), hard_weight=0.5)
    check(f"{prefix}num-items", results, rank, member_rank, widths, s, t, group=group, labels=labels,
          num_items_in_batch=40, reduction="batchmean", divergence="reverse_kl")
    check(f"{prefix}inplace-backward", results, rank, member_rank, widths, s, t, group=group, labels=labels,
          inplace=True, divergence="jsd", beta=0.6, hard_weight=0.4)
    # One rank with an empty slice (the others hold the whole vocabulary).
    empty = [vocab // 2, 0, vocab - vocab // 2] if len(widths) == 3 else [vocab, 0]
    check(f"{prefix}empty-slice", results, rank, member_rank, empty, s, t, group=group, labels=labels,
          divergence="forward_kl", hard_weight=0.5, reduction="mean")
    # A teacher slice wider than its student slice on one rank: every rank raises, none hangs.
    try:
        extra = 1 if member_rank == len(widths) - 1 else 0
        vocab_parallel_kd_loss(split(widths, s)[member_rank],
                               torch.cat([split(widths, t)[member_rank], t[..., :extra]], -1), group=group,
                               backend=backend)
        results[f"{prefix}width-mismatch"] = {"error": "no error raised"}
    except ValueError as error:
        results[f"{prefix}width-mismatch"] = {"error": "" if "same width on every rank" in str(error) else str(error)}
    outcome(f"{prefix}parts-and-kd-loss", results,
            lambda: parts_and_nan_rows(member_rank, widths, s, t, labels, group, backend=backend))
    if backend == "triton":  # float64 logits run on the torch backend only
        return
    s64, t64 = s.double(), t.double()
    check(f"{prefix}float64", results, rank, member_rank, widths, s64, t64, group=group, labels=labels,
          divergence="jsd", beta=0.7, hard_weight=0.5, loss_tol=1e-10, grad_tol=1e-10)


def sparse_teacher(gen, t, k, temperature, columns=None):
    """k distinct random ids per row (from columns, default the whole vocabulary, so they fall on
    several ranks) and the teacher's log-probabilities there at the temperature; two empty slots
    (-1) in one row, and one row with every slot empty."""
    lead, vocab = t.shape[:-1], t.shape[-1]
    lo, hi = columns or (0, vocab)
    ids = torch.rand((*lead, hi - lo), generator=gen).argsort(-1)[..., :k] + lo
    logprobs = torch.log_softmax(t.double() / temperature, -1).gather(-1, ids).float()
    if k < vocab:
        ids[0, 1, -2:] = -1
        ids[2, 3] = -1
    return ids, logprobs.masked_fill(ids < 0, -math.inf)


SPARSE_DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1)]


def run_sparse_cases(results, rank, member_rank, widths, group, prefix, seed):
    """vocab_parallel_sparse_kd_loss: every divergence and tail, hard labels (on any rank's columns),
    ignored rows, empty slots, ids covering the vocabulary or on one rank only, and the options."""
    gen = torch.Generator().manual_seed(seed)
    vocab = sum(widths)
    lead = (3, 5)
    s, t = make_logits(gen, (*lead, vocab))
    labels = make_labels(gen, lead, vocab)
    teacher = sparse_teacher(gen, t, 6, 2.0)
    for divergence, beta in SPARSE_DIVERGENCES:
        for reduction in ("batchmean", "sum", "none"):
            grad_scale = torch.rand(lead if reduction == "none" else (), generator=gen, dtype=torch.float64) + 0.5
            check_one(f"{prefix}{divergence}-{beta}-{reduction}", results, rank, member_rank, widths, s, None,
                  sparse=teacher, group=group, labels=labels, temperature=2.0, divergence=divergence, beta=beta,
                  reduction=reduction, grad_scale=grad_scale)
        check_one(f"{prefix}{divergence}-{beta}-hard", results, rank, member_rank, widths, s, None, sparse=teacher,
              group=group, labels=labels, temperature=2.0, divergence=divergence, beta=beta, hard_weight=0.7,
              soft_weight=0.3, scale_t2=False)
        # The ids cover the vocabulary: no rest (K = V).
        check_one(f"{prefix}{divergence}-{beta}-covering", results, rank, member_rank, widths, s, None,
              sparse=sparse_teacher(gen, t, vocab, 1.0), group=group, labels=labels, divergence=divergence,
              beta=beta, hard_weight=0.2)
    for tail in ("renorm", "raw"):
        check_one(f"{prefix}{tail}", results, rank, member_rank, widths, s, None, sparse=teacher, group=group,
              labels=labels, temperature=2.0, tail=tail)
        check_one(f"{prefix}{tail}-hard-T1", results, rank, member_rank, widths, s, None,
              sparse=sparse_teacher(gen, t, 5, 1.0), group=group, labels=labels, tail=tail, hard_weight=0.5)
    # Ids on the first rank's columns only; labels on the last rank's only (the others read none).
    check_one(f"{prefix}ids-on-first-rank", results, rank, member_rank, widths, s, None,
          sparse=sparse_teacher(gen, t, 4, 2.0, (0, widths[0])), group=group, labels=labels, temperature=2.0,
          divergence="jsd", beta=0.3)
    owned = torch.randint(vocab - widths[-1], vocab, lead, generator=gen)
    owned[0, 0] = -100
    check_one(f"{prefix}labels-on-last-rank", results, rank, member_rank, widths, s, None, sparse=teacher, group=group,
          labels=owned, hard_weight=1.0, temperature=2.0, divergence="reverse_kl")
    check_one(f"{prefix}all-ignored", results, rank, member_rank, widths, s, None, sparse=teacher, group=group,
          labels=torch.full(lead, -100), hard_weight=1.0, loss_tol=0.0, grad_tol=0.0)
    check_one(f"{prefix}nolabels", results, rank, member_rank, widths, s, None, sparse=teacher, group=group,
          divergence="jsd", temperature=2.0)
    check_one(f"{prefix}strided", results, rank, member_rank, widths, s, None, sparse=teacher, group=group,
          labels=labels, slicer=Strided(), temperature=2.0, hard_weight=0.3)
    check_one(f"{prefix}num-items", results, rank, member_rank, widths, s, None, sparse=teacher, group=group,
          labels=labels, num_items_in_batch=40, temperature=2.0, divergence="reverse_kl")
    check_one(f"{prefix}expected-grad-output", results, rank, member_rank, widths, s, None, sparse=teacher, group=group,
          labels=labels, temperature=2.0, expected_grad_output=0.25,
          grad_scale=torch.tensor(0.25, dtype=torch.float64), hard_weight=0.5)
    check_one(f"{prefix}inplace-backward", results, rank, member_rank, widths, s, None, sparse=teacher, group=group,
          labels=labels, inplace=True, temperature=2.0, divergence="jsd", beta=0.6, hard_weight=0.4)
    empty = [vocab // 2, 0, vocab - vocab // 2] if len(widths) == 3 else [vocab, 0]
    check_one(f"{prefix}empty-slice", results, rank, member_rank, empty, s, None, sparse=teacher, group=group,
          labels=labels, temperature=2.0, hard_weight=0.5)
    check_one(f"{prefix}bf16", results, rank, member_rank, widths, s.to(torch.bfloat16), None, sparse=teacher,
          group=group, labels=labels, temperature=2.0, divergence="jsd", hard_weight=0.5)
    check_one(f"{prefix}float64", results, rank, member_rank, widths, s.double(), None, sparse=teacher, group=group,
          labels=labels, temperature=2.0, divergence="reverse_kl", hard_weight=0.5, loss_tol=1e-10, grad_tol=1e-10)
    outcome(f"{prefix}parts-and-sparse-kd-loss", results,
            lambda: parts_and_nan_rows(member_rank, widths, s, None, labels, group, sparse=teacher))


def main():
    rank, world, store, out_dir, seed = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), \
        int(sys.argv[5])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    count_collectives()
    results = {}
    widths = [7, 11] if world == 2 else [5, 13, 8]
    run_cases(results, rank, rank, widths, None, "world-", seed)
    run_cases(results, rank, rank, widths, None, "world-triton-", seed + 4, backend="triton")
    run_sparse_cases(results, rank, rank, widths, None, "world-sparse-", seed + 2)
    if world == 3:  # a sub-group: ranks 0 and 2 of 3 (new_group is called by every rank)
        sub = dist.new_group([0, 2])
        if rank in (0, 2):
            run_cases(results, rank, rank // 2, [9, 4], sub, "subgroup-", seed + 1)
            run_cases(results, rank, rank // 2, [9, 4], sub, "subgroup-triton-", seed + 5, backend="triton")
            run_sparse_cases(results, rank, rank // 2, [9, 4], sub, "subgroup-sparse-", seed + 3)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
