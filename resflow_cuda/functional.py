"""User-facing functions over the ops: argument handling, no kernels."""

from __future__ import annotations

from torch import Tensor

from . import ops


def lipswish(x: Tensor, beta: Tensor) -> Tensor:
    """LipSwish ``x * sigmoid(softplus(beta) * x) / 1.1`` (Residual Flows), fused in one kernel.

    Shapes:
        x: any shape, float32/float64/float16/bfloat16 (half types compute in float).
        beta: shape [1] (or 0-dim), the raw parameter before softplus.
        returns: like x (same shape, dtype and, for dense x, strides). A 0-dim x gives a 0-dim
            result, where the reference's broadcasting with the [1]-shaped beta gives shape [1].

    Autograd: first and second order in x and beta (gradcheck / gradgradcheck pass).

    Deviation from the reference ``Swish``: when beta's dtype differs from x's (e.g. a float32
    parameter under bfloat16 autocast), beta is cast to x's dtype and the result keeps x's dtype,
    where the reference would promote to the wider type.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"lipswish: expected x to be a torch.Tensor, but got {type(x).__name__}")
    if not isinstance(beta, Tensor):
        raise TypeError(f"lipswish: expected beta to be a torch.Tensor of shape [1], but got {type(beta).__name__}")
    if beta.dtype != x.dtype and beta.is_floating_point() and x.is_floating_point():
        beta = beta.to(x.dtype)
    return ops.lipswish(x, beta)


def logdet_series_accumulate_(w: Tensor, eps: Tensor, logdet: Tensor, neumann: Tensor | None = None,
                              logdet_coeff: float = 1.0, neumann_coeff: float = 0.0) -> None:
    """One term of the log-det power series, in place: ``logdet[b] += logdet_coeff * <w_b, eps_b>``
    per sample and ``neumann += neumann_coeff * w`` (see :func:`resflow_cuda.ops.logdet_series_accumulate_`
    for shapes and dtypes). Under ``torch.no_grad()`` only."""
    ops.logdet_series_accumulate_(w, eps, logdet, neumann, float(logdet_coeff), float(neumann_coeff))
