"""The fused dense block: a small dense residual branch's whole training step in a few op calls.

For a branch that :mod:`resflow_cuda.linearize` recognises, made of dense layers with LipSwish (or no)
activations, on inputs (B, D) with D <= :data:`MAX_DIM`, the Neumann estimator with backward-in-forward
(normflows' ``Residual`` default, the reference's ``neumann_grad=True, grad_in_forward=True``) runs as:

- forward: the weights of every layer that registered a ``normalization`` (this library's
  SpectralNormLinear / InducedNormLinear) are normalized in one op (``lipschitz_normalize_``, which also
  writes their ``scale`` buffers); then one op (``dense_jacobian_forward``) runs the branch in forward
  mode on a stack of 2 + D blocks of the batch (x, the probe eps and the D input directions), one
  matrix product and one fused bias + LipSwish + derivative kernel per layer, and takes every term of
  the series, the Neumann vector w~ and the surrogate <w~^T J, eps> from the Jacobians in one kernel;
- backward: one op (``dense_jacobian_backward``) takes g's gradient and the surrogate's (w~ constant)
  together through the primal rows and the eps tangent, two products and one fused kernel per layer,
  then one op the normalization's backward.

The draws, coefficients, values and gradients are the linearized path's (to rounding: the terms come
from the Jacobian instead of chained vector-Jacobian products). Memory: per layer the stack's rows
(2 + D times the branch's activations), whatever the number of terms. As with backward-in-forward, a
non-uniform upstream gradient of the log-det is refused (the block's documented behaviour), although
this backward would be exact for it. Under autocast, for other activations or shapes, the linearized
path runs instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import dense_ops, ops
from .estimators import SeriesPlan, require_uniform_upstream
from .linearize import IDENTITY, LIPSWISH, LinearizedBranch

__all__ = ["MAX_DIM", "fused_neumann_estimate"]

# The largest input width D of the fused block: its stack has 2 + D blocks of rows, which for larger D
# costs more products than the vector-Jacobian series of the linearized path.
MAX_DIM = 16


@dataclass
class _Spec:
    steps: int
    normalized: list[int]  # the steps whose weight the block normalizes
    coeffs: list[float]
    detach: list[bool]
    scales: list[Tensor]
    logdet_coeffs: list[float]
    neumann_coeffs: list[float]


def _eligible(branch: LinearizedBranch, x: Tensor) -> bool:
    return (branch.dense and x.dim() == 2 and 1 <= x.shape[1] <= MAX_DIM and x.shape[0] > 0
            and x.dtype in (torch.float32, torch.float64) and not ops.autocast_enabled(x.device.type)
            and all(step.activation in (IDENTITY, LIPSWISH) for step in branch.steps))


def fused_neumann_estimate(branch: LinearizedBranch, x: Tensor, eps: Tensor,
                           plan: SeriesPlan) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(g, surrogate, estimate)`` of the Neumann estimator with backward-in-forward on the fused block
    (module docstring), or None when the branch or x does not qualify.

    Args:
        branch: the linearized branch.
        x: the block's input (B, D).
        eps: the probe, like x.
        plan: the series' terms and coefficients.

    Returns:
        g (B, D) and the surrogate (B,) with their graphs to x and the branch's parameters, and the
        log-det estimate (B,) without graph.
    """
    if not _eligible(branch, x):
        return None
    weights, biases, betas, us, vs = [], [], [], [], []
    normalized, coeffs, detach, scales = [], [], [], []
    with torch.enable_grad():
        for i, step in enumerate(branch.steps):
            if step.normalization_of is not None:
                weight, u, v, coeff, detach_sigma, scale = step.normalization_of(step.layer, x)
                normalized.append(i)
                coeffs.append(float(coeff))
                detach.append(bool(detach_sigma))
                scales.append(scale)
                us.append(u)
                vs.append(v)
            else:
                weight = step.weight(x)  # dense layers ignore their input here
            if weight.dtype != x.dtype:
                return None
            weights.append(weight)
            biases.append(step.layer.bias)
            betas.append(step.act_module.beta if step.activation == LIPSWISH else None)
    n = plan.n_terms
    spec = _Spec(len(weights), normalized, coeffs, detach, scales,
                 [plan.logdet_coeff(k) for k in range(1, n + 1)], [plan.neumann_coeff(k) for k in range(1, n + 1)])
    return _FusedDenseBlock.apply(spec, x, eps, *weights, *biases, *betas, *us, *vs)


class _FusedDenseBlock(torch.autograd.Function):
    """forward(spec, x, eps, *weights, *biases, *betas, *us, *vs) -> (g, surrogate, estimate); see the
    module docstring."""

    @staticmethod
    def forward(ctx, spec: _Spec, x, eps, *tensors):
        n, k = spec.steps, len(spec.normalized)
        weights, biases, betas = list(tensors[:n]), list(tensors[n:2 * n]), list(tensors[2 * n:3 * n])
        us, vs = list(tensors[3 * n:3 * n + k]), list(tensors[3 * n + k:])
        raw = [weights[i] for i in spec.normalized]
        sigmas = None
        if raw:
            normalized, sigmas = dense_ops.lipschitz_normalize_(raw, us, vs, spec.scales, spec.coeffs)
            for i, w in zip(spec.normalized, normalized):
                weights[i] = w
        g, logdet, value, w_tilde, hs, stacks, activated = dense_ops.dense_jacobian_forward(
            x, eps, weights, biases, betas, spec.logdet_coeffs, spec.neumann_coeffs)
        ctx.spec, ctx.biases, ctx.betas, ctx.sigmas = spec, biases, betas, sigmas
        ctx.cache = (w_tilde, weights, hs, stacks, activated)
        ctx.save_for_backward(*raw, *us, *vs)
        logdet = logdet.to(eps.dtype)
        ctx.mark_non_differentiable(logdet)
        return g, value.to(eps.dtype), logdet

    @staticmethod
    def backward(ctx, grad_g, grad_value, _grad_estimate):
        spec = ctx.spec
        n, k = spec.steps, len(spec.normalized)
        saved = ctx.saved_tensors
        raw, us, vs = list(saved[:k]), list(saved[k:2 * k]), list(saved[2 * k:])
        w_tilde, weights, hs, stacks, activated = ctx.cache
        if grad_value.numel() > 0 and any(p is not None and p.requires_grad for p in (*weights, *ctx.biases, *ctx.betas)):
            require_uniform_upstream(grad_value, grad_value.reshape(-1)[0])
        grad_x, grad_weights, grad_biases, grad_betas = dense_ops.dense_jacobian_backward(
            grad_g.contiguous(), grad_value, w_tilde, weights, ctx.biases, ctx.betas, hs, stacks, activated)
        if raw:
            through = dense_ops.lipschitz_normalize_backward([grad_weights[i] for i in spec.normalized], raw, us, vs,
                                                             ctx.sigmas, spec.coeffs, spec.detach)
            for i, g in zip(spec.normalized, through):
                grad_weights[i] = g
        ctx.cache = None
        biases = [None if b is None else gb for b, gb in zip(ctx.biases, grad_biases)]
        betas = [None if b is None else gb.reshape(b.shape) for b, gb in zip(ctx.betas, grad_betas)]
        return (None, grad_x, None, *grad_weights, *biases, *betas, *([None] * (2 * k)))
