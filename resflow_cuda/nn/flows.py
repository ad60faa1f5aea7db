"""The flow layers around the residual blocks of Residual Flows, with the reference semantics
(residual-flows ``resflows/layers``: act_norm, squeeze, elemwise, container, glow, normalization).

Every layer is invertible and follows one calling convention: ``forward(x, logpx=None)`` returns
``y``, or ``(y, logpx - logdet)`` when ``logpx`` (shape ``(B, 1)``) is given; ``inverse(y,
logpy=None)`` returns ``x`` or ``(x, logpy + logdet)``. Log-determinants are exact. The layers that
ImpFlow's code calls with ``restore`` (ActNorm, SqueezeLayer, LogitTransform, SequentialFlow) take
it in ``forward``; only SequentialFlow uses it (it passes it on).
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor, nn

from .. import flow_ops
from ..ops import _FLOAT_DTYPES, autocast_disabled

# flow_ops.actnorm's CUDA backward reduces each channel in one thread block: larger layers keep ATen's ops,
# whose reductions spread over the whole GPU.
_ACTNORM_CUDA_MAX = 1 << 16


def _in_transform(*tensors) -> bool:
    """Whether forward-mode AD (a dual level) or a torch.func transform (a wrapped tensor) is active: the
    custom ops have backward formulas only, so the layers take ATen's ops there."""
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return forward_ad._current_level >= 0 or (wrapped is not None and any(
        isinstance(t, Tensor) and wrapped(t) for t in tensors))


def _with_logp(y: Tensor, logp: Tensor | None, delta: Tensor | None, subtract: bool = False):
    """y, or (y, logp + delta) when logp is given (logp - delta with ``subtract``: one op, where a negated
    delta would be two; delta None: no change)."""
    if logp is None:
        return y
    if delta is None:
        return y, logp
    return y, logp - delta if subtract else logp + delta


class ActNormNd(nn.Module):
    """Per-channel affine ``y = (x + bias) * exp(weight)`` initialised from the first batch:
    ``bias = -mean``, ``weight = -log(max(var, 0.2)) / 2`` (unbiased variance, per channel over the
    batch and positions), after which ``initialized`` (an int64 buffer) is 1. The log-det is
    ``sum(weight)`` times the positions per channel. Parity with the reference: docs/parity.md#actnorm1d-actnorm2d

    Args:
        num_features: number of channels C.
        eps: unused, kept for the signature.

    Shapes:
        x, y: (B, C) (ActNorm1d) or (B, C, H, W) (ActNorm2d); logpx: (B, 1).
    """

    _view: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-12) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"ActNorm: expected num_features to be a positive int, but got {num_features!r}")
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(0))
        self._known_initialized = False

    def _check(self, x: Tensor) -> None:
        if x.dim() != len(self._view) or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: expected input of {len(self._view)} dims with "
                             f"{self.num_features} channels in dim 1, but got shape {tuple(x.shape)}")

    def _is_initialized(self) -> bool:
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    def forward(self, x: Tensor, logpx: Tensor | None = None, restore: bool | None = None):
        self._check(x)
        if not self._is_initialized():
            with torch.no_grad():
                flat = x.transpose(0, 1).reshape(self.num_features, -1)
                var = torch.var(flat, dim=1).clamp(min=0.2)
                self.bias.copy_(-flat.mean(dim=1))
                self.weight.copy_(-0.5 * torch.log(var))
                self.initialized.fill_(1)
            self._known_initialized = True
        if self._fused(x, logpx):
            y, logpy = flow_ops.actnorm(x, self.weight, self.bias, logpx, -1)
            return y if logpx is None else (y, logpy)
        y = (x + self.bias.view(self._view)) * torch.exp(self.weight.view(self._view))
        return y if logpx is None else (y, self._add_logdet(logpx, x, -1))

    def _fused(self, x: Tensor, logpx) -> bool:
        """Whether the forward runs as one op each way (flow_ops.actnorm): x contiguous and of the parameters'
        dtype and device (not under autocast's mixed dtypes), logpx None or a (B, 1) tensor of that dtype (the
        shape and dtype the ATen expression gives), no forward-mode AD or torch.func transform (the op has a
        backward formula only), and on CUDA at most _ACTNORM_CUDA_MAX values per channel (its backward reduces
        each channel in one thread block)."""
        return (x.is_contiguous() and x.dtype == self.weight.dtype == self.bias.dtype and x.device == self.weight.device
                and x.dtype in _FLOAT_DTYPES
                and (logpx is None or (isinstance(logpx, Tensor) and logpx.dtype == x.dtype
                                       and logpx.shape == (x.shape[0], 1)))
                and not (x.is_cuda and x.numel() > _ACTNORM_CUDA_MAX * max(1, x.shape[1]))
                and not _in_transform(x, self.weight, self.bias, logpx))

    def inverse(self, y: Tensor, logpy: Tensor | None = None):
        self._check(y)
        if not self._is_initialized():
            raise RuntimeError(f"{type(self).__name__}.inverse: the layer is not initialised; run a forward pass on "
                               "data (or load a state_dict) first")
        x = y * torch.exp(-self.weight.view(self._view)) - self.bias.view(self._view)
        return x if logpy is None else (x, self._add_logdet(logpy, x, 1))

    def _add_logdet(self, logp: Tensor | float, x: Tensor, sign: int) -> Tensor:
        """logp + sign * the log-det, sum(weight) times the positions per channel, as (B, 1); for a (B, 1) logp
        of the result's dtype the multiple of the sum in the add itself (its alpha), else broadcast and promoted
        as logp + a (B, 1) tensor."""
        positions = x[0, 0].numel()
        if (isinstance(logp, Tensor) and logp.shape == (x.shape[0], 1)
                and logp.dtype == torch.promote_types(logp.dtype, self.weight.dtype)):
            return torch.add(logp, self.weight.sum(), alpha=sign * positions)
        return logp + (self.weight.sum() * (sign * positions)).expand(x.shape[0], 1)

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_initialized = False
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return str(self.num_features)


