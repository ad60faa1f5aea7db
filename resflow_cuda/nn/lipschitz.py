"""Lipschitz-constrained linear and convolution layers of Residual Flows.

Drop-in versions of residual-flows' ``SpectralNormLinear``, ``SpectralNormConv2d``,
``InducedNormLinear``, ``InducedNormConv2d``, ``LopLinear``, ``LopConv2d``, ``get_linear`` and
``get_conv2d`` (``resflows/layers/base/lipschitz.py`` and ``mixed_lipschitz.py``; normflows ships
copies of the InducedNorm* layers): the same constructor arguments and defaults, parameters and
buffers with the same names, order and dtypes, the same random draws at construction, and the
weight ``W / max(1, sigma / coeff)`` with ``sigma = u^T W v`` and the gradient flowing through sigma.
The power iteration runs in one op call (``resflow_cuda.ops.power_iteration`` /
``conv_power_iteration``) instead of a Python loop: for float64 convolutions with the reference's u
and v bit for bit on CPU, for float32 ones (oneDNN called directly, where ATen's conv2d picks its
im2col kernel for narrow inputs) and for the op's sigma, which update_lipschitz stores (it comes from
the loop's last convolution), up to float rounding; for matrices up to float rounding (a fused kernel).

Differences from the reference, each on purpose:

- ``compute_weight(rtol=...)``: the reference replaces an explicitly passed rtol by atol; here the
  given rtol is used, unless the layer was built with ``reference_rtol_quirk=True``.
- ``detach_sigma=True`` (default False, the reference's behaviour) treats sigma as a constant in
  the gradient of the normalised weight.
- Convolutions record the input size without a host synchronisation in ``forward`` and load
  checkpoints saved before or after their first forward, without the reference's dummy forward.
- Learnable norm orders (tensor-valued ``domain``/``codomain``) keep the reference's Python loop.
"""

from __future__ import annotations

import collections.abc
import math

import torch
import torch.nn.functional as F
import torch.nn.init as init
from torch import Tensor, nn

from .. import ops
from ..functional import conv_operator, eager_power_iteration, normalize_u, normalize_v
from ..linearize import register_linear

__all__ = [
    "SpectralNormLinear", "SpectralNormConv2d", "InducedNormLinear", "InducedNormConv2d", "LopLinear", "LopConv2d",
    "get_linear", "get_conv2d", "update_lipschitz", "lipschitz_report", "asym_squash",
]

INF = float("inf")


def _pair(x):
    return tuple(x) if isinstance(x, collections.abc.Iterable) else (x, x)


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
    if not torch.is_tensor(p) and not p >= 1:
        raise ValueError(f"{name} must be a norm order >= 1 (or inf), got {p}")


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

    def _normalized(self, weight: Tensor, sigma: Tensor) -> Tensor:
        with torch.no_grad():
            self.scale.copy_(sigma)
        if self.detach_sigma:
            sigma = sigma.detach()
        # torch.max, not clamp: equal gradients at sigma == coeff, as in the reference.
        factor = torch.max(sigma.new_ones(1), sigma / self.coeff)
        return weight / factor

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


class SpectralNormLinear(_LipschitzMixin, nn.Module):
    """Linear layer with W / max(1, ||W||_2 / coeff), power iteration in training forward.

    Parameters/buffers: ``weight``, ``bias``, ``scale``, ``u``, ``v`` (the reference's). ``forward``
    runs ``n_iterations`` (or to the atol/rtol tolerance, at most 20000) steps in training mode;
    200 at construction. Shapes: input (..., in_features) -> (..., out_features).
    """

    def __init__(self, in_features, out_features, bias=True, coeff=0.97, n_iterations=None, atol=None, rtol=None,
                 *, detach_sigma=False, reference_rtol_quirk=False, **unused_kwargs):
        del unused_kwargs
        super().__init__()
        _check_common(coeff, n_iterations, atol, rtol)
        self.in_features, self.out_features = in_features, out_features
        self.coeff, self.n_iterations, self.atol, self.rtol = coeff, n_iterations, atol, rtol
        self.detach_sigma, self.reference_rtol_quirk = detach_sigma, reference_rtol_quirk
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features)) if bias else None)
        _reset_parameters(self)
        h, w = self.weight.shape
        self.register_buffer("scale", torch.tensor(0.0))
        self.register_buffer("u", F.normalize(self.weight.new_empty(h).normal_(0, 1), dim=0))
        self.register_buffer("v", F.normalize(self.weight.new_empty(w).normal_(0, 1), dim=0))
        self.compute_weight(True, 200)

    def compute_weight(self, update=True, n_iterations=None, atol=None, rtol=None):
        u, v = self.u, self.v
        if update:
            _, atol, rtol, max_iterations = self._iteration_settings(n_iterations, atol, rtol, 20000)
            # SpectralNorm* test the tolerance whenever atol and rtol are set, also with n_iterations.
            tol = atol is not None and rtol is not None
            with torch.no_grad():
                u, v, _, _ = ops.power_iteration(self.weight.detach(), u, v, max_iterations,
                                                 atol if tol else None, rtol if tol else None, 2.0, 2.0, False)
                self.u.copy_(u)
                self.v.copy_(v)
        return self._normalized(self.weight, torch.dot(u, torch.mv(self.weight, v)))

    def forward_weight(self, input: Tensor) -> Tensor:
        """The weight forward applies to ``input`` (with forward's side effects)."""
        return self.compute_weight(update=self.training)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.forward_weight(input), self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"coeff={self.coeff}, n_iters={self.n_iterations}, atol={self.atol}, rtol={self.rtol}")


