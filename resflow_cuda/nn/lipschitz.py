"""Lipschitz-constrained linear and convolution layers of Residual Flows: the weight W / max(1, sigma / coeff),
where sigma, an operator norm of W, is estimated by power iteration in one op call. Drop-in versions of
residual-flows' layers; parity with the reference: docs/parity.md#lipschitz-layers
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..functional import conv_operator, eager_power_iteration, normalize_u, normalize_v
from ..linearize import register_linear
from .lipschitz_base import (INF, _check_common, _check_norm, _InducedNormsMixin, _LipschitzConv2d, _LipschitzMixin,
                             _load_conv_geometry, _reset_parameters)

__all__ = ["SpectralNormLinear", "SpectralNormConv2d", "InducedNormLinear", "InducedNormConv2d"]


class SpectralNormLinear(_LipschitzMixin, nn.Module):
    """Linear layer with the weight W / max(1, ||W||_2 / coeff): its Lipschitz constant is at most coeff.

    ||W||_2 is estimated by power iteration in every training forward (200 steps at construction).
    Drop-in for residual-flows' ``SpectralNormLinear``. Parity with the reference: docs/parity.md#spectralnormlinear

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        coeff: the Lipschitz bound.
        n_iterations: power-iteration steps per update; None: to the atol / rtol tolerance (at most 20000).
        atol: absolute tolerance of the power iteration.
        rtol: relative tolerance of the power iteration.
        detach_sigma: treat the estimated norm as a constant in the weight's gradient.
        reference_rtol_quirk: ``compute_weight(rtol=...)`` uses atol instead, as the reference does.

    Shapes:
        input: (..., in_features); output: (..., out_features).

    Example:
        >>> from resflow_cuda.nn import SpectralNormLinear, lipschitz_report
        >>> layer = SpectralNormLinear(16, 8, coeff=0.5, n_iterations=5)
        >>> layer(torch.randn(4, 16)).shape
        torch.Size([4, 8])
        >>> round(lipschitz_report(layer)[0]["lipschitz"], 3)  # the exact norm of the weight used
        0.5
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
        return self._normalized(self.weight, *self._vectors(update, n_iterations, atol, rtol))

    def _vectors(self, update, n_iterations=None, atol=None, rtol=None):
        """(u, v) of sigma = u^T W v, after the power iteration when ``update``."""
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
        return u, v

    def forward_weight(self, input: Tensor) -> Tensor:
        """The weight forward applies to ``input`` (with forward's side effects)."""
        return self.compute_weight(update=self.training)

    def forward_vectors(self, input: Tensor) -> tuple[Tensor, Tensor]:
        """(u, v) that :meth:`forward_weight` normalizes with, with its side effects but for the scale buffer."""
        return self._vectors(self.training)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.forward_weight(input), self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"coeff={self.coeff}, n_iters={self.n_iterations}, atol={self.atol}, rtol={self.rtol}")


class InducedNormLinear(_InducedNormsMixin, _LipschitzMixin, nn.Module):
    """Linear layer with the weight W / max(1, ||W||_{domain->codomain} / coeff) (induced p -> q norm).

    ``forward`` never iterates: call :func:`~resflow_cuda.nn.update_lipschitz` after each optimiser step.
    Drop-in for residual-flows' (and normflows') ``InducedNormLinear``.
    Parity with the reference: docs/parity.md#inducednormlinear

    Args:
        in_features, out_features, bias, coeff, atol, rtol, detach_sigma, reference_rtol_quirk: as
            :class:`SpectralNormLinear`.
        domain: the input norm order p (>= 1 or inf; a tensor: learnable, mapped into (1, 5)).
        codomain: the output norm order q, likewise.
        n_iterations: power-iteration steps per update; None: to the atol / rtol tolerance (at most 200).
        zero_init: start from a near-zero weight (the kaiming one / 1000).

    Shapes:
        input: (..., in_features); output: (..., out_features).

    Example:
        >>> from resflow_cuda.nn import InducedNormLinear, update_lipschitz
        >>> layer = InducedNormLinear(16, 8, coeff=0.9, domain=2, codomain=2, n_iterations=5)
        >>> update_lipschitz(layer)  # after each optimiser step
        >>> layer(torch.randn(4, 16)).shape
        torch.Size([4, 8])
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
        return self._normalized(self.weight, u, v)

    def forward_vectors(self, input: Tensor) -> tuple[Tensor, Tensor]:
        """(u, v) that :meth:`forward_weight` normalizes with (forward does not update them)."""
        return self.u, self.v

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


class SpectralNormConv2d(_LipschitzConv2d):
    """Convolution whose operator norm ||conv||_2 is at most coeff (W / max(1, ||conv||_2 / coeff)).

    The operator is the convolution on the input size of the first forward (the matrix for 1x1
    kernels); power iteration runs in every training forward. Drop-in for residual-flows'
    ``SpectralNormConv2d``. Parity with the reference: docs/parity.md#spectralnormconv2d

    Args:
        in_channels, out_channels, kernel_size, stride, padding, bias: as ``nn.Conv2d``.
        coeff, n_iterations, atol, rtol, detach_sigma, reference_rtol_quirk: as :class:`SpectralNormLinear`.

    Shapes:
        input: (B, in_channels, H, W), H and W those of the first forward; output: (B, out_channels, H', W').
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
        return self._normalized(self.weight, *self._vectors(update, n_iterations))

    def _vectors(self, update, n_iterations=None):
        """(u, v) of sigma = u^T A v, after the power iteration when ``update``."""
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
        return u, v

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "u" in state_dict or prefix + "v" in state_dict:
            _load_conv_geometry(self, state_dict, prefix, initialized=True)
            self.initialized = True
        elif getattr(self, "u", None) is not None:
            # A checkpoint from before the first forward: back to the uninitialised state.
            del self._buffers["u"], self._buffers["v"]
            self.initialized = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return super().extra_repr() + f", coeff={self.coeff}, n_iters={self.n_iterations}, atol={self.atol}, rtol={self.rtol}"


