"""Typed wrappers of ``torch.ops.resflow_cuda.*`` with their fake kernels and autograd.

With :mod:`resflow_cuda.dense_ops` (the fused dense block's ops), the only module that touches
``torch.ops.resflow_cuda``. Each op section has: the wrapper, the
fake (meta) kernel that ``torch.compile`` and ``opcheck`` use, and the autograd formula, which
calls further custom ops so that derivatives form a ladder (LipSwish: forward → backward →
double backward; third order is not supported). The ops that run matrix products inside are opaque to
``torch.autocast`` (see the section "Autocast" at the end).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import _extension  # noqa: F401  (loads _C, which defines the ops)

_OPS = torch.ops.resflow_cuda

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# Memory formats with the tensor rank they apply to (None: any rank).
_MEMORY_FORMATS = ((torch.contiguous_format, None), (torch.channels_last, 4), (torch.channels_last_3d, 5))


def _elementwise_format(*operands: Tensor) -> torch.memory_format:
    """The layout csrc's elementwise_operands() runs in: the first memory format every operand
    is dense in (contiguous, channels_last, channels_last_3d), else contiguous (after copies)."""
    for fmt, rank in _MEMORY_FORMATS:
        if rank in (None, operands[0].dim()) and all(t.is_contiguous(memory_format=fmt) for t in operands):
            return fmt
    return torch.contiguous_format


def _elementwise_like(*operands: Tensor) -> Tensor:
    """An output of an elementwise kernel over the operands (see _elementwise_format)."""
    first = operands[0]
    return torch.empty(first.shape, dtype=first.dtype, device=first.device,
                       memory_format=_elementwise_format(*operands))


def _check_float(op: str, name: str, t: Tensor) -> None:
    torch._check(
        t.dtype in _FLOAT_DTYPES,
        lambda: f"{op}: expected {name} to have a floating-point dtype (float32, float64, float16 or "
        f"bfloat16), but got {t.dtype}",
    )


def _check_matches(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    _check_float(op, name, t)
    torch._check(t.dtype == ref.dtype,
                 lambda: f"{op}: expected {name} to have the dtype of {ref_name} ({ref.dtype}), but got {t.dtype}")
    torch._check(t.device == ref.device,
                 lambda: f"{op}: expected {name} to be on the device of {ref_name} ({ref.device}), but got {t.device}")
    torch._check(t.shape == ref.shape,
                 lambda: f"{op}: expected {name} to have the shape of {ref_name} {list(ref.shape)}, "
                 f"but got {list(t.shape)}")


def _check_param(op: str, name: str, p: Tensor, x: Tensor) -> None:
    torch._check(p.dim() <= 1 and p.numel() == 1,
                 lambda: f"{op}: expected {name} to have shape [1] (or be 0-dimensional), but got shape {list(p.shape)}")
    _check_float(op, "x", x)
    torch._check(p.dtype == x.dtype,
                 lambda: f"{op}: expected {name} to have the dtype of x ({x.dtype}), but got {p.dtype}")
    torch._check(p.device == x.device,
                 lambda: f"{op}: expected {name} to be on the device of x ({x.device}), but got {p.device}")


def _or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _not_differentiable(op: str, reason: str, error: type[Exception] = RuntimeError):
    """An autograd formula for an op without a derivative: it raises ``error`` saying why."""
    def backward(ctx, *grads):
        raise error(f"{op} is not differentiable: {reason}")
    return backward


# ---------------------------------------------------------------------------------------------
# Build information
# ---------------------------------------------------------------------------------------------


def cuda_version() -> int:
    """CUDART_VERSION the CUDA kernels were compiled with (e.g. 13000), or -1 in a CPU-only build."""
    return _OPS.cuda_version.default()


# ---------------------------------------------------------------------------------------------
# LipSwish: y = x·σ(βx)/1.1 with β = softplus(beta) (csrc/include/resflow/lipswish_math.h)
# ---------------------------------------------------------------------------------------------


def lipswish(x: Tensor, beta: Tensor) -> Tensor:
    """Fused LipSwish ``x * sigmoid(softplus(beta) * x) / 1.1``.

    Shapes: x any shape (float32/64, float16, bfloat16; half types compute in float); beta
    shape [1] (or 0-dim), same dtype and device. Returns y like x. Differentiable twice in x and beta.
    """
    return _OPS.lipswish.default(x, beta)


def lipswish_with_derivative(x: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """``(y, dy/dx)`` in one pass; dy/dx is what the log-det power series caches.

    Differentiable once (through both outputs) in x and beta.
    """
    return _OPS.lipswish_with_derivative.default(x, beta)


def lipswish_backward(grad: Tensor, x: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """``(grad * dy/dx, sum(grad * dy/dbeta))``: the gradients of x and of the raw beta
    (through softplus). grad_beta has beta's shape. Differentiable once (LipSwish's second order)."""
    return _OPS.lipswish_backward.default(grad, x, beta)


def lipswish_double_backward(grad: Tensor, gg_x: Tensor, gg_beta: Tensor, x: Tensor,
                             beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The vector-Jacobian product of :func:`lipswish_backward`: given the upstream gradients
    ``gg_x`` of grad_x and ``gg_beta`` of grad_beta, returns the gradients of (grad, x, beta).
    Uses d²y/dx², d²y/dx dbeta and d²y/dbeta². Not differentiable (third order is out of scope)."""
    return _OPS.lipswish_double_backward.default(grad, gg_x, gg_beta, x, beta)