class InducedNormLinear(_InducedNormsMixin, _LipschitzMixin, nn.Module):
    """Linear layer with W / max(1, ||W||_{domain->codomain} / coeff) (generalised spectral norm).

    Parameters/buffers: ``weight``, ``bias``, ``scale``, ``u``, ``v``. ``forward`` never iterates; call
    ``compute_weight(update=True)`` (or :func:`update_lipschitz`) after each optimiser step. At
    construction: 200 iterations, plus the reference's 10 random restarts unless p = q = 2 (keeping,
    as the reference does, the last restart that beats the first estimate).
    Shapes: input (..., in_features) -> (..., out_features).
    """

    def __init__(self, in_features, out_features, bias=True, coeff=0.97, domain=2, codomain=2, n_iterations=None,
                 atol=None, rtol=None, zero_init=False, *, detach_sigma=False, reference_rtol_quirk=False,
                 **unused_kwargs):
        del unused_kwargs
        super().__init__()
        _check_common(coeff, n_iterations, atol, rtol)
        _check_norm("domain", domain)
        _check_norm("codomain", codomain)
        self.in_features, self.out_features = in_features, out_features
        self.coeff, self.n_iterations, self.atol, self.rtol = coeff, n_iterations, atol, rtol
        self.domain, self.codomain = domain, codomain
        self.detach_sigma, self.reference_rtol_quirk = detach_sigma, reference_rtol_quirk
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features)) if bias else None)
        _reset_parameters(self, zero_init)
        with torch.no_grad():
            domain, codomain = self.compute_domain_codomain()
        h, w = self.weight.shape
        self.register_buffer("scale", torch.tensor(0.0))
        self.register_buffer("u", normalize_u(self.weight.new_empty(h).normal_(0, 1), codomain))
        self.register_buffer("v", normalize_v(self.weight.new_empty(w).normal_(0, 1), domain))
        with torch.no_grad():
            self.compute_weight(True, n_iterations=200, atol=None, rtol=None)
            best_scale = self.scale.clone()
            best_u, best_v = self.u.clone(), self.v.clone()
            if not (domain == 2 and codomain == 2):
                for _ in range(10):
                    self.u = normalize_u(self.weight.new_empty(h).normal_(0, 1), codomain)
                    self.v = normalize_v(self.weight.new_empty(w).normal_(0, 1), domain)
                    self.compute_weight(True, n_iterations=200)
                    if self.scale > best_scale:
                        best_u, best_v = self.u.clone(), self.v.clone()
            self.u.copy_(best_u)
            self.v.copy_(best_v)

    def _iterate(self, max_iterations, atol, rtol):
        """(u, v) after the update; the buffers get them too."""
        domain, codomain = self.compute_domain_codomain()
        weight = self.weight.detach()
        if self._learnable_norms():
            u, v, _, _ = eager_power_iteration(weight, self.u, self.v, max_iterations, atol, rtol, domain,
                                               codomain)
        else:
            u, v, _, _ = ops.power_iteration(weight, self.u, self.v, max_iterations, atol, rtol, domain, codomain,
                                             True)
        self.u.copy_(u)
        self.v.copy_(v)
        return u, v

    def compute_weight(self, update=True, n_iterations=None, atol=None, rtol=None):
        u, v = self.u, self.v
        if update:
            n_iterations, atol, rtol, max_iterations = self._iteration_settings(n_iterations, atol, rtol, 200)
            tol = n_iterations is None  # InducedNorm* test the tolerance only without n_iterations
            with torch.no_grad():
                u, v = self._iterate(max_iterations, atol if tol else None, rtol if tol else None)
        return self._normalized(self.weight, torch.dot(u, torch.mv(self.weight, v)))

    def compute_one_iter(self):
        """One iteration from the current u, v, differentiable in the learnable norm orders only."""
        domain, codomain = self.compute_domain_codomain()
        weight = self.weight.detach()
        u = normalize_u(torch.mv(weight, self.v.detach()), codomain)
        v = normalize_v(torch.mv(weight.t(), u), domain)
        return torch.dot(u, torch.mv(weight, v))

    def forward_weight(self, input: Tensor) -> Tensor:
        """The weight forward applies to ``input``."""
        return self.compute_weight(update=False)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.forward_weight(input), self.bias)

    def extra_repr(self):
        domain, codomain = self.compute_domain_codomain()
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"coeff={self.coeff}, domain={float(domain):.2f}, codomain={float(codomain):.2f}, "
                f"n_iters={self.n_iterations}, atol={self.atol}, rtol={self.rtol}, "
                f"learnable_ord={torch.is_tensor(self.domain)}")


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
        if not self._is_initialized():
            self._record_input_size(input)
        return self.compute_weight(update=self._update_in_forward())

    def forward(self, input: Tensor) -> Tensor:
        return F.conv2d(input, self.forward_weight(input), self.bias, self.stride, self.padding, 1, 1)

    def _load_geometry(self, state_dict, prefix) -> None:
        """Adopts the checkpoint's u / v sizes and input size (before or after its first forward)."""
        dims = state_dict.get(prefix + "spatial_dims")
        if dims is not None:
            self._input_hw = tuple(int(d) for d in dims.tolist())
        for name in ("u", "v"):
            saved = state_dict.get(prefix + name)
            mine = getattr(self, name, None)
            if saved is not None and (mine is None or mine.shape != saved.shape):
                like = self.weight
                self.register_buffer(name, torch.empty(saved.shape, dtype=like.dtype, device=like.device))

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.bias is None:
            s += ", bias=False"
        return s


