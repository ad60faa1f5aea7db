"""Log-det estimators of invertible residual blocks y = x + g(x) (Chen et al., 2019).

The math in Python: which series terms, which coefficients, which gradient path. The vector-Jacobian
products come from a *VJP source*: :class:`AutogradVJP` (any branch, one ``autograd.grad`` per term)
or the linearized branches of :mod:`resflow_cuda.linearize` (the whole series in one op call).
Either way the per-sample terms and the Neumann vector are accumulated by the fused op
``resflow_cuda.ops.logdet_series_accumulate_``.

Reference semantics (residual-flows ``resflows/layers/iresblock.py``, normflows'
``flows/residual.py``):

- Russian roulette: N_1..N_S drawn from NumPy's global RNG (geometric, support {1, 2, ...}, or
  Poisson), n = max N + m terms, c_k = #{s: N_s >= k - m} / S / P(N >= k - m) (1 for k <= m);
  log det(I + J) ~ sum_k (-1)^(k+1)/k c_k e^T J^k e with one Gaussian probe e.
- basic estimator: the sum above (differentiated through every term in training).
- Neumann estimator (training only): w~ = e + sum_k (-1)^k c_k e^T J^k, then the value
  s = <w~^T J, e>, whose gradient with w~ held constant is the Neumann-series gradient. The value
  is a surrogate, not a log-det estimate; the estimate from the same terms is returned beside it.
- backward-in-forward (:class:`MemoryEfficientLogDet`): the series and its gradient are computed
  and freed inside forward; backward scales the saved gradients by the upstream gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from . import ops, step_ops

__all__ = [
    "SeriesPlan", "AutogradVJP", "JacobianVJP", "geometric_survival", "poisson_survival", "draw_terms", "roulette_plan",
    "truncated_plan", "HostCopies", "series_plan", "check_estimator_args", "check_block_input", "series_terms",
    "basic_estimator", "neumann_estimator",
    "MemoryEfficientLogDet", "require_uniform_upstream", "batch_jacobian", "batch_trace", "grads_or_none",
]

DISTRIBUTIONS = ("geometric", "poisson")
RNGS = ("numpy", "torch")


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_estimator_args(owner: str, geom_p: float, lamb: float, n_dist: str, rng: str, n_power_series,
                         integers, tolerances=()) -> None:
    """The argument checks of the log-det estimator that iResBlock and ImplicitBlock share; ``integers``
    holds (name, value, least) for the block's integer arguments (bools are refused), ``tolerances``
    (name, value) for its solver tolerances (finite numbers > 0)."""
    if not _is_number(geom_p) or not 0 < geom_p < 1:
        raise ValueError(f"{owner}: expected geom_p in (0, 1), but got {geom_p!r}")
    if not _is_number(lamb) or not 0 < lamb < math.inf:
        raise ValueError(f"{owner}: expected lamb > 0 and finite, but got {lamb!r}")
    for name, value in tolerances:
        if not (_is_number(value) and math.isfinite(value) and value > 0):
            raise ValueError(f"{owner}: expected {name} to be a finite number > 0, but got {value!r}")
    if n_dist not in DISTRIBUTIONS:
        raise ValueError(f"{owner}: expected n_dist to be one of {DISTRIBUTIONS}, but got {n_dist!r}")
    if rng not in RNGS:
        raise ValueError(f"{owner}: expected rng to be one of {RNGS}, but got {rng!r}")
    for name, value, least in integers:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise ValueError(f"{owner}: expected {name} to be an integer >= {least}, but got {value!r}")
    if n_power_series is not None and (not isinstance(n_power_series, (int, np.integer)) or n_power_series < 1):
        raise ValueError(f"{owner}: expected n_power_series to be None or an integer >= 1, but got {n_power_series!r}")


def check_block_input(owner: str, name: str, x, module: torch.nn.Module) -> None:
    """The entry check of the flow blocks and layers: ``x`` a floating-point tensor on the device of
    ``module``'s first floating-point parameter and, outside autocast, of its dtype (no silent cast;
    under autocast the products run in the autocast dtype and x may be 16-bit). Raises TypeError
    for a wrong type or dtype, ValueError for a wrong device; nothing for a module without
    parameters."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: expected {name} to be a tensor, but got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: expected {name} to have a floating-point dtype (torch.float32, torch.float64, "
                        f"torch.float16 or torch.bfloat16), but got {x.dtype}")
    for param in module.parameters():
        if param.is_floating_point():
            break
    else:
        return
    if x.device != param.device:
        raise ValueError(f"{owner}: expected {name} on the device of the parameters ({param.device}), but got "
                         f"{x.device}; move one of them (.to(device))")
    if x.dtype != param.dtype and not ops.autocast_enabled(x.device.type):
        raise TypeError(f"{owner}: expected {name} to have the dtype of the parameters ({param.dtype}), but got "
                        f"{x.dtype}; convert the input or the module (.to(dtype))")


