"""Is a residual branch built from layers we know? Then its linearization: the fast log-det path.

A qualifying branch is an ``nn.Sequential`` (or normflows' ``LipschitzMLP`` / ``LipschitzCNN``,
which wrap one) of steps "optional activation, then a linear map": activations LipSwish (ours or
the reference's ``Swish``), ``nn.ELU``, ``nn.Softplus``, ``nn.Identity``; linear maps our
Lipschitz layers, normflows' InducedNorm layers, ``nn.Linear`` and ``nn.Conv2d`` (zero padding,
no dilation or groups). That covers the reference's pre-activation MLPs and its conv branches
``[act] conv k x k, act, conv 1 x 1, act, conv k x k``.

:func:`linearize` returns a :class:`LinearizedBranch` (or None: use autograd). Calling it on x
runs the same forward as the branch (same layer side effects, an ordinary autograd graph for g)
and keeps, per step, the normalized weight, the activation's input and output and phi'. The layers that
register their normalization (our Lipschitz layers) get their weights from one op (all of a branch's
together once they are ready), with a one-op backward, instead of their autograd graphs. The log-det
series then runs in one op call (``ops.linearized_logdet_series``) and the Neumann gradient in
another (``ops.linearized_neumann_gradient``) instead of one autograd pass per term. For dense
branches on inputs (B, D) with small D, :meth:`LinearizedBranch.jacobian` builds the full Jacobians
in forward mode instead (the basic estimator's differentiable terms and exact determinants).

A branch that does not qualify takes autograd VJPs: :func:`fallback_reason` says why (the blocks
show it in their ``repr``), and :func:`linearize` logs it once per branch at DEBUG level.

Under ``torch.autocast`` the branch's matrix products run in the autocast dtype, as ``F.linear`` and
``F.conv2d`` do there, so its activations and phi' come out in 16 bits. The cached quantities (and the
full Jacobians) are cast, here and only here, to the dtype of the block's input x, so that the series,
the Neumann vector and the gradient run in x's dtype: float32 for a float32 model under autocast
(docs/parity.md#mixed-precision). Without autocast nothing is cast (no op is dispatched).

This module imports no layer library: layers qualify by registration (:func:`register_lipswish`,
:func:`register_linear`, :func:`register_wrapper`). ``resflow_cuda.nn`` registers its own layers
when it is imported; ``resflow_cuda.integrations.normflows`` registers normflows' ones, and
``import resflow_cuda`` asks (:func:`register_on_import`) that linearize() import it once normflows
is in ``sys.modules``, so normflows' layers take the fast path without importing the adapter.
"""

from __future__ import annotations

import importlib
import logging
import sys
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dense_ops, ops

__all__ = ["LinearizedBranch", "fallback_reason", "fast_path_repr", "linearize", "register_linear", "register_lipswish",
           "register_on_import", "register_wrapper"]

logger = logging.getLogger(__name__)

# The ops' activation codes (csrc/composite/linearized_chain.h).
IDENTITY, LIPSWISH, ELU, SOFTPLUS = 0, 1, 2, 3

# The registered layers (see the module docstring).
_LIPSWISH_TYPES: tuple[type, ...] = ()
_LINEAR_TYPES: dict[type, tuple[bool, Callable[[nn.Module, Tensor], Tensor], Callable | None]] = {}
_WRAPPER_TYPES: dict[type, Callable[[nn.Module], nn.Module]] = {}
_ON_IMPORT: dict[str, str] = {}


def _forward_weight(layer: nn.Module, input: Tensor) -> Tensor:
    return layer.forward_weight(input)


def register_lipswish(cls: type) -> None:
    """Activations of type ``cls`` (or a subclass) are LipSwish with the raw parameter ``beta``."""
    global _LIPSWISH_TYPES
    _LIPSWISH_TYPES = (*_LIPSWISH_TYPES, cls)


