"""What the SpectralNorm* and InducedNorm* layers share: argument checks, the reference's
initialisation, W / max(1, sigma / coeff) with the reference's iteration settings, learnable norm
orders, and the convolutions' operator (see :mod:`resflow_cuda.nn.lipschitz`)."""

from __future__ import annotations

import collections.abc
import math

import torch
import torch.nn.functional as F
import torch.nn.init as init
from torch import Tensor, nn

from .. import ops

__all__ = ["asym_squash"]

INF = float("inf")


def leaky_elu(x: Tensor, a: float = 0.3) -> Tensor:
    return a * x + (1 - a) * F.elu(x)


def asym_squash(x: Tensor) -> Tensor:
    """Maps a learnable norm parameter to an order in (1, 5); 0 gives 2 (the reference's map)."""
    return torch.tanh(-leaky_elu(-x + 0.5493061829986572)) * 2 + 3


def _check_common(coeff, n_iterations, atol, rtol):
    if not coeff > 0:
        raise ValueError(f"coeff must be > 0 (the Lipschitz bound of the layer), got {coeff}")
    if n_iterations is not None and (not isinstance(n_iterations, int) or n_iterations < 0):
        raise ValueError(f"n_iterations must be None or an integer >= 0, got {n_iterations!r}")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not value >= 0:
            raise ValueError(f"{name} must be None or >= 0, got {value}")


def _check_norm(name, p):
    if torch.is_tensor(p):
        return
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p >= 1:
        raise ValueError(f"{name} must be a norm order >= 1 (or inf), got {p!r}")


def _load_conv_geometry(layer, state_dict, prefix, initialized: bool) -> None:
    """Prepares a Lipschitz convolution to load a checkpoint: takes its input size (spatial_dims)
    and gives the u / v buffers the sizes that this geometry implies, so that torch's loader
    reports a checkpoint whose u or v disagrees with the layer ("size mismatch for u", always an
    error) or lacks one ("Missing key(s)", an error with strict=True) as it does for any buffer,
    instead of the layer adopting them. A buffer resized here starts from a random unit vector, as
    at initialisation (what strict=False leaves for a missing one).

    Args:
        layer: a SpectralNormConv2d or InducedNormConv2d.
        initialized: whether the checkpoint's u and v are those of the operator (after the first
            forward); before it they have the channel counts (out_channels, in_channels).
    """
    dims = state_dict.get(prefix + "spatial_dims")
    if torch.is_tensor(dims) and dims.numel() == 2 and bool((dims >= 1).all()):
        layer._input_hw = tuple(int(d) for d in dims.tolist())
    n_u, n_v = layer.out_channels, layer.in_channels
    if initialized and not layer._pointwise:
        n_u = math.prod(layer._output_shape())
        n_v = layer.in_channels * layer._input_hw[0] * layer._input_hw[1]
        if n_u <= 0:
            raise ValueError(f"{prefix}spatial_dims: the checkpoint's input size {list(layer._input_hw)} is smaller "
                             f"than the {layer.kernel_size} kernel with padding {layer.padding}")
    for name, n in (("u", n_u), ("v", n_v)):
        mine = layer._buffers.get(name)
        if mine is None or tuple(mine.shape) != (n,):
            like = layer.weight
            fresh = torch.randn(n, dtype=like.dtype, device=like.device)
            layer.register_buffer(name, fresh / fresh.norm().clamp_min(1e-12))


def _reset_parameters(module, zero_init=False):
    init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    if zero_init:
        # The reference's zero_init: a tiny, not a zero, weight (normalisation needs a non-zero W).
        module.weight.data.div_(1000)
    if module.bias is not None:
        fan_in, _ = init._calculate_fan_in_and_fan_out(module.weight)
        bound = 1 / math.sqrt(fan_in)
        init.uniform_(module.bias, -bound, bound)


class _LipschitzMixin:
    """sigma -> W / max(1, sigma / coeff), and the reference's resolution of iteration settings."""

    def _sigma(self, u: Tensor, v: Tensor) -> Tensor:
        """u^T W v of a matrix layer (the convolutions override it)."""
        return torch.dot(u, torch.mv(self.weight, v))

    def _normalized(self, weight: Tensor, u: Tensor, v: Tensor) -> Tensor:
        # sigma in the weight's dtype also under autocast, as the power iteration that gave u and v
        # (docs/parity.md#mixed-precision); the normalized weight then goes into the layer's product.
        with ops.autocast_disabled(weight):
            sigma = self._sigma(u, v)
        with torch.no_grad():
            self.scale.copy_(sigma)
        if self.detach_sigma:
            sigma = sigma.detach()
        # torch.max, not clamp: equal gradients at sigma == coeff, as in the reference.
        factor = torch.max(sigma.new_ones(1), sigma / self.coeff)
        return weight / factor

    def normalization_inputs(self, input: Tensor | None) -> tuple:
        """(weight, u, v, coeff, detach_sigma, scale) of the weight that ``forward_weight(input)`` returns,
        with its side effects but for the scale buffer: the fast paths (:mod:`resflow_cuda.linearize`,
        :mod:`resflow_cuda.dense_block`) normalize the weights in one op, which writes the scales. input
        may be None once :meth:`normalization_ready`."""
        u, v = self.forward_vectors(input)
        return self.weight, u, v, self.coeff, self.detach_sigma, self.scale

    def normalization_ready(self) -> bool:
        """Whether :meth:`normalization_inputs` can run without the input (a matrix layer: always)."""
        return True

    def _iteration_settings(self, n_iterations, atol, rtol, default_max):
        n_iterations = self.n_iterations if n_iterations is None else n_iterations
        atol = self.atol if atol is None else atol
        if rtol is None:
            rtol = self.rtol
        elif self.reference_rtol_quirk:
            rtol = atol
        if n_iterations is None and (atol is None or rtol is None):
            raise ValueError("Need one of n_iteration or (atol, rtol).")
        return n_iterations, atol, rtol, (default_max if n_iterations is None else n_iterations)


