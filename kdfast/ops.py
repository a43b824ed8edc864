"""The torch.library custom ops and the autograd Function around them.

``kdfast::kd_forward`` runs a backend over (B, M, V) row views and, when asked, writes
the weighted gradient into a buffer at the same time (the gradient is computed in the
forward pass, while the logits are still in cache). ``kdfast::scale_grad_`` applies
the incoming grad_output in backward, and skips the pass when it is exactly 1 (the
usual ``loss.backward()``). Both have fake implementations, so ``kd_loss`` works under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import KernelParams, SparseKernelParams, compute_dtype
from .backends import registry
from .reduction import ReductionWeights, weighted_loss


@torch.library.custom_op("kdfast::kd_forward", mutates_args=("grad",))
def kd_forward(student: Tensor, teacher: Tensor, labels: Optional[Tensor], grad: Optional[Tensor], coefs: Tensor,
               temperature: float, teacher_temperature: float, divergence: int, beta: float, ignore_index: int,
               hard: bool, student_scale: float, student_cap: float, teacher_scale: float, teacher_cap: float,
               backend: str) -> tuple[Tensor, Tensor]:
    params = KernelParams(temperature, teacher_temperature, divergence, beta, ignore_index, hard, student_scale,
                          student_cap, teacher_scale, teacher_cap)
    return registry.backend(backend).kd_forward(student, teacher, labels, grad, coefs, params)


@kd_forward.register_fake
def _(student, teacher, labels, grad, coefs, temperature, teacher_temperature, divergence, beta, ignore_index, hard,
      student_scale, student_cap, teacher_scale, teacher_cap, backend):
    dtype = compute_dtype(student.dtype, teacher.dtype)
    n_rows = student.shape[0] * student.shape[1]
    return student.new_empty(n_rows, dtype=dtype), student.new_empty(n_rows, dtype=dtype)


@torch.library.custom_op("kdfast::sparse_kd_forward", mutates_args=("grad",))
def sparse_kd_forward(student: Tensor, ids: Tensor, logprobs: Tensor, labels: Optional[Tensor],
                      grad: Optional[Tensor], coefs: Tensor, temperature: float, divergence: int, beta: float,
                      tail: int, mass_tolerance: float, ignore_index: int, hard: bool, student_scale: float,
                      student_cap: float, backend: str) -> tuple[Tensor, Tensor]:
    params = SparseKernelParams(temperature, divergence, beta, tail, mass_tolerance, ignore_index, hard,
                                student_scale, student_cap)
    return registry.backend(backend).sparse_kd_forward(student, ids, logprobs, labels, grad, coefs, params)


@sparse_kd_forward.register_fake
def _(student, ids, logprobs, labels, grad, coefs, temperature, divergence, beta, tail, mass_tolerance,
      ignore_index, hard, student_scale, student_cap, backend):
    dtype = compute_dtype(student.dtype, logprobs.dtype)
    n_rows = student.shape[0] * student.shape[1]
    return student.new_empty(n_rows, dtype=dtype), student.new_empty(n_rows, dtype=dtype)


@torch.library.custom_op("kdfast::scale_grad_", mutates_args=("grad",))
def scale_grad_(grad: Tensor, grad_output: Tensor, backend: str) -> None:
    """grad *= grad_output, a scalar or one value per row of the (B, M, V) grad; on a GPU by the
    backend that computed grad when it can (see kdfast.backends), which avoids a host sync.
    On the CPU a sync is free and torch's multiply rounds exactly as the reference does."""
    device_scale = registry.backend(backend).scale_grad_ if grad.device.type != "cpu" else None
    if grad_output.numel() != 1:
        grad.mul_(grad_output.view(grad.shape[0], grad.shape[1], 1))
    elif device_scale is not None:
        device_scale(grad, grad_output)  # tests for 1 on the device: no sync
    else:
        scale = grad_output.item()
        if scale != 1.0:
            grad.mul_(scale)  # a Python scale is applied in float32 even to a bf16 grad


@scale_grad_.register_fake
def _(grad, grad_output, backend):
    return None


