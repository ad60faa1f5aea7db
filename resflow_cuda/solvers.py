"""Batched root finding for implicit blocks: Broyden's method with a fixed-point fallback.

Both solvers work on problems written as a fixed point x = T(x) of a contraction T (every problem of
an :class:`~resflow_cuda.nn.ImplicitBlock` is one: the forward solve z = x + g_x(x) - g_z(z), the
inverse, and the adjoint solve u = grad - J^T u of its backward). Broyden's method finds a root of
G(x) = T(x) - x, whose Jacobian is near -I for a contraction; the fixed-point iteration applies T.

Semantics follow ImpFlow (``lib/layers/broyden.py`` and ``find_fixed_point`` of
thu-ml/implicit-normalizing-flows): "good" Broyden updates of a low-rank inverse Jacobian
-I + U V^T per sample (one column per step), no line search, the batch stops when
||G||_2 over the whole batch is below ``eps * sqrt(numel)``, a protective stop when ||G|| grows
beyond 1e6 times its start; the fixed-point stopping rule is (x_k - x_{k-1})^2 < eps + eps |x_0|
elementwise. Every solve returns a :class:`RootReport` with per-sample residuals, and each sample
gets its lowest-residual iterate. Parity with the reference: docs/parity.md#solvers
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["RootReport", "broyden", "fixed_point", "find_root"]

DIVERGENCE_FACTOR = 1e6
SOLVE_EVENT = "resflow_cuda.find_root"


class _ReadOnAccess:
    """A dataclass field that may be given as a device scalar: read to a Python float (one host sync) at
    its first access, so that a solve whose outcome is known on the host does not wait for it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, "_" + name

    def __get__(self, obj: object, owner: type | None = None) -> float:
        if obj is None:  # the class's own access: no default value (dataclasses' descriptor protocol)
            raise AttributeError(self.name)
        # a report pickled before the field was read lazily holds it under its own name
        value = obj.__dict__[self.slot] if self.slot in obj.__dict__ else obj.__dict__[self.name]
        if isinstance(value, Tensor):
            value = float(value)
            setattr(obj, self.slot, value)
        return value

    def __set__(self, obj: object, value: float | Tensor) -> None:
        setattr(obj, self.slot, value)


@dataclass
class RootReport:
    """How one solve ended.

    method: ``"broyden"``, or ``"fixed_point"`` when Broyden diverged and the fallback ran.
    iterations: steps of the method that produced the result (map evaluations after the first).
    converged: the batch criterion, ||G|| < tolerance (Broyden) or every element's squared step
        below its tolerance (fixed point).
    residual: ||G||_2 over the batch at the result (fixed point: its last step's norm), a float, read
        from the device when it is first accessed (a converged Broyden solve or a fixed-point iteration
        leaves it there until then).
    tolerance: ``eps * sqrt(numel)`` (Broyden) or ``eps`` (fixed point, elementwise).
    sample_residuals: ||G_b||_2 per sample at the result, shape (B,).
    sample_converged: per sample, ||G_b|| < eps * sqrt(numel / B) (Broyden: the batch rule at the
        size of one sample) or every squared step below tolerance (fixed point), shape (B,).
    diverged: Broyden's residual grew past 1e6 times its start or became non-finite.
    """

    method: str
    iterations: int
    converged: bool
    residual: float = _ReadOnAccess()
    tolerance: float
    sample_residuals: Tensor
    sample_converged: Tensor
    diverged: bool = False


