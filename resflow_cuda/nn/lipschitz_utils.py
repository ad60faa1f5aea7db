"""Model-wide updates and checks of the Lipschitz layers: :func:`update_lipschitz` after each
optimiser step, :func:`lipschitz_report` to verify every layer's bound."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..functional import conv_operator
from .lipschitz import InducedNormConv2d, InducedNormLinear, SpectralNormConv2d, SpectralNormLinear, _LipschitzConv2d
from .lipschitz_base import INF
from .lop import LopConv2d, LopLinear

__all__ = ["update_lipschitz", "lipschitz_report"]


_ITERATED = (SpectralNormLinear, SpectralNormConv2d, InducedNormLinear, InducedNormConv2d)


def _update_settings(m, n_iterations):
    """The op settings (max_iterations, atol, rtol, domain, codomain, u_first) of updating `m` by plain
    power iteration whose u, v and sigma go into its buffers as they are (no learnable orders, no lazy
    initialisation pending, not the reference's 1x1 projmax case that keeps stale buffers); None otherwise."""
    if isinstance(m, (InducedNormLinear, InducedNormConv2d)):
        conv = isinstance(m, InducedNormConv2d)
        if m._learnable_norms() or (conv and (not m._initialized or (m._pointwise and (m.domain == 1
                                                                                        or m.codomain == INF)))):
            return None
        n_it, atol, rtol, max_it = m._iteration_settings(n_iterations, None, None, 200)
        tol = n_it is None
        return max_it, atol if tol else None, rtol if tol else None, float(m.domain), float(m.codomain), True
    if isinstance(m, (SpectralNormLinear, SpectralNormConv2d)):
        if isinstance(m, SpectralNormConv2d) and not m.initialized:
            return None
        _, atol, rtol, max_it = m._iteration_settings(n_iterations, None, None, 20000)
        tol = atol is not None and rtol is not None
        return max_it, atol if tol else None, rtol if tol else None, 2.0, 2.0, False
    return None


def update_lipschitz(model: nn.Module, n_iterations: int | None = None) -> None:
    """Runs the power iteration of every SpectralNorm* / InducedNorm* layer of ``model``, in place.

    The training loops' ``update_lipschitz``: call it after every optimiser step and before
    evaluation. Each layer ends as after ``compute_weight(update=True, n_iterations=n_iterations)``
    (u, v and ``scale``); matrix layers with equal settings share one op call.
    Parity with the reference: docs/parity.md#update_lipschitz

    Args:
        model: the module whose Lipschitz layers to update (any depth).
        n_iterations: power-iteration steps for every layer; None: each layer's own setting.

    Example:
        >>> from resflow_cuda.nn import InducedNormLinear, LipSwish, update_lipschitz
        >>> model = nn.Sequential(InducedNormLinear(2, 32, n_iterations=5), LipSwish(),
        ...                       InducedNormLinear(32, 2, n_iterations=5))
        >>> optimizer = torch.optim.Adam(model.parameters())
        >>> model(torch.randn(8, 2)).pow(2).mean().backward(); optimizer.step()
        >>> update_lipschitz(model)
    """
    groups: dict = {}
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, _ITERATED):
                continue
            settings = _update_settings(m, n_iterations)
            if settings is None:
                m.compute_weight(update=True, n_iterations=n_iterations)
                continue
            weight = m.weight.detach()
            if weight.dim() == 4 and not m._pointwise:
                u, v, sigma, _ = m._power_iterate(weight, m.u, m.v, *settings)
                m.u.copy_(u)
                m.v.copy_(v)
                m.scale.copy_(sigma.reshape(m.scale.shape))
                continue
            matrix = weight if weight.dim() == 2 else m._matrix(weight)
            groups.setdefault((settings, weight.device), []).append((m, matrix))
        for (settings, _), members in groups.items():
            ops.power_iteration_update_([w for _, w in members], [m.u for m, _ in members],
                                        [m.v for m, _ in members], [m.scale for m, _ in members], *settings)


def _exact_dense_norm(matrix: Tensor) -> Tensor:
    return torch.linalg.matrix_norm(matrix.detach().double(), 2)


