"""Coupling flows: the baselines of the Residual Flows paper (NICE, Real NVP, Glow) and the
reference's own coupling blocks (residual-flows ``resflows/layers/coupling.py`` and
``mask_utils.py``), used by ``ResidualFlow(block_type='coupling')``.

A coupling layer keeps one part ``x_a`` of its input and transforms the other part ``x_b``
elementwise with parameters computed from ``x_a`` by a network ``nnet``, so the inverse and the
log-determinant are exact and cheap. The part kept is chosen by a mask type:

- ``'channel0'`` / ``'channel1'``: the first / second half of dim 1 (the channels of
  ``(B, C, H, W)`` or the features of ``(B, D)``) is kept; ``nnet`` sees only that half.
- ``'checkerboard0'`` / ``'checkerboard1'``: on ``(B, C, H, W)``, the positions with ``h + w``
  even / odd are kept (in every channel); ``nnet`` sees the whole input with the other positions
  set to zero.

Calling convention (as every flow layer of this package): ``forward(x, logpx=None)`` returns
``y``, or ``(y, logpx - logdet)`` with ``logdet`` of shape ``(B, 1)`` when ``logpx`` is given;
``inverse(y, logpy=None)`` returns ``x`` or ``(x, logpy + logdet)``. Autograd: any order (plain
PyTorch operations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..estimators import check_block_input
from ..ops import autocast_disabled

__all__ = ["AdditiveCoupling", "AffineCoupling", "ChannelCouplingBlock", "CouplingBlock", "InvertibleConv2dLU",
           "MaskedCouplingBlock", "coupling_mask"]

MASK_TYPES = ("channel0", "channel1", "checkerboard0", "checkerboard1")
SCALE_FNS = ("sigmoid", "exp")


def coupling_mask(x: Tensor, mask_type: str) -> Tensor:
    """The reference's coupling mask for ``x``: 1 where a coupling layer keeps the input, 0 where it
    transforms it. Parity with the reference: docs/parity.md#coupling_mask

    Args:
        x: the input, whose device, dtype and shape the mask takes.
        mask_type: ``'checkerboard0'`` (1 where ``h + w`` is even), ``'checkerboard1'`` (odd), ``'channel0'``
            (1 on the first half of dim 1) or ``'channel1'`` (the second half).

    Shapes:
        x: (B, C, H, W) for checkerboard masks; (B, C, ...) with even C for channel masks.
        output: (1, 1, H, W) for checkerboard masks, (1, C, 1, ...) for channel masks (broadcasts against x).
    """
    _check_mask_type(mask_type)
    if mask_type.startswith("checkerboard"):
        if x.dim() != 4:
            raise ValueError(f"x: a checkerboard mask expects a 4-D input (B, C, H, W), but got shape {tuple(x.shape)}")
        h, w = x.shape[2], x.shape[3]
        parity = torch.arange(h, device=x.device).view(h, 1) + torch.arange(w, device=x.device).view(1, w)
        keep = parity.remainder(2) == (1 if mask_type == "checkerboard1" else 0)
        return keep.to(x.dtype).view(1, 1, h, w)
    if x.dim() < 2 or x.shape[1] % 2:
        raise ValueError(f"x: a channel mask expects an input of at least 2 dims with an even size of dim 1, but got "
                         f"shape {tuple(x.shape)}")
    c = x.shape[1]
    keep = torch.arange(c, device=x.device) < c // 2
    if mask_type == "channel1":
        keep = ~keep
    return keep.to(x.dtype).view(1, c, *([1] * (x.dim() - 2)))


def _check_mask_type(mask_type, allowed=MASK_TYPES) -> None:
    if mask_type not in allowed:
        raise ValueError(f"mask_type: expected one of {', '.join(map(repr, allowed))}, but got {mask_type!r}")


class _Coupling(nn.Module):
    """Shared machinery of the coupling layers (see the module docstring).

    Two layouts: ``split`` (channel masks): ``x`` is cut along dim 1 into the kept half ``x_a``
    and the transformed half ``x_b``, ``nnet(x_a)`` gives the parameters for ``x_b`` and the halves
    are concatenated back in place; ``masked``: ``nnet(b * x)`` gives parameters for the whole
    input, applied where the mask ``b`` is 0. ``nnet`` returns ``n_params`` blocks of the
    transformed part's channels, concatenated along dim 1 (affine: log-scale parameter first,
    then shift; additive: the shift).
    """

    n_params = 1

    def __init__(self, dim: int, nnet: nn.Module, mask_type: str) -> None:
        super().__init__()
        _check_mask_type(mask_type)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ValueError(f"dim: expected a positive int (the size of dim 1 of the input), but got {dim!r}")
        if mask_type.startswith("channel") and dim % 2:
            raise ValueError(f"dim: a channel mask ({mask_type!r}) expects an even number of channels / features, "
                             f"but got {dim}")
        self.dim = dim
        self.nnet = nnet
        self.mask_type = mask_type
        self.masked = mask_type.startswith("checkerboard")

    # -- layout helpers -------------------------------------------------------------------------

    def _check_input(self, x: Tensor, name: str) -> None:
        check_block_input(type(self).__name__, name, x, self.nnet)
        if self.mask_type.startswith("checkerboard") and x.dim() != 4:
            raise ValueError(f"{name}: {type(self).__name__} with mask_type={self.mask_type!r} expects a 4-D input "
                             f"(B, C, H, W), but got shape {tuple(x.shape)}")
        if x.dim() < 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name}: {type(self).__name__} expects an input of at least 2 dims with size {self.dim} "
                             f"in dim 1, but got shape {tuple(x.shape)}")

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        d = self.dim // 2
        if self.mask_type == "channel0":
            return x[:, :d], x[:, d:]
        return x[:, d:], x[:, :d]

    def _merge(self, kept: Tensor, changed: Tensor) -> Tensor:
        return torch.cat([kept, changed] if self.mask_type == "channel0" else [changed, kept], dim=1)

    def _params(self, h: Tensor, like: Tensor) -> list[Tensor]:
        """``nnet(h)`` cut into ``n_params`` tensors shaped like ``like`` (the transformed part), in its
        dtype: under autocast the network runs in 16 bits, the transform and its log-det do not."""
        f = self.nnet(h)
        f = f if f.dtype == like.dtype else f.to(like.dtype)
        c = like.shape[1]
        expected = (like.shape[0], self.n_params * c, *like.shape[2:])
        if tuple(f.shape) != expected:
            raise ValueError(f"nnet: {type(self).__name__} expects the network to return shape {expected} "
                             f"({self.n_params} × the {c} transformed channels), but it returned {tuple(f.shape)}")
        return [f[:, i * c:(i + 1) * c] for i in range(self.n_params)]

    # -- the elementwise transform (subclasses) ---------------------------------------------------

    def _fwd(self, x_b: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _inv(self, y_b: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _masked_fwd(self, x: Tensor, b: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _masked_inv(self, y: Tensor, b: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------------------

    def forward(self, x: Tensor, logpx: Tensor | None = None):
        self._check_input(x, "x")
        if self.masked:
            b = coupling_mask(x, self.mask_type)
            x_a = b * x
            y, log_scale = self._masked_fwd(x, b, self._params(x_a, x))
        else:
            x_a, x_b = self._split(x)
            y_b, log_scale = self._fwd(x_b, self._params(x_a, x_b))
            y = self._merge(x_a, y_b)
        if logpx is None:
            return y
        if log_scale is None:
            return y, logpx
        return y, logpx - log_scale.flatten(1).sum(1, keepdim=True)

    def inverse(self, y: Tensor, logpy: Tensor | None = None):
        self._check_input(y, "y")
        if self.masked:
            b = coupling_mask(y, self.mask_type)
            y_a = b * y
            x, log_scale = self._masked_inv(y, b, self._params(y_a, y))
        else:
            y_a, y_b = self._split(y)
            x_b, log_scale = self._inv(y_b, self._params(y_a, y_b))
            x = self._merge(y_a, x_b)
        if logpy is None:
            return x
        if log_scale is None:
            return x, logpy
        return x, logpy + log_scale.flatten(1).sum(1, keepdim=True)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mask_type={self.mask_type!r}"


class AffineCoupling(_Coupling):
    """Real NVP's affine coupling (Dinh et al., 2017):
    ``y_a = x_a``, ``y_b = x_b · scale(s(x_a)) + t(x_a)``; log-det ``Σ log scale`` over the
    transformed part; inverse ``x_b = (y_b - t) / scale``.

    Args:
        dim: size of dim 1 of the input (channels of ``(B, C, H, W)``, features of ``(B, D)``;
            even for the channel masks).
        nnet: the conditioner. Channel masks: maps the kept half ``(B, dim/2, ...)`` to
            ``(B, dim, ...)``, i.e. ``s`` then ``t`` for the other half. Checkerboard masks: maps the
            masked input ``b·x`` ``(B, dim, H, W)`` to ``(B, 2·dim, H, W)``, ``s`` then ``t``.
        mask_type: ``'channel0'``, ``'channel1'``, ``'checkerboard0'`` or ``'checkerboard1'``
            (see the module docstring).
        scale_fn: the scale parameterisation. ``'sigmoid'`` (default): ``scale = sigmoid(s + 2)``,
            in (0, 1) and about 0.88 at ``s = 0``, as the Residual Flows reference and Glow: it
            cannot blow up, which keeps training stable. ``'exp'``: ``scale = exp(s)``, Real NVP's
            original unbounded form.

    With ``scale_fn='sigmoid'`` and a channel mask this is the reference's
    :class:`ChannelCouplingBlock`; with a checkerboard mask its :class:`MaskedCouplingBlock`.
    The log-scale is ``logsigmoid(s + 2)``, finite where the sigmoid underflows (docs/parity.md#maskedcouplingblock).

    Shapes: ``(B, dim)`` or ``(B, dim, *spatial)`` for channel masks, ``(B, dim, H, W)`` for
    checkerboard masks; log-densities ``(B, 1)``.
    """

    n_params = 2

    def __init__(self, dim: int, nnet: nn.Module, mask_type: str = "channel0", scale_fn: str = "sigmoid") -> None:
        if scale_fn not in SCALE_FNS:
            raise ValueError(f"scale_fn: expected one of {', '.join(map(repr, SCALE_FNS))}, but got {scale_fn!r}")
        super().__init__(dim, nnet, mask_type)
        self.scale_fn = scale_fn

    def _scale(self, s: Tensor) -> tuple[Tensor, Tensor]:
        if self.scale_fn == "sigmoid":
            return torch.sigmoid(s + 2.0), F.logsigmoid(s + 2.0)
        return torch.exp(s), s

    def _fwd(self, x_b, params):
        s, t = params
        scale, log_scale = self._scale(s)
        return x_b * scale + t, log_scale

    def _inv(self, y_b, params):
        s, t = params
        scale, log_scale = self._scale(s)
        return (y_b - t) / scale, log_scale

    def _masked_fwd(self, x, b, params):
        s, t = params
        scale, log_scale = self._scale(s)
        # The reference's order of operations: (x·scale + t)·(1 - b) + b·x.
        return (x * scale + t) * (1 - b) + b * x, log_scale * (1 - b)

    def _masked_inv(self, y, b, params):
        s, t = params
        scale, log_scale = self._scale(s)
        return b * y + (1 - b) * (y - t) / scale, log_scale * (1 - b)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale_fn={self.scale_fn!r}"


class AdditiveCoupling(_Coupling):
    """NICE's additive coupling (Dinh et al., 2015): ``y_a = x_a``, ``y_b = x_b + t(x_a)``; volume
    preserving (log-det 0, so ``logpx`` is returned unchanged); inverse ``x_b = y_b - t(y_a)``.

    Args:
        dim: size of dim 1 of the input (even for the channel masks).
        nnet: the conditioner. Channel masks: maps the kept half ``(B, dim/2, ...)`` to ``t`` of
            shape ``(B, dim/2, ...)``. Checkerboard masks: maps ``b·x`` ``(B, dim, H, W)`` to ``t``
            of shape ``(B, dim, H, W)`` (used where the mask is 0).
        mask_type: ``'channel0'``, ``'channel1'``, ``'checkerboard0'`` or ``'checkerboard1'``.

    Shapes: as :class:`AffineCoupling`.
    """

    n_params = 1

    def __init__(self, dim: int, nnet: nn.Module, mask_type: str = "channel0") -> None:
        super().__init__(dim, nnet, mask_type)

    def _fwd(self, x_b, params):
        return x_b + params[0], None

    def _inv(self, y_b, params):
        return y_b - params[0], None

    def _masked_fwd(self, x, b, params):
        return (x + params[0]) * (1 - b) + b * x, None

    def _masked_inv(self, y, b, params):
        return b * y + (1 - b) * (y - params[0]), None


class CouplingBlock(AffineCoupling):
    """The reference's coupling layer for a split along dim 1 (features of ``(B, D)`` or channels of
    ``(B, C, H, W)``): with ``d = dim // 2``, ``x_a = x[:, :d]`` and ``x_b = x[:, d:]`` (the other way
    round with ``swap=True``), ``nnet(x_a) = [s, t]``, ``y_b = x_b · sigmoid(s + 2) + t``, log-det
    ``Σ log sigmoid(s + 2)``. An :class:`AffineCoupling` with mask ``'channel1'`` if ``swap`` else
    ``'channel0'`` and ``scale_fn='sigmoid'``. Parity with the reference: docs/parity.md#couplingblock

    Args:
        dim: size of dim 1 of the input (even).
        nnet: the conditioner, from ``(B, d, *)`` to ``(B, 2d, *)`` (``s`` then ``t``, ``d`` channels each).
        swap: keep the second half and transform the first.

    Shapes:
        ``(B, dim, *)``; log-densities ``(B, 1)``.
    """

    def __init__(self, dim: int, nnet: nn.Module, swap: bool = False) -> None:
        super().__init__(dim, nnet, "channel1" if swap else "channel0", "sigmoid")
        self.d = dim // 2
        self.swap = bool(swap)

    def extra_repr(self) -> str:
        return f"dim={self.d}, swap={self.swap}"


class ChannelCouplingBlock(CouplingBlock):
    """The reference's channel-wise coupling for images: :class:`CouplingBlock` that keeps the first
    or the second half of the channels. Parity with the reference: docs/parity.md#channelcouplingblock

    Args:
        dim: number of channels (even).
        nnet: the conditioner, from ``(B, dim/2, H, W)`` to ``(B, dim, H, W)`` (``s`` then ``t``).
        mask_type: ``'channel0'`` (keep the first half) or ``'channel1'`` (keep the second, ``swap=True``).

    Shapes:
        ``(B, dim, H, W)`` (any input with ``dim`` in dim 1 works); log-densities ``(B, 1)``.
    """

    def __init__(self, dim: int, nnet: nn.Module, mask_type: str = "channel0") -> None:
        _check_mask_type(mask_type, ("channel0", "channel1"))
        super().__init__(dim, nnet, swap=mask_type == "channel1")

    def extra_repr(self) -> str:
        return f"dim={self.d}, mask_type={self.mask_type}"


class MaskedCouplingBlock(AffineCoupling):
    """The reference's mask-based coupling for images: with the mask ``b`` (see
    :func:`coupling_mask`), ``nnet(b·x) = [s', t]``, ``s = sigmoid(s' + 2)``,
    ``y = (x·s + t)·(1 - b) + b·x``, log-det ``Σ (1 - b)·log s``; inverse
    ``x = b·y + (1 - b)·(y - t) / s``. Parity with the reference: docs/parity.md#maskedcouplingblock

    Args:
        dim: number of channels.
        nnet: the conditioner, from ``(B, dim, H, W)`` to ``(B, 2·dim, H, W)`` (``s'`` then ``t``).
        mask_type: ``'checkerboard0'``, ``'checkerboard1'``, or, masked, ``'channel0'`` / ``'channel1'``.

    Shapes:
        ``(B, dim, H, W)``; log-densities ``(B, 1)``.
    """

    def __init__(self, dim: int, nnet: nn.Module, mask_type: str = "checkerboard0") -> None:
        super().__init__(dim, nnet, mask_type, "sigmoid")
        self.masked = True  # channel masks too: nnet sees the full-size masked input
        self.d = dim

    def extra_repr(self) -> str:
        return f"dim={self.d}, mask_type={self.mask_type}"


class InvertibleConv2dLU(nn.Module):
    """Glow's invertible 1×1 convolution (Kingma & Dhariwal, 2018) in the LU parameterisation:
    ``W = P · L · (U + diag(sign_S · exp(log_S)))`` with a fixed permutation ``P`` (buffer), a unit
    lower-triangular ``L`` (parameter; only its strict lower triangle is used), a strictly upper
    triangular ``U`` (parameter; only its strict upper triangle is used), the signs of the
    diagonal ``sign_S`` (buffer) and ``log_S = log|diag|`` (parameter). Initialised from the LU
    factorisation of a random orthogonal matrix (torch's global RNG), as Glow.
    Parity with normflows' ``Invertible1x1Conv``: docs/parity.md#invertibleconv2dlu

    ``forward``: ``y = W x`` over channels, log-det ``H·W·Σ log_S`` (``Σ log_S`` for ``(B, C)``
    inputs, where the layer is a linear map); ``inverse`` applies ``W⁻¹ = (U + diag)⁻¹ L⁻¹ Pᵀ``
    from two triangular solves.

    Args:
        num_channels: number of channels C.

    Shapes:
        ``(B, C, H, W)`` or ``(B, C)``; log-densities ``(B, 1)``.

    Autograd: any order.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        if not isinstance(num_channels, int) or isinstance(num_channels, bool) or num_channels <= 0:
            raise ValueError(f"num_channels: expected a positive int, but got {num_channels!r}")
        self.num_channels = num_channels
        q = torch.linalg.qr(torch.randn(num_channels, num_channels))[0]
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("P", p)
        self.L = nn.Parameter(torch.tril(lower, -1))
        self.register_buffer("sign_S", torch.sign(diag))
        self.log_S = nn.Parameter(torch.log(torch.abs(diag)))
        self.U = nn.Parameter(torch.triu(upper, 1))

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.num_channels, dtype=self.L.dtype, device=self.L.device)
        lower = torch.tril(self.L, -1) + eye
        upper = torch.triu(self.U, 1) + torch.diag(self.sign_S * torch.exp(self.log_S))
        return lower, upper

    @property
    def weight(self) -> Tensor:
        """The assembled ``C × C`` matrix ``W = P L (U + diag(s))``."""
        lower, upper = self._factors()
        return self.P @ lower @ upper

    def inverse_weight(self) -> Tensor:
        """``W⁻¹ = (U + diag(s))⁻¹ L⁻¹ Pᵀ`` from two triangular solves."""
        lower, upper = self._factors()
        z = torch.linalg.solve_triangular(lower, self.P.t(), upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, z, upper=True)

    def _transform(self, x: Tensor, matrix: Tensor, name: str) -> Tensor:
        check_block_input("InvertibleConv2dLU", name, x, self)
        if x.dim() not in (2, 4) or x.shape[1] != self.num_channels:
            raise ValueError(f"{name}: InvertibleConv2dLU expects (B, {self.num_channels}, H, W) or "
                             f"(B, {self.num_channels}), but got shape {tuple(x.shape)}")
        with autocast_disabled(x):  # in x's dtype also under autocast, as InvertibleConv2d
            if x.dim() == 2:
                return F.linear(x, matrix)
            return F.conv2d(x, matrix.view(self.num_channels, self.num_channels, 1, 1))

    def _logdet(self, x: Tensor) -> Tensor:
        positions = x.shape[2] * x.shape[3] if x.dim() == 4 else 1
        return (self.log_S.sum() * positions).expand(x.shape[0], 1)

    def forward(self, x: Tensor, logpx: Tensor | None = None):
        y = self._transform(x, self.weight, "x")
        return y if logpx is None else (y, logpx - self._logdet(x))

    def inverse(self, y: Tensor, logpy: Tensor | None = None):
        x = self._transform(y, self.inverse_weight(), "y")
        return x if logpy is None else (x, logpy + self._logdet(y))

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}"