def geometric_survival(p: float, j: int) -> float:
    """P(N >= j) for N ~ Geometric(p) on {1, 2, ...} (NumPy's convention); 1 for j <= 1."""
    return (1 - p) ** max(j - 1, 0)


def poisson_survival(lamb: float, j: int) -> float:
    """P(N >= j) for N ~ Poisson(lamb); 1 for j <= 0 (the reference's summation order)."""
    if j <= 0:
        return 1.0
    partial = 1.0
    for i in range(1, j):
        partial += lamb ** i / math.factorial(i)
    return 1 - np.exp(-lamb) * partial


def draw_terms(dist: str, p: float, lamb: float, n_samples: int, rng: str = "numpy",
               device: torch.device | str | None = None) -> np.ndarray:
    """Draws the numbers of terms N_1..N_S of the Russian roulette.

    Args:
        dist: ``"geometric"`` (support {1, 2, ...}) or ``"poisson"``.
        p: the geometric distribution's success probability.
        lamb: the Poisson distribution's rate.
        n_samples: S, the number of draws.
        rng: ``"numpy"`` (NumPy's global RNG, the reference's draws) or ``"torch"`` (torch's RNG on
            ``device``, so that ``torch.manual_seed`` alone reproduces a run).
        device: where torch draws.

    Returns:
        The draws, an int NumPy array of shape (S,) (read back to the host, which needs them to size
        the series).
    """
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"n_dist must be one of {DISTRIBUTIONS}, got {dist!r}")
    if rng == "numpy":
        if dist == "geometric":
            return np.random.geometric(p, n_samples)
        return np.random.poisson(lamb, n_samples)
    if rng != "torch":
        raise ValueError(f"rng must be one of {RNGS}, got {rng!r}")
    draws = torch.empty(n_samples, dtype=torch.float64, device=device)
    if dist == "geometric":
        draws.geometric_(p)
    else:
        draws = torch.poisson(draws.fill_(lamb))
    return draws.to(torch.int64).cpu().numpy()


@dataclass(frozen=True)
class SeriesPlan:
    """The terms k = 1..n of one estimate: c_k and the drawn N (None when truncated)."""

    coeffs: tuple[float, ...]
    samples: np.ndarray | None = None

    @property
    def n_terms(self) -> int:
        return len(self.coeffs)

    def logdet_coeff(self, k: int) -> float:
        """(-1)^(k+1)/k c_k, the weight of e^T J^k e in the log-det (the reference's order)."""
        return (-1) ** (k + 1) / k * self.coeffs[k - 1]

    def neumann_coeff(self, k: int) -> float:
        """(-1)^k c_k, the weight of e^T J^k in the Neumann vector."""
        return (-1) ** k * self.coeffs[k - 1]


