"""Typed wrappers of ``torch.ops.resflow_cuda.*`` with their fake kernels and autograd.

The only module that touches ``torch.ops.resflow_cuda``. Each op section has: the wrapper, the
fake (meta) kernel that ``torch.compile`` and ``opcheck`` use, and the autograd formula, which
calls further custom ops so that derivatives form a ladder (LipSwish: forward → backward →
double backward; third order is not supported).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _build  # noqa: F401  (loads _C, which defines the ops)

_OPS = torch.ops.resflow_cuda

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# Memory formats with the tensor rank they apply to (None: any rank).
_MEMORY_FORMATS = ((torch.contiguous_format, None), (torch.channels_last, 4), (torch.channels_last_3d, 5))


def _elementwise_format(*operands: Tensor) -> torch.memory_format:
    """The layout csrc's elementwise_operands() runs in: the first memory format every operand
    is dense in (contiguous, channels_last, channels_last_3d), else contiguous (after copies)."""
    for fmt, rank in _MEMORY_FORMATS:
        if rank in (None, operands[0].dim()) and all(t.is_contiguous(memory_format=fmt) for t in operands):
            return fmt
    return torch.contiguous_format


def _elementwise_like(*operands: Tensor) -> Tensor:
    """An output of an elementwise kernel over the operands (see _elementwise_format)."""
    first = operands[0]
    return torch.empty(first.shape, dtype=first.dtype, device=first.device,
                       memory_format=_elementwise_format(*operands))


def _check_float(op: str, name: str, t: Tensor) -> None:
    torch._check(
        t.dtype in _FLOAT_DTYPES,
        lambda: f"{op}: expected {name} to have a floating-point dtype (float32, float64, float16 or "
        f"bfloat16), but got {t.dtype}",
    )


def _check_matches(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    _check_float(op, name, t)
    torch._check(t.dtype == ref.dtype,
                 lambda: f"{op}: expected {name} to have the dtype of {ref_name} ({ref.dtype}), but got {t.dtype}")
    torch._check(t.device == ref.device,
                 lambda: f"{op}: expected {name} to be on the device of {ref_name} ({ref.device}), but got {t.device}")
    torch._check(t.shape == ref.shape,
                 lambda: f"{op}: expected {name} to have the shape of {ref_name} {list(ref.shape)}, "
                 f"but got {list(t.shape)}")


def _check_param(op: str, name: str, p: Tensor, x: Tensor) -> None:
    torch._check(p.dim() <= 1 and p.numel() == 1,
                 lambda: f"{op}: expected {name} to have shape [1] (or be 0-dimensional), but got shape {list(p.shape)}")
    _check_float(op, "x", x)
    torch._check(p.dtype == x.dtype,
                 lambda: f"{op}: expected {name} to have the dtype of x ({x.dtype}), but got {p.dtype}")
    torch._check(p.device == x.device,
                 lambda: f"{op}: expected {name} to be on the device of x ({x.device}), but got {p.device}")


def _or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


# ---------------------------------------------------------------------------------------------
# LipSwish: y = x·σ(βx)/1.1 with β = softplus(beta) (csrc/include/resflow/lipswish_math.h)
# ---------------------------------------------------------------------------------------------


def lipswish(x: Tensor, beta: Tensor) -> Tensor:
    """Fused LipSwish ``x * sigmoid(softplus(beta) * x) / 1.1``.

    Shapes: x any shape (float32/64, float16, bfloat16; half types compute in float); beta
    shape [1] (or 0-dim), same dtype and device. Returns y like x. Differentiable twice in x and beta.
    """
    return _OPS.lipswish.default(x, beta)


def lipswish_with_derivative(x: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """``(y, dy/dx)`` in one pass; dy/dx is what the log-det power series caches.

    Differentiable once (through both outputs) in x and beta.
    """
    return _OPS.lipswish_with_derivative.default(x, beta)


def lipswish_backward(grad: Tensor, x: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """``(grad * dy/dx, sum(grad * dy/dbeta))``: the gradients of x and of the raw beta
    (through softplus). grad_beta has beta's shape. Differentiable once (LipSwish's second order)."""
    return _OPS.lipswish_backward.default(grad, x, beta)


def lipswish_double_backward(grad: Tensor, gg_x: Tensor, gg_beta: Tensor, x: Tensor,
                             beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The vector-Jacobian product of :func:`lipswish_backward`: given the upstream gradients
    ``gg_x`` of grad_x and ``gg_beta`` of grad_beta, returns the gradients of (grad, x, beta).
    Uses d²y/dx², d²y/dx dbeta and d²y/dbeta². Not differentiable (third order is out of scope)."""
    return _OPS.lipswish_double_backward.default(grad, gg_x, gg_beta, x, beta)