class ActNorm1d(ActNormNd):
    """ActNorm on ``(B, C)`` inputs (see :class:`ActNormNd`)."""

    _view = (1, -1)


class ActNorm2d(ActNormNd):
    """ActNorm on ``(B, C, H, W)`` inputs (see :class:`ActNormNd`)."""

    _view = (1, -1, 1, 1)


class SqueezeLayer(nn.Module):
    """``(B, C, H·r, W·r) -> (B, C·r², H, W)``, output channel ``c·r² + i·r + j`` (the reference's
    reshape and permute, which is ``pixel_unshuffle``); log-det 0."""

    def __init__(self, downscale_factor: int) -> None:
        super().__init__()
        self.downscale_factor = downscale_factor

    def forward(self, x: Tensor, logpx: Tensor | None = None, restore: bool = False):
        r = self.downscale_factor
        if x.dim() != 4 or x.shape[2] % r or x.shape[3] % r:
            raise ValueError(f"SqueezeLayer: expected a 4-D input with H and W divisible by {r}, "
                             f"but got shape {tuple(x.shape)}")
        if x.shape[0] == 0:  # pixel_unshuffle returns an empty batch in its input's shape
            b, c, h, w = x.shape
            return _with_logp(x.new_empty(0, c * r * r, h // r, w // r), logpx, None)
        return _with_logp(F.pixel_unshuffle(x, r), logpx, None)

    def inverse(self, y: Tensor, logpy: Tensor | None = None):
        r = self.downscale_factor
        if y.dim() == 4 and y.shape[0] == 0 and y.shape[1] % (r * r) == 0:  # as pixel_unshuffle, pixel_shuffle
            b, c, h, w = y.shape
            return _with_logp(y.new_empty(0, c // (r * r), h * r, w * r), logpy, None)
        return _with_logp(F.pixel_shuffle(y, r), logpy, None)

    def extra_repr(self) -> str:
        return str(self.downscale_factor)


class LogitTransform(nn.Module):
    """``y = logit(alpha + (1 - 2 alpha) x)`` for data in [0, 1] (Real NVP's preprocessing);
    log-det ``sum(log(1 - 2 alpha) - log(s - s²))`` with ``s = alpha + (1 - 2 alpha) x``."""

    def __init__(self, alpha: float = 1e-6) -> None:
        super().__init__()
        self.alpha = alpha

    def _logdet(self, x: Tensor) -> Tensor:
        s = self.alpha + (1 - 2 * self.alpha) * x
        return (math.log(1 - 2 * self.alpha) - torch.log(s - s * s)).reshape(x.shape[0], -1).sum(1, keepdim=True)

    def forward(self, x: Tensor, logpx: Tensor | None = None, restore: bool = False):
        s = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(s) - torch.log(1 - s)
        return _with_logp(y, logpx, None if logpx is None else self._logdet(x), subtract=True)

    def inverse(self, y: Tensor, logpy: Tensor | None = None):
        x = (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)
        return _with_logp(x, logpy, None if logpy is None else self._logdet(x))

    def extra_repr(self) -> str:
        return str(self.alpha)


class Normalize(nn.Module):
    """``y[:, c] = (x[:, c] - mean[c]) / std[c]`` for the first ``len(mean)`` channels of an image
    batch (float32 buffers ``mean`` and ``std``); log-det ``-H·W·sum(log|std|)``."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def _logdet(self, x: Tensor) -> Tensor:
        return (-self.std.abs().log().sum() * x.shape[2] * x.shape[3]).expand(x.shape[0], 1)

    def forward(self, x: Tensor, logpx: Tensor | None = None):
        c = len(self.mean)
        y = x.clone()
        y[:, :c] = (x[:, :c] - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return _with_logp(y, logpx, None if logpx is None else self._logdet(x), subtract=True)

    def inverse(self, y: Tensor, logpy: Tensor | None = None):
        c = len(self.mean)
        x = y.clone()
        x[:, :c] = y[:, :c] * self.std.view(1, -1, 1, 1) + self.mean.view(1, -1, 1, 1)
        return _with_logp(x, logpy, None if logpy is None else self._logdet(x))


class ZeroMeanTransform(nn.Module):
    """``y = x - 0.5``; log-det 0."""

    def forward(self, x: Tensor, logpx: Tensor | None = None):
        return _with_logp(x - 0.5, logpx, None)

    def inverse(self, y: Tensor, logpy: Tensor | None = None):
        return _with_logp(y + 0.5, logpy, None)


class SequentialFlow(nn.Module):
    """A chain of flow layers (attribute ``chain``, so state_dict keys are ``chain.{i}.…``):
    forward through the chain, inverse backwards.

    ``forward``'s ``restore`` is ImpFlow's calling convention (its container passes it to every
    layer): it goes to the layers whose ``forward`` takes a ``restore`` argument (such as
    :class:`~resflow_cuda.nn.ImplicitBlock` and nested SequentialFlows) and not to the others.
    Parity with the reference: docs/parity.md#sequentialflow

    Args:
        layersList: the flow layers, each with ``forward(x, logpx=None)`` and ``inverse(y, logpy=None)``.

    Shapes:
        x, y: as the layers; logpx, logpy: (B, 1).

    Returns:
        ``forward(x)``: y; ``forward(x, logpx)``: ``(y, logpx - logdet)``; ``inverse`` likewise.
    """

    def __init__(self, layersList) -> None:
        super().__init__()
        self.chain = nn.ModuleList(layersList)

    def forward(self, x: Tensor, logpx: Tensor | None = None, restore: bool = False):
        for layer in self.chain:
            kwargs = {"restore": restore} if _takes_restore(type(layer)) else {}
            if logpx is None:
                x = layer(x, **kwargs)
            else:
                x, logpx = layer(x, logpx, **kwargs)
        return _with_logp(x, logpx, None)

    def inverse(self, y: Tensor, logpy: Tensor | None = None):
        for layer in reversed(self.chain):
            if logpy is None:
                y = layer.inverse(y)
            else:
                y, logpy = layer.inverse(y, logpy)
        return _with_logp(y, logpy, None)


@functools.cache
def _takes_restore(cls: type) -> bool:
    """Whether ``cls.forward`` takes a ``restore`` keyword (or any keyword)."""
    try:
        params = inspect.signature(cls.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "restore" and p.kind is not p.POSITIONAL_ONLY or p.kind is p.VAR_KEYWORD for p in params)


class Inverse(nn.Module):
    """The inverse of a flow: forward is ``flow.inverse`` and inverse is ``flow.forward``."""

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor, logpx: Tensor | None = None):
        return self.flow.inverse(x, logpx)

    def inverse(self, y: Tensor, logpy: Tensor | None = None):
        return self.flow.forward(y, logpy)


class _InvertibleMatrix(nn.Module):
    """A learnable invertible ``dim × dim`` matrix, initialised to a random permutation (torch's
    global RNG, as the reference); log|det W| per application. The product runs in x's dtype also
    under autocast: in 16 bits it would round the flow's state itself (docs/parity.md#mixed-precision)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.eye(dim)[torch.randperm(dim)])

    @property
    def _logdetgrad(self) -> Tensor:
        return torch.linalg.slogdet(self.weight)[1]

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class InvertibleLinear(_InvertibleMatrix):
    """``y = x Wᵀ`` on ``(B, dim)``; log-det ``log|det W|``."""

    def forward(self, x: Tensor, logpx: Tensor | None = None):
        with autocast_disabled(x):
            return _with_logp(F.linear(x, self.weight), logpx, None if logpx is None else self._logdetgrad,
                              subtract=True)

    def inverse(self, y: Tensor, logpy: Tensor | None = None):
        with autocast_disabled(y):
            return _with_logp(F.linear(y, torch.linalg.inv(self.weight)), logpy,
                              None if logpy is None else self._logdetgrad)


class InvertibleConv2d(_InvertibleMatrix):
    """Glow's invertible 1×1 convolution on ``(B, dim, H, W)``; log-det ``H·W·log|det W|``."""

    def forward(self, x: Tensor, logpx: Tensor | None = None):
        with autocast_disabled(x):
            y = F.conv2d(x, self.weight.view(self.dim, self.dim, 1, 1))
            delta = None if logpx is None else self._logdetgrad * (x.shape[2] * x.shape[3])
        return _with_logp(y, logpx, delta, subtract=True)

    def inverse(self, y: Tensor, logpy: Tensor | None = None):
        with autocast_disabled(y):
            x = F.conv2d(y, torch.linalg.inv(self.weight).view(self.dim, self.dim, 1, 1))
            delta = None if logpy is None else self._logdetgrad * (x.shape[2] * x.shape[3])
        return _with_logp(x, logpy, delta)


class MovingBatchNormNd(nn.Module):
    """Mean-only batch normalisation, as the reference: ``y = x - m + bias`` where ``m`` is the
    running mean before this batch's update (with ``bn_lag > 0``, a bias-corrected lagged mean
    that includes the batch mean); in training the running mean then moves toward the batch mean
    by ``decay`` and ``step`` is incremented. Log-det 0, as in the reference.
    Parity with the reference: docs/parity.md#movingbatchnorm1d-movingbatchnorm2d

    Args:
        num_features: number of channels C.
        eps: unused, kept for the signature.
        decay: step of the running mean toward the batch mean.
        bn_lag: lag of the mean used in training (0: the running mean).
        affine: learn a per-channel ``bias``.

    Shapes:
        x, y: (B, C) (MovingBatchNorm1d) or (B, C, H, W) (MovingBatchNorm2d); logpx: (B, 1).
    """

    _view: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-4, decay: float = 0.1, bn_lag: float = 0.0,
                 affine: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.affine = affine
        self.eps = eps
        self.decay = decay
        self.bn_lag = bn_lag
        self.register_buffer("step", torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: Tensor, logpx: Tensor | None = None):
        used_mean = self.running_mean.clone()
        if self.training:
            batch_mean = x.transpose(0, 1).reshape(x.shape[1], -1).mean(dim=1)
            if self.bn_lag > 0:
                used_mean = batch_mean - (1 - self.bn_lag) * (batch_mean - used_mean)
                used_mean = used_mean / (1.0 - self.bn_lag ** (self.step[0] + 1))
            with torch.no_grad():
                self.running_mean -= self.decay * (self.running_mean - batch_mean)
                self.step += 1
        y = x - used_mean.view(self._view)
        if self.affine:
            y = y + self.bias.view(self._view)
        return _with_logp(y, logpx, None)

    def inverse(self, y: Tensor, logpy: Tensor | None = None):
        if self.affine:
            y = y - self.bias.view(self._view)
        return _with_logp(y + self.running_mean.view(self._view), logpy, None)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, decay={self.decay}, bn_lag={self.bn_lag}, affine={self.affine}"


class MovingBatchNorm1d(MovingBatchNormNd):
    _view = (1, -1)


class MovingBatchNorm2d(MovingBatchNormNd):
    _view = (1, -1, 1, 1)