def roulette_plan(samples: np.ndarray, offset: int, survival) -> SeriesPlan:
    """Unbiased Russian-roulette plan: n = max N + offset terms, c_k per the module docstring.

    ``survival(j)`` is P(N >= j); the coefficient is evaluated as the reference does,
    ``1 / P * count / S``, so that the floats agree.
    """
    drawn = [int(s) for s in samples.tolist()]
    n_terms = max(drawn) + offset
    coeffs = []
    for k in range(1, n_terms + 1):
        j = k - offset
        tail = 1.0 if j <= 0 else survival(j)
        # in Python floats, which round as NumPy's float64 does: the reference's value to the bit
        coeffs.append(1 / tail * sum(1 for s in drawn if s >= j) / len(drawn))
    return SeriesPlan(tuple(coeffs), samples)


def record_statistics(samples: Tensor, firmom: Tensor, secmom: Tensor, plan: SeriesPlan, value: Tensor) -> None:
    """The reference's training statistics of a block, written into its buffers: the roulette's draws
    (``last_n_samples``) and the mean of the log-det value and of its square over the batch
    (``last_firmom``, ``last_secmom``), both means from one pass of ``step_ops.moments_`` (the squares
    rounded to the value's dtype, as ``value ** 2``; the sums in float64)."""
    drawn = plan.samples.tolist()
    if len(drawn) == 1:
        samples.fill_(drawn[0])
    else:
        samples.copy_(torch.as_tensor(drawn))  # copy_ converts to the buffer's dtype and device
    step_ops.moments_(value.detach(), firmom, secmom)


def truncated_plan(n_terms: int) -> SeriesPlan:
    """The biased i-ResNet series: the first n terms, c_k = 1."""
    return SeriesPlan((1.0,) * n_terms)


class HostCopies:
    """Host copies of a block's scalar parameters that steer its draws (``sigmoid(geom_p)``, ``lamb``).

    A copy is read from its tensor only when the tensor has changed since the last read (its version
    counter, storage or device: an optimiser step that updates it, ``load_state_dict``, ``.to()``), so a
    training or evaluation step costs no host sync. Not part of the state_dict.
    """

    def __init__(self) -> None:
        self._copies: dict[str, tuple[tuple, float]] = {}

    def read(self, name: str, tensor: Tensor, transform: Callable[[Tensor], Tensor] | None = None) -> float:
        """``transform(tensor).item()``, from the copy when ``tensor`` has not changed since it was made."""
        key = (tensor._version, tensor.data_ptr(), tensor.device)
        copy = self._copies.get(name)
        if copy is None or copy[0] != key:
            with torch.no_grad():
                copy = self._copies[name] = (key, (tensor if transform is None else transform(tensor)).item())
        return copy[1]


def series_plan(training: bool, n_power_series: int | None, offset: int, n_dist: str, geom_p: Tensor, lamb: Tensor,
                n_samples: int, rng: str, device: torch.device, host: HostCopies | None = None) -> SeriesPlan:
    """The terms of one estimate per the reference's decision tree: the truncated series in training
    with ``n_power_series``, otherwise Russian roulette with ``offset`` exact terms.

    Args:
        training: the block's mode.
        n_power_series: the truncated series' number of terms (used in training), or None.
        offset: the roulette's exact terms.
        n_dist: ``"geometric"`` or ``"poisson"``.
        geom_p: the geometric distribution's success probability as a logit (a tensor).
        lamb: the Poisson rate (a tensor).
        n_samples: draws of the number of terms.
        rng: ``"numpy"`` or ``"torch"`` (see :func:`draw_terms`).
        device: where torch draws.
        host: the block's :class:`HostCopies`; without it the parameter is read from its tensor.

    Returns:
        A :class:`SeriesPlan`. Only the parameter of ``n_dist`` is read: from the host copy when it is
        current, else with one host sync.
    """
    if training and n_power_series is not None:
        return truncated_plan(n_power_series)
    host = HostCopies() if host is None else host
    if n_dist == "geometric":
        p = host.read("geom_p", geom_p, torch.sigmoid)
        samples = draw_terms("geometric", p, math.nan, n_samples, rng, device)
        return roulette_plan(samples, offset, lambda j: geometric_survival(p, j))
    rate = host.read("lamb", lamb)
    samples = draw_terms("poisson", math.nan, rate, n_samples, rng, device)
    return roulette_plan(samples, offset, lambda j: poisson_survival(rate, j))