def _check(name: str, x0: Tensor, max_steps: int, eps: float) -> None:
    if not isinstance(x0, Tensor) or x0.dim() < 1:
        raise ValueError(f"{name}: expected x0 to be a tensor of shape (B, ...), but got "
                         f"{getattr(x0, 'shape', type(x0).__name__)}")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 0:
        raise ValueError(f"{name}: expected max_steps to be an integer >= 0, but got {max_steps!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"{name}: expected eps to be a finite number >= 0, but got {eps!r}")


def _low_rank(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    """U V^T x per sample; ``us`` and ``vts`` hold the columns of U and rows of V^T as (B, k, d), k >= 1."""
    return torch.bmm(us.transpose(1, 2), torch.bmm(vts, x.unsqueeze(2))).squeeze(2)


def _apply_inverse(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    """(-I + U V^T) x per sample, one op besides the products (U V^T x - x, which rounds as -x + U V^T x)."""
    if us.shape[1] == 0:
        return -x
    return torch.sub(_low_rank(us, vts, x), x)


def _apply_inverse_transposed(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    """x^T (-I + U V^T) per sample, as a (B, d) tensor."""
    return _apply_inverse(vts, us, x)


def broyden(residual_fn: Callable[[Tensor], Tensor], x0: Tensor, max_steps: int, eps: float) -> tuple[Tensor, RootReport]:
    """A root of ``residual_fn`` near ``x0`` by Broyden's method (see the module docstring for the rules).

    Args:
        residual_fn: G(x) = T(x) - x of a contraction T, batched over dim 0.
        x0: the start.
        max_steps: step limit.
        eps: tolerance: stop when ||G||_2 over the batch < eps * sqrt(numel).

    Shapes:
        x0 and the root: (B, ...), the shape ``residual_fn`` takes and returns.

    Returns:
        ``(x, report)``: each sample's lowest-residual iterate and a :class:`RootReport`. No graph
        is built: call under ``no_grad`` or with a residual that does not need one.
    """
    _check("broyden", x0, max_steps, eps)
    shape, batch = x0.shape, x0.shape[0]
    x = x0.detach().reshape(batch, -1)
    dim = x.shape[1]
    tolerance = eps * math.sqrt(x.numel())
    sample_tolerance = eps * math.sqrt(dim)

    def g(v: Tensor) -> Tensor:
        return residual_fn(v.view(shape)).reshape(batch, -1)

    gx = g(x)
    best, best_res = x.clone(), gx.norm(dim=1)
    start = float(best_res.norm())
    us = x.new_zeros(batch, max_steps, dim)
    vts = x.new_zeros(batch, max_steps, dim)
    update = gx  # the first step -H_0 G with H_0 = -I: a fixed-point step (docs/parity.md#solvers)
    steps, diverged, total = 0, not math.isfinite(start), start
    while not diverged and total >= tolerance and steps < max_steps and batch > 0:
        x_new = x + update
        g_new = g(x_new)
        dx, dg = update, g_new - gx
        x, gx = x_new, g_new
        steps += 1
        per_sample = gx.norm(dim=1)
        better = per_sample < best_res
        best = torch.where(better.unsqueeze(1), x, best)
        best_res = torch.where(better, per_sample, best_res)
        total = float(per_sample.norm())
        if not math.isfinite(total) or total > start * DIVERGENCE_FACTOR:
            diverged = True
            break
        if total < tolerance or steps == max_steps:
            break
        k = steps - 1
        vt = _apply_inverse_transposed(us[:, :k], vts[:, :k], dx)
        u = (dx - _apply_inverse(us[:, :k], vts[:, :k], dg)) / (vt * dg).sum(1, keepdim=True)
        torch.nan_to_num(u, nan=0.0, posinf=0.0, neginf=0.0, out=us[:, k])
        torch.nan_to_num(vt, nan=0.0, posinf=0.0, neginf=0.0, out=vts[:, k])
        update = torch.sub(gx, _low_rank(us[:, :k + 1], vts[:, :k + 1], gx))  # -(-I + U V^T) gx, exactly
    # One read per step: the last step's total decides the stop. Below the tolerance it also bounds the
    # result's residual (each sample's best is at most its last), which is then left on the device.
    residual = best_res.norm()
    if diverged or (total >= tolerance and batch > 0):
        residual = float(residual)
        converged = residual < tolerance
    else:
        converged = True
    report = RootReport("broyden", steps, converged, residual, tolerance, best_res, best_res < sample_tolerance,
                        diverged)
    return best.view(shape), report


def fixed_point(map_fn: Callable[[Tensor], Tensor], x0: Tensor, max_steps: int, eps: float) -> tuple[Tensor, RootReport]:
    """The fixed point of the contraction ``map_fn`` by iteration from ``x0``.

    Args:
        map_fn: the contraction T, batched over dim 0.
        x0: the start.
        max_steps: step limit beyond the first step.
        eps: tolerance: stop when every squared step is below ``eps + eps |x0|`` elementwise (or at a
            non-finite step).

    Shapes:
        x0 and the fixed point: (B, ...).

    Returns:
        ``(x, report)``: the last iterate and a :class:`RootReport`.
    """
    _check("fixed_point", x0, max_steps, eps)
    batch = x0.shape[0]
    tol = eps + eps * x0.detach().abs()
    x_prev, x = x0.detach(), map_fn(x0.detach())
    steps = 0
    while True:
        ratio = ((x - x_prev) ** 2 / tol).reshape(batch, -1)
        # One read per step: the ratios are >= 0 or NaN, and the largest (NaN if any is) says both whether
        # every one is below 1 and whether all are finite.
        worst = float(ratio.max()) if ratio.numel() else 0.0
        done, finite = worst < 1, math.isfinite(worst)
        if done or steps >= max_steps or not finite:
            break
        x_prev, x = x, map_fn(x)
        steps += 1
    step_norms = (x - x_prev).reshape(batch, -1).norm(dim=1)
    report = RootReport("fixed_point", steps, done, step_norms.norm(), eps, step_norms, (ratio < 1).all(1),
                        not finite)
    return x, report


def find_root(map_fn: Callable[[Tensor], Tensor], x0: Tensor, max_steps: int, eps: float,
              fallback_steps: int = 1000) -> tuple[Tensor, RootReport]:
    """The fixed point of ``map_fn`` by Broyden's method on T(x) - x from zeros (ImpFlow's start),
    falling back to the fixed-point iteration from ``x0`` when Broyden diverges.

    Args:
        map_fn: the contraction T, batched over dim 0.
        x0: the start of the fixed-point fallback (its shape is the solution's).
        max_steps: step limit of Broyden's method.
        eps: tolerance of both methods (see :func:`broyden` and :func:`fixed_point`).
        fallback_steps: step limit of the fixed-point fallback.

    Shapes:
        x0 and the solution: (B, ...).

    Returns:
        ``(x, report)``, the report of the method that produced x. Runs under ``no_grad``.
    """
    # Named for the profiler: the solvers' convergence tests read the device, and tests and
    # benchmarks tell those host syncs apart from the rest of a step.
    with torch.no_grad(), torch.profiler.record_function(SOLVE_EVENT):
        start = torch.zeros_like(x0)
        x, report = broyden(lambda v: map_fn(v) - v, start, max_steps, eps)
        if report.diverged:
            x, report = fixed_point(map_fn, x0, fallback_steps, eps)
    return x, report
