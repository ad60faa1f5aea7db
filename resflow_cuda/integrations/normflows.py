"""normflows' residual flow API on this library's layers: swap one import.

    from resflow_cuda.integrations.normflows import LipschitzMLP, Residual   # was: normflows.nets / .flows

``Residual`` is a ``normflows.flows.Flow`` with normflows' signature and conventions (``reverse``: the
map x + g(x) runs in ``inverse``; ``reduce_memory``: Neumann gradient with backward-in-forward;
``forward`` and ``inverse`` return ``(z, log_det)`` with ``log_det`` of shape ``(B,)``), backed by
:class:`resflow_cuda.nn.iResBlock`. ``LipschitzMLP`` / ``LipschitzCNN`` have normflows' signatures,
defaults and state_dict keys (``net.{i}.…``) with the fused LipSwish and our InducedNorm layers, so
their fast path and ``resflow_cuda.update_lipschitz`` apply. Needs normflows installed.

This module also registers normflows' own layers (``Swish``, ``InducedNormLinear``,
``InducedNormConv2d``, ``LipschitzMLP`` / ``LipschitzCNN``) with :mod:`resflow_cuda.linearize`, so
that residual branches built from them take the fast log-det path. Users need not import it for
that: ``import resflow_cuda`` (which does not import normflows) has linearize() import it on the
first call after normflows has been imported.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

try:
    from normflows.flows.base import Flow
    from normflows.nets import lipschitz as _nfl
except ImportError as exc:  # pragma: no cover - exercised only without normflows
    raise ImportError("resflow_cuda.integrations.normflows needs normflows (pip install normflows)") from exc

from ..linearize import register_linear, register_lipswish, register_wrapper
from ..nn import InducedNormConv2d, InducedNormLinear, iResBlock, LipSwish


def _normflows_linear_weight(layer, input: Tensor) -> Tensor:
    return layer.compute_weight(update=False)


def _normflows_conv_weight(layer, input: Tensor) -> Tensor:
    if not layer.initialized:
        layer.spatial_dims.copy_(torch.tensor(input.shape[2:4]).to(layer.spatial_dims))
    return layer.compute_weight(update=False)


register_lipswish(_nfl.Swish)
register_linear(_nfl.InducedNormLinear, conv=False, weight=_normflows_linear_weight)
register_linear(_nfl.InducedNormConv2d, conv=True, weight=_normflows_conv_weight)
for _wrapper in (_nfl.LipschitzMLP, _nfl.LipschitzCNN):
    register_wrapper(_wrapper, lambda net: net.net)


class Residual(Flow):
    """normflows' ``Residual`` flow (same arguments and defaults) on :class:`resflow_cuda.nn.iResBlock`.

    Args:
        net: the residual branch, e.g. :class:`LipschitzMLP` or :class:`LipschitzCNN`.
        reverse: the map x + g(x) runs in ``inverse`` (normflows' convention for sampling-first flows).
        reduce_memory: the Neumann gradient with backward-in-forward.
        geom_p, lamb, n_power_series, exact_trace, brute_force, n_samples, n_exact_terms, n_dist: the
            block's (see :class:`~resflow_cuda.nn.iResBlock`).

    Shapes:
        z: (B, ...); log_det: (B,).

    Returns:
        ``forward(z)`` and ``inverse(z)``: ``(z', log_det)``, the log-determinant of the map applied.
        Parity with normflows: docs/parity.md#normflows-integration

    Example:
        >>> from resflow_cuda.integrations.normflows import LipschitzMLP, Residual
        >>> flow = Residual(LipschitzMLP([2, 16, 2]))
        >>> z, log_det = flow(torch.randn(8, 2))
        >>> z.shape, log_det.shape
        (torch.Size([8, 2]), torch.Size([8]))
    """

    def __init__(self, net, reverse=True, reduce_memory=True, geom_p=0.5, lamb=2.0, n_power_series=None,
                 exact_trace=False, brute_force=False, n_samples=1, n_exact_terms=2, n_dist="geometric"):
        super().__init__()
        self.reverse = reverse
        self.iresblock = iResBlock(net, n_samples=n_samples, n_exact_terms=n_exact_terms, neumann_grad=reduce_memory,
                                   grad_in_forward=reduce_memory, exact_trace=exact_trace, geom_p=geom_p, lamb=lamb,
                                   n_power_series=n_power_series, brute_force=brute_force, n_dist=n_dist)

    def _run(self, z, through_block: bool):
        z, neg_log_det = self.iresblock.forward(z, 0) if through_block else self.iresblock.inverse(z, 0)
        return z, -neg_log_det.view(-1)

    def forward(self, z):
        return self._run(z, not self.reverse)

    def inverse(self, z):
        return self._run(z, self.reverse)


class _LipschitzNet(nn.Module):
    """normflows' attributes of a Lipschitz net and the (LipSwish, layer) pairs in ``net``."""

    def __init__(self, channels, lipschitz_const, max_lipschitz_iter, lipschitz_tolerance, init_zeros, n_layers,
                 layer):
        super().__init__()
        self.n_layers = n_layers
        self.channels = channels
        self.lipschitz_const = lipschitz_const
        self.max_lipschitz_iter = max_lipschitz_iter
        self.lipschitz_tolerance = lipschitz_tolerance
        self.init_zeros = init_zeros
        options = dict(coeff=lipschitz_const, domain=2, codomain=2, n_iterations=max_lipschitz_iter,
                       atol=lipschitz_tolerance, rtol=lipschitz_tolerance)
        layers = []
        for i in range(n_layers):
            layers += [LipSwish(), layer(i, zero_init=init_zeros and i == n_layers - 1, **options)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class LipschitzMLP(_LipschitzNet):
    """normflows' ``LipschitzMLP``: (LipSwish, InducedNormLinear) per layer, with its state_dict keys.

    Args:
        channels: the widths, input first, e.g. [2, 64, 2].
        lipschitz_const: the Lipschitz bound of every linear layer.
        max_lipschitz_iter: power-iteration steps per update.
        lipschitz_tolerance: atol and rtol of the power iteration.
        init_zeros: start the last layer near zero.

    Shapes:
        input: (B, channels[0]); output: (B, channels[-1]).
    """

    def __init__(self, channels, lipschitz_const=0.97, max_lipschitz_iter=5, lipschitz_tolerance=None,
                 init_zeros=True):
        super().__init__(channels, lipschitz_const, max_lipschitz_iter, lipschitz_tolerance, init_zeros,
                         len(channels) - 1, lambda i, **kw: InducedNormLinear(channels[i], channels[i + 1], **kw))


class LipschitzCNN(_LipschitzNet):
    """normflows' ``LipschitzCNN``: (LipSwish, InducedNormConv2d with 'same' padding) per layer.

    Args:
        channels: the channel counts, input first.
        kernel_size: the kernel size of each layer (odd).
        lipschitz_const, max_lipschitz_iter, lipschitz_tolerance, init_zeros: as :class:`LipschitzMLP`.

    Shapes:
        input: (B, channels[0], H, W); output: (B, channels[-1], H, W).
    """

    def __init__(self, channels, kernel_size, lipschitz_const=0.97, max_lipschitz_iter=5, lipschitz_tolerance=None,
                 init_zeros=True):
        super().__init__(channels, lipschitz_const, max_lipschitz_iter, lipschitz_tolerance, init_zeros,
                         len(kernel_size), lambda i, **kw: InducedNormConv2d(
                             channels[i], channels[i + 1], kernel_size[i], 1, kernel_size[i] // 2, bias=True, **kw))
        self.kernel_size = kernel_size