@torch.library.register_fake("resflow_cuda::lipswish")
def _lipswish_fake(x, beta):
    _check_param("resflow_cuda.lipswish", "beta", beta, x)
    return _elementwise_like(x)


@torch.library.register_fake("resflow_cuda::lipswish_with_derivative")
def _lipswish_with_derivative_fake(x, beta):
    _check_param("resflow_cuda.lipswish_with_derivative", "beta", beta, x)
    return _elementwise_like(x), _elementwise_like(x)


@torch.library.register_fake("resflow_cuda::lipswish_backward")
def _lipswish_backward_fake(grad, x, beta):
    op = "resflow_cuda.lipswish_backward"
    _check_param(op, "beta", beta, x)
    _check_matches(op, "grad", grad, "x", x)
    return _elementwise_like(grad, x), beta.new_empty(beta.shape)


@torch.library.register_fake("resflow_cuda::lipswish_double_backward")
def _lipswish_double_backward_fake(grad, gg_x, gg_beta, x, beta):
    op = "resflow_cuda.lipswish_double_backward"
    _check_param(op, "beta", beta, x)
    _check_matches(op, "grad", grad, "x", x)
    _check_matches(op, "gg_x", gg_x, "x", x)
    _check_param(op, "gg_beta", gg_beta, x)
    return _elementwise_like(grad, gg_x, x), _elementwise_like(grad, gg_x, x), beta.new_empty(beta.shape)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _lipswish_autograd(ctx, grad):
    x, beta = ctx.saved_tensors
    return lipswish_backward(grad, x, beta)


def _lipswish_with_derivative_autograd(ctx, grad_y, grad_dydx):
    x, beta = ctx.saved_tensors
    grad_x, grad_beta = lipswish_backward(_or_zeros(grad_y, x), x, beta)
    if grad_dydx is not None:
        # d(dy/dx)/dx = y'' and d(dy/dx)/dbeta are what the double backward multiplies by
        # grad when gg_x = 1 and gg_beta = 0.
        _, gx2, gb2 = lipswish_double_backward(grad_dydx, torch.ones_like(x), torch.zeros_like(beta), x, beta)
        grad_x = grad_x + gx2
        grad_beta = grad_beta + gb2
    return grad_x, grad_beta


def _lipswish_backward_autograd(ctx, gg_x, gg_beta):
    grad, x, beta = ctx.saved_tensors
    return lipswish_double_backward(grad, _or_zeros(gg_x, x), _or_zeros(gg_beta, beta), x, beta)


def _lipswish_double_backward_autograd(ctx, *grads):
    raise NotImplementedError(
        "resflow_cuda.lipswish_double_backward is not differentiable: LipSwish supports derivatives "
        "up to second order (third-order gradients, e.g. a double backward of a double backward, are not implemented)"
    )


torch.library.register_autograd("resflow_cuda::lipswish", _lipswish_autograd, setup_context=_save_inputs)
torch.library.register_autograd("resflow_cuda::lipswish_with_derivative", _lipswish_with_derivative_autograd,
                                setup_context=_save_inputs)
torch.library.register_autograd("resflow_cuda::lipswish_backward", _lipswish_backward_autograd,
                                setup_context=_save_inputs)
torch.library.register_autograd("resflow_cuda::lipswish_double_backward", _lipswish_double_backward_autograd)


def cuda_version() -> int:
    """CUDART_VERSION the CUDA kernels were compiled with (e.g. 13000), or -1 in a CPU-only build."""
    return _OPS.cuda_version.default()