class AutogradVJP:
    """VJPs w -> w^T J of g at x by autograd (works for any branch); the graph of g is kept."""

    def __init__(self, g: Tensor, x: Tensor) -> None:
        self.g, self.x = g, x

    def vjp(self, w: Tensor, create_graph: bool = False) -> Tensor:
        (out,) = torch.autograd.grad(self.g, self.x, w, retain_graph=True, create_graph=create_graph)
        return out

    def series(self, eps: Tensor, plan: SeriesPlan, neumann: bool, surrogate: bool = True) -> tuple[Tensor, Tensor | None]:
        """(sum_k (-1)^(k+1)/k c_k <w_k, e>, and w~ when ``neumann``), no graph. ``surrogate``
        says whether :meth:`surrogate` follows (a hint for sources that can fuse it)."""
        return series_terms(self.vjp, eps, plan, neumann)

    def surrogate(self, w_tilde: Tensor, eps: Tensor) -> Tensor:
        """<w~^T J, e> per sample, differentiable in x and the branch's parameters."""
        return _per_sample_dot(self.vjp(w_tilde, create_graph=True), eps)

    def surrogate_and_grads(self, w_tilde: Tensor, eps: Tensor, params: list[Tensor]):
        """The surrogate (no graph) and the gradients of its sum w.r.t. x and ``params`` (None: unused)."""
        value = self.surrogate(w_tilde, eps)
        return value.detach(), grads_or_none(value, [self.x, *params])


class JacobianVJP(AutogradVJP):
    """VJPs from the explicit Jacobians J (B, D, D) of g at x (B, D): w -> w^T J as one batched
    product, differentiable through J when ``create_graph``. For small D, where J is cheaper to
    build (forward mode, :meth:`resflow_cuda.linearize.LinearizedBranch.jacobian`) than n VJPs.
    The products run in J's dtype also under autocast (float32: docs/parity.md#mixed-precision)."""

    def __init__(self, g: Tensor, x: Tensor, jac: Tensor) -> None:
        super().__init__(g, x)
        self.jac = jac

    def vjp(self, w: Tensor, create_graph: bool = False) -> Tensor:
        jac = self.jac if create_graph else self.jac.detach()
        with ops.autocast_disabled(jac):  # the terms in J's dtype, float32 under autocast
            return torch.bmm(w.unsqueeze(1), jac).squeeze(1)


def grads_or_none(value: Tensor, inputs: list[Tensor]) -> list[Tensor | None]:
    """Gradients of ``value.sum()`` w.r.t. ``inputs`` (None: unused), all None when ``value`` has no
    graph (a branch whose Jacobian depends on neither its input nor parameters, e.g. a ``Zero`` branch)."""
    if not value.requires_grad:
        return [None] * len(inputs)
    return list(torch.autograd.grad(value.sum(), inputs, retain_graph=True, allow_unused=True))


def _per_sample_dot(a: Tensor, b: Tensor) -> Tensor:
    shape = (a.shape[0], math.prod(a.shape[1:]))
    return torch.sum(a.reshape(shape) * b.reshape(shape), 1)


def _accumulator(eps: Tensor) -> Tensor:
    dtype = torch.float64 if eps.dtype == torch.float64 else torch.float32
    return torch.zeros(eps.shape[0], dtype=dtype, device=eps.device)


