"""User-facing functions over the ops: argument handling, no kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops


def lipswish(x: Tensor, beta: Tensor) -> Tensor:
    """LipSwish ``x * sigmoid(softplus(beta) * x) / 1.1`` (Residual Flows), fused in one kernel.

    Args:
        x: the input, float32/float64/float16/bfloat16 (half types compute in float).
        beta: the raw parameter before softplus, shape [1] (or 0-dim); cast to x's dtype if it differs.

    Shapes:
        x: any shape; beta: [1] or (); output: like x (same shape, dtype and, for dense x, strides).

    Returns:
        The activation of x.

    Autograd: first and second order in x and beta (gradcheck / gradgradcheck pass).

    Parity with the reference (mixed dtypes, 0-dim x): docs/parity.md#lipswish
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"lipswish: expected x to be a torch.Tensor, but got {type(x).__name__}")
    if not isinstance(beta, Tensor):
        raise TypeError(f"lipswish: expected beta to be a torch.Tensor of shape [1], but got {type(beta).__name__}")
    if beta.dtype != x.dtype and beta.is_floating_point() and x.is_floating_point():
        beta = beta.to(x.dtype)
    return ops.lipswish(x, beta)


def logdet_series_accumulate_(w: Tensor, eps: Tensor, logdet: Tensor, neumann: Tensor | None = None,
                              logdet_coeff: float = 1.0, neumann_coeff: float = 0.0,
                              scale: Tensor | None = None) -> None:
    """One term of the log-det power series, in place: ``logdet[b] += logdet_coeff * <w_b, eps_b>``
    per sample and ``neumann += neumann_coeff * w``; with ``scale``, ``w *= scale`` first.

    Args:
        w: the term's vector w_k = eps^T J^k.
        eps: the probe.
        logdet: the per-sample accumulator (float32; float64 for float64 w).
        neumann: the Neumann-vector accumulator, or None.
        logdet_coeff: the weight of <w, eps>.
        neumann_coeff: the weight of w in ``neumann``.
        scale: multiplies w elementwise, in place, before the term reads it (the last elementwise
            product of the term's vector-Jacobian chain, fused into the same pass), or None.

    Shapes:
        w, eps, neumann, scale: (B, ...); logdet: (B,). See :func:`resflow_cuda.ops.logdet_series_accumulate_`.

    Autograd: none; call it under ``torch.no_grad()``.
    """
    ops.logdet_series_accumulate_(w, eps, logdet, neumann, float(logdet_coeff), float(neumann_coeff), scale)


# ---------------------------------------------------------------------------------------------
# The power iteration in eager ops, for the Lipschitz layers' learnable (tensor-valued) norm
# orders, which the ops do not take: the dual maps of p-norms, the loop (u first, the InducedNorm*
# order) and the operator of a convolution.
# ---------------------------------------------------------------------------------------------

_NORMALIZE_EPS = 1e-12  # F.normalize's default eps


def _projmax(x: Tensor) -> Tensor:
    """One-hot at the first index of max |x|."""
    out = torch.zeros_like(x)
    out[torch.argmax(torch.abs(x))] = 1
    return out


def _sum_norm(x: Tensor, p) -> Tensor:
    """``(sum x^p)^(1/p)`` on non-negative x (p = inf gives sum(x^inf)^0, as the reference)."""
    return torch.sum(x.reshape(-1) ** p) ** (1 / p)


def _sign_or_one(x: Tensor) -> Tensor:
    sign = x / torch.abs(x)
    sign[torch.isnan(sign)] = 1
    return sign


def normalize_v(v: Tensor, domain) -> Tensor:
    """Dual map of the domain norm p: unit l2 (p = 2), projmax (p = 1), else the Hoelder dual.
    A tensor-valued p (learnable norms) always takes the general branch, as in the reference."""
    if not torch.is_tensor(domain) and domain == 2:
        return F.normalize(v, p=2, dim=0, eps=_NORMALIZE_EPS)
    if domain == 1:
        return _projmax(v)
    vabs = torch.abs(v)
    vabs = (vabs / torch.max(vabs)) ** (1 / (domain - 1))
    return _sign_or_one(v) * vabs / _sum_norm(vabs, domain)


def normalize_u(u: Tensor, codomain) -> Tensor:
    """Dual map of the codomain norm q: unit l2 (q = 2), projmax (q = inf), else the Hoelder dual."""
    if not torch.is_tensor(codomain) and codomain == 2:
        return F.normalize(u, p=2, dim=0, eps=_NORMALIZE_EPS)
    if codomain == float("inf"):
        return _projmax(u)
    uabs = torch.abs(u)
    uabs = (uabs / torch.max(uabs)) ** (codomain - 1)
    return _sign_or_one(u) * uabs / _sum_norm(uabs, float("inf") if codomain == 1 else codomain / (codomain - 1))


def eager_power_iteration(weight: Tensor, u: Tensor, v: Tensor, max_iterations: int, atol: float | None = None,
                          rtol: float | None = None, domain=2, codomain=2, matvec=None, rmatvec=None):
    """The power iteration as a Python loop, for norm orders the ops do not take (tensors).

    Each step is u <- normalize_u(A v, codomain) then v <- normalize_v(A^T u, domain). With atol
    and rtol it stops after the first step where ||u - u_old||/sqrt(len u) < atol + rtol max(u)
    and the same for v.

    Args:
        weight: the matrix A (out x in), unless ``matvec`` / ``rmatvec`` are given.
        u, v: the starting vectors.
        max_iterations: step limit.
        atol, rtol: the tolerance (both or neither).
        domain, codomain: the norm orders p, q (numbers or tensors).
        matvec, rmatvec: functions applying the operator and its transpose (see :func:`conv_operator`).

    Returns:
        ``(u, v, sigma = u^T A v, iterations)``, without graph.
    """
    matvec = matvec or (lambda x: torch.mv(weight, x))
    rmatvec = rmatvec or (lambda y: torch.mv(weight.t(), y))
    iterations = 0
    with torch.no_grad(), ops.autocast_disabled(u):  # in the weight's dtype also under autocast
        for _ in range(max_iterations):
            old_u, old_v = u.clone(), v.clone()
            u = normalize_u(matvec(v), codomain)
            v = normalize_v(rmatvec(u), domain)
            iterations += 1
            if atol is not None and rtol is not None:
                err_u = torch.norm(u - old_u) / (u.nelement() ** 0.5)
                err_v = torch.norm(v - old_v) / (v.nelement() ** 0.5)
                if err_u < atol + rtol * torch.max(u) and err_v < atol + rtol * torch.max(v):
                    break
        sigma = torch.dot(u, matvec(v))
    return u, v, sigma, iterations


def conv_operator(weight: Tensor, input_hw, stride, padding):
    """(matvec, rmatvec): the convolution x -> conv2d(x, weight) on a 1 x C x H x W input and its
    transpose (conv_transpose2d), on flattened vectors. ``stride`` and ``padding`` are pairs."""
    c, (h, w) = weight.shape[1], input_hw
    (sh, sw), (ph, pw) = stride, padding
    out_shape = (1, weight.shape[0], (h + 2 * ph - weight.shape[2]) // sh + 1, (w + 2 * pw - weight.shape[3]) // sw + 1)

    def matvec(x):
        return F.conv2d(x.view(1, c, h, w), weight, stride=stride, padding=padding).reshape(-1)

    def rmatvec(y):
        return F.conv_transpose2d(y.view(out_shape), weight, stride=stride, padding=padding).reshape(-1)

    return matvec, rmatvec