def register_linear(cls: type, conv: bool, weight: Callable[[nn.Module, Tensor], Tensor] = _forward_weight,
                    normalization: Callable[[nn.Module, Tensor | None], tuple] | None = None,
                    normalization_ready: Callable[[nn.Module], bool] | None = None) -> None:
    """Layers of type ``cls`` (or a subclass) are linear maps ``F.linear(a, W, bias)`` or, with
    ``conv``, ``F.conv2d(a, W, bias, stride, padding)`` (zero padding), where ``weight(layer, a)``
    returns W with the side effects of the layer's forward on a (default ``layer.forward_weight(a)``).
    ``normalization(layer, a)``, where given, returns ``(weight, u, v, coeff, detach_sigma, scale)`` such
    that W = weight / max(1, u^T A v / coeff), with the same side effects but for writing sigma into
    ``scale``; A is the weight as a matrix (u, v vectors) or, for a convolution, the convolution on
    images u (1, C_out, H', W') and v (1, C_in, H, W). The fast paths then normalize (and differentiate)
    the weights in one op instead of the layer's autograd graph. Where ``normalization_ready(layer)`` is
    true, ``normalization(layer, None)`` may run before the layer's input exists (e.g. once a layer that
    records its input size has seen one): a branch whose registered layers are all ready normalizes them
    together, in one op each way."""
    _LINEAR_TYPES[cls] = (conv, weight, normalization, normalization_ready)


def register_wrapper(cls: type, inner: Callable[[nn.Module], nn.Module]) -> None:
    """A module of type ``cls`` (or a subclass) qualifies when ``inner(module)``, an ``nn.Sequential``, does."""
    _WRAPPER_TYPES[cls] = inner


def register_on_import(library: str, module: str) -> None:
    """linearize() imports ``module``, which registers ``library``'s layers, once ``library`` is in
    ``sys.modules``."""
    _ON_IMPORT[library] = module


def _import_registrations() -> None:
    for library in [name for name in _ON_IMPORT if name in sys.modules]:
        try:
            importlib.import_module(_ON_IMPORT.pop(library))
        except ImportError:  # a module of that name that is not the library: its layers stay unregistered
            pass


def _lookup(table: dict, module: nn.Module):
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None


def _module_weight(layer: nn.Module, input: Tensor) -> Tensor:
    return layer.weight


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """t in ``dtype`` (see the module docstring); t itself, with no op dispatched, when it already is."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


@dataclass
class _Step:
    activation: int
    act_module: nn.Module | None
    act_params: tuple[float, float]
    layer: nn.Module
    conv: bool
    stride: tuple[int, int]
    padding: tuple[int, int]
    weight_of: Callable[[nn.Module, Tensor], Tensor]
    normalization_of: Callable[[nn.Module, Tensor | None], tuple] | None = None
    normalization_ready: Callable[[nn.Module], bool] | None = None

    def activate(self, h: Tensor, slope_graph: bool = False) -> tuple[Tensor, Tensor | None]:
        """phi(h) with its autograd graph, and phi'(h) (with a graph only if ``slope_graph``)."""
        if self.activation == IDENTITY:
            return h, None
        if self.activation == LIPSWISH:
            beta = self.act_module.beta
            a, slope = ops.lipswish_with_derivative(h, beta.to(h.dtype))
            return a, slope if slope_graph else slope.detach()
        if self.activation == ELU:
            alpha = self.act_params[0]
            a = F.elu(h, alpha)
            with torch.set_grad_enabled(slope_graph and torch.is_grad_enabled()):
                return a, torch.where(h > 0, torch.ones_like(h), a + alpha)
        beta, threshold = self.act_params
        a = F.softplus(h, beta, threshold)
        with torch.set_grad_enabled(slope_graph and torch.is_grad_enabled()):
            z = h * beta
            return a, torch.where(z > threshold, torch.ones_like(h), torch.sigmoid(z))

    def weight(self, a: Tensor) -> Tensor:
        """The layer's weight for input a, with its side effects; a registered normalization (float32 /
        float64 weights, at most ``_NORMALIZED_CUDA_MAX`` elements on CUDA) in one op
        (:class:`_NormalizedWeights`) instead of the layer's autograd graph."""
        return _normalized_weights([self.normalization(a)])[0] if self.normalizes() else self.weight_of(self.layer, a)

    def normalizes(self) -> bool:
        """Whether the layer's weight comes from :meth:`normalization` (decided before any side effect)."""
        raw = getattr(self.layer, "weight", None)
        return (self.normalization_of is not None and isinstance(raw, Tensor) and raw.dtype in _NORMALIZED_DTYPES
                and not (raw.is_cuda and raw.numel() > _NORMALIZED_CUDA_MAX))

    def normalization(self, a: Tensor | None) -> tuple:
        """(weight, u, v, coeff, detach_sigma, scale) of the layer's normalization for input a (None: a
        ready layer's, before its input exists), with its side effects; a convolution's as the 1 x K
        matrix W with u = [1] and v = G (sigma = <W, G>)."""
        weight, u, v, coeff, detach_sigma, scale = self.normalization_of(self.layer, a)
        if u.dim() == 4:  # a convolution's images: sigma = u^T conv(v, W) = <W, G>, G its weight gradient
            with ops.autocast_disabled(weight):  # in the weight's dtype, as the layers compute sigma
                u, v = weight.new_ones(1), torch.ops.aten.convolution_backward(
                    u, v, weight.detach(), None, self.stride, self.padding, (1, 1), False, (0, 0), 1,
                    (False, True, False))[1].reshape(-1)
        return weight, u, v, float(coeff), bool(detach_sigma), scale

    def apply(self, a: Tensor, weight: Tensor) -> Tensor:
        if self.conv:
            return F.conv2d(a, weight, self.layer.bias, self.stride, self.padding)
        return F.linear(a, weight, self.layer.bias)