class _InducedNormsMixin:
    """The norm orders of the InducedNorm* layers: numbers, or learnable tensors mapped by asym_squash."""

    def compute_domain_codomain(self):
        if torch.is_tensor(self.domain):
            return asym_squash(self.domain), asym_squash(self.codomain)
        return self.domain, self.codomain

    def _learnable_norms(self) -> bool:
        return torch.is_tensor(self.domain) or torch.is_tensor(self.codomain)


def _pair(x):
    return tuple(x) if isinstance(x, collections.abc.Iterable) else (x, x)


class _LipschitzConv2d(_LipschitzMixin, nn.Module):
    """What the Lipschitz convolutions share: parameters, the recorded input size (kept in Python
    as well, so forward reads no buffer), the power iteration of the operator, sigma = u^T A v."""

    def _setup(self, in_channels, out_channels, kernel_size, stride, padding, bias, coeff, n_iterations, atol, rtol,
               detach_sigma, reference_rtol_quirk):
        _check_common(coeff, n_iterations, atol, rtol)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        self.coeff, self.n_iterations, self.atol, self.rtol = coeff, n_iterations, atol, rtol
        self.detach_sigma, self.reference_rtol_quirk = detach_sigma, reference_rtol_quirk
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_channels)) if bias else None)
        self._input_hw = (1, 1)  # mirrors the spatial_dims buffer

    @property
    def _pointwise(self) -> bool:
        return self.kernel_size == (1, 1)

    def _output_shape(self):
        h, w = self._input_hw
        return (1, self.out_channels, (h + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1,
                (w + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1)

    def _record_input_size(self, input: Tensor) -> None:
        self._input_hw = tuple(int(d) for d in input.shape[2:4])
        self.spatial_dims.copy_(torch.tensor(input.shape[2:4]).to(self.spatial_dims))

    def _matrix(self, weight: Tensor) -> Tensor:
        return weight.view(self.out_channels, self.in_channels)

    def _power_iterate(self, weight, u, v, max_iterations, atol, rtol, domain, codomain, u_first):
        """The op for this layer's operator: a matrix for 1x1 kernels, else the convolution."""
        if self._pointwise:
            return ops.power_iteration(self._matrix(weight), u, v, max_iterations, atol, rtol, domain, codomain,
                                       u_first)
        return ops.conv_power_iteration(weight, u, v, self._input_hw, self.stride, self.padding, max_iterations, atol,
                                        rtol, domain, codomain, u_first)

    def _sigma(self, u: Tensor, v: Tensor) -> Tensor:
        if self._pointwise:
            return torch.dot(u, torch.mv(self._matrix(self.weight), v))
        weight_v = F.conv2d(v.view(1, self.in_channels, *self._input_hw), self.weight, stride=self.stride,
                            padding=self.padding)
        return torch.dot(u.view(-1), weight_v.view(-1))

    def forward_weight(self, input: Tensor) -> Tensor:
        """The weight forward applies to ``input`` (recording its size on the first call)."""
        return self._normalized(self.weight, *self.forward_vectors(input))

    def forward_vectors(self, input: Tensor) -> tuple[Tensor, Tensor]:
        """(u, v) that :meth:`forward_weight` normalizes with, with its side effects but for the scale buffer."""
        if not self._is_initialized():
            self._record_input_size(input)
        return self._vectors(self._update_in_forward())

    def normalization_ready(self) -> bool:
        """Once the layer has recorded its input size (its first forward, or a loaded checkpoint)."""
        return self._is_initialized()

    def normalization_inputs(self, input: Tensor | None) -> tuple:
        """As the matrix layers' (:meth:`_LipschitzMixin.normalization_inputs`), with u and v as the
        convolution's output and input images (1, C, H, W) (vectors for 1x1 kernels, whose operator is
        the matrix)."""
        weight, u, v, coeff, detach_sigma, scale = super().normalization_inputs(input)
        if not self._pointwise:
            u, v = u.view(self._output_shape()), v.view(1, self.in_channels, *self._input_hw)
        return weight, u, v, coeff, detach_sigma, scale

    def forward(self, input: Tensor) -> Tensor:
        return F.conv2d(input, self.forward_weight(input), self.bias, self.stride, self.padding, 1, 1)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.bias is None:
            s += ", bias=False"
        return s