def series_terms(vjp, eps: Tensor, plan: SeriesPlan, neumann: bool) -> tuple[Tensor, Tensor | None]:
    """The log-det estimate and (if ``neumann``) the Neumann vector from n calls of ``vjp``,
    each term accumulated by the fused op (no graph is built)."""
    with torch.no_grad():
        logdet = _accumulator(eps)
        w_tilde = eps.clone() if neumann else None
        w = eps
        for k in range(1, plan.n_terms + 1):
            w = vjp(w)
            ops.logdet_series_accumulate_(w, eps, logdet, w_tilde, plan.logdet_coeff(k),
                                          plan.neumann_coeff(k) if neumann else 0.0)
    return logdet.to(eps.dtype), w_tilde


def basic_estimator(source, eps: Tensor, plan: SeriesPlan, create_graph: bool) -> Tensor:
    """The basic estimator sum_k (-1)^(k+1)/k c_k <w_k, e> of log det(I + J), w_k = e^T J^k.

    Args:
        source: the VJP source (:class:`AutogradVJP`, :class:`JacobianVJP` or a linearized branch's).
        eps: the probe e.
        plan: the terms and coefficients.
        create_graph: differentiable through every term (the reference's training path; memory
            grows with the number of terms).

    Shapes:
        eps: like the branch's input (B, ...); output: (B,).
    """
    if not create_graph:
        return source.series(eps, plan, neumann=False)[0]
    logdet = torch.zeros((), dtype=eps.dtype, device=eps.device)
    w = eps
    for k in range(1, plan.n_terms + 1):
        w = source.vjp(w, create_graph=True)
        logdet = logdet + plan.logdet_coeff(k) * _per_sample_dot(w, eps)
    return logdet


def neumann_estimator(source, eps: Tensor, plan: SeriesPlan) -> tuple[Tensor, Tensor]:
    """The Neumann estimator (training): a surrogate whose gradient is the Neumann-series gradient.

    Args:
        source: the VJP source.
        eps: the probe e.
        plan: the terms and coefficients.

    Shapes:
        eps: (B, ...); outputs: (B,).

    Returns:
        ``(surrogate, estimate)``: the differentiable <w~^T J, e> and the log-det estimate from the
        same terms (no graph).
    """
    estimate, w_tilde = source.series(eps, plan, neumann=True)
    return source.surrogate(w_tilde, eps), estimate


class MemoryEfficientLogDet(torch.autograd.Function):
    """Backward-in-forward: the series and the gradient of the log-det value with respect to x and
    the branch's parameters are computed in forward and only g's graph is kept.

    forward(run, x, *params) -> (g, value, estimate), where ``run(x_leaf)`` returns
    ``(g, value, estimate, grad_x, param_grads)`` with the value's gradients (summed over the
    batch) already computed. backward: grad_x * dL per sample (exact for any upstream gradient);
    parameter gradients need dL to be the same for every sample (true for mean or sum losses), as
    the per-sample parameter gradients were summed in forward: a non-uniform dL raises.
    """

    @staticmethod
    def forward(ctx, run, x, *params):
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_(True)
            g, value, estimate, grad_x, param_grads = run(x_leaf)
        ctx.g, ctx.x = g, x_leaf
        ctx.param_grads = param_grads
        ctx.save_for_backward(grad_x, *params)
        estimate = estimate.detach()
        ctx.mark_non_differentiable(estimate)  # an output: the report of the estimate carries no gradient
        ctx.set_materialize_grads(False)  # no zeros made for the estimate's gradient, which is never read
        return g.detach(), value.detach(), estimate

    @staticmethod
    def backward(ctx, grad_g, grad_value, _grad_estimate):
        grad_x, *params = ctx.saved_tensors
        if grad_g is None:  # only the log-det reached the loss
            grad_g = torch.zeros_like(ctx.g)
        if grad_value is None:  # only g reached the loss
            grad_value = grad_x.new_zeros(grad_x.shape[0])
        trainable = [p for p in params if p.requires_grad]
        with torch.enable_grad():
            grads = iter(torch.autograd.grad(ctx.g, [ctx.x, *trainable], grad_g, allow_unused=True))
        dg = [next(grads)] + [next(grads) if p.requires_grad else None for p in params]
        # each gradient in one op: g's part plus the value's part times the upstream gradient (addcmul)
        scale = grad_value.reshape((-1,) + (1,) * (grad_x.dim() - 1))
        out_x = grad_x * scale if dg[0] is None else torch.addcmul(dg[0], grad_x, scale)
        param_grads, first = ctx.param_grads, None
        if any(gp is not None for gp in param_grads) and grad_value.numel() > 0:
            first = grad_value.reshape(-1)[0]
            require_uniform_upstream(grad_value, first)
        out_params = _add_all_scaled(dg[1:], param_grads, first)
        ctx.g = ctx.x = ctx.param_grads = None
        return (None, out_x, *out_params)