_NORMALIZED_DTYPES = (torch.float32, torch.float64)  # those of lipschitz_normalize_
# lipschitz_normalize_'s CUDA kernel gives each layer one thread block: a larger weight keeps the layer's own
# ops, which spread over the whole GPU.
_NORMALIZED_CUDA_MAX = 1 << 16


def _normalized_weights(normalizations: list[tuple]) -> tuple[Tensor, ...]:
    """The normalized weights of :meth:`_Step.normalization`'s tuples, all in one op each way."""
    weights, us, vs, coeffs, detach, scales = (list(t) for t in zip(*normalizations))
    with ops.autocast_disabled(weights[0]):  # sigma in the weights' dtype, as the layers compute it
        return _NormalizedWeights.apply(coeffs, detach, scales, *weights, *us, *vs)


def _unpack(n: int, tensors) -> tuple:
    """(weights, us, vs, the weights as len(u) x len(v) matrices) of n layers' (*weights, *us, *vs)."""
    weights, us, vs = tensors[:n], list(tensors[n:2 * n]), list(tensors[2 * n:])
    return weights, us, vs, [w.reshape(u.numel(), v.numel()) for w, u, v in zip(weights, us, vs)]


class _NormalizedWeights(torch.autograd.Function):
    """forward(coeffs, detach_sigma, scales, *weights, *us, *vs) -> every weight / max(1, u^T W v / coeff)
    with W the weight as a (len(u), len(v)) matrix, in one op (``lipschitz_normalize_``, which writes
    sigma into ``scale``), as the layers' own normalization computes it; backward: one op, or autograd's
    formula under ``create_graph`` (differentiable again)."""

    @staticmethod
    def forward(ctx, coeffs, detach_sigma, scales, *tensors):
        weights, us, vs, matrices = _unpack(len(coeffs), tensors)
        out, sigmas = dense_ops.lipschitz_normalize_(matrices, us, vs, scales, coeffs)
        ctx.save_for_backward(*tensors, sigmas)
        ctx.coeffs, ctx.detach_sigma = coeffs, detach_sigma
        return tuple(o.view(w.shape) for o, w in zip(out, weights))

    @staticmethod
    def backward(ctx, *grads):
        *tensors, sigmas = ctx.saved_tensors
        weights, us, vs, matrices = _unpack(len(ctx.coeffs), tensors)
        grads = [g.reshape(m.shape) for g, m in zip(grads, matrices)]
        if torch.is_grad_enabled():
            out = []
            for matrix, u, v, grad, coeff, detach in zip(matrices, us, vs, grads, ctx.coeffs, ctx.detach_sigma):
                sigma = torch.dot(u, torch.mv(matrix, v))
                sigma = sigma.detach() if detach else sigma
                normalized = matrix / torch.max(sigma.new_ones(1), sigma / coeff)
                out.append(torch.autograd.grad(normalized, matrix, grad, create_graph=True)[0])
        else:
            out = dense_ops.lipschitz_normalize_backward(grads, matrices, us, vs, sigmas, ctx.coeffs, ctx.detach_sigma)
        return (None, None, None, *(g.view(w.shape) for g, w in zip(out, weights)), *([None] * (2 * len(us))))