class SpectralNormConv2d(_LipschitzConv2d):
    """Convolution with W / max(1, ||conv||_2 / coeff), the operator norm of the convolution on the
    input size of the first forward (matrix norm for 1x1 kernels); power iteration in training forward.

    Buffers: ``spatial_dims``, ``scale``, then ``u``, ``v`` from the first forward (the reference's;
    ``initialized`` is a Python attribute as there). Order v then u, as the reference.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, bias=True, coeff=0.97,
                 n_iterations=None, atol=None, rtol=None, *, detach_sigma=False, reference_rtol_quirk=False,
                 **unused_kwargs):
        del unused_kwargs
        super().__init__()
        self._setup(in_channels, out_channels, kernel_size, stride, padding, bias, coeff, n_iterations, atol, rtol,
                    detach_sigma, reference_rtol_quirk)
        _reset_parameters(self)
        self.initialized = False
        self.register_buffer("spatial_dims", torch.tensor([1.0, 1.0]))
        self.register_buffer("scale", torch.tensor(0.0))

    def _is_initialized(self) -> bool:
        return self.initialized

    def _update_in_forward(self) -> bool:
        return self.training

    def _initialize_u_v(self):
        if self._pointwise:
            self.register_buffer("u", F.normalize(self.weight.new_empty(self.out_channels).normal_(0, 1), dim=0))
            self.register_buffer("v", F.normalize(self.weight.new_empty(self.in_channels).normal_(0, 1), dim=0))
            return
        with torch.no_grad():
            num_input = self.in_channels * self._input_hw[0] * self._input_hw[1]
            v = F.normalize(torch.randn(num_input).to(self.weight), dim=0, eps=1e-12)
            num_output = math.prod(self._output_shape())
            u = F.normalize(torch.randn(num_output).to(self.weight), dim=0, eps=1e-12)
        self.register_buffer("u", u)
        self.register_buffer("v", v)

    def compute_weight(self, update=True, n_iterations=None):
        if not self.initialized:
            self._initialize_u_v()
            self.initialized = True
        u, v = self.u, self.v
        if update:
            _, atol, rtol, max_iterations = self._iteration_settings(n_iterations, None, None, 20000)
            tol = atol is not None and rtol is not None
            with torch.no_grad():
                u, v, _, _ = self._power_iterate(self.weight.detach(), u, v, max_iterations, atol if tol else None,
                                                 rtol if tol else None, 2.0, 2.0, False)
                self.u.copy_(u)
                self.v.copy_(v)
        return self._normalized(self.weight, self._sigma(u, v))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._load_geometry(state_dict, prefix)
        if prefix + "u" in state_dict:
            self.initialized = True
        elif getattr(self, "u", None) is not None:
            # A checkpoint from before the first forward: back to the uninitialised state.
            del self._buffers["u"], self._buffers["v"]
            self.initialized = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return super().extra_repr() + f", coeff={self.coeff}, n_iters={self.n_iterations}, atol={self.atol}, rtol={self.rtol}"


class InducedNormConv2d(_InducedNormsMixin, _LipschitzConv2d):
    """Convolution with W / max(1, ||conv||_{domain->codomain} / coeff) on the input size of the
    first forward (matrix norm for 1x1 kernels). ``forward`` never iterates after the first call.

    Buffers (order): ``initialized``, ``spatial_dims``, ``scale``, ``u``, ``v``; u and v get their
    operator sizes at the first forward (200 iterations or the tolerance, then the 10 restarts for
    non-(2, 2) norms). ``zero_init`` is normflows' addition (default False as there).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, bias=True, coeff=0.97, domain=2,
                 codomain=2, n_iterations=None, atol=None, rtol=None, zero_init=False, *, detach_sigma=False,
                 reference_rtol_quirk=False, **unused_kwargs):
        del unused_kwargs
        super().__init__()
        _check_norm("domain", domain)
        _check_norm("codomain", codomain)
        self._setup(in_channels, out_channels, kernel_size, stride, padding, bias, coeff, n_iterations, atol, rtol,
                    detach_sigma, reference_rtol_quirk)
        self.domain, self.codomain = domain, codomain
        _reset_parameters(self, zero_init)
        self._initialized = False  # mirrors the initialized buffer
        self.register_buffer("initialized", torch.tensor(0))
        self.register_buffer("spatial_dims", torch.tensor([1.0, 1.0]))
        self.register_buffer("scale", torch.tensor(0.0))
        self.register_buffer("u", self.weight.new_empty(self.out_channels))
        self.register_buffer("v", self.weight.new_empty(self.in_channels))

    def _is_initialized(self) -> bool:
        return self._initialized

    def _update_in_forward(self) -> bool:
        return False

    def _initialize_u_v(self):
        with torch.no_grad():
            domain, codomain = self.compute_domain_codomain()
            if self._pointwise:
                self.u.resize_(self.out_channels).normal_(0, 1)
                self.u.copy_(normalize_u(self.u, codomain))
                self.v.resize_(self.in_channels).normal_(0, 1)
                self.v.copy_(normalize_v(self.v, domain))
                n_out, n_in = self.out_channels, self.in_channels
            else:
                n_in = self.in_channels * self._input_hw[0] * self._input_hw[1]
                self.v.resize_(n_in).normal_(0, 1)
                self.v.copy_(normalize_v(self.v, domain))
                n_out = math.prod(self._output_shape())
                self.u.resize_(n_out).normal_(0, 1)
                self.u.copy_(normalize_u(self.u, codomain))
            self.initialized.fill_(1)
            self._initialized = True
            self.compute_weight(True)
            best_scale = self.scale.clone()
            best_u, best_v = self.u.clone(), self.v.clone()
            if not (domain == 2 and codomain == 2):
                for _ in range(10):
                    if self._pointwise:
                        self.u.copy_(normalize_u(self.weight.new_empty(n_out).normal_(0, 1), codomain))
                        self.v.copy_(normalize_v(self.weight.new_empty(n_in).normal_(0, 1), domain))
                    else:
                        self.u.copy_(normalize_u(torch.randn(n_out).to(self.weight), codomain))
                        self.v.copy_(normalize_v(torch.randn(n_in).to(self.weight), domain))
                    self.compute_weight(True, n_iterations=200)
                    if self.scale > best_scale:
                        best_u, best_v = self.u.clone(), self.v.clone()
            self.u.copy_(best_u)
            self.v.copy_(best_v)

    def compute_weight(self, update=True, n_iterations=None, atol=None, rtol=None):
        if not self._initialized:
            self._initialize_u_v()
        u, v = self.u, self.v
        if update:
            n_iterations, atol, rtol, max_iterations = self._iteration_settings(n_iterations, atol, rtol, 200)
            tol = n_iterations is None
            atol, rtol = (atol, rtol) if tol else (None, None)
            domain, codomain = self.compute_domain_codomain()
            with torch.no_grad():
                weight = self.weight.detach()
                if self._learnable_norms():
                    operator = (None, None)
                    if self._pointwise:
                        weight = self._matrix(weight)
                    else:
                        operator = conv_operator(weight, self._input_hw, self.stride, self.padding)
                    u, v, _, _ = eager_power_iteration(weight, u, v, max_iterations, atol, rtol, domain,
                                                       codomain, *operator)
                else:
                    u, v, _, _ = self._power_iterate(weight, u, v, max_iterations, atol, rtol, domain, codomain,
                                                     True)
                # The reference's 1x1 path leaves the buffers alone for projmax maps (p = 1, q = inf).
                if not self._pointwise or domain != 1:
                    self.v.copy_(v)
                if not self._pointwise or codomain != INF:
                    self.u.copy_(u)
        return self._normalized(self.weight, self._sigma(u, v))

    def compute_one_iter(self):
        """One iteration from the current u, v, differentiable in the learnable norm orders only."""
        if not self._initialized:
            raise ValueError("Layer needs to be initialized first.")
        domain, codomain = self.compute_domain_codomain()
        weight = self.weight.detach()
        if self._pointwise:
            weight = self._matrix(weight)
            u = normalize_u(torch.mv(weight, self.v.detach()), codomain)
            v = normalize_v(torch.mv(weight.t(), u), domain)
            return torch.dot(u, torch.mv(weight, v))
        matvec, rmatvec = conv_operator(weight, self._input_hw, self.stride, self.padding)
        u = normalize_u(matvec(self.v.detach()), codomain)
        v = normalize_v(rmatvec(u), domain)
        return torch.dot(u, matvec(v))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._load_geometry(state_dict, prefix)
        flag = state_dict.get(prefix + "initialized")
        if flag is not None:
            self._initialized = bool(flag)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        domain, codomain = self.compute_domain_codomain()
        return super().extra_repr() + (
            f", coeff={self.coeff}, domain={float(domain):.2f}, codomain={float(codomain):.2f}, "
            f"n_iters={self.n_iterations}, atol={self.atol}, rtol={self.rtol}, "
            f"learnable_ord={torch.is_tensor(self.domain)}")


