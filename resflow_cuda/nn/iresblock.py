"""The invertible residual block of Residual Flows and i-ResNet."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .. import estimators as est
from ..estimators import HostCopies, check_block_input, check_estimator_args, record_statistics, series_plan
from ..linearize import fast_path_repr
from ..logdet import branch_estimate, branch_jacobian, exact_trace_logdet
from ..ops import autocast_disabled

__all__ = ["iResBlock", "InverseReport"]

logger = logging.getLogger(__name__)

EVAL_EXACT_TERMS = 20


@dataclass
class InverseReport:
    """How the fixed-point inverse ended: ``iterations`` run, whether every element met the
    tolerance, the largest remaining (x_k - x_{k-1})^2 / tol (< 1 means converged), and per sample
    the iteration at which it converged (-1: did not; only with ``inverse_per_sample``)."""

    iterations: int
    converged: bool
    max_residual: float
    sample_iterations: Tensor | None = None


class iResBlock(nn.Module):  # noqa: N801 (the reference's name)
    """Invertible residual block ``y = x + g(x)`` with an estimated log det(I + J_g(x)).

    Drop-in for residual-flows' ``iResBlock`` (and the ``iresblock`` of normflows' ``Residual``): the
    same arguments, defaults, state_dict and random draws. The log-det is exact for inputs (B, 2) in
    eval mode, else a Russian-roulette (unbiased) or truncated power-series estimate.
    Parity with the reference: docs/parity.md#iresblock

    Args:
        nnet: the residual branch g, with Lip(g) < 1 (e.g. Lipschitz layers and LipSwish).
        geom_p: success probability of the geometric number of terms N (stored as a float64 logit).
        lamb: rate of the Poisson number of terms, with ``n_dist="poisson"``.
        n_power_series: in training, that many terms (the biased i-ResNet series) instead of roulette.
        exact_trace: terms from the traces of the full Jacobian's powers (inputs (B, D)).
        brute_force: the exact determinant in training too (inputs (B, 2)).
        n_samples: draws of N per estimate (the series has max N + exact terms).
        n_exact_terms: terms always computed in training (eval: 20).
        n_dist: ``"geometric"`` or ``"poisson"``, the distribution of N.
        neumann_grad: in training, the Neumann-series gradient (memory independent of the number of
            terms) instead of differentiating through every term.
        grad_in_forward: backward-in-forward: compute the log-det's gradient in forward and free its graph.
        rng: ``"numpy"`` (NumPy's global RNG, the reference's draws) or ``"torch"`` (torch's RNG on x's device).
        logdet_estimate: return the log-det estimate instead of the Neumann estimator's surrogate (same gradient).
        inverse_atol: absolute tolerance of the fixed-point inverse, on the squared step
            (x_k - x_{k-1})^2 < atol + rtol |y|: 1e-12 gives an inverse accurate to about 1e-6.
        inverse_rtol: relative tolerance of the fixed-point inverse, on the squared step.
        inverse_max_iterations: iteration limit of the fixed-point inverse.
        inverse_per_sample: stop each sample once it has converged, not the whole batch.
        fast_path: run a branch of supported layers (:mod:`resflow_cuda.linearize`) in fused op calls
            (other branches take autograd VJPs; the block's ``repr`` says which and why).

    Shapes:
        x: (B, ...), at least 2 dims; (B, 2) with ``brute_force``, (B, D) with ``exact_trace``.
        logpx: (B, 1) or a scalar.
        y: like x; logdet: (B, 1).

    Returns:
        ``forward(x)``: ``y = x + g(x)``; ``forward(x, logpx)``: ``(y, logpx - logdet)``.
        ``inverse(y)``: ``x``; ``inverse(y, logpy)``: ``(x, logpy + logdet)``. After each call
        ``last_logdet_estimate`` (B, 1) holds the estimate and ``last_inverse_report`` an
        :class:`InverseReport`. Under ``torch.autocast`` only the branch's products are lowered: y and
        the log-det keep x's dtype (docs/parity.md#mixed-precision).

    Autograd: first order in x and the parameters (the log-det's gradient itself differentiates
    through the branch once more, which its layers must support).

    Example:
        >>> from resflow_cuda.nn import InducedNormLinear, LipSwish, iResBlock
        >>> net = nn.Sequential(InducedNormLinear(2, 32, coeff=0.9, n_iterations=5), LipSwish(),
        ...                     InducedNormLinear(32, 2, coeff=0.9, n_iterations=5))
        >>> block, x = iResBlock(net, inverse_atol=1e-12, inverse_rtol=1e-12), torch.randn(8, 2)
        >>> y, logpy = block(x, torch.zeros(8, 1))  # logpy = 0 - logdet, shape (8, 1)
        >>> torch.allclose(block.inverse(y), x, atol=1e-5)
        True
    """

    def __init__(self, nnet: nn.Module, geom_p: float = 0.5, lamb: float = 2., n_power_series: int | None = None,
                 exact_trace: bool = False, brute_force: bool = False, n_samples: int = 1, n_exact_terms: int = 2,
                 n_dist: str = "geometric", neumann_grad: bool = True, grad_in_forward: bool = False, *,
                 rng: str = "numpy", logdet_estimate: bool = False, inverse_atol: float = 1e-5,
                 inverse_rtol: float = 1e-5, inverse_max_iterations: int = 1000,
                 inverse_per_sample: bool = False, fast_path: bool = True) -> None:
        super().__init__()
        if not isinstance(nnet, nn.Module):
            raise TypeError(f"iResBlock: expected nnet to be an nn.Module, but got {type(nnet).__name__}")
        check_estimator_args("iResBlock", geom_p, lamb, n_dist, rng, n_power_series,
                             (("n_samples", n_samples, 1), ("n_exact_terms", n_exact_terms, 0),
                              ("inverse_max_iterations", inverse_max_iterations, 0)),
                             (("inverse_atol", inverse_atol), ("inverse_rtol", inverse_rtol)))
        self.nnet = nnet
        self.n_dist = n_dist
        self.geom_p = nn.Parameter(torch.tensor(np.log(geom_p) - np.log(1. - geom_p)))
        self.lamb = nn.Parameter(torch.tensor(lamb))
        self.n_samples = n_samples
        self.n_power_series = n_power_series
        self.exact_trace = exact_trace
        self.brute_force = brute_force
        self.n_exact_terms = n_exact_terms
        self.grad_in_forward = grad_in_forward
        self.neumann_grad = neumann_grad
        self.rng = rng
        self.logdet_estimate = logdet_estimate
        self.inverse_atol = inverse_atol
        self.inverse_rtol = inverse_rtol
        self.inverse_max_iterations = inverse_max_iterations
        self.inverse_per_sample = inverse_per_sample
        self.fast_path = fast_path
        self.last_logdet_estimate: Tensor | None = None
        self.last_inverse_report: InverseReport | None = None
        self.register_buffer("last_n_samples", torch.zeros(self.n_samples))
        self.register_buffer("last_firmom", torch.zeros(1))
        self.register_buffer("last_secmom", torch.zeros(1))

    def forward(self, x: Tensor, logpx: Tensor | float | None = None):
        check_block_input("iResBlock", "x", x, self.nnet)
        if x.dim() >= 2 and x.shape[0] == 0:
            return _empty_batch(x, logpx)
        if logpx is None:
            return x + self.nnet(x)
        g, logdet = self._logdetgrad(x)
        return x + g, logpx - logdet

    def inverse(self, y: Tensor, logpy: Tensor | float | None = None):
        check_block_input("iResBlock.inverse", "y", y, self.nnet)
        if y.dim() >= 2 and y.shape[0] == 0:
            return _empty_batch(y, logpy)
        # The fixed-point iteration in y's dtype also under autocast: in 16 bits g's rounding (2^-9 |g|
        # for bfloat16) lies above the iteration's tolerances (docs/parity.md#mixed-precision).
        with autocast_disabled(y):
            x = self._inverse_fixed_point(y)
        if logpy is None:
            return x
        return x, logpy + self._logdetgrad(x)[1]

    # -- inverse -----------------------------------------------------------------------------

    def _inverse_fixed_point(self, y: Tensor) -> Tensor:
        if not bool(torch.isfinite(y).all()):
            raise ValueError("iResBlock.inverse: y contains NaN or Inf; the fixed-point iteration cannot converge")
        tol = self.inverse_atol + y.abs() * self.inverse_rtol
        x, x_prev = y - self.nnet(y), y
        if self.inverse_per_sample:
            return self._inverse_per_sample(y, x, x_prev, tol)
        i = 0
        while True:
            residual = (x - x_prev) ** 2 / tol
            if bool(torch.all(residual < 1)):
                break
            if i > self.inverse_max_iterations:
                break
            x, x_prev = y - self.nnet(x), x
            i += 1
        self._report_inverse(InverseReport(i, bool(torch.all(residual < 1)), _max_or_zero(residual)))
        return x

    def _inverse_per_sample(self, y: Tensor, x: Tensor, x_prev: Tensor, tol: Tensor) -> Tensor:
        batch = y.shape[0]
        done_at = torch.full((batch,), -1, dtype=torch.int64, device=y.device)
        residual = ((x - x_prev) ** 2 / tol).reshape(batch, -1)
        i = 0
        while True:
            converged = (residual < 1).all(1)
            done_at = torch.where(converged & (done_at < 0), torch.full_like(done_at, i), done_at)
            active = (~converged).nonzero().reshape(-1)
            if active.numel() == 0 or i > self.inverse_max_iterations:
                break
            x_active = y[active] - self.nnet(x[active])
            step = ((x_active - x[active]) ** 2 / tol[active]).reshape(active.numel(), -1)
            x = x.index_copy(0, active, x_active)
            residual = residual.index_copy(0, active, step)
            i += 1
        self._report_inverse(InverseReport(i, bool(converged.all()), _max_or_zero(residual), done_at))
        return x

    def _report_inverse(self, report: InverseReport) -> None:
        self.last_inverse_report = report
        if not report.converged:
            message = (f"iResBlock.inverse did not converge in {report.iterations} iterations "
                       f"(max (dx)^2/tol = {report.max_residual:.3g}, needs < 1). If this persists the branch may "
                       f"not be contractive (Lip(g) >= 1): check resflow_cuda.lipschitz_report(block), or raise "
                       f"inverse_max_iterations.")
            logger.info(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    # -- log-det -----------------------------------------------------------------------------

    def _logdetgrad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """g(x) and the log-det (B, 1) per the reference's decision tree (class docstring)."""
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise ValueError(f"iResBlock: expected x to be a tensor of shape (B, ...) with at least 2 dimensions, "
                             f"but got {getattr(x, 'shape', type(x).__name__)}")
        with torch.enable_grad():
            is_2d = x.dim() == 2 and x.shape[1] == 2
            if self.brute_force and not is_2d:
                raise ValueError(f"iResBlock(brute_force=True): the exact determinant needs inputs of shape (B, 2), "
                                 f"but got {list(x.shape)}")
            if (self.brute_force or not self.training) and is_2d:
                g, jac = branch_jacobian(self.nnet, x, self.fast_path)
                det = (jac[:, 0, 0] + 1) * (jac[:, 1, 1] + 1) - jac[:, 0, 1] * jac[:, 1, 0]
                return g, torch.log(torch.abs(det)).view(-1, 1)

            plan = self._plan(x)
            if self.exact_trace:
                g, value = self._exact_trace(x, plan)
                estimate = value
            else:
                # Drawn in x's logical order whatever its layout (channels_last too): the same probe,
                # hence the same estimate, as for the contiguous x (for which it is the reference's draw).
                eps = torch.randn_like(x, memory_format=torch.contiguous_format)
                g, value, estimate = self._estimate(x, eps, plan)
            self.last_logdet_estimate = estimate.detach().view(-1, 1)
            if self.logdet_estimate and self.training and self.neumann_grad and not self.exact_trace:
                value = estimate.detach() + (value - value.detach())

            if self.training and self.n_power_series is None:
                record_statistics(self.last_n_samples, self.last_firmom, self.last_secmom, plan, value)
            return g, value.view(-1, 1)

    def _plan(self, x: Tensor) -> est.SeriesPlan:
        offset = self.n_exact_terms if self.training else EVAL_EXACT_TERMS
        return series_plan(self.training, self.n_power_series, offset, self.n_dist, self.geom_p, self.lamb,
                           self.n_samples, self.rng, x.device, self.__dict__.setdefault("_host_copies", HostCopies()))

    def _exact_trace(self, x: Tensor, plan: est.SeriesPlan) -> tuple[Tensor, Tensor]:
        if x.dim() != 2:
            raise ValueError(f"iResBlock(exact_trace=True): needs inputs of shape (B, D), but got {list(x.shape)}")
        return exact_trace_logdet(self.nnet, x, plan, self.fast_path)

    def _estimate(self, x: Tensor, eps: Tensor, plan: est.SeriesPlan) -> tuple[Tensor, Tensor, Tensor]:
        return branch_estimate(self.nnet, x, eps, plan, training=self.training, neumann_grad=self.neumann_grad,
                               grad_in_forward=self.grad_in_forward, fast_path=self.fast_path)

    def extra_repr(self) -> str:
        return (f"dist={self.n_dist}, n_samples={self.n_samples}, n_power_series={self.n_power_series}, "
                f"neumann_grad={self.neumann_grad}, exact_trace={self.exact_trace}, brute_force={self.brute_force}, "
                f"{fast_path_repr(self.fast_path, nnet=self.nnet)}")


def _empty_batch(x: Tensor, logp: Tensor | float | None):
    """The result of a block on an empty batch: an empty output like x and, with logp, logp minus a
    (0, 1) log-det; the branch is not run (no sample to run it on)."""
    y = x.clone()
    return y if logp is None else (y, logp - x.new_zeros(0, 1))


def _max_or_zero(t: Tensor) -> float:
    return float(t.detach().max()) if t.numel() else 0.0