def _activation(module: nn.Module):
    """(code, params) of a supported activation module, else None."""
    if isinstance(module, _LIPSWISH_TYPES):
        return LIPSWISH, (0.0, 0.0)
    if type(module) is nn.ELU:
        return ELU, (float(module.alpha), 0.0)
    if type(module) is nn.Softplus:
        return SOFTPLUS, (float(module.beta), float(module.threshold))
    if type(module) is nn.Identity:
        return IDENTITY, (0.0, 0.0)
    return None


def _linear(module: nn.Module):
    """(conv, stride, padding, weight_of, normalization_of, normalization_ready) of a supported linear map,
    else None."""
    registered, normalization_of, ready = _lookup(_LINEAR_TYPES, module), None, None
    if registered is not None:
        conv, weight_of, normalization_of, ready = registered
    elif type(module) is nn.Linear:
        conv, weight_of = False, _module_weight
    elif type(module) is nn.Conv2d:
        if (module.dilation != (1, 1) or module.groups != 1 or module.padding_mode != "zeros"
                or isinstance(module.padding, str)):
            return None
        conv, weight_of = True, _module_weight
    else:
        return None
    if not conv:
        return False, (1, 1), (1, 1), weight_of, normalization_of, ready
    return True, tuple(module.stride), tuple(module.padding), weight_of, normalization_of, ready


def _children(nnet: nn.Module) -> list[nn.Module] | None:
    if type(nnet) is nn.Sequential:
        return list(nnet)
    inner = _lookup(_WRAPPER_TYPES, nnet)
    if inner is not None and type(inner(nnet)) is nn.Sequential:
        return list(inner(nnet))
    return None


def linearize(nnet: nn.Module) -> LinearizedBranch | None:
    """The fast-path description of ``nnet``, or None when it is not made of supported layers (then
    the log-det takes autograd VJPs; :func:`fallback_reason` says why, and the first time for a
    branch a DEBUG message on this module's logger does)."""
    branch, reason = _describe(nnet)
    if branch is None and nnet not in _LOGGED:
        _LOGGED.add(nnet)
        logger.debug("%s: autograd VJPs instead of the linearized fast path: %s", type(nnet).__name__, reason)
    return branch


def fallback_reason(nnet: nn.Module) -> str | None:
    """Why the branch ``nnet`` takes autograd VJPs instead of the fast path; None when it qualifies."""
    return _describe(nnet)[1]


def fast_path_repr(enabled: bool, **branches: nn.Module) -> str:
    """``fast_path=...`` for a block's ``extra_repr``: ``False``, ``linearized``, or ``autograd`` with
    the branches that do not qualify and why."""
    if not enabled:
        return "fast_path=False"
    reasons = [(name, fallback_reason(net)) for name, net in branches.items()]
    reasons = [f"{name}: {why}" if len(branches) > 1 else why for name, why in reasons if why is not None]
    return "fast_path=linearized" if not reasons else f"fast_path=autograd ({'; '.join(reasons)})"


_LOGGED: weakref.WeakSet = weakref.WeakSet()
_ACTIVATIONS = "LipSwish, ELU, Softplus, Identity"


def _describe(nnet: nn.Module) -> tuple[LinearizedBranch | None, str | None]:
    if _ON_IMPORT:
        _import_registrations()
    children = _children(nnet)
    if children is None:
        return None, f"{type(nnet).__name__} is not an nn.Sequential (nor a registered wrapper of one)"
    if not children:
        return None, "the branch is empty"
    steps, pending = [], None
    for i, child in enumerate(children):
        act = _activation(child)
        if act is not None:
            if act[0] == IDENTITY:
                continue
            if pending is not None:
                return None, f"two activations in a row (step {i}, {type(child).__name__})"
            pending = (*act, child)
            continue
        lin = _linear(child)
        if lin is None:
            return None, (f"step {i} ({type(child).__name__}) is neither an elementwise activation of the fused chain "
                          f"({_ACTIVATIONS}) nor a supported linear map")
        code, params, module = pending if pending is not None else (IDENTITY, (0.0, 0.0), None)
        steps.append(_Step(code, module, params, child, *lin))
        pending = None
    if pending is not None:
        return None, "the branch ends with an activation"
    return LinearizedBranch(steps), None