class InducedNormConv2d(_InducedNormsMixin, _LipschitzConv2d):
    """Convolution whose induced domain -> codomain operator norm is at most coeff.

    The operator is the convolution on the input size of the first forward (the matrix for 1x1
    kernels); ``forward`` never iterates after the first call: call
    :func:`~resflow_cuda.nn.update_lipschitz` after each optimiser step. Drop-in for residual-flows'
    (and normflows') ``InducedNormConv2d``. Parity with the reference: docs/parity.md#inducednormconv2d

    Args:
        in_channels, out_channels, kernel_size, stride, padding, bias: as ``nn.Conv2d``.
        coeff, domain, codomain, n_iterations, atol, rtol, zero_init, detach_sigma, reference_rtol_quirk:
            as :class:`InducedNormLinear`.

    Shapes:
        input: (B, in_channels, H, W), H and W those of the first forward; output: (B, out_channels, H', W').

    Example:
        >>> from resflow_cuda.nn import InducedNormConv2d
        >>> conv = InducedNormConv2d(3, 8, kernel_size=3, stride=1, padding=1, coeff=0.9, n_iterations=5)
        >>> conv(torch.randn(2, 3, 16, 16)).shape  # the first forward fixes H and W
        torch.Size([2, 8, 16, 16])
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, bias=True, coeff=0.97, domain=2,
                 codomain=2, n_iterations=None, atol=None, rtol=None, zero_init=False, *, detach_sigma=False,
                 reference_rtol_quirk=False, **unused_kwargs):
        del unused_kwargs
        super().__init__()
        self._setup(in_channels, out_channels, kernel_size, stride, padding, bias, coeff, n_iterations, atol, rtol,
                    detach_sigma, reference_rtol_quirk)
        _check_norm("domain", domain)
        _check_norm("codomain", codomain)
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
        return self._normalized(self.weight, *self._vectors(update, n_iterations, atol, rtol))

    def _vectors(self, update, n_iterations=None, atol=None, rtol=None):
        """(u, v) of sigma = u^T A v, after the power iteration when ``update``."""
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
        return u, v

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
        flag = state_dict.get(prefix + "initialized")
        if flag is not None:
            self._initialized = bool(flag)
        _load_conv_geometry(self, state_dict, prefix, self._initialized)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        domain, codomain = self.compute_domain_codomain()
        return super().extra_repr() + (
            f", coeff={self.coeff}, domain={float(domain):.2f}, codomain={float(codomain):.2f}, "
            f"n_iters={self.n_iterations}, atol={self.atol}, rtol={self.rtol}, "
            f"learnable_ord={torch.is_tensor(self.domain)}")


for _layer, _conv in ((SpectralNormLinear, False), (InducedNormLinear, False), (SpectralNormConv2d, True),
                     (InducedNormConv2d, True)):
    register_linear(_layer, conv=_conv, normalization=_layer.normalization_inputs,
                    normalization_ready=_layer.normalization_ready)
