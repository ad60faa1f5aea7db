"""Pure-PyTorch twins of every resflow_cuda op: the oracle for tests and the baseline for benchmarks.

Each follows the semantics of the reference implementations (rtqichen/residual-flows,
normflows) with plain eager ops and no resflow_cuda code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LIPSWISH_DIVISOR = 1.1


def lipswish(x: Tensor, beta: Tensor) -> Tensor:
    """The reference ``Swish.forward``: ``x * sigmoid(x * softplus(beta)) / 1.1``."""
    return x * torch.sigmoid(x * F.softplus(beta)) / LIPSWISH_DIVISOR


def lipswish_with_derivative(x: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """``(y, dy/dx)`` with ``dy/dx = (s + βx·s(1 − s)) / 1.1``, s = sigmoid(βx), in eager ops."""
    b = F.softplus(beta)
    s = torch.sigmoid(x * b)
    y = x * s / LIPSWISH_DIVISOR
    dydx = (s + b * x * s * (1 - s)) / LIPSWISH_DIVISOR
    return y, dydx


# ---------------------------------------------------------------------------------------------
# Power iteration for spectral and induced p->q norms (residual-flows mixed_lipschitz.py,
# lipschitz.py): the dual maps, one iteration step, and the loop with the reference's stopping rule.
# ---------------------------------------------------------------------------------------------

NORMALIZE_EPS = 1e-12  # F.normalize's default eps


def projmax(x: Tensor) -> Tensor:
    """One-hot at the first index of max |x| (the reference's `projmax_`, out of place)."""
    out = torch.zeros_like(x)
    out[torch.argmax(torch.abs(x))] = 1
    return out


def vector_norm(x: Tensor, p: float) -> Tensor:
    """The reference's `(sum x^p)^(1/p)` on non-negative x (p = inf gives sum(x^inf)^0)."""
    x = x.reshape(-1)
    return torch.sum(x ** p) ** (1 / p)


def _sign_with_zero_as_one(x: Tensor) -> Tensor:
    sign = x / torch.abs(x)
    sign[torch.isnan(sign)] = 1
    return sign


def normalize_v(v: Tensor, domain) -> Tensor:
    """Dual map of the domain norm p: unit l2 (p = 2), projmax (p = 1), else the Hoelder dual.
    A tensor-valued p (learnable norms) always takes the general branch, as in the reference."""
    if not torch.is_tensor(domain) and domain == 2:
        return F.normalize(v, p=2, dim=0, eps=NORMALIZE_EPS)
    if domain == 1:
        return projmax(v)
    vabs = torch.abs(v)
    vabs = (vabs / torch.max(vabs)) ** (1 / (domain - 1))
    return _sign_with_zero_as_one(v) * vabs / vector_norm(vabs, domain)


def normalize_u(u: Tensor, codomain) -> Tensor:
    """Dual map of the codomain norm q: unit l2 (q = 2), projmax (q = inf), else the Hoelder dual."""
    if not torch.is_tensor(codomain) and codomain == 2:
        return F.normalize(u, p=2, dim=0, eps=NORMALIZE_EPS)
    if codomain == float("inf"):
        return projmax(u)
    uabs = torch.abs(u)
    uabs = (uabs / torch.max(uabs)) ** (codomain - 1)
    dual = float("inf") if codomain == 1 else codomain / (codomain - 1)
    return _sign_with_zero_as_one(u) * uabs / vector_norm(uabs, dual)


def power_iteration(weight: Tensor, u: Tensor, v: Tensor, max_iterations: int, atol: float | None = None,
                    rtol: float | None = None, domain=2, codomain=2, u_first: bool = True,
                    matvec=None, rmatvec=None):
    """The reference power iteration on one operator.

    Each step is u <- normalize_u(A v, codomain) then v <- normalize_v(A^T u, domain) (u_first, the
    InducedNorm* order) or v first then u (the SpectralNorm* order, p = q = 2). With atol and rtol
    it stops after the first step where ||u - u_old||/sqrt(len u) < atol + rtol max(u) and the same
    for v. A is `weight` (out x in) unless matvec / rmatvec apply the operator and its transpose.
    Returns (u, v, sigma = u^T A v, iterations).
    """
    matvec = matvec or (lambda x: torch.mv(weight, x))
    rmatvec = rmatvec or (lambda y: torch.mv(weight.t(), y))
    iterations = 0
    with torch.no_grad():
        for _ in range(max_iterations):
            old_u, old_v = u.clone(), v.clone()
            if u_first:
                u = normalize_u(matvec(v), codomain)
                v = normalize_v(rmatvec(u), domain)
            else:
                v = normalize_v(rmatvec(u), domain)
                u = normalize_u(matvec(v), codomain)
            iterations += 1
            if atol is not None and rtol is not None:
                err_u = torch.norm(u - old_u) / (u.nelement() ** 0.5)
                err_v = torch.norm(v - old_v) / (v.nelement() ** 0.5)
                if err_u < atol + rtol * torch.max(u) and err_v < atol + rtol * torch.max(v):
                    break
        sigma = torch.dot(u, matvec(v))
    return u, v, sigma, iterations


def conv_operator(weight: Tensor, input_hw, stride, padding):
    """(matvec, rmatvec) of the convolution x -> conv2d(x, weight) on a 1 x C x H x W input, on
    flattened vectors: conv2d and conv_transpose2d as in the reference's k x k power iteration."""
    c = weight.shape[1]
    h, w = input_hw
    out_shape = F.conv2d(weight.new_zeros(1, c, h, w), weight, stride=stride, padding=padding).shape

    def matvec(x):
        return F.conv2d(x.view(1, c, h, w), weight, stride=stride, padding=padding).reshape(-1)

    def rmatvec(y):
        return F.conv_transpose2d(y.view(out_shape), weight, stride=stride, padding=padding).reshape(-1)

    return matvec, rmatvec
