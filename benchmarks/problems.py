"""What a benchmark cell runs on: the inputs, the float64 reference, and the cost model.

Three problems: ``LogitsProblem`` (student and teacher logits in, the loss of ``kd_loss``),
``FusedLinearProblem`` (hidden states and lm_head weights in, the logits made inside) and
``SparseProblem`` (student logits and a teacher's top-k ids and log-probabilities in, the loss
of ``sparse_kd_loss``).
The reference is computed a block of rows at a time, so that it fits in memory even at
N = 8192 x V = 262144 (a float64 copy of one input alone is 17 GB there); its gradient is
kept in float32, which is ~1e-7 relative away from float64, far below every tolerance.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

import kdfast
from kdfast.reference import kd_loss_reference, sparse_kd_loss_reference
from kdfast.sparse import MASS_TOLERANCE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd+bwd", "fwd")  # "fwd": the loss alone, the student requiring no grad
REFERENCE_BLOCK = 1 << 24  # elements of one float64 logits block of the reference (~10 temporaries)


def _randn(gen: torch.Generator, shape, device) -> Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


def _rows_per_block(vocab: int) -> int:
    return max(1, REFERENCE_BLOCK // vocab)


def _leaf(x: Tensor, requires_grad: bool) -> Tensor:
    """x as a leaf that (does not) require grad."""
    return x.requires_grad_(requires_grad)


def _consumable(x: Tensor, requires_grad: bool) -> tuple[Tensor, Tensor]:
    """(a fresh copy of x for inplace_backward to overwrite, the leaf its gradient reaches). The copy is
    a differentiable clone, as logits from an lm_head are non-leaf tensors: kdfast refuses to overwrite
    a leaf that requires grad."""
    leaf = x.detach().requires_grad_(requires_grad)
    return leaf.clone(), leaf


def _student_argument(values: Tensor, requires_grad: bool, fresh: bool) -> tuple[Tensor, list[Tensor]]:
    """The student logits argument, and the tensors that get a gradient: with ``fresh`` (inplace_backward
    overwrites the argument) a consumable copy of ``values``, else ``values`` as a leaf."""
    if fresh:
        student, leaf = _consumable(values, requires_grad)
    else:
        student = leaf = _leaf(values, requires_grad)
    return student, [leaf] if requires_grad else []


class _StudentLogitsProblem:
    """What the problems whose gradient is the student's logits share."""

    student: Tensor

    def release(self) -> None:
        self.student.requires_grad_(False).grad = None

    @property
    def grad_bytes(self) -> int:
        return self.student.nbytes


class Variant(NamedTuple):
    """A way training calls the logits loss, beside plain contiguous logits and loss.backward()."""

    name: str
    pad: int = 0  # columns beyond V: the loss compares vocab_size = V of V + pad (a padded vocabulary)
    strided: bool = False  # logits[:, :-1] of (8, N / 8 + 1, V): the rows are not one contiguous block
    ignored: float = 0.0  # > 0: labels with this fraction ignored, and hard_weight = soft_weight = 0.5
    grad_output: float = 1.0  # what backward receives, e.g. 1 / grad_accum
    folded: bool = False  # expected_grad_output = grad_output: folded into the kernel, no pass in backward


VARIANTS = {v.name: v for v in (Variant("plain"), Variant("vocab_slice", pad=293), Variant("strided", strided=True),
                                Variant("hard", ignored=0.25), Variant("grad_half", grad_output=0.5),
                                Variant("grad_half_folded", grad_output=0.5, folded=True))}