for _layer, _conv in ((SpectralNormLinear, False), (InducedNormLinear, False), (SpectralNormConv2d, True),
                     (InducedNormConv2d, True)):
    register_linear(_layer, conv=_conv)


# ---------------------------------------------------------------------------------------------
# Closed-form operator norms (Lop*) and the reference's layer factories
# ---------------------------------------------------------------------------------------------


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
    """Linear layer bounded by a closed-form operator norm (domain, codomain in {(1,1), (1,2),
    (1,inf), (2,inf), (inf,inf)}); the reference's ``LopLinear``."""

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
    """Convolution bounded by a closed-form operator norm of its weight; the reference's ``LopConv2d``."""

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


# ---------------------------------------------------------------------------------------------
# Model-wide updates and checks
# ---------------------------------------------------------------------------------------------

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
    """``compute_weight(update=True, n_iterations=n_iterations)`` on every SpectralNorm* / InducedNorm*
    layer of ``model`` (the reference training loops' ``update_lipschitz``; with ``n_iterations=None``
    each layer uses its own setting), writing only what that leaves behind: u, v and ``scale``. All
    matrix layers (linear and 1x1 convolutions) with equal settings share one op call that updates
    them in place; convolutions with larger kernels run one op call each and take sigma from it
    (equal to the reference's u^T A v up to float rounding, see ``ops.conv_power_iteration``), which
    saves the convolution and the weight division of compute_weight. Call it after every optimiser
    step and before evaluation."""
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
    """A verified look at every Lipschitz layer of ``model``.

    For each layer: ``sigma`` (the power-iteration estimate the layer normalises with, its ``scale``
    buffer), ``sigma_exact`` and ``method`` (``"svd"`` for matrices and 1x1 convolutions, and for
    k x k convolutions whose input has at most ``exact_conv_max_inputs`` entries; ``"fft-bound"``
    otherwise, an upper bound from the circular convolution; ``"closed-form"`` for Lop*; None for
    induced norms other than 2 -> 2), ``lipschitz`` (the exact norm of the normalised weight,
    sigma_exact / max(1, sigma / coeff)) and ``meets_coeff`` (lipschitz <= coeff, with 1e-5 slack; None
    when unknown: no exact norm, or an FFT bound above coeff).
    Run :func:`update_lipschitz` first so that ``sigma`` is current. Convolutions must have seen
    an input (their operator depends on the input size).
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