def gradient_buffer(student: Tensor, backend: str) -> Tensor:
    """A buffer for the student's gradient: the backend's (recycled, or laid out for its kernel), else contiguous."""
    if not torch.compiler.is_compiling():  # a compiled graph allocates its own
        recycle = registry.backend(backend).gradient_buffer
        if recycle is not None:
            return recycle(student)
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def apply_loss(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)``, with the tensors detached when grad mode is off: autograd.Function
    flags an input that requires grad as needing one (ctx.needs_input_grad) even under
    torch.no_grad(), and the fused kernels would then compute a gradient in forward that no
    backward can take (a full gradient buffer, and for a fused-linear loss the weight's GEMM)."""
    if not torch.is_grad_enabled():
        args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
    return function.apply(*args)


def relative_grad_output(grad_output: Tensor, expected: float) -> Tensor:
    """What a gradient computed for grad_output = expected must still be multiplied by: 1 (no pass
    over the gradient) when backward receives what was expected."""
    return grad_output if expected == 1.0 else grad_output / expected


def start_backward(ctx, loss_name: str, once: bool = True) -> None:
    """Checks that the backward of a loss whose gradient was computed in forward can run: without
    create_graph (the gradient has no graph of its own to differentiate), and, when the gradient
    is consumed by its backward, once per forward."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{loss_name} has no second derivative: its gradient is computed during the forward pass "
                           "by a fused kernel, outside autograd, so backward with create_graph=True (double "
                           "backward, e.g. a gradient penalty or gradgradcheck) cannot be differentiated again")
    if once and getattr(ctx, "backward_done", False):
        raise RuntimeError(f"{loss_name}'s backward already ran for this forward: kdfast computes the gradient "
                           "during the forward pass and hands it to autograd, scaled in place, in the first "
                           "backward, so a second backward through the same loss (retain_graph=True) has no "
                           "gradient left to give; compute the loss again for a second backward")
    ctx.backward_done = True


class GradientInForward(torch.autograd.Function):
    """The autograd side of a loss whose kernel computes the student's gradient in forward:
    ``forward`` of a subclass runs the kernel with ``prepare_gradient``'s buffer and returns
    ``finish``'s result, loss = coefs[0] * kd_rows + coefs[1] * ce_rows (summed over rows
    unless per_row); backward scales the kept gradient by grad_output.

    The gradient is kept in a buffer, or in the student logits themselves with inplace_backward.
    Writing over the student bumps its version counter (the custom op declares the mutation),
    so a use of the logits that autograd saved earlier raises PyTorch's in-place error.
    (Marking it dirty would also catch later uses, but autograd then routes the gradient of a
    view through copies of its whole base, which costs more memory than the overwrite saves.)
    """

    @staticmethod
    def prepare_gradient(ctx, student: Tensor, backend: str, inplace: bool) -> Optional[Tensor]:
        """Where the kernel writes the student's gradient: None when no gradient is needed."""
        if not ctx.needs_input_grad[0]:
            return None
        return student if inplace else gradient_buffer(student, backend)

    @staticmethod
    def finish(ctx, loss_name: str, grad: Optional[Tensor], kd_rows: Tensor, ce_rows: Tensor,
               weights: ReductionWeights, expected_grad_output: float, backend: str, per_row: bool):
        ctx.mark_non_differentiable(kd_rows, ce_rows)
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.loss_name, ctx.backend, ctx.expected_grad_output = loss_name, backend, expected_grad_output
        return weighted_loss(weights.coefs, kd_rows, ce_rows, per_row), kd_rows, ce_rows

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd_rows, _grad_ce_rows):
        start_backward(ctx, ctx.loss_name)
        (grad,) = ctx.saved_tensors
        scale_grad_(grad, relative_grad_output(grad_loss, ctx.expected_grad_output), ctx.backend)
        return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)


class KDLossFunction(GradientInForward):
    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, labels: Optional[Tensor], weights: ReductionWeights,
                expected_grad_output: float, params: KernelParams, backend: str, per_row: bool, inplace: bool):
        grad = GradientInForward.prepare_gradient(ctx, student, backend, inplace)
        kd_rows, ce_rows = kd_forward(student, teacher, labels, grad, weights.grad_coefs, *params, backend)
        return GradientInForward.finish(ctx, "kd_loss", grad, kd_rows, ce_rows, weights, expected_grad_output,
                                        backend, per_row)


class SparseKDFunction(GradientInForward):
    @staticmethod
    def forward(ctx, student: Tensor, ids: Tensor, logprobs: Tensor, labels: Optional[Tensor],
                weights: ReductionWeights, expected_grad_output: float, params: SparseKernelParams, backend: str,
                per_row: bool, inplace: bool):
        grad = GradientInForward.prepare_gradient(ctx, student, backend, inplace)
        kd_rows, ce_rows = sparse_kd_forward(student, ids, logprobs, labels, grad, weights.grad_coefs, *params,
                                             backend)
        return GradientInForward.finish(ctx, "sparse_kd_loss", grad, kd_rows, ce_rows, weights,
                                        expected_grad_output, backend, per_row)