class LogitsProblem(_StudentLogitsProblem):
    """kd_loss(student_logits, teacher_logits): logits of spread 3 with the teacher a perturbed
    student (as in the tests), N x V each, in ``dtype``; the student is the one trainable input.
    A variant other than "plain" lays them out, or calls the loss, as VARIANTS says."""

    kind = "logits"

    def __init__(self, n: int, v: int, dtype: str, device: str, seed: int = 0, variant: str = "plain"):
        self.n, self.v, self.dtype, self.variant = n, v, dtype, VARIANTS[variant]
        gen = torch.Generator(device=device).manual_seed(seed)
        shape = (8, n // 8 + 1, v) if self.variant.strided else (n, v + self.variant.pad)
        student = _randn(gen, shape, device) * 3.0
        teacher = (student + _randn(gen, shape, device) * 2.1).to(DTYPES[dtype])
        self.student, self.teacher = student.to(DTYPES[dtype]), teacher
        if self.variant.strided:
            assert n % 8 == 0, "a strided variant takes N = 8 x positions"
            self.student, self.teacher = self.student[:, :-1], self.teacher[:, :-1]
        self.labels = None
        if self.variant.ignored:
            self.labels = torch.randint(0, v, self.student.shape[:-1], generator=gen, device=device)
            ignored = torch.rand(self.labels.shape, generator=gen, device=device) < self.variant.ignored
            self.labels[ignored] = -100

    @property
    def key(self) -> dict:
        key = {"problem": self.kind, "n": self.n, "v": self.v, "dtype": self.dtype}
        return key if self.variant.name == "plain" else {**key, "variant": self.variant.name}

    @property
    def options(self) -> dict:
        """The loss options the variant adds (kdfast's keywords; peers take none)."""
        options = {}
        if self.variant.pad:
            options["vocab_size"] = self.v
        if self.labels is not None:
            options.update(labels=self.labels, hard_weight=0.5, soft_weight=0.5)
        if self.variant.folded:
            options["expected_grad_output"] = self.variant.grad_output
        return options

    @property
    def grad_output(self) -> float:
        return self.variant.grad_output

    def arguments(self, requires_grad: bool, fresh: bool) -> tuple[tuple[Tensor, ...], list[Tensor]]:
        """(the loss function's tensor arguments, the ones that get a gradient)."""
        student, leaves = _student_argument(self.student, requires_grad, fresh)
        return (student, self.teacher), leaves

    def traffic_bytes(self, mode: str) -> int:
        """The memory traffic floor: read the V compared entries of S and T, and write dS when there is a backward."""
        compared = self.n * self.v * self.student.element_size()
        return 2 * compared + (compared if mode == "fwd+bwd" else 0)

    def reference(self, temperature: float, divergence: str, beta: float) -> tuple[float, list[Tensor]]:
        """The float64 loss and its gradient w.r.t. the student (stored as float32), times grad_output."""
        student = self.student.reshape(self.n, -1)[:, :self.v]
        teacher = self.teacher.reshape(self.n, -1)[:, :self.v]
        labels = None if self.labels is None else self.labels.reshape(-1)
        counted = self.n if labels is None else max(1, int((labels != -100).sum()))
        weights = dict(hard_weight=0.5, soft_weight=0.5) if labels is not None else {}
        grad = torch.zeros(self.student.shape, dtype=torch.float32, device=self.student.device)  # contiguous
        flat_grad = grad.view(self.n, -1)  # the padding columns get no gradient
        loss = 0.0
        step = _rows_per_block(self.v)
        for r0 in range(0, self.n, step):
            s = student[r0:r0 + step].detach().double().requires_grad_()
            block = kd_loss_reference(s, teacher[r0:r0 + step].double(), temperature=temperature,
                                      divergence=divergence, beta=beta, reduction="sum",
                                      labels=None if labels is None else labels[r0:r0 + step], **weights) / counted
            (block * self.grad_output).backward()
            loss += block.item()
            flat_grad[r0:r0 + step, :self.v] = s.grad
        return loss, [grad]


class FusedLinearProblem:
    """fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight):
    weights (V, H) as in nn.Linear, scaled so that the logits have spread 3; the student's
    hidden states and weight are the trainable inputs."""

    kind = "fused"

    def __init__(self, n: int, v: int, hs: int, ht: int, dtype: str, device: str, seed: int = 0):
        self.n, self.v, self.hs, self.ht, self.dtype = n, v, hs, ht, dtype
        gen = torch.Generator(device=device).manual_seed(seed)
        dt = DTYPES[dtype]
        self.student_hidden = _randn(gen, (n, hs), device).to(dt)
        self.student_weight = (_randn(gen, (v, hs), device) * (3.0 / hs**0.5)).to(dt)
        self.teacher_hidden = _randn(gen, (n, ht), device).to(dt)
        self.teacher_weight = (_randn(gen, (v, ht), device) * (3.0 / ht**0.5)).to(dt)

    @property
    def key(self) -> dict:
        return {"problem": self.kind, "n": self.n, "v": self.v, "hs": self.hs, "ht": self.ht, "dtype": self.dtype}

    def arguments(self, requires_grad: bool, fresh: bool) -> tuple[tuple[Tensor, ...], list[Tensor]]:
        sh = _leaf(self.student_hidden, requires_grad)
        sw = _leaf(self.student_weight, requires_grad)
        return (sh, sw, self.teacher_hidden, self.teacher_weight), [sh, sw] if requires_grad else []

    def release(self) -> None:
        for x in (self.student_hidden, self.student_weight):
            x.requires_grad_(False).grad = None

    @property
    def grad_bytes(self) -> int:
        return self.student_hidden.nbytes + self.student_weight.nbytes

    def flops(self, mode: str) -> int:
        """The GEMM floor: both logits GEMMs forward, and dS @ W plus dS^T @ H for the student backward."""
        forward = 2 * self.n * self.v * (self.hs + self.ht)
        return forward + (4 * self.n * self.v * self.hs if mode == "fwd+bwd" else 0)

    def reference(self, temperature: float, divergence: str, beta: float) -> tuple[float, list[Tensor]]:
        """The float64 batchmean loss and its gradients w.r.t. the student's hidden states and weight."""
        sh = self.student_hidden.detach().double().requires_grad_()
        sw = self.student_weight.detach().double().requires_grad_()
        th, tw = self.teacher_hidden.double(), self.teacher_weight.double()
        loss = 0.0
        step = _rows_per_block(self.v)
        for r0 in range(0, self.n, step):
            block = kd_loss_reference(sh[r0:r0 + step] @ sw.T, th[r0:r0 + step] @ tw.T, temperature=temperature,
                                      divergence=divergence, beta=beta, reduction="sum") / self.n
            block.backward()
            loss += block.item()
        return loss, [sh.grad, sw.grad]


class SparseProblem(_StudentLogitsProblem):
    """sparse_kd_loss(student_logits, teacher_ids, teacher_logprobs), tail "bucket": the student's
    logits as in LogitsProblem, in ``dtype``, and the perturbed teacher's top-k at the suite's
    temperature, as float32 log-probabilities (the teacher's N x V logits exist a block of rows at
    a time only). The student is the one trainable input."""

    kind = "sparse"

    def __init__(self, n: int, v: int, k: int, dtype: str, device: str, temperature: float, seed: int = 0):
        self.n, self.v, self.k, self.dtype = n, v, k, dtype
        gen = torch.Generator(device=device).manual_seed(seed)
        student = _randn(gen, (n, v), device) * 3.0
        self.ids = torch.empty(n, k, dtype=torch.int64, device=device)
        self.logprobs = torch.empty(n, k, dtype=torch.float32, device=device)
        step = _rows_per_block(v)
        for r0 in range(0, n, step):
            teacher = student[r0:r0 + step] + _randn(gen, student[r0:r0 + step].shape, device) * 2.1
            self.ids[r0:r0 + step], self.logprobs[r0:r0 + step] = kdfast.teacher_topk(teacher, k, temperature)
        self.student = student.to(DTYPES[dtype])

    @property
    def key(self) -> dict:
        return {"problem": self.kind, "n": self.n, "v": self.v, "k": self.k, "dtype": self.dtype}

    def arguments(self, requires_grad: bool, fresh: bool) -> tuple[tuple[Tensor, ...], list[Tensor]]:
        student, leaves = _student_argument(self.student, requires_grad, fresh)
        return (student, self.ids, self.logprobs), leaves

    def traffic_bytes(self, mode: str) -> int:
        """The memory traffic floor: read S, the ids and log-probs, and write dS when there is a backward."""
        return self.student.nbytes + self.ids.nbytes + self.logprobs.nbytes \
            + (self.student.nbytes if mode == "fwd+bwd" else 0)

    def reference(self, temperature: float, divergence: str, beta: float) -> tuple[float, list[Tensor]]:
        """The float64 batchmean loss and its gradient w.r.t. the student (stored as float32)."""
        grad = torch.empty(self.n, self.v, dtype=torch.float32, device=self.student.device)
        loss = 0.0
        step = _rows_per_block(self.v)
        for r0 in range(0, self.n, step):
            s = self.student[r0:r0 + step].detach().cpu().double().requires_grad_()
            block = sparse_kd_loss_reference(s, self.ids[r0:r0 + step].cpu(), self.logprobs[r0:r0 + step].cpu(),
                                             temperature=temperature, divergence=divergence, beta=beta,
                                             mass_tolerance=MASS_TOLERANCE[self.logprobs.dtype],
                                             reduction="sum") / self.n
            block.backward()
            loss += block.item()
            grad[r0:r0 + step] = s.grad
        return loss, [grad]
