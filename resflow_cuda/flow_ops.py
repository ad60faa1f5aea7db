"""The ops of the flow layers around the residual blocks (``torch.ops.resflow_cuda``): typed wrappers, fake
kernels and autograd, as :mod:`resflow_cuda.ops` has them for the other ops (kept apart for its length).

ActNorm (csrc/include/resflow/actnorm_math.h): the layer's map and its log-density in one op each way, where
autograd over ATen ops takes five forward and eight backward (one kernel each on CUDA).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .ops import _OPS, _check_float, _check_matches

__all__ = ["actnorm", "actnorm_backward"]


def actnorm(x: Tensor, weight: Tensor, bias: Tensor, logp: Tensor | None, sign: int) -> tuple[Tensor, Tensor]:
    """ActNorm's forward ``y = (x + bias) * exp(weight)`` (per channel, dim 1) and, with ``logp``, the
    log-density after it, ``logp + sign * positions * weight.sum()`` (positions: the elements per channel
    and sample; sign -1 for a forward pass, whose log-det is subtracted), in one op.

    Shapes: x (B, C, ...); weight, bias (C,); logp B values ((B, 1) or (B,)), all of one float dtype and
    device. Returns y (contiguous, like x) and the new log-density like logp (empty without logp).
    Differentiable in x, weight, bias and logp (twice: a backward under ``create_graph`` runs on ATen ops).
    """
    return _OPS.actnorm.default(x, weight, bias, logp, sign)


def actnorm_backward(grad_y: Tensor, grad_logp: Tensor | None, x: Tensor, weight: Tensor, bias: Tensor,
                     sign: int) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients ``(grad_x, grad_weight, grad_bias)`` of :func:`actnorm` for the upstream gradients of y
    and of the log-density (None: none), in one pass; each channel's sums in float64 in a fixed order.
    Not differentiable."""
    return _OPS.actnorm_backward.default(grad_y, grad_logp, x, weight, bias, sign)


def _check_actnorm(op: str, x, weight, bias, logp, logp_name: str, sign: int) -> None:
    _check_float(op, "x", x)
    torch._check(x.dim() >= 2, lambda: f"{op}: expected x to have shape (B, C, ...), but got {list(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        _check_float(op, name, t)
        torch._check(t.dtype == x.dtype and t.device == x.device, lambda: f"{op}: expected {name} to have the dtype "
                     f"and device of x, but got {t.dtype} on {t.device}")
        torch._check(t.dim() == 1 and t.shape[0] == x.shape[1],
                     lambda: f"{op}: expected {name} to have shape [{x.shape[1]}], but got {list(t.shape)}")
    if logp is not None:
        _check_float(op, logp_name, logp)
        torch._check(logp.dtype == x.dtype and logp.device == x.device, lambda: f"{op}: expected {logp_name} to have "
                     f"the dtype and device of x, but got {logp.dtype} on {logp.device}")
        torch._check(logp.dim() >= 1 and logp.shape[0] == x.shape[0] and logp.numel() == x.shape[0],
                     lambda: f"{op}: expected {logp_name} to have one value per sample of x, but got "
                     f"{list(logp.shape)}")
    torch._check(sign in (1, -1), lambda: f"{op}: expected sign to be 1 or -1, but got {sign}")


@torch.library.register_fake("resflow_cuda::actnorm")
def _actnorm_fake(x, weight, bias, logp, sign):
    _check_actnorm("resflow_cuda.actnorm", x, weight, bias, logp, "logp", sign)
    out = x.new_empty(0) if logp is None else logp.new_empty(logp.shape)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), out


@torch.library.register_fake("resflow_cuda::actnorm_backward")
def _actnorm_backward_fake(grad_y, grad_logp, x, weight, bias, sign):
    _check_actnorm("resflow_cuda.actnorm_backward", x, weight, bias, grad_logp, "grad_logp", sign)
    _check_matches("resflow_cuda.actnorm_backward", "grad_y", grad_y, "x", x)
    channels = weight.new_empty(weight.shape)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), channels, channels.clone()


def _actnorm_setup(ctx, inputs, output):
    x, weight, bias, logp, sign = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.sign, ctx.with_logp = sign, logp is not None
    ctx.set_materialize_grads(False)


def _actnorm_autograd(ctx, grad_y, grad_logp):
    x, weight, bias = ctx.saved_tensors
    grad_logp = grad_logp if ctx.with_logp else None
    if torch.is_grad_enabled():  # create_graph: the same gradients as a graph of ATen ops, differentiable again
        return (*_actnorm_gradients_by_aten(grad_y, grad_logp, x, weight, bias, ctx.sign), grad_logp, None)
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    grad_x, grad_weight, grad_bias = actnorm_backward(grad_y, grad_logp, x, weight, bias, ctx.sign)
    return grad_x, grad_weight, grad_bias, grad_logp, None


def _actnorm_gradients_by_aten(grad_y, grad_logp, x, weight, bias, sign):
    view = (1, -1) + (1,) * (x.dim() - 2)
    reduce = [0] + list(range(2, x.dim()))
    scale = torch.exp(weight).view(view)
    grad_y = torch.zeros_like(x) if grad_y is None else grad_y
    grad_x = grad_y * scale
    grad_weight = (grad_y * (x + bias.view(view)) * scale).sum(reduce)
    if grad_logp is not None:
        grad_weight = grad_weight + sign * math.prod(x.shape[2:]) * grad_logp.sum()
    return grad_x, grad_weight, grad_x.sum(reduce)


torch.library.register_autograd("resflow_cuda::actnorm", _actnorm_autograd, setup_context=_actnorm_setup)
