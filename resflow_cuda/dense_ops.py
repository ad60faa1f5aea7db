"""The fused dense block's ops (``torch.ops.resflow_cuda``): typed wrappers and fake kernels, as
:mod:`resflow_cuda.ops` has them for the other ops (kept apart for its length).

A dense branch's forward-mode Jacobian stack (csrc/composite/dense_jacobian_block.cpp over the kernels of
csrc/include/resflow/dense_jacobian_math.h), its series and the backward of its Neumann surrogate, and the
Lipschitz weight normalization of many layers at once; float32 / float64. Not differentiable: the fused
block (:mod:`resflow_cuda.dense_block`) computes its gradients with them; with grad mode on, a tensor that
requires grad is refused in C++ (csrc/registration.cpp), which costs the block's no-grad calls nothing.
Opaque to autocast, like the linearized ops (the fused block runs without autocast only).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import _OPS, _accumulator_like, _without_autocast

__all__ = ["dense_jacobian_backward", "dense_jacobian_forward", "jacobian_series_backward", "lipschitz_normalize_",
           "lipschitz_normalize_backward"]


def dense_jacobian_forward(x: Tensor, eps: Tensor, weights: list[Tensor], biases: list[Tensor | None],
                           betas: list[Tensor | None], logdet_coeffs: list[float], neumann_coeffs: list[float]):
    """A dense branch of steps "LipSwish (``betas[i]`` its raw beta; None: no activation), then
    ``x @ weights[i].T + biases[i]``" at x (B, D), in forward mode with the probe eps and the D input
    directions. Returns ``(g, logdet, surrogate, w_tilde, hs, stacks, activated)``: g (B, D); the
    series sum_k logdet_coeffs[k] e^T J^k e and (with ``neumann_coeffs``) <w~^T J, e> per sample in the
    accumulation type; w~ = e + sum_k neumann_coeffs[k] e^T J^k; and, per step, what
    :func:`dense_jacobian_backward` needs: with ``neumann_coeffs`` only the rows its seed covers (h, the eps
    tangent's pre-activation, the first two activated blocks), without them the whole stacks and the last
    one (the basic estimator's seed reads it)."""
    return _OPS.dense_jacobian_forward(x, eps, weights, biases, betas, logdet_coeffs, neumann_coeffs)


def dense_jacobian_backward(seed: Tensor, weights: list[Tensor], biases: list[Tensor | None],
                            betas: list[Tensor | None], hs: list[Tensor], stacks: list[Tensor],
                            activated: list[Tensor]):
    """The gradient with respect to x, every weight, bias and raw beta (empty tensors where a step has none)
    of sum <seed, the first rows of the last stack>, through :func:`dense_jacobian_forward`'s stacks
    (``stacks[i]`` of an activation step: the whole input stack, or only its tangent rows that the seed
    covers; ``activated[i]``: at least the seed's rows):
    ``seed`` = [grad_g; grad_value w~] for the Neumann surrogate (w~ held constant), or
    :func:`jacobian_series_backward`'s for the basic estimator. Returns ``(grad_x, grad_weights,
    grad_biases, grad_betas)``."""
    return _OPS.dense_jacobian_backward(seed, weights, biases, betas, hs, stacks, activated)


def jacobian_series_backward(z: Tensor, eps: Tensor, logdet_coeffs: list[float], grad_logdet: Tensor,
                             grad_g: Tensor) -> Tensor:
    """The seed of :func:`dense_jacobian_backward` for the basic estimator sum_k logdet_coeffs[k] e^T J^k e
    differentiated through every term: ``grad_g`` on the primal rows of the last stack ``z``, 0 on the eps
    tangent, ``grad_logdet`` times d(estimate)/dJ on the Jacobian's rows."""
    return _OPS.jacobian_series_backward(z, eps, logdet_coeffs, grad_logdet, grad_g)


def lipschitz_normalize_(weights: list[Tensor], us: list[Tensor], vs: list[Tensor], scales: list[Tensor],
                         coeffs: list[float]) -> tuple[list[Tensor], Tensor]:
    """``weights[i] / max(1, sigma_i / coeffs[i])`` with sigma_i = u_i^T W_i v_i for every layer in one
    call; writes sigma_i into ``scales[i]``. Returns ``(normalized, sigmas)``."""
    out = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
    sigmas = (weights[0] if weights else torch.empty(0)).new_empty((len(weights),))
    _OPS.lipschitz_normalize_(weights, us, vs, coeffs, out, sigmas, scales)
    return out, sigmas


def lipschitz_normalize_backward(grads: list[Tensor], weights: list[Tensor], us: list[Tensor], vs: list[Tensor],
                                 sigmas: Tensor, coeffs: list[float], detach_sigma: list[bool]) -> list[Tensor]:
    """The gradients of the raw weights from those of :func:`lipschitz_normalize_`'s outputs, as
    autograd takes them through ``W / torch.max(ones(1), u^T W v / coeff)`` (u, v constant; sigma too
    where ``detach_sigma``)."""
    return _OPS.lipschitz_normalize_backward(grads, weights, us, vs, sigmas, coeffs, detach_sigma)


@torch.library.register_fake("resflow_cuda::jacobian_lipswish")
def _jacobian_lipswish_fake(z, bias, beta, batch, keep=False):
    kept = keep and batch > 0 and z.shape[0] >= 2 * batch
    return (z.new_empty((batch, z.shape[1])), torch.empty_like(z, memory_format=torch.contiguous_format),
            z.new_empty((2 * batch if kept else 0, z.shape[1])), z.new_empty((batch if kept else 0, z.shape[1])))


@torch.library.register_fake("resflow_cuda::jacobian_lipswish_backward")
def _jacobian_lipswish_backward_fake(grad, h, tangent, beta):
    return torch.empty_like(grad, memory_format=torch.contiguous_format), torch.empty_like(beta)


@torch.library.register_fake("resflow_cuda::jacobian_series")
def _jacobian_series_fake(z, bias, eps, logdet_coeffs, neumann_coeffs):
    batch, neumann = eps.shape[0], len(neumann_coeffs) > 0
    return (eps.new_empty(eps.shape), _accumulator_like(eps, batch), _accumulator_like(eps, batch if neumann else 0),
            eps.new_empty(eps.shape if neumann else (0,)))


@torch.library.register_fake("resflow_cuda::jacobian_series_backward")
def _jacobian_series_backward_fake(z, eps, logdet_coeffs, grad_logdet, grad_g):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@torch.library.register_fake("resflow_cuda::lipschitz_normalize_")
def _lipschitz_normalize_fake(weights, us, vs, coeffs, out, sigmas, scales):
    return None


@torch.library.register_fake("resflow_cuda::lipschitz_normalize_backward")
def _lipschitz_normalize_backward_fake(grads, weights, us, vs, sigmas, coeffs, detach_sigma):
    return [w.new_empty(w.shape) for w in weights]


@torch.library.register_fake("resflow_cuda::dense_jacobian_forward")
def _dense_jacobian_forward_fake(x, eps, weights, biases, betas, logdet_coeffs, neumann_coeffs):
    batch, dim = x.shape
    g, logdet, value, w_tilde = _jacobian_series_fake(x, None, eps, logdet_coeffs, neumann_coeffs)
    widths = [dim] + [w.shape[0] for w in weights[:-1]]
    rows = (2 + dim) * batch
    hs = [x.new_empty((batch, n)) for n in widths]
    if not neumann_coeffs:  # the basic estimator's backward reads the whole stacks
        return (g, logdet, value, w_tilde, hs, [x.new_empty((rows, n)) for n in widths + [dim]],
                [x.new_empty((rows, n)) for n in widths])
    # the Neumann surrogate's: per step the eps tangent's pre-activation (activation steps) and two blocks
    stacks = [x.new_empty((batch if beta is not None else 0, n)) for n, beta in zip(widths, betas)]
    return (g, logdet, value, w_tilde, hs, stacks + [x.new_empty((0, dim))],
            [x.new_empty((2 * batch, n)) for n in widths])


@torch.library.register_fake("resflow_cuda::dense_jacobian_backward")
def _dense_jacobian_backward_fake(seed, weights, biases, betas, hs, stacks, activated):
    return (seed.new_empty(hs[0].shape[0], seed.shape[1]), [w.new_empty(w.shape) for w in weights],
            [w.new_empty((w.shape[0],) if b is not None else (0,)) for w, b in zip(weights, biases)],
            [seed.new_empty(b.shape if b is not None else (0,)) for b in betas])


_AUTOCAST_LIBRARY = torch.library.Library("resflow_cuda", "IMPL")
for _name in ("dense_jacobian_forward", "dense_jacobian_backward"):
    for _key, _device in (("AutocastCPU", "cpu"), ("AutocastCUDA", "cuda")):
        _AUTOCAST_LIBRARY.impl(_name, _without_autocast(getattr(_OPS, _name).default, _device), _key)
