"""Closed-form operator norms (Lop*) and the reference's layer factories (``get_linear`` /
``get_conv2d``: Lop* where the norm has a closed form, else InducedNorm*)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..linearize import register_linear
from .lipschitz import InducedNormConv2d, InducedNormLinear
from .lipschitz_base import INF

__all__ = ["LopLinear", "LopConv2d", "get_linear", "get_conv2d"]


def operator_norm_settings(domain, codomain):
    """(max over input dimensions?, norm type) of the closed-form induced norms."""
    settings = {(1, 1): (True, 1), (1, 2): (True, 2), (1, INF): (True, INF), (2, INF): (False, 2), (INF, INF): (False, 1)}
    if (domain, codomain) not in settings:
        raise ValueError(f'Unknown combination of domain "{domain}" and codomain "{codomain}"')
    return settings[(domain, codomain)]


def _max_except_dim(x: Tensor, dim: int) -> Tensor:
    for axis in list(range(x.dim() - 1, dim, -1)) + list(range(dim - 1, -1, -1)):
        x, _ = x.max(axis, keepdim=True)
    return x


def _norm_except_dim(w: Tensor, norm_type, dim: int) -> Tensor:
    if norm_type in (1, 2):
        return torch.norm_except_dim(w, norm_type, dim)
    return _max_except_dim(w, dim)


class _LopMixin:
    """W / max(1, scale / coeff) with the closed-form norm of each row or column (local) or their max."""

    def _setup_lop(self, coeff, domain, codomain, local_constraint):
        if not coeff > 0:
            raise ValueError(f"coeff must be > 0 (the Lipschitz bound of the layer), got {coeff}")
        self.coeff, self.domain, self.codomain, self.local_constraint = coeff, domain, codomain, local_constraint
        max_across_input_dims, self.norm_type = operator_norm_settings(domain, codomain)
        self.max_across_dim = 1 if max_across_input_dims else 0
        self.register_buffer("scale", torch.tensor(0.0))

    def compute_weight(self):
        scale = _norm_except_dim(self.weight, self.norm_type, dim=self.max_across_dim)
        if not self.local_constraint:
            scale = scale.max()
        with torch.no_grad():
            self.scale.copy_(scale.max())
        factor = torch.max(scale.new_ones(1), scale / self.coeff)
        return self.weight / factor

    def _lop_repr(self):
        return f", coeff={self.coeff}, domain={self.domain}, codomain={self.codomain}, local={self.local_constraint}"


class LopLinear(_LopMixin, nn.Linear):
    """Linear layer bounded by a closed-form operator norm; the reference's ``LopLinear``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        coeff: the Lipschitz bound.
        domain: the input norm order; (domain, codomain) in {(1,1), (1,2), (1,inf), (2,inf), (inf,inf)}.
        codomain: the output norm order.
        local_constraint: normalise each row / column by its own norm instead of the largest.
        **unused_kwargs: ignored (the reference's signature).

    Shapes:
        input: (..., in_features); output: (..., out_features).
    """

    def __init__(self, in_features, out_features, bias=True, coeff=0.97, domain=INF, codomain=INF,
                 local_constraint=True, **unused_kwargs):
        del unused_kwargs
        super().__init__(in_features, out_features, bias)
        self._setup_lop(coeff, domain, codomain, local_constraint)

    def forward_weight(self, input: Tensor) -> Tensor:
        """The weight forward applies to ``input``."""
        return self.compute_weight()

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.forward_weight(input), self.bias)

    def extra_repr(self):
        return super().extra_repr() + self._lop_repr()


class LopConv2d(_LopMixin, nn.Conv2d):
    """Convolution bounded by a closed-form operator norm of its weight; the reference's ``LopConv2d``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, bias: as ``nn.Conv2d``.
        coeff, domain, codomain, local_constraint: as :class:`LopLinear`.

    Shapes:
        input: (B, in_channels, H, W); output: (B, out_channels, H', W').
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, bias=True, coeff=0.97, domain=INF,
                 codomain=INF, local_constraint=True, **unused_kwargs):
        del unused_kwargs
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self._setup_lop(coeff, domain, codomain, local_constraint)

    def forward_weight(self, input: Tensor) -> Tensor:
        """The weight forward applies to ``input``."""
        return self.compute_weight()

    def forward(self, input: Tensor) -> Tensor:
        return F.conv2d(input, self.forward_weight(input), self.bias, self.stride, self.padding, 1, 1)

    def extra_repr(self):
        return super().extra_repr() + self._lop_repr()


register_linear(LopLinear, conv=False)
register_linear(LopConv2d, conv=True)


def _closed_form(domain, codomain) -> bool:
    return (domain == 1 and codomain in (1, 2, INF)) or (codomain == INF and domain in (2, INF))


def get_linear(in_features, out_features, bias=True, coeff=0.97, domain=None, codomain=None, **kwargs):
    """LopLinear for the closed-form (domain, codomain) pairs, else InducedNormLinear (the reference's rule)."""
    layer = LopLinear if _closed_form(domain, codomain) else InducedNormLinear
    return layer(in_features, out_features, bias, coeff, domain, codomain, **kwargs)


def get_conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=True, coeff=0.97, domain=None,
               codomain=None, **kwargs):
    """LopConv2d for the closed-form (domain, codomain) pairs, else InducedNormConv2d."""
    layer = LopConv2d if _closed_form(domain, codomain) else InducedNormConv2d
    return layer(in_channels, out_channels, kernel_size, stride, padding, bias, coeff, domain, codomain, **kwargs)
