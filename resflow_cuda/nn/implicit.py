"""The implicit block of ImpFlow (Lu et al., ICLR 2021): z + g_z(z) = x + g_x(x)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..estimators import HostCopies, check_block_input, check_estimator_args, record_statistics, series_plan
from ..linearize import fast_path_repr
from ..logdet import branch_estimate, branch_jacobian, exact_trace_logdet
from ..ops import autocast_disabled
from ..solvers import SOLVE_EVENT, RootReport, find_root

__all__ = ["ImplicitBlock"]

logger = logging.getLogger(__name__)

BRUTE_FORCE_MAX_DIM = 10


class ImplicitBlock(nn.Module):
    """Implicit invertible block (ImpFlow): ``forward(x)`` is the z with z + g_z(z) = x + g_x(x).

    Drop-in for ImpFlow's ``imBlock``: the same arguments, defaults, state_dict and random draws.
    z is found by Broyden's method (fixed-point iteration if it diverges, :mod:`resflow_cuda.solvers`)
    and differentiated implicitly, so memory does not grow with the solver's steps; the log-det is
    estimated as in :class:`~resflow_cuda.nn.iResBlock`, or exact for inputs (B, D <= 10) in eval mode.
    Parity with the reference: docs/parity.md#implicitblock

    Args:
        nnet_x: the branch g_x of the input, with Lip(g_x) < 1.
        nnet_z: the branch g_z of the output, with Lip(g_z) < 1 (a second module, not nnet_x).
        geom_p: success probability of the geometric number of terms N (a float32 logit, not in the state_dict).
        lamb: rate of the Poisson number of terms, with ``n_dist="poisson"``.
        n_power_series: in training, that many terms (biased) instead of Russian roulette.
        exact_trace: terms from the traces of the full Jacobians' powers (inputs (B, D)).
        brute_force: the exact determinants in training too (inputs (B, D) with D <= 10).
        n_samples: draws of N per estimate.
        n_exact_terms: terms always computed in training.
        n_exact_terms_test: terms always computed in eval.
        n_dist: ``"geometric"`` or ``"poisson"``, the distribution of N.
        neumann_grad: in training, the Neumann-series gradient instead of differentiating every term.
        grad_in_forward: backward-in-forward: compute the log-det's gradient in forward and free its graph.
        eps_forward: tolerance of the forward solve: ||x + g_x(x) - z - g_z(z)|| over the batch
            < eps_forward * sqrt(numel).
        eps_backward: tolerance of the backward (adjoint) solve.
        eps_sample: tolerance of the inverse solve.
        threshold: step limit of Broyden's method.
        rng: ``"numpy"`` (the reference's draws; probes on the CPU) or ``"torch"`` (torch's RNG on x's device).
        fast_path: run branches of supported layers (:mod:`resflow_cuda.linearize`) in fused op calls
            (other branches take autograd VJPs; the block's ``repr`` says which and why).
        fallback_steps: step limit of the fixed-point fallback.

    Shapes:
        x, z: (B, ...), at least 2 dims; (B, D) with ``exact_trace`` or ``brute_force``.
        logpx, logpz: (B, 1) or a scalar; logdet = log det(I + J_gx(x)) - log det(I + J_gz(z)): (B, 1).

    Returns:
        ``forward(x)``: ``z``; ``forward(x, logpx)``: ``(z, logpx - logdet)``.
        ``inverse(z)``: ``x``; ``inverse(z, logpz)``: ``(x, logpz + logdet)``. After every solve
        ``last_forward_report``, ``last_inverse_report`` or ``last_backward_report`` holds a
        :class:`~resflow_cuda.solvers.RootReport`; an unconverged forward or inverse solve warns.

    Autograd: first order in the input and the parameters (implicit gradients, forward and inverse).

    Example:
        >>> from resflow_cuda.nn import ImplicitBlock, InducedNormLinear, LipSwish
        >>> def mlp(): return nn.Sequential(InducedNormLinear(2, 16, n_iterations=5), LipSwish(),
        ...                                 InducedNormLinear(16, 2, n_iterations=5))
        >>> block, x = ImplicitBlock(mlp(), mlp()), torch.randn(8, 2)
        >>> z, logpz = block(x, torch.zeros(8, 1))
        >>> torch.allclose(z + block.nnet_z(z), x + block.nnet_x(x), atol=1e-4)
        True
    """

    def __init__(self, nnet_x: nn.Module, nnet_z: nn.Module, geom_p: float = 0.5, lamb: float = 2.,
                 n_power_series: int | None = None, exact_trace: bool = False, brute_force: bool = False,
                 n_samples: int = 1, n_exact_terms: int = 2, n_exact_terms_test: int = 20, n_dist: str = "geometric",
                 neumann_grad: bool = True, grad_in_forward: bool = True, eps_forward: float = 1e-6,
                 eps_backward: float = 1e-10, eps_sample: float = 1e-5, threshold: int = 30, *, rng: str = "numpy",
                 fast_path: bool = True, fallback_steps: int = 1000) -> None:
        super().__init__()
        for name, net in (("nnet_x", nnet_x), ("nnet_z", nnet_z)):
            if not isinstance(net, nn.Module):
                raise TypeError(f"ImplicitBlock: expected {name} to be an nn.Module, but got {type(net).__name__}")
        if nnet_x is nnet_z:
            raise ValueError("ImplicitBlock: nnet_x and nnet_z must be two modules (got the same module twice); "
                             "with g_x = g_z the block is the identity")
        check_estimator_args("ImplicitBlock", geom_p, lamb, n_dist, rng, n_power_series,
                             (("n_samples", n_samples, 1), ("n_exact_terms", n_exact_terms, 0),
                              ("n_exact_terms_test", n_exact_terms_test, 0), ("threshold", threshold, 0),
                              ("fallback_steps", fallback_steps, 0)),
                             (("eps_forward", eps_forward), ("eps_backward", eps_backward), ("eps_sample", eps_sample)))
        self.nnet_x = nnet_x
        self.nnet_z = nnet_z
        self.n_dist = n_dist
        self.geom_p = torch.tensor(np.log(geom_p) - np.log(1. - geom_p)).float()
        self.lamb = nn.Parameter(torch.tensor(lamb))
        self.n_samples = n_samples
        self.n_power_series = n_power_series
        self.exact_trace = exact_trace
        self.brute_force = brute_force
        self.n_exact_terms = n_exact_terms
        self.n_exact_terms_test = n_exact_terms_test
        self.grad_in_forward = grad_in_forward
        self.neumann_grad = neumann_grad
        self.eps_forward = eps_forward
        self.eps_backward = eps_backward
        self.eps_sample = eps_sample
        self.threshold = int(threshold)
        self.rng = rng
        self.fast_path = fast_path
        self.fallback_steps = int(fallback_steps)
        self.last_logdet_estimate: Tensor | None = None
        self.last_forward_report: RootReport | None = None
        self.last_inverse_report: RootReport | None = None
        self.last_backward_report: RootReport | None = None
        self.register_buffer("last_n_samples", torch.zeros(self.n_samples))
        self.register_buffer("last_firmom", torch.zeros(1))
        self.register_buffer("last_secmom", torch.zeros(1))

    def forward(self, x: Tensor, logpx: Tensor | float | None = None, restore: bool = False):
        """x -> z, or (z, logpx - logdet) with ``logpx``. ``restore`` has no effect (the reference's
        calling convention; docs/parity.md#implicitblock)."""
        z = self._solve(x, self.nnet_x, self.nnet_z, self.eps_forward, "forward")
        if logpx is None:
            return z
        return z, logpx - self._logdetgrad(x, z)

    def inverse(self, z: Tensor, logpz: Tensor | float | None = None):
        """z -> x, or (x, logpz + logdet)."""
        x = self._solve(z, self.nnet_z, self.nnet_x, self.eps_sample, "inverse")
        if logpz is None:
            return x
        return x, logpz + self._logdetgrad(x, z)

    # -- solves ------------------------------------------------------------------------------

    def _solve(self, given: Tensor, net_given: nn.Module, net_sought: nn.Module, eps: float, direction: str) -> Tensor:
        """The s with s + net_sought(s) = given + net_given(given), differentiable implicitly."""
        if not isinstance(given, Tensor) or given.dim() < 2:
            raise ValueError(f"ImplicitBlock.{direction}: expected a tensor of shape (B, ...) with at least 2 "
                             f"dimensions, but got {getattr(given, 'shape', type(given).__name__)}")
        check_block_input(f"ImplicitBlock.{direction}", "x" if direction == "forward" else "z", given, net_given)
        if given.shape[0] == 0:  # an empty batch: an empty result; nothing to solve, no branch run
            return given.clone()
        # The solve's own read, before any branch runs on the input: a NaN / Inf cannot be solved, and a
        # branch's state (a BatchNorm's running statistics, a layer's lazily set buffers) must not see it.
        with torch.profiler.record_function(SOLVE_EVENT):
            finite = bool(torch.isfinite(given.detach()).all())
        if not finite:
            raise ValueError(f"ImplicitBlock.{direction}: the input contains NaN or Inf; the root finder cannot "
                             f"converge")
        # The solve in the input's dtype also under autocast: in 16 bits g's rounding (2^-9 |g| for
        # bfloat16) lies above the solver's tolerances (docs/parity.md#mixed-precision).
        with torch.no_grad(), autocast_disabled(given):
            g_given = net_given(given)
            target = given + g_given
            root, report = find_root(lambda s: target - net_sought(s), given, self.threshold, eps,
                                     self.fallback_steps)
        self._report(direction, report)
        if not torch.is_grad_enabled():
            return (g_given - net_sought(root)) + given
        fixed = given.detach()
        out = (net_given(fixed) - net_sought(root)) + fixed
        if not (out.requires_grad or given.requires_grad):
            return out
        return _ImplicitGradient.apply(out, given, root, self, net_given, net_sought)

    def _report(self, direction: str, report: RootReport) -> None:
        setattr(self, f"last_{direction}_report", report)
        if report.converged:
            return
        message = (f"ImplicitBlock {direction} solve did not converge: {report.method}, {report.iterations} steps, "
                   f"residual {report.residual:.3g} (tolerance {report.tolerance:.3g}), "
                   f"{int((~report.sample_converged).sum())} of {report.sample_converged.numel()} samples above it. "
                   f"Raise threshold or eps, or check that both branches are contractive "
                   f"(resflow_cuda.lipschitz_report(block)).")
        logger.info(message)
        if direction != "backward":
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    # -- log-det -----------------------------------------------------------------------------

    def _logdetgrad(self, x: Tensor, z: Tensor) -> Tensor:
        """log|det dz/dx| per sample, shape (B, 1) (class docstring)."""
        if x.shape[0] == 0:
            return x.new_zeros(0, 1)
        with torch.enable_grad():
            small = x.dim() == 2 and x.shape[1] <= BRUTE_FORCE_MAX_DIM
            if (self.brute_force or not self.training) and small:
                return (_logdet_full(self.nnet_x, x, self.fast_path)
                        - _logdet_full(self.nnet_z, z, self.fast_path)).view(-1, 1)
            if self.brute_force:
                raise ValueError(f"ImplicitBlock(brute_force=True): the exact determinant needs inputs of shape "
                                 f"(B, D) with D <= {BRUTE_FORCE_MAX_DIM}, but got {list(x.shape)}")
            offset = self.n_exact_terms if self.training else self.n_exact_terms_test
            plan = series_plan(self.training, self.n_power_series, offset, self.n_dist, self.geom_p, self.lamb,
                               self.n_samples, self.rng, x.device, self.__dict__.setdefault("_host_copies",
                                                                                           HostCopies()))
            if self.exact_trace:
                if x.dim() != 2:
                    raise ValueError(f"ImplicitBlock(exact_trace=True): needs inputs of shape (B, D), "
                                     f"but got {list(x.shape)}")
                value = (exact_trace_logdet(self.nnet_x, x, plan, self.fast_path)[1]
                         - exact_trace_logdet(self.nnet_z, z, plan, self.fast_path)[1])
                estimate = value.detach()
            else:
                eps_x, eps_z = self._probe(x), self._probe(z)
                options = dict(training=self.training, neumann_grad=self.neumann_grad,
                               grad_in_forward=self.grad_in_forward, fast_path=self.fast_path)
                _, value_x, estimate_x = branch_estimate(self.nnet_x, x, eps_x, plan, **options)
                _, value_z, estimate_z = branch_estimate(self.nnet_z, z, eps_z, plan, **options)
                value, estimate = value_x - value_z, estimate_x - estimate_z
            self.last_logdet_estimate = estimate.detach().view(-1, 1)
            if self.training and self.n_power_series is None:
                record_statistics(self.last_n_samples, self.last_firmom, self.last_secmom, plan, value)
            return value.view(-1, 1)

    def _probe(self, like: Tensor) -> Tensor:
        """A Rademacher probe: the reference's draw (Bernoulli(0.5) on the CPU) or, with rng="torch",
        drawn on like's device."""
        if self.rng == "numpy":
            draw = torch.bernoulli(torch.tensor([0.5]).expand(*like.shape, 1)).reshape(like.shape)
            return draw.to(like) * 2 - 1
        return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for copy in ("nnet_x_copy.", "nnet_z_copy."):
            for key in [k for k in state_dict if k.startswith(prefix + copy)]:
                del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"dist={self.n_dist}, n_samples={self.n_samples}, n_power_series={self.n_power_series}, "
                f"neumann_grad={self.neumann_grad}, exact_trace={self.exact_trace}, brute_force={self.brute_force}, "
                f"grad_in_forward={self.grad_in_forward}, threshold={self.threshold}, "
                f"{fast_path_repr(self.fast_path, nnet_x=self.nnet_x, nnet_z=self.nnet_z)}")


def _logdet_full(nnet: nn.Module, x: Tensor, fast_path: bool) -> Tensor:
    """log det(I + J_g(x)) per sample from the full Jacobian of ``nnet`` at x (B, D), with graph
    (``torch.logdet``: NaN for a negative determinant, as the reference)."""
    jac = branch_jacobian(nnet, x, fast_path)[1]
    return torch.logdet(jac + torch.eye(x.shape[1], dtype=jac.dtype, device=jac.device))


class _ImplicitGradient(torch.autograd.Function):
    """forward(out, given, root, block, net_given, net_sought) -> out (the value at the root, whose
    graph reaches the parameters). backward: u solving u^T (I + J_sought(root)) = grad by the block's
    solver; u goes to ``out`` (parameters get u^T d(g_given - g_sought)/dtheta) and
    u^T (I + J_given(given)) to ``given``."""

    @staticmethod
    def forward(ctx, out, given, root, block, net_given, net_sought):
        ctx.save_for_backward(given, root)
        ctx.block, ctx.net_given, ctx.net_sought = block, net_given, net_sought
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        given, root = ctx.saved_tensors
        with autocast_disabled(grad):  # as the forward solve
            return _ImplicitGradient._adjoint(ctx, grad, given, root)

    @staticmethod
    def _adjoint(ctx, grad, given, root):
        block = ctx.block
        with torch.enable_grad():
            leaf = root.detach().requires_grad_(True)
            g_root = ctx.net_sought(leaf)

        def adjoint_map(w: Tensor) -> Tensor:
            return grad - torch.autograd.grad(g_root, leaf, w, retain_graph=True)[0]

        u, report = find_root(adjoint_map, grad, block.threshold, block.eps_backward, block.fallback_steps)
        block._report("backward", report)
        grad_given = None
        if ctx.needs_input_grad[1]:
            with torch.enable_grad():
                leaf_given = given.detach().requires_grad_(True)
                g_given = ctx.net_given(leaf_given)
            grad_given = u + torch.autograd.grad(g_given, leaf_given, u)[0]
        return u, grad_given, None, None, None, None