class LinearizedBranch:
    """A qualifying branch: ``branch(x)`` -> ``(g, LinearizedVJP)`` (see the module docstring)."""

    def __init__(self, steps: list[_Step]) -> None:
        self.steps = steps

    def __call__(self, x: Tensor) -> tuple[Tensor, LinearizedVJP]:
        h = x
        cache = _Cache()
        ahead = self._normalized_ahead()
        for i, step in enumerate(self.steps):
            a, slope = step.activate(h)
            weight = ahead[i] if i in ahead else step.weight(a)
            cache.add(step, h, a, slope, weight)
            h = step.apply(a, weight)
        return h, LinearizedVJP(self, x, cache)

    def _normalized_ahead(self) -> dict[int, Tensor]:
        """Every normalizing step's weight in one op, when there are two or more and all their layers are
        ready (``register_linear``'s ``normalization_ready``); else none."""
        steps = [(i, s) for i, s in enumerate(self.steps) if s.normalizes()]
        if len(steps) < 2 or not all(s.normalization_ready and s.normalization_ready(s.layer) for _, s in steps):
            return {}
        return dict(zip((i for i, _ in steps), _normalized_weights([s.normalization(None) for _, s in steps])))

    @property
    def dense(self) -> bool:
        """True when every linear map is a dense (non-convolutional) layer."""
        return not any(step.conv for step in self.steps)

    def jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(g, J)`` at x of shape (B, D) for a dense branch: g (B, E) as ``__call__`` computes it (same
        layer side effects) and the Jacobians J (B, E, D), both with autograd graphs to x and the
        parameters. Forward mode: the D input directions travel below the batch through every layer,
        so each layer is one matrix product of (1 + D) B rows for g and J together. For small D this
        is cheaper than D (or n) VJPs made with ``create_graph``, and J is differentiable as theirs are."""
        if not self.dense or x.dim() != 2:
            raise ValueError(f"LinearizedBranch.jacobian: needs a dense branch and x of shape (B, D), "
                             f"but got {'a convolutional branch' if not self.dense else list(x.shape)}")
        batch, dim = x.shape
        h = x
        tangents = torch.eye(dim, dtype=x.dtype, device=x.device).unsqueeze(1).expand(dim, batch, dim)
        for step in self.steps:
            a, slope = step.activate(h, slope_graph=True)
            if slope is not None:
                tangents = tangents * slope
            weight = step.weight(a)
            out = F.linear(torch.cat([a.unsqueeze(0), tangents]).reshape((1 + dim) * batch, -1), weight)
            out = out.reshape(1 + dim, batch, -1)
            h, tangents = out[0], out[1:]
            if step.layer.bias is not None:
                h = h + step.layer.bias
        return h, _cast(tangents.permute(1, 2, 0), x.dtype)  # in x's dtype also under autocast


class _Cache:
    """Per step: the weight applied (with its graph to the parameters), and detached tensors."""

    def __init__(self) -> None:
        self.weights, self.act_inputs, self.layer_inputs, self.slopes = [], [], [], []
        self.betas, self.biases = [], []

    def add(self, step: _Step, h: Tensor, a: Tensor, slope: Tensor | None, weight: Tensor) -> None:
        self.weights.append(weight)
        self.act_inputs.append(None if slope is None else h.detach())
        self.layer_inputs.append(a.detach())
        self.slopes.append(slope)
        self.betas.append(step.act_module.beta if step.activation == LIPSWISH else None)
        self.biases.append(step.layer.bias)

    def to(self, dtype: torch.dtype) -> None:
        """Casts the cached activations, phi' and betas (the latter keep their graph) to ``dtype``."""
        for name in ("act_inputs", "layer_inputs", "slopes", "betas"):
            setattr(self, name, [_cast(t, dtype) for t in getattr(self, name)])