@torch.library.register_fake("resflow_cuda::lipswish")
def _lipswish_fake(x, beta):
    _check_param("resflow_cuda.lipswish", "beta", beta, x)
    return _elementwise_like(x)


@torch.library.register_fake("resflow_cuda::lipswish_with_derivative")
def _lipswish_with_derivative_fake(x, beta):
    _check_param("resflow_cuda.lipswish_with_derivative", "beta", beta, x)
    return _elementwise_like(x), _elementwise_like(x)


@torch.library.register_fake("resflow_cuda::lipswish_backward")
def _lipswish_backward_fake(grad, x, beta):
    op = "resflow_cuda.lipswish_backward"
    _check_param(op, "beta", beta, x)
    _check_matches(op, "grad", grad, "x", x)
    return _elementwise_like(grad, x), beta.new_empty(beta.shape)


@torch.library.register_fake("resflow_cuda::lipswish_double_backward")
def _lipswish_double_backward_fake(grad, gg_x, gg_beta, x, beta):
    op = "resflow_cuda.lipswish_double_backward"
    _check_param(op, "beta", beta, x)
    _check_matches(op, "grad", grad, "x", x)
    _check_matches(op, "gg_x", gg_x, "x", x)
    _check_param(op, "gg_beta", gg_beta, x)
    return _elementwise_like(grad, gg_x, x), _elementwise_like(grad, gg_x, x), beta.new_empty(beta.shape)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _save_inputs_unmaterialized(ctx, inputs, output):
    # an output without upstream gradient arrives as None, not as a tensor of zeros
    ctx.set_materialize_grads(False)
    _save_inputs(ctx, inputs, output)


def _lipswish_autograd(ctx, grad):
    x, beta = ctx.saved_tensors
    return lipswish_backward(grad, x, beta)


def _lipswish_with_derivative_autograd(ctx, grad_y, grad_dydx):
    x, beta = ctx.saved_tensors
    if grad_dydx is None:
        return lipswish_backward(_or_zeros(grad_y, x), x, beta)
    # d(dy/dx)/dx = y'' and d(dy/dx)/dbeta are what the double backward multiplies by grad when
    # gg_x = 1 and gg_beta = 0; without an upstream gradient of y that is all (no backward of zeros).
    _, grad_x, grad_beta = lipswish_double_backward(grad_dydx, torch.ones_like(x), torch.zeros_like(beta), x, beta)
    if grad_y is None:
        return grad_x, grad_beta
    grad_x_y, grad_beta_y = lipswish_backward(grad_y, x, beta)
    return grad_x_y + grad_x, grad_beta_y + grad_beta