def _add_all_scaled(dps: list, gps: list, first: Tensor | None) -> list:
    """dp + gp * first for every parameter: the pairs of first's dtype in one op (``foreach_add_scaled``), any
    other by :func:`_add_scaled`; under ``create_graph`` (grad mode on in backward) all by :func:`_add_scaled`,
    whose ``addcmul`` is differentiable again."""
    fused = [] if first is None or torch.is_grad_enabled() else [
        i for i, (dp, gp) in enumerate(zip(dps, gps))
        if dp is not None and gp is not None and dp.dtype == gp.dtype == first.dtype and dp.shape == gp.shape]
    out = [None if i in fused else _add_scaled(dp, gp, first) for i, (dp, gp) in enumerate(zip(dps, gps))]
    if fused:
        sums = step_ops.foreach_add_scaled([dps[i] for i in fused], [gps[i] for i in fused], first)
        for i, total in zip(fused, sums):
            out[i] = total
    return out


def _add_scaled(dp: Tensor | None, gp: Tensor | None, first: Tensor | None) -> Tensor | None:
    """dp + gp * first in one op, where a missing term (None) drops out (first None: unscaled)."""
    if gp is None:
        return dp
    if first is None:
        return gp if dp is None else gp + dp
    return gp * first if dp is None else torch.addcmul(dp, gp, first)


_NON_UNIFORM = ("iResBlock(grad_in_forward=True): the upstream gradient of the per-sample log-det is not the same "
                "for every sample (a weighted or per-sample loss), but backward-in-forward sums the parameter "
                "gradients over the batch in forward, so they cannot be weighted per sample. Build the block with "
                "grad_in_forward=False for such losses.")


def require_uniform_upstream(grad_value: Tensor, first: Tensor) -> None:
    """Backward-in-forward's condition on the upstream gradient of the log-det (``first``: its first
    entry): refuses a non-uniform upstream gradient without a host sync: on CUDA as a device-side assert
    (the error surfaces at the next synchronisation), on the CPU by reading the gradient where it
    already is (host memory, no dispatcher op); elsewhere with one read."""
    if grad_value.device.type == "cuda":
        torch._assert_async(torch.all(grad_value == first), _NON_UNIFORM)
        return
    if grad_value.device.type == "cpu":
        values = grad_value.detach().reshape(-1)
        values = values.numpy() if values.dtype in (torch.float32, torch.float64, torch.float16) else \
            values.float().numpy()
        uniform = bool((values == values[0]).all())
    else:
        uniform = bool(torch.all(grad_value == first))
    if not uniform:
        raise RuntimeError(_NON_UNIFORM)


def batch_jacobian(g: Tensor, x: Tensor) -> Tensor:
    """The (B, D, D) Jacobians of g (B, D) at x (B, D), one autograd pass per output, with graph."""
    rows = [torch.autograd.grad(g[:, d].sum(), x, create_graph=True)[0].reshape(x.shape[0], 1, x.shape[1])
            for d in range(g.shape[1])]
    return torch.cat(rows, 1)


def batch_trace(m: Tensor) -> Tensor:
    return torch.diagonal(m, dim1=1, dim2=2).sum(1)