def _conv_norm_bound_fft(weight: Tensor, input_hw) -> Tensor:
    """Spectral norm of the circular convolution on a grid large enough that no output wraps
    around: an upper bound of the zero-padded (and strided) convolution's norm (the singular
    values of a circular convolution are those of the per-frequency channel matrices)."""
    kh, kw = weight.shape[2:]
    grid = (input_hw[0] + kh - 1, input_hw[1] + kw - 1)
    spectrum = torch.fft.fft2(weight.detach().double(), s=grid)  # (out, in, gh, gw)
    per_frequency = spectrum.permute(2, 3, 0, 1)
    return torch.linalg.matrix_norm(per_frequency, 2).max()


def _conv_dense_matrix(layer: _LipschitzConv2d) -> Tensor:
    matvec, _ = conv_operator(layer.weight.detach().double(), layer._input_hw, layer.stride, layer.padding)
    n_in = layer.in_channels * layer._input_hw[0] * layer._input_hw[1]
    return torch.stack([matvec(e) for e in torch.eye(n_in, dtype=torch.float64, device=layer.weight.device)], 1)


def lipschitz_report(model: nn.Module, exact_conv_max_inputs: int = 2048) -> list[dict]:
    """A verified look at every Lipschitz layer of ``model``: estimated and exact norms, and the bound met.

    Run :func:`update_lipschitz` first so that ``sigma`` is current. Convolutions must have seen an
    input (their operator depends on the input size).

    Args:
        model: the module whose Lipschitz layers (SpectralNorm*, InducedNorm*, Lop*) to check.
        exact_conv_max_inputs: k x k convolutions with at most this many input entries get an exact
            norm (SVD of the dense operator); larger ones an FFT upper bound.

    Returns:
        One dict per layer: ``name``, ``type``, ``coeff``; ``sigma`` (the power-iteration estimate the
        layer normalises with, its ``scale`` buffer); ``sigma_exact`` and ``method`` (``"svd"`` for
        matrices, 1x1 convolutions and small k x k ones; ``"fft-bound"``, an upper bound from the
        circular convolution; ``"closed-form"`` for Lop*; None for induced norms other than 2 -> 2);
        ``lipschitz`` (the exact norm of the normalised weight, sigma_exact / max(1, sigma / coeff));
        ``meets_coeff`` (lipschitz <= coeff with 1e-5 slack; None when unknown: no exact norm, or an
        FFT bound above coeff).
    """
    report = []
    for name, m in model.named_modules():
        if isinstance(m, (LopLinear, LopConv2d)):
            with torch.no_grad():
                m.compute_weight()
            scale = float(m.scale)
            entry = dict(sigma=scale, sigma_exact=scale, method="closed-form", lipschitz=min(scale, m.coeff))
        elif isinstance(m, _ITERATED):
            sigma = float(m.scale)
            exact, method = None, None
            if _is_spectral(m):
                if isinstance(m, (SpectralNormLinear, InducedNormLinear)):
                    exact, method = _exact_dense_norm(m.weight), "svd"
                elif m._pointwise:
                    exact, method = _exact_dense_norm(m._matrix(m.weight)), "svd"
                elif m.in_channels * m._input_hw[0] * m._input_hw[1] <= exact_conv_max_inputs:
                    exact, method = _exact_dense_norm(_conv_dense_matrix(m)), "svd"
                else:
                    exact, method = _conv_norm_bound_fft(m.weight, m._input_hw), "fft-bound"
            entry = dict(sigma=sigma, sigma_exact=None if exact is None else float(exact), method=method,
                         lipschitz=None if exact is None else float(exact) / max(1.0, sigma / m.coeff))
        else:
            continue
        meets = None if entry["lipschitz"] is None else entry["lipschitz"] <= m.coeff * (1 + 1e-5)
        if entry["method"] == "fft-bound" and not meets:
            meets = None  # an upper bound above coeff decides nothing
        entry.update(name=name, type=type(m).__name__, coeff=m.coeff, meets_coeff=meets)
        report.append(entry)
    return report


def _is_spectral(m) -> bool:
    """Does the layer bound the l2 -> l2 norm (with fixed orders)?"""
    domain, codomain = getattr(m, "domain", 2), getattr(m, "codomain", 2)
    return not torch.is_tensor(domain) and domain == 2 and codomain == 2
