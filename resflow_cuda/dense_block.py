"""The fused dense block: a small dense residual branch's whole training step in a few op calls.

For a branch that :mod:`resflow_cuda.linearize` recognises, made of dense layers with LipSwish (or no)
activations, on inputs (B, D) with D <= :data:`MAX_DIM`, a training step of either estimator (the Neumann
estimator with or without backward-in-forward, normflows' ``Residual`` default; the basic estimator
differentiated through every term, the reference toy model's) runs as:

- forward: the weights of every layer that registered a ``normalization`` (this library's
  SpectralNormLinear / InducedNormLinear) are normalized in one op (``lipschitz_normalize_``, which also
  writes their ``scale`` buffers); then one op (``dense_jacobian_forward``) runs the branch in forward
  mode on a stack of 2 + D blocks of the batch (x, the probe eps and the D input directions), one
  matrix product and one fused bias + LipSwish + derivative kernel per layer, and takes every term of
  the series (and, for the Neumann estimator, w~ and the surrogate <w~^T J, eps>) from the Jacobians in
  one kernel;
- backward: one op (``dense_jacobian_backward``) takes g's gradient and the value's together back through
  the stacks from a seed: for the Neumann surrogate (w~ constant) the primal rows and the eps tangent
  only; for the basic estimator every block, seeded with d(estimate)/dJ by ``jacobian_series_backward``;
  two products and one fused kernel per layer; then one op the normalization's backward.

The draws, coefficients, values and gradients are the linearized path's (to rounding: the terms come
from the Jacobian instead of chained vector-Jacobian products). Memory held for the backward, whatever the
number of terms: per layer 4 times the branch's activations for the Neumann estimator (h, the eps tangent
and two activated blocks; 3 for a layer without activation; the D direction tangents live only inside the
forward op), 2 (2 + D) + 1 times for the basic estimator (whose backward runs through every block). With
backward-in-forward a
non-uniform upstream gradient of the log-det is refused (the block's documented behaviour), although
this backward would be exact for it. Its gradients are not differentiable again: a backward with
``create_graph=True`` raises (``fast_path=False`` keeps autograd's graph for that). Under autocast, for other
activations or shapes, the linearized path runs instead."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import dense_ops, ops
from .estimators import SeriesPlan, require_uniform_upstream
from .linearize import IDENTITY, LIPSWISH, LinearizedBranch

__all__ = ["MAX_DIM", "fused_estimate"]

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
    neumann_coeffs: list[float]  # empty: the basic estimator
    uniform_upstream: bool


def _eligible(branch: LinearizedBranch, x: Tensor) -> bool:
    # decided before any layer's forward side effects (a SpectralNorm layer's power iteration in training)
    return (branch.dense and x.dim() == 2 and 1 <= x.shape[1] <= MAX_DIM and x.shape[0] > 0
            and x.dtype in (torch.float32, torch.float64) and not ops.autocast_enabled(x.device.type)
            and all(step.activation in (IDENTITY, LIPSWISH) and getattr(step.layer, "weight", x).dtype == x.dtype
                    for step in branch.steps))


def fused_estimate(branch: LinearizedBranch, x: Tensor, eps: Tensor, plan: SeriesPlan, neumann: bool,
                   uniform_upstream: bool) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(g, value, estimate)`` of a training step on the fused block (module docstring), or None when the
    branch or x does not qualify.

    Args:
        branch: the linearized branch.
        x: the block's input (B, D).
        eps: the probe, like x.
        plan: the series' terms and coefficients.
        neumann: the Neumann estimator (value: the surrogate <w~^T J, eps>); else the basic estimator
            differentiated through every term (value: the estimate itself).
        uniform_upstream: refuse, in backward, an upstream gradient of the value that differs between
            samples while the branch has parameters (backward-in-forward's condition).

    Returns:
        g (B, D) and the value (B,) with their graphs to x and the branch's parameters, and the log-det
        estimate (B,) without graph.
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
    spec = _Spec(len(weights), normalized, coeffs, detach, scales, [plan.logdet_coeff(k) for k in range(1, n + 1)],
                 [plan.neumann_coeff(k) for k in range(1, n + 1)] if neumann else [], uniform_upstream)
    g, value, estimate = _FusedDenseBlock.apply(spec, x, eps, *weights, *biases, *betas, *us, *vs)
    return g, value, estimate if neumann else value.detach()


_NO_DOUBLE_BACKWARD = ("iResBlock: the fused dense block's gradients are not differentiable again (backward with "
                       "create_graph=True, e.g. a gradient penalty); build the block with fast_path=False to keep "
                       "autograd's graph through the log-det")


class _FusedDenseBlock(torch.autograd.Function):
    """forward(spec, x, eps, *weights, *biases, *betas, *us, *vs) -> (g, value, estimate) (estimate empty
    for the basic estimator, whose value is the estimate); see the module docstring."""

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
        ctx.cache = (eps, w_tilde, weights, hs, stacks, activated)
        ctx.save_for_backward(*raw, *us, *vs)
        ctx.set_materialize_grads(False)  # no zeros made for the estimate's gradient, which is never read
        logdet = logdet.to(eps.dtype)
        if not spec.neumann_coeffs:  # the basic estimator: the value is the estimate
            estimate = logdet.new_empty(0)
            ctx.mark_non_differentiable(estimate)
            return g, logdet, estimate
        ctx.mark_non_differentiable(logdet)
        return g, value.to(eps.dtype), logdet

    @staticmethod
    def backward(ctx, grad_g, grad_value, _grad_estimate):
        if torch.is_grad_enabled():  # create_graph: refused here, not left without a second derivative
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        spec = ctx.spec
        k = len(spec.normalized)
        saved = ctx.saved_tensors
        raw, us, vs = list(saved[:k]), list(saved[k:2 * k]), list(saved[2 * k:])
        eps, w_tilde, weights, hs, stacks, activated = ctx.cache
        if grad_g is None:  # only the log-det reached the loss
            grad_g = torch.zeros_like(eps)
        if grad_value is None:  # only g reached the loss
            grad_value = eps.new_zeros(eps.shape[0])
        if (spec.uniform_upstream and grad_value.numel() > 0
                and any(p is not None and p.requires_grad for p in (*weights, *ctx.biases, *ctx.betas))):
            require_uniform_upstream(grad_value, grad_value.reshape(-1)[0])
        grad_g = grad_g.contiguous()
        if spec.neumann_coeffs:
            seed = torch.cat([grad_g, w_tilde * grad_value.to(w_tilde.dtype).unsqueeze(1)])
        else:
            seed = dense_ops.jacobian_series_backward(stacks[-1], eps, spec.logdet_coeffs, grad_value, grad_g)
        grad_x, grad_weights, grad_biases, grad_betas = dense_ops.dense_jacobian_backward(
            seed, weights, ctx.biases, ctx.betas, hs, stacks, activated)
        if raw:
            through = dense_ops.lipschitz_normalize_backward([grad_weights[i] for i in spec.normalized], raw, us, vs,
                                                             ctx.sigmas, spec.coeffs, spec.detach)
            for i, g in zip(spec.normalized, through):
                grad_weights[i] = g
        ctx.cache = None
        biases = [None if b is None else gb for b, gb in zip(ctx.biases, grad_biases)]
        betas = [None if b is None else gb.reshape(b.shape) for b, gb in zip(ctx.betas, grad_betas)]
        return (None, grad_x, None, *grad_weights, *biases, *betas, *([None] * (2 * k)))
