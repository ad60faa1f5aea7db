"""A block's log-det: plan -> estimate / Jacobian / exact, on the linearized fast path or by autograd.

What :class:`resflow_cuda.nn.iResBlock` and :class:`resflow_cuda.nn.ImplicitBlock` call, once per
branch and forward: the branch's output g(x) and its log det(I + J_g(x)) term, by the estimators of
:mod:`resflow_cuda.estimators` over the VJP source that :mod:`resflow_cuda.linearize` gives for a
branch made of supported layers (else autograd), or from the full Jacobian.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import estimators as est
from . import ops
from .dense_block import fused_estimate
from .linearize import linearize

__all__ = ["branch_estimate", "branch_jacobian", "exact_trace_logdet", "logdet_exact"]


def branch_jacobian(nnet: nn.Module, x: Tensor, fast_path: bool) -> tuple[Tensor, Tensor]:
    """(g, J): the branch's output at x (B, D) and its Jacobians (B, D, D), with graph; forward mode
    through the linearized branch when ``fast_path`` and it is a dense one, else D autograd passes."""
    x = x.requires_grad_(True)
    fast = linearize(nnet) if fast_path else None
    if fast is not None and fast.dense:
        return fast.jacobian(x)
    g = nnet(x)
    return g, est.batch_jacobian(g, x)


def exact_trace_logdet(nnet: nn.Module, x: Tensor, plan: est.SeriesPlan,
                       fast_path: bool = True) -> tuple[Tensor, Tensor]:
    """(g, sum_k (-1)^(k+1)/k c_k tr(J^k)) from the full Jacobian of ``nnet`` at x (B, D), with graph."""
    g, jac = branch_jacobian(nnet, x, fast_path)
    logdet = est.batch_trace(jac)
    jac_k = jac
    with ops.autocast_disabled(jac):  # the powers in J's dtype, float32 under autocast
        for k in range(2, plan.n_terms + 1):
            jac_k = torch.bmm(jac, jac_k)
            logdet = logdet + plan.logdet_coeff(k) * est.batch_trace(jac_k)
    return g, logdet


def branch_estimate(nnet: nn.Module, x: Tensor, eps: Tensor, plan: est.SeriesPlan, *, training: bool,
                    neumann_grad: bool, grad_in_forward: bool, fast_path: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(g, value, estimate) of log det(I + J_g(x)) for the branch ``nnet`` with probe ``eps``: the basic
    or (in training with ``neumann_grad``) the Neumann estimator, with or without backward-in-forward;
    on the linearized fast path when ``fast_path`` and the branch qualifies. ``value`` carries the
    gradient (the Neumann surrogate in training), ``estimate`` is the log-det estimate (no graph)."""
    neumann = training and neumann_grad
    fast = linearize(nnet) if fast_path else None

    def branch(x_in: Tensor, create_graph: bool):
        if fast is not None and (neumann or not create_graph):
            return fast(x_in)
        if fast is not None and fast.dense and x_in.dim() == 2 and x_in.shape[1] < plan.n_terms:
            g, jac = fast.jacobian(x_in)  # the basic estimator differentiated through every term
            return g, est.JacobianVJP(g, x_in, jac)
        g = nnet(x_in)
        return g, est.AutogradVJP(g, x_in)

    if training and fast is not None:
        fused = fused_estimate(fast, x, eps, plan, neumann, grad_in_forward)
        if fused is not None:
            return fused
    if training and grad_in_forward:
        params = list(nnet.parameters())

        def run(x_leaf: Tensor):
            g, source = branch(x_leaf, True)
            trainable = [p for p in params if p.requires_grad]
            if neumann:
                logdet, w_tilde = source.series(eps, plan, neumann=True, surrogate=False)
                value, grads = source.surrogate_and_grads(w_tilde, eps, trainable)
            else:
                value = est.basic_estimator(source, eps, plan, create_graph=True)
                logdet = value.detach()
                grads = est.grads_or_none(value, [x_leaf, *trainable])
            grads = iter(grads)
            grad_x = next(grads)
            grad_x = torch.zeros_like(x_leaf) if grad_x is None else grad_x
            return g, value, logdet, grad_x, [next(grads) if p.requires_grad else None for p in params]

        return est.MemoryEfficientLogDet.apply(run, x, *params)
    x = x.requires_grad_(True)
    g, source = branch(x, training)
    if neumann:
        value, logdet = est.neumann_estimator(source, eps, plan)
    else:
        value = est.basic_estimator(source, eps, plan, training)
        logdet = value.detach()
    return g, value, logdet


def logdet_exact(block: nn.Module, x: Tensor) -> Tensor:
    """The exact log|det(I + J_g(x))| of a residual block per sample, from the full Jacobian.

    One autograd pass per input element: for small inputs, evaluation and tests.

    Args:
        block: an :class:`~resflow_cuda.nn.iResBlock` (or anything with an ``nnet`` module g).
        x: the input.

    Shapes:
        x: (B, ...), any shape with at least 2 dims; output: (B, 1).

    Returns:
        The log-determinants, without graph.

    Example:
        >>> from resflow_cuda import logdet_exact
        >>> from resflow_cuda.nn import InducedNormLinear, LipSwish, iResBlock
        >>> block = iResBlock(nn.Sequential(LipSwish(), InducedNormLinear(3, 3, n_iterations=5))).eval()
        >>> logdet_exact(block, torch.randn(4, 3)).shape
        torch.Size([4, 1])
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"logdet_exact: expected x to be a tensor of shape (B, ...) with at least 2 dimensions, "
                         f"but got {getattr(x, 'shape', type(x).__name__)}")
    nnet = getattr(block, "nnet", None)
    if not isinstance(nnet, nn.Module):
        raise TypeError(f"logdet_exact: expected block to have an nnet module (an iResBlock), "
                        f"but got {type(block).__name__}")
    batch, dim = x.shape[0], x[0].numel()
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        g = nnet(x_in).reshape(batch, dim)
        rows = [torch.autograd.grad(g[:, d].sum(), x_in, retain_graph=True)[0].reshape(batch, dim)
                for d in range(dim)]
    jac = torch.stack(rows, 1) if rows else x.new_zeros(batch, 0, 0)
    eye = torch.eye(dim, dtype=jac.dtype, device=jac.device)
    return torch.linalg.slogdet(eye + jac).logabsdet.view(-1, 1)