def _lipswish_backward_autograd(ctx, gg_x, gg_beta):
    grad, x, beta = ctx.saved_tensors
    return lipswish_double_backward(grad, _or_zeros(gg_x, x), _or_zeros(gg_beta, beta), x, beta)


def _lipswish_double_backward_autograd(ctx, *grads):
    raise NotImplementedError(
        "resflow_cuda.lipswish_double_backward is not differentiable: LipSwish supports derivatives "
        "up to second order (third-order gradients, e.g. a double backward of a double backward, are not implemented)"
    )


torch.library.register_autograd("resflow_cuda::lipswish", _lipswish_autograd, setup_context=_save_inputs)
torch.library.register_autograd("resflow_cuda::lipswish_with_derivative", _lipswish_with_derivative_autograd,
                                setup_context=_save_inputs_unmaterialized)
torch.library.register_autograd("resflow_cuda::lipswish_backward", _lipswish_backward_autograd,
                                setup_context=_save_inputs)
torch.library.register_autograd("resflow_cuda::lipswish_double_backward", _lipswish_double_backward_autograd)


# ---------------------------------------------------------------------------------------------
# Power iteration for spectral / induced p->q operator norms (csrc/host/power_iteration_host.h)
# ---------------------------------------------------------------------------------------------


def power_iteration(weight: Tensor, u: Tensor, v: Tensor, max_iterations: int, atol: float | None = None,
                    rtol: float | None = None, domain: float = 2.0, codomain: float = 2.0,
                    u_first: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Power iteration for the induced ``domain -> codomain`` norm of a dense weight.

    Each step is ``u <- normalize_u(W v, codomain)``, ``v <- normalize_v(W^T u, domain)`` (or v first
    with ``u_first=False``, the SpectralNorm* order).

    Args:
        weight: the matrix W, or a batch of them.
        u: the start of the output-side vector.
        v: the start of the input-side vector.
        max_iterations: number of steps (the limit, with a tolerance).
        atol, rtol: with both, stop early when the reference's tolerance test passes.
        domain: the input norm order p (>= 1 or inf).
        codomain: the output norm order q (>= 1 or inf).
        u_first: update u before v in each step.

    Shapes:
        weight (out, in) or (B, out, in); u (out,) / (B, out); v (in,) / (B, in); one float dtype
        (half types compute in float32).

    Returns:
        ``(u, v, sigma, iterations)``: sigma = u^T W v and iterations of shape () or (B,).

    Autograd: not differentiable (the layers take gradients through sigma).
    """
    return _OPS.power_iteration.default(weight, u, v, max_iterations, atol, rtol, float(domain), float(codomain),
                                        u_first)


def conv_power_iteration(weight: Tensor, u: Tensor, v: Tensor, input_size, stride, padding, max_iterations: int,
                         atol: float | None = None, rtol: float | None = None, domain: float = 2.0,
                         codomain: float = 2.0, u_first: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Power iteration for the convolution operator ``x -> conv2d(x, weight, stride, padding)`` on a
    ``1 x C x H x W`` input.

    Args:
        weight: the convolution's weight (out_channels, in_channels, kh, kw).
        u: the start of the flattened output-side vector.
        v: the start of the flattened input-side vector.
        input_size: the input's (H, W).
        stride, padding: pairs, as ``conv2d``'s.
        max_iterations, atol, rtol, domain, codomain, u_first: as :func:`power_iteration`.

    Shapes:
        u: (out_channels·H_out·W_out,); v: (in_channels·H·W,).

    Returns:
        ``(u, v, sigma, iterations)`` as :func:`power_iteration`; sigma comes from the last step's
        convolution (equal to u^T A v up to float rounding). Parity with the reference:
        docs/parity.md#conv_power_iteration

    Autograd: not differentiable.
    """
    return _OPS.conv_power_iteration.default(weight, u, v, list(input_size), list(stride), list(padding),
                                             max_iterations, atol, rtol, float(domain), float(codomain), u_first)


def power_iteration_update_(weights: list[Tensor], us: list[Tensor], vs: list[Tensor], sigmas: list[Tensor],
                            max_iterations: int, atol: float | None = None, rtol: float | None = None,
                            domain: float = 2.0, codomain: float = 2.0, u_first: bool = True) -> None:
    """:func:`power_iteration` on many matrices of any shapes in one call, writing each result into
    its ``u``, ``v`` (in place) and ``sigma`` (a one-element tensor): the buffers of a model's
    Lipschitz layers. Shapes as :func:`power_iteration` for one 2-D weight each. No autograd formula:
    call it under ``torch.no_grad()``, as update_lipschitz does."""
    _OPS.power_iteration_update_.default(weights, us, vs, sigmas, max_iterations, atol, rtol, float(domain),
                                         float(codomain), u_first)


def _power_iteration_outputs(weight, u, v):
    batch = weight.shape[:-2]
    compute = torch.promote_types(weight.dtype, torch.float32)
    return (torch.empty_like(u, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            weight.new_empty(batch, dtype=compute), weight.new_empty(batch, dtype=torch.long))


@torch.library.register_fake("resflow_cuda::power_iteration")
def _power_iteration_fake(weight, u, v, max_iterations, atol, rtol, domain, codomain, u_first):
    torch._check(weight.dim() in (2, 3), lambda: f"resflow_cuda.power_iteration: expected weight of shape "
                 f"(out, in) or (batch, out, in), but got shape {list(weight.shape)}")
    return _power_iteration_outputs(weight, u, v)


@torch.library.register_fake("resflow_cuda::conv_power_iteration")
def _conv_power_iteration_fake(weight, u, v, input_size, stride, padding, max_iterations, atol, rtol, domain,
                               codomain, u_first):
    torch._check(weight.dim() == 4, lambda: "resflow_cuda.conv_power_iteration: expected weight of shape "
                 f"(out_channels, in_channels, kh, kw), but got shape {list(weight.shape)}")
    return _power_iteration_outputs(weight[0, 0], u, v)


@torch.library.register_fake("resflow_cuda::power_iteration_update_")
def _power_iteration_update_fake(weights, us, vs, sigmas, max_iterations, atol, rtol, domain, codomain, u_first):
    return None


for _name in ("power_iteration", "conv_power_iteration"):
    torch.library.register_autograd(f"resflow_cuda::{_name}", _not_differentiable(
        f"resflow_cuda.{_name}", "the Lipschitz layers take the gradient through sigma = u^T W v computed from the "
        "returned u and v", NotImplementedError))


# ---------------------------------------------------------------------------------------------
# The log-det series of a linearized residual branch (csrc/composite/linearized_chain.h): composite ops
# over ATen and the fused accumulation, one implementation for every device. Not differentiable
# (they compute gradients themselves); called under no_grad by resflow_cuda.linearize.
# ---------------------------------------------------------------------------------------------


def linearized_logdet_series(eps: Tensor, weights: list[Tensor], strides: list[int], paddings: list[int],
                             derivs: list[Tensor | None], logdet_coeffs: list[float],
                             neumann_coeffs: list[float], surrogate: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """All n series terms of the branch's Jacobian J in one call, w_k = w_{k-1}^T J from w_0 = eps.

    Steps i = 1..L: ``weights[i]`` (out, in) or (out, in, kh, kw) with two ``strides`` /
    ``paddings`` entries per step, ``derivs[i]`` phi'(h_{i-1}) of the activation before it (None:
    none). Returns ``(logdet, neumann, surrogate)``: sum_k logdet_coeffs[k] <w_k, eps> per sample
    (float32, float64 for float64 eps), eps + sum_k neumann_coeffs[k] w_k and <neumann^T J, eps>
    (empty when ``neumann_coeffs`` is empty; the last also without ``surrogate``: one chain fewer).
    """
    return _OPS.linearized_logdet_series(eps, weights, strides, paddings, derivs, logdet_coeffs, neumann_coeffs,
                                         surrogate)


def linearized_neumann_gradient(w_tilde: Tensor, eps: Tensor, weights: list[Tensor], strides: list[int],
                                paddings: list[int], derivs: list[Tensor | None], layer_inputs: list[Tensor],
                                act_inputs: list[Tensor | None], activations: list[int], act_params: list[float],
                                betas: list[Tensor | None], has_bias: list[bool]):
    """The surrogate s = <w_tilde^T J, eps> per sample and its gradient, w_tilde held constant.

    Per step also: ``layer_inputs[i]`` a_i = phi_i(h_{i-1}), ``act_inputs[i]`` h_{i-1} (None
    without activation), ``activations[i]`` 0 identity / 1 LipSwish / 2 ELU / 3 softplus with two
    ``act_params`` (ELU alpha; softplus beta, threshold), ``betas[i]`` LipSwish's raw beta.
    Returns ``(s, grad_x, grad_weights, grad_biases, grad_betas)`` (empty tensors for steps
    without bias / LipSwish).
    """
    return _OPS.linearized_neumann_gradient(w_tilde, eps, weights, strides, paddings, derivs, layer_inputs,
                                            act_inputs, activations, act_params, betas, has_bias)


def _accumulator_like(eps: Tensor, n: int) -> Tensor:
    dtype = torch.float64 if eps.dtype == torch.float64 else torch.float32
    return eps.new_empty((n,), dtype=dtype)


@torch.library.register_fake("resflow_cuda::linearized_logdet_series")
def _linearized_logdet_series_fake(eps, weights, strides, paddings, derivs, logdet_coeffs, neumann_coeffs,
                                   surrogate):
    with_neumann = len(neumann_coeffs) > 0
    neumann = torch.empty_like(eps, memory_format=torch.contiguous_format) if with_neumann else eps.new_empty((0,))
    return (_accumulator_like(eps, eps.shape[0]), neumann,
            _accumulator_like(eps, eps.shape[0] if with_neumann and surrogate else 0))


@torch.library.register_fake("resflow_cuda::linearized_neumann_gradient")
def _linearized_neumann_gradient_fake(w_tilde, eps, weights, strides, paddings, derivs, layer_inputs, act_inputs,
                                      activations, act_params, betas, has_bias):
    grad_biases = [w.new_empty((w.shape[0],) if bias else (0,)) for w, bias in zip(weights, has_bias)]
    grad_betas = [eps.new_empty((0,)) if b is None else torch.empty_like(b) for b in betas]
    return (eps.new_empty((eps.shape[0],)), torch.empty_like(eps), [torch.empty_like(w) for w in weights],
            grad_biases, grad_betas)


for _name in ("linearized_logdet_series", "linearized_neumann_gradient"):
    torch.library.register_autograd(f"resflow_cuda::{_name}", _not_differentiable(
        f"resflow_cuda::{_name}", "it computes log-det terms and gradients itself. Call it under torch.no_grad() "
        "(resflow_cuda.nn.iResBlock does)."))


# ---------------------------------------------------------------------------------------------
# One term of the log-det power series (csrc/include/resflow/series_math.h), in place
# ---------------------------------------------------------------------------------------------


def logdet_series_accumulate_(w: Tensor, eps: Tensor, logdet: Tensor, neumann: Tensor | None, logdet_coeff: float,
                              neumann_coeff: float, scale: Tensor | None = None) -> None:
    """For every sample b (dim 0): ``logdet[b] += logdet_coeff * <w_b, eps_b>`` and, when given,
    ``neumann += neumann_coeff * w``, in one pass over w and eps; with ``scale``, first ``w *= scale``
    in place (the sums read the product before it is rounded to w's dtype: the same values for
    float32 / float64).

    Shapes: w, eps, neumann, scale (B, ...) of one float dtype and device, any strides; logdet (B,)
    in float32 (float64 for float64 w), the accumulation type. Half types compute in float32; each
    sum has a fixed order (independent of the thread count). Not differentiable: the estimators
    call it under ``torch.no_grad()``; with tensors that require grad it raises.
    """
    _OPS.logdet_series_accumulate_(w, eps, logdet, neumann, logdet_coeff, neumann_coeff, scale)


_SERIES = "resflow_cuda.logdet_series_accumulate_"


@torch.library.register_fake("resflow_cuda::logdet_series_accumulate_")
def _logdet_series_accumulate_fake(w, eps, logdet, neumann, logdet_coeff, neumann_coeff, scale=None):
    _check_float(_SERIES, "w", w)
    torch._check(w.dim() >= 1, lambda: f"{_SERIES}: expected w to have a batch dimension, but got a 0-dimensional tensor")
    _check_matches(_SERIES, "eps", eps, "w", w)
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    torch._check(logdet.dtype == acc, lambda: f"{_SERIES}: expected logdet to have dtype {acc}, but got {logdet.dtype}")
    torch._check(logdet.dim() == 1 and logdet.shape[0] == w.shape[0],
                 lambda: f"{_SERIES}: expected logdet to have shape [{w.shape[0]}], but got {list(logdet.shape)}")
    if neumann is not None:
        _check_matches(_SERIES, "neumann", neumann, "w", w)
    if scale is not None:
        _check_matches(_SERIES, "scale", scale, "w", w)


# ---------------------------------------------------------------------------------------------
# Autocast (docs/parity.md#mixed-precision): the ops that run ATen matrix products inside (the power
# iterations, the linearized log-det ops) are opaque to torch.autocast: they run in their inputs'
# dtypes with autocast off inside, since autocast would lower their inner products to 16 bits while
# they check that their inputs share one dtype (and still refuse inputs that do not). The callers
# pass one dtype: x's for the log-det (float32 in a float32 model), the weight's for the power
# iteration. Elementwise kernels (LipSwish, the accumulation) need no rule: autocast leaves them alone.
# ---------------------------------------------------------------------------------------------


def autocast_enabled(device: str) -> bool:
    """Whether autocast is on for the device type ``device`` (False where autocast does not exist).

    On CPU and CUDA it asks ``torch.is_autocast_enabled`` alone, which torch.compile traces in every
    supported torch (``torch.amp.is_autocast_available`` breaks the graph in torch 2.11)."""
    if device in ("cpu", "cuda"):
        return torch.is_autocast_enabled(device)
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def autocast_disabled(like: Tensor):
    """A context with autocast off on ``like``'s device type (a null context where autocast is not on):
    what the Python code that must run in its inputs' dtypes (the power iteration's sigma, the
    estimators' Jacobian products, root solves) wraps itself in."""
    device = like.device.type
    if autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def _without_autocast(op, device: str):
    def kernel(*args):
        with torch.autocast(device, enabled=False):
            return op(*args)
    return kernel


_AUTOCAST_LIBRARY = torch.library.Library("resflow_cuda", "IMPL")
for _name in ("power_iteration", "conv_power_iteration", "power_iteration_update_", "linearized_logdet_series",
              "linearized_neumann_gradient"):
    for _key, _device in (("AutocastCPU", "cpu"), ("AutocastCUDA", "cuda")):
        _AUTOCAST_LIBRARY.impl(_name, _without_autocast(getattr(_OPS, _name).default, _device), _key)