class LinearizedVJP:
    """The VJP source of a linearized branch at x (see :mod:`resflow_cuda.estimators`)."""

    def __init__(self, branch: LinearizedBranch, x: Tensor, cache: _Cache) -> None:
        self.branch, self.x, self.cache = branch, x, cache
        cache.to(x.dtype)  # under autocast the activations come in 16 bits (module docstring)
        steps = branch.steps
        self._strides = [s for step in steps for s in step.stride]
        self._paddings = [p for step in steps for p in step.padding]
        self._weights = [_cast(w.detach(), x.dtype) for w in cache.weights]
        self._surrogate: tuple[Tensor, Tensor] | None = None

    def series(self, eps: Tensor, plan, neumann: bool, surrogate: bool = True) -> tuple[Tensor, Tensor | None]:
        n = plan.n_terms
        logdet_coeffs = [plan.logdet_coeff(k) for k in range(1, n + 1)]
        neumann_coeffs = [plan.neumann_coeff(k) for k in range(1, n + 1)] if neumann else []
        with torch.no_grad():
            logdet, w_tilde, value = ops.linearized_logdet_series(
                eps, self._weights, self._strides, self._paddings, self.cache.slopes, logdet_coeffs, neumann_coeffs,
                surrogate)
        if not neumann:
            return logdet.to(eps.dtype), None
        self._surrogate = (w_tilde, value.to(eps.dtype)) if surrogate else None
        return logdet.to(eps.dtype), w_tilde

    def surrogate(self, w_tilde: Tensor, eps: Tensor) -> Tensor:
        """<w~^T J, e> per sample with the analytic Neumann gradient as its backward."""
        if self._surrogate is None or self._surrogate[0] is not w_tilde:
            with torch.no_grad():
                value = ops.linearized_neumann_gradient(w_tilde, eps, *self._gradient_args())[0].to(eps.dtype)
        else:
            value = self._surrogate[1]
        c = self.cache
        return _NeumannSurrogate.apply(self, w_tilde, eps, value, self.x, *c.weights, *c.biases, *c.betas)

    def surrogate_and_grads(self, w_tilde: Tensor, eps: Tensor, params: list[Tensor]):
        """The surrogate and the gradients of its sum w.r.t. x and ``params`` from one call of the
        gradient op (backward-in-forward); weight gradients go on to the parameters through the
        layers' weight normalization."""
        c = self.cache
        with torch.no_grad():
            value, grad_x, grad_weights, grad_biases, grad_betas = ops.linearized_neumann_gradient(
                w_tilde, eps, *self._gradient_args())
        outputs, grads = [], []
        for t, g in [*zip(c.weights, grad_weights), *zip(c.betas, grad_betas)]:
            if t is not None and t.requires_grad:
                outputs.append(t)
                grads.append(g.reshape(t.shape))
        through = torch.autograd.grad(outputs, params, grads, retain_graph=True, allow_unused=True) if outputs \
            else [None] * len(params)
        by_id = {id(p): g for p, g in zip(params, through)}
        for b, g in zip(c.biases, grad_biases):
            if b is not None and id(b) in by_id:
                by_id[id(b)] = g if by_id[id(b)] is None else by_id[id(b)] + g
        return value.to(eps.dtype), [grad_x, *(by_id[id(p)] for p in params)]

    def _gradient_args(self) -> tuple:
        c, steps = self.cache, self.branch.steps
        return (self._weights, self._strides, self._paddings, c.slopes, c.layer_inputs, c.act_inputs,
                [s.activation for s in steps], [p for s in steps for p in s.act_params],
                [None if b is None else b.detach() for b in c.betas], [b is not None for b in c.biases])


class _NeumannSurrogate(torch.autograd.Function):
    """forward: the precomputed surrogate; backward: ``linearized_neumann_gradient`` with w~ scaled
    per sample by the upstream gradient (the surrogate is linear in w~)."""

    @staticmethod
    def forward(ctx, source, w_tilde, eps, value, x, *params):
        ctx.source, ctx.w_tilde, ctx.eps = source, w_tilde, eps
        ctx.steps = len(source.branch.steps)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_value):
        source, w_tilde = ctx.source, ctx.w_tilde
        scale = grad_value.reshape((-1,) + (1,) * (w_tilde.dim() - 1)).to(w_tilde.dtype)
        _, grad_x, grad_weights, grad_biases, grad_betas = ops.linearized_neumann_gradient(
            w_tilde * scale, ctx.eps, *source._gradient_args())
        c = source.cache
        biases = [None if b is None else gb for b, gb in zip(c.biases, grad_biases)]
        betas = [None if b is None else gb.reshape(b.shape) for b, gb in zip(c.betas, grad_betas)]
        return (None, None, None, None, grad_x, *grad_weights, *biases, *betas)
