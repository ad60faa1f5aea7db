"""Pure-PyTorch twins of every resflow_cuda op: the oracle for tests and the baseline for benchmarks.

Each follows the semantics of the reference implementations (rtqichen/residual-flows,
normflows) with plain eager ops and no resflow_cuda code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

LIPSWISH_DIVISOR = 1.1


def lipswish(x: Tensor, beta: Tensor) -> Tensor:
    """The reference ``Swish.forward``: ``x * sigmoid(x * softplus(beta)) / 1.1``."""
    return x * torch.sigmoid(x * F.softplus(beta)) / LIPSWISH_DIVISOR


def lipswish_with_derivative(x: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """``(y, dy/dx)`` with ``dy/dx = (s + βx·s(1 − s)) / 1.1``, s = sigmoid(βx), in eager ops."""
    b = F.softplus(beta)
    s = torch.sigmoid(x * b)
    y = x * s / LIPSWISH_DIVISOR
    dydx = (s + b * x * s * (1 - s)) / LIPSWISH_DIVISOR
    return y, dydx


# ---------------------------------------------------------------------------------------------
# Power iteration for spectral and induced p->q norms (residual-flows mixed_lipschitz.py,
# lipschitz.py): the dual maps, one iteration step, and the loop with the reference's stopping rule.
# ---------------------------------------------------------------------------------------------

NORMALIZE_EPS = 1e-12  # F.normalize's default eps


def projmax(x: Tensor) -> Tensor:
    """One-hot at the first index of max |x| (the reference's `projmax_`, out of place)."""
    out = torch.zeros_like(x)
    out[torch.argmax(torch.abs(x))] = 1
    return out


def vector_norm(x: Tensor, p: float) -> Tensor:
    """The reference's `(sum x^p)^(1/p)` on non-negative x (p = inf gives sum(x^inf)^0)."""
    x = x.reshape(-1)
    return torch.sum(x ** p) ** (1 / p)


def _sign_with_zero_as_one(x: Tensor) -> Tensor:
    sign = x / torch.abs(x)
    sign[torch.isnan(sign)] = 1
    return sign


def normalize_v(v: Tensor, domain) -> Tensor:
    """Dual map of the domain norm p: unit l2 (p = 2), projmax (p = 1), else the Hoelder dual.
    A tensor-valued p (learnable norms) always takes the general branch, as in the reference."""
    if not torch.is_tensor(domain) and domain == 2:
        return F.normalize(v, p=2, dim=0, eps=NORMALIZE_EPS)
    if domain == 1:
        return projmax(v)
    vabs = torch.abs(v)
    vabs = (vabs / torch.max(vabs)) ** (1 / (domain - 1))
    return _sign_with_zero_as_one(v) * vabs / vector_norm(vabs, domain)


def normalize_u(u: Tensor, codomain) -> Tensor:
    """Dual map of the codomain norm q: unit l2 (q = 2), projmax (q = inf), else the Hoelder dual."""
    if not torch.is_tensor(codomain) and codomain == 2:
        return F.normalize(u, p=2, dim=0, eps=NORMALIZE_EPS)
    if codomain == float("inf"):
        return projmax(u)
    uabs = torch.abs(u)
    uabs = (uabs / torch.max(uabs)) ** (codomain - 1)
    dual = float("inf") if codomain == 1 else codomain / (codomain - 1)
    return _sign_with_zero_as_one(u) * uabs / vector_norm(uabs, dual)


def power_iteration(weight: Tensor, u: Tensor, v: Tensor, max_iterations: int, atol: float | None = None,
                    rtol: float | None = None, domain=2, codomain=2, u_first: bool = True,
                    matvec=None, rmatvec=None):
    """The reference power iteration on one operator.

    Each step is u <- normalize_u(A v, codomain) then v <- normalize_v(A^T u, domain) (u_first, the
    InducedNorm* order) or v first then u (the SpectralNorm* order, p = q = 2). With atol and rtol
    it stops after the first step where ||u - u_old||/sqrt(len u) < atol + rtol max(u) and the same
    for v. A is `weight` (out x in) unless matvec / rmatvec apply the operator and its transpose.
    Returns (u, v, sigma = u^T A v, iterations).
    """
    matvec = matvec or (lambda x: torch.mv(weight, x))
    rmatvec = rmatvec or (lambda y: torch.mv(weight.t(), y))
    iterations = 0
    with torch.no_grad():
        for _ in range(max_iterations):
            old_u, old_v = u.clone(), v.clone()
            if u_first:
                u = normalize_u(matvec(v), codomain)
                v = normalize_v(rmatvec(u), domain)
            else:
                v = normalize_v(rmatvec(u), domain)
                u = normalize_u(matvec(v), codomain)
            iterations += 1
            if atol is not None and rtol is not None:
                err_u = torch.norm(u - old_u) / (u.nelement() ** 0.5)
                err_v = torch.norm(v - old_v) / (v.nelement() ** 0.5)
                if err_u < atol + rtol * torch.max(u) and err_v < atol + rtol * torch.max(v):
                    break
        sigma = torch.dot(u, matvec(v))
    return u, v, sigma, iterations


def conv_operator(weight: Tensor, input_hw, stride, padding):
    """(matvec, rmatvec) of the convolution x -> conv2d(x, weight) on a 1 x C x H x W input, on
    flattened vectors: conv2d and conv_transpose2d as in the reference's k x k power iteration (the
    output shape from the convolution arithmetic: no extra convolution, as there)."""
    c, (h, w) = weight.shape[1], input_hw
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    out_shape = (1, weight.shape[0], (h + 2 * ph - weight.shape[2]) // sh + 1, (w + 2 * pw - weight.shape[3]) // sw + 1)

    def matvec(x):
        return F.conv2d(x.view(1, c, h, w), weight, stride=stride, padding=padding).reshape(-1)

    def rmatvec(y):
        return F.conv_transpose2d(y.view(out_shape), weight, stride=stride, padding=padding).reshape(-1)

    return matvec, rmatvec


# ---------------------------------------------------------------------------------------------
# The log-det series of a linearized residual branch (steps "activation, then a dense or conv
# map"; see csrc/composite/linearized_chain.h): twins of linearized_logdet_series and
# linearized_neumann_gradient, with autograd for the chain's transposes.
# ---------------------------------------------------------------------------------------------


def _chain_maps(weights, strides, paddings):
    """Per step: the map v -> W v (dense on the last dim, or conv2d), without bias."""
    maps = []
    for i, w in enumerate(weights):
        if w.dim() == 2:
            maps.append(lambda v, w=w: F.linear(v, w))
        else:
            s, p = tuple(strides[2 * i:2 * i + 2]), tuple(paddings[2 * i:2 * i + 2])
            maps.append(lambda v, w=w, s=s, p=p: F.conv2d(v, w, stride=s, padding=p))
    return maps


def _jacobian_apply(maps, derivs, v: Tensor) -> Tensor:
    for apply, d in zip(maps, derivs):
        v = apply(v if d is None else v * d)
    return v


def _chain_vjp(maps, derivs, w: Tensor) -> Tensor:
    probe = torch.zeros_like(w).requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(_jacobian_apply(maps, derivs, probe), probe, w)[0]


def linearized_logdet_series(eps, weights, strides, paddings, derivs, logdet_coeffs, neumann_coeffs, surrogate=True):
    """(sum_k lc_k <w_k, eps>, eps + sum_k nc_k w_k, <neumann^T J, eps>), w_k = w_{k-1}^T J."""
    maps = _chain_maps(weights, strides, paddings)
    acc = torch.float64 if eps.dtype == torch.float64 else torch.float32
    flat = (eps.shape[0], eps[0].numel() if eps.shape[0] else 0)
    logdet = torch.zeros(eps.shape[0], dtype=acc, device=eps.device)
    neumann = eps.clone() if neumann_coeffs else eps.new_empty((0,))
    w = eps
    for k, lc in enumerate(logdet_coeffs):
        w = _chain_vjp(maps, derivs, w)
        logdet = logdet + lc * (w.reshape(flat) * eps.reshape(flat)).to(acc).sum(1)
        if neumann_coeffs:
            neumann = neumann + neumann_coeffs[k] * w
    if not (neumann_coeffs and surrogate):
        return logdet, neumann, logdet.new_empty((0,))
    surrogate = (_chain_vjp(maps, derivs, neumann).reshape(flat) * eps.reshape(flat)).to(acc).sum(1)
    return logdet, neumann, surrogate


def _activation(code: int, params, beta):
    if code == 1:
        return lambda h: lipswish(h, beta)
    if code == 2:
        return lambda h: F.elu(h, params[0])
    return lambda h: F.softplus(h, params[0], params[1])


def linearized_neumann_gradient(w_tilde, eps, weights, strides, paddings, derivs, layer_inputs, act_inputs,
                                activations, act_params, betas, has_bias):
    """s = <w~^T J, eps> and its gradient by autograd's double backward through a rebuilt branch.

    The branch is rebuilt from the cached inputs of each step: x = h_0 (act_inputs[0], or
    layer_inputs[0] without activation) and biases chosen so that every h_i is the cached one,
    so that the gradients are those of the original branch at the original point."""
    maps = _chain_maps(weights, strides, paddings)
    steps = len(weights)
    x = (act_inputs[0] if activations[0] else layer_inputs[0]).detach().clone().requires_grad_(True)
    leaves_w = [w.detach().clone().requires_grad_(True) for w in weights]
    leaves_beta = [None if b is None else b.detach().clone().requires_grad_(True) for b in betas]
    biases = []
    for i in range(steps):
        nxt = act_inputs[i + 1] if i + 1 < steps and activations[i + 1] else (
            layer_inputs[i + 1] if i + 1 < steps else None)
        if nxt is None or not has_bias[i]:
            shape = (weights[i].shape[0],)
            biases.append(torch.zeros(shape, dtype=eps.dtype, device=eps.device, requires_grad=True))
            continue
        offset = nxt - maps[i](layer_inputs[i])
        dims = [0] + list(range(2, offset.dim()))
        biases.append(offset.mean(dims).detach().clone().requires_grad_(True))
    with torch.enable_grad():
        h = x
        for i in range(steps):
            a = _activation(activations[i], act_params[2 * i:2 * i + 2], leaves_beta[i])(h) if activations[i] else h
            b = biases[i] if a.dim() == 2 else biases[i].view(1, -1, 1, 1)
            h = (F.linear(a, leaves_w[i]) if weights[i].dim() == 2 else
                 F.conv2d(a, leaves_w[i], stride=tuple(strides[2 * i:2 * i + 2]),
                          padding=tuple(paddings[2 * i:2 * i + 2]))) + b
        (vjp,) = torch.autograd.grad(h, x, w_tilde, create_graph=True)
        s = (vjp * eps).reshape(eps.shape[0], -1).sum(1)
        leaves = [x, *leaves_w, *biases, *[b for b in leaves_beta if b is not None]]
        grads = torch.autograd.grad(s.sum(), leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    grad_x, grad_w = grads[0], grads[1:1 + steps]
    grad_b = [g if hb else eps.new_empty((0,)) for g, hb in zip(grads[1 + steps:1 + 2 * steps], has_bias)]
    beta_grads = iter(grads[1 + 2 * steps:])
    grad_beta = [eps.new_empty((0,)) if b is None else next(beta_grads) for b in leaves_beta]
    return s.detach(), grad_x, grad_w, grad_b, grad_beta


# ---------------------------------------------------------------------------------------------
# The reference SpectralNorm* layers (residual-flows lipschitz.py; normflows has no copy), for tests
# ---------------------------------------------------------------------------------------------


def _soft_normalize(weight: Tensor, sigma: Tensor, coeff: float) -> Tensor:
    return weight / torch.max(torch.ones(1).to(weight.device), sigma / coeff)


class SpectralNormLinear(torch.nn.Module):
    """residual-flows' SpectralNormLinear: v-first power iteration, in training forward too."""

    def __init__(self, in_features, out_features, bias=True, coeff=0.97, n_iterations=None, atol=None, rtol=None):
        super().__init__()
        self.coeff, self.n_iterations, self.atol, self.rtol = coeff, n_iterations, atol, rtol
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.empty(out_features)) if bias else None
        torch.nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        if bias:
            bound = 1 / in_features ** 0.5
            torch.nn.init.uniform_(self.bias, -bound, bound)
        self.register_buffer("scale", torch.tensor(0.0))
        self.register_buffer("u", F.normalize(self.weight.new_empty(out_features).normal_(0, 1), dim=0))
        self.register_buffer("v", F.normalize(self.weight.new_empty(in_features).normal_(0, 1), dim=0))
        self.compute_weight(True, 200)

    def compute_weight(self, update=True, n_iterations=None, atol=None, rtol=None):
        n_iterations = self.n_iterations if n_iterations is None else n_iterations
        atol = self.atol if atol is None else atol
        rtol = self.rtol if rtol is None else atol  # the reference's quirk
        u, v = self.u, self.v
        if update:
            u, v, _, _ = power_iteration(self.weight.detach(), u, v, 20000 if n_iterations is None else n_iterations,
                                         atol, rtol, 2, 2, u_first=False)
            self.u.copy_(u)
            self.v.copy_(v)
        sigma = torch.dot(u, torch.mv(self.weight, v))
        with torch.no_grad():
            self.scale.copy_(sigma)
        return _soft_normalize(self.weight, sigma, self.coeff)

    def forward(self, x):
        return F.linear(x, self.compute_weight(update=self.training), self.bias)


class SpectralNormConv2d(torch.nn.Module):
    """residual-flows' SpectralNormConv2d: u and v sized at the first forward (v drawn first for
    k x k kernels, u first for 1x1), v-first power iteration in training forward."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, bias=True, coeff=0.97,
                 n_iterations=None, atol=None, rtol=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kernel_size,) * 2, (stride,) * 2, (padding,) * 2
        self.coeff, self.n_iterations, self.atol, self.rtol = coeff, n_iterations, atol, rtol
        self.weight = torch.nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = torch.nn.Parameter(torch.empty(out_channels)) if bias else None
        torch.nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        if bias:
            bound = 1 / (in_channels * kernel_size * kernel_size) ** 0.5
            torch.nn.init.uniform_(self.bias, -bound, bound)
        self.initialized = False
        self.register_buffer("spatial_dims", torch.tensor([1.0, 1.0]))
        self.register_buffer("scale", torch.tensor(0.0))

    def _operator(self):
        h, w = (int(d) for d in self.spatial_dims.tolist())
        if self.kernel_size == (1, 1):
            matrix = self.weight.view(self.out_channels, self.in_channels)
            return (lambda x: torch.mv(matrix, x)), (lambda y: torch.mv(matrix.t(), y)), (h, w)
        return (*conv_operator(self.weight, (h, w), self.stride, self.padding), (h, w))

    def compute_weight(self, update=True, n_iterations=None):
        if not self.initialized:
            if self.kernel_size == (1, 1):
                self.register_buffer("u", F.normalize(self.weight.new_empty(self.out_channels).normal_(0, 1), dim=0))
                self.register_buffer("v", F.normalize(self.weight.new_empty(self.in_channels).normal_(0, 1), dim=0))
            else:
                with torch.no_grad():
                    matvec, _, (h, w) = self._operator()
                    v = F.normalize(torch.randn(self.in_channels * h * w).to(self.weight), dim=0, eps=1e-12)
                    n_out = matvec(v).numel()
                    u = F.normalize(torch.randn(n_out).to(self.weight), dim=0, eps=1e-12)
                self.register_buffer("u", u)
                self.register_buffer("v", v)
            self.initialized = True
        n_iterations = self.n_iterations if n_iterations is None else n_iterations
        u, v = self.u, self.v
        matvec, rmatvec, _ = self._operator()
        if update:
            with torch.no_grad():
                u, v, _, _ = power_iteration(None, u, v, 20000 if n_iterations is None else n_iterations, self.atol,
                                             self.rtol, 2, 2, False, matvec, rmatvec)
                self.u.copy_(u)
                self.v.copy_(v)
        sigma = torch.dot(u, matvec(v))
        with torch.no_grad():
            self.scale.copy_(sigma)
        return _soft_normalize(self.weight, sigma, self.coeff)

    def forward(self, x):
        if not self.initialized:
            self.spatial_dims.copy_(torch.tensor(x.shape[2:4]).to(self.spatial_dims))
        return F.conv2d(x, self.compute_weight(update=self.training), self.bias, self.stride, self.padding)


# ---------------------------------------------------------------------------------------------
# One term of the log-det power series (the reference's basic / Neumann estimator loops)
# ---------------------------------------------------------------------------------------------


def logdet_series_accumulate_(w: Tensor, eps: Tensor, logdet: Tensor, neumann: Tensor | None, logdet_coeff: float,
                              neumann_coeff: float, scale: Tensor | None = None) -> None:
    """In place: with ``scale``, ``w *= scale`` first (the product in logdet's dtype, which the sums
    below read, rounded once into w); then ``logdet[b] += logdet_coeff * <w_b, eps_b>`` (in logdet's
    dtype) and ``neumann += neumann_coeff * w`` (computed in logdet's dtype, rounded once)."""
    acc = logdet.dtype
    wide = w.to(acc)
    if scale is not None:
        wide = wide * scale.to(acc)
        w.copy_(wide)
    flat = (w.shape[0], w[0].numel() if w.shape[0] else 0)
    logdet.add_(logdet_coeff * (wide.reshape(flat) * eps.reshape(flat).to(acc)).sum(1))
    if neumann is not None:
        neumann.copy_(neumann.to(acc) + neumann_coeff * wide)


def moments_(x: Tensor, mean: Tensor, mean_square: Tensor) -> None:
    """The reference's statistics ``mean(value)`` and ``mean(value ** 2)``: each square rounded to x's
    dtype, the means taken in float64 over every element, rounded to x's dtype, stored in the buffers."""
    flat = x.reshape(-1)
    mean.fill_(flat.double().mean().to(x.dtype).item())
    mean_square.fill_((flat ** 2).double().mean().to(x.dtype).item())


def foreach_add_scaled(a: list[Tensor], b: list[Tensor], scale: Tensor) -> list[Tensor]:
    """a[i] + b[i] * scale per pair, as the reference's autograd sums a parameter's two gradient shares."""
    return [ai + bi * scale.reshape(()) for ai, bi in zip(a, b)]


def actnorm(x: Tensor, weight: Tensor, bias: Tensor, logp: Tensor | None, sign: int) -> tuple[Tensor, Tensor]:
    """residual-flows' ActNorm: (x + bias) * exp(weight) per channel, and logp + sign * the log-det, the weight
    expanded over every position and summed per sample (its ``_logdetgrad``); differentiable by autograd."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    y = (x + bias.view(view)) * torch.exp(weight.view(view))
    if logp is None:
        return y, x.new_empty(0)
    logdet = weight.view(view).expand(x.shape).flatten(1).sum(1)
    return y, logp + sign * logdet.reshape(logp.shape)


# ---------------------------------------------------------------------------------------------
# The fused dense block (resflow_cuda.dense_block): its kernels and composite ops, by autograd
# ---------------------------------------------------------------------------------------------


def jacobian_lipswish(z: Tensor, bias: Tensor | None, beta: Tensor, batch: int,
                      keep: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(h, a, kept_a, kept_t): h = z[:B] + bias; a = f(h) on the first B rows, f'(h) z on every further block
    of B rows; with ``keep`` and at least two blocks, a's first two blocks and z's second (else no rows)."""
    h = z[:batch] + (0 if bias is None else bias)
    value, slope = lipswish_with_derivative(h, beta)
    blocks = z.shape[0] // batch if batch else 0
    a = torch.cat([value, slope.repeat(max(blocks - 1, 0), 1) * z[batch:]])
    kept = keep and blocks >= 2
    return h, a, a[:2 * batch if kept else 0].clone(), z[batch:2 * batch if kept else batch].clone()


def jacobian_lipswish_backward(grad: Tensor, h: Tensor, tangent: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of <grad[:B], f(h)> + sum_k <grad[B(k+1):B(k+2)], f'(h) t_k> (t_k the k-th block of B rows
    of ``tangent``) with respect to (h, tangent) (stacked) and beta."""
    h, tangent, beta = (t.detach().requires_grad_(True) for t in (h, tangent, beta))
    batch = h.shape[0]
    blocks = tangent.shape[0] // batch if batch else 0
    with torch.enable_grad():
        value, slope = lipswish_with_derivative(h, beta)
        total = (grad[:batch] * value).sum() + (grad[batch:] * slope.repeat(blocks, 1) * tangent).sum()
        gh, gt, gb = torch.autograd.grad(total, (h, tangent, beta), allow_unused=True)
    return torch.cat([gh, torch.zeros_like(tangent) if gt is None else gt]), gb


def _series_from_jacobian(jac: Tensor, eps: Tensor, logdet_coeffs, neumann_coeffs):
    """log-det terms and w~ from per-sample Jacobians (B, D, D): w_k = J^T w_{k-1}."""
    logdet = eps.new_zeros(eps.shape[0])
    w, w_tilde = eps, eps
    for k, c in enumerate(logdet_coeffs):
        w = torch.einsum("bed,be->bd", jac, w)
        logdet = logdet + c * (w * eps).sum(1)
        if neumann_coeffs:
            w_tilde = w_tilde + neumann_coeffs[k] * w
    return logdet, w_tilde


def jacobian_series(z: Tensor, bias: Tensor | None, eps: Tensor, logdet_coeffs, neumann_coeffs):
    """(g, logdet, surrogate, w~) from the last stack [g; J eps; J e_1; ...; J e_D] (blocks of B rows)."""
    batch, dim = eps.shape
    jac = z[2 * batch:].reshape(dim, batch, dim).permute(1, 2, 0)  # (B, e, d)
    logdet, w_tilde = _series_from_jacobian(jac, eps, logdet_coeffs, neumann_coeffs)
    g = z[:batch] + (0 if bias is None else bias)
    if not neumann_coeffs:
        return g, logdet, eps.new_zeros(0), eps.new_zeros(0)
    return g, logdet, (w_tilde * z[batch:2 * batch]).sum(1), w_tilde


def lipschitz_normalize(weights, us, vs, coeffs, detach_sigma: bool = False) -> tuple[list[Tensor], Tensor]:
    """The reference's ``W / max(ones(1), u^T W v / coeff)`` per layer (differentiable in W; in sigma too
    unless ``detach_sigma``), and the sigmas."""
    sigmas = [torch.dot(u, torch.mv(w, v)) for w, u, v in zip(weights, us, vs)]
    out = [w / torch.max(s.new_ones(1), (s.detach() if detach_sigma else s) / c)
           for w, s, c in zip(weights, sigmas, coeffs)]
    return out, torch.stack(sigmas) if sigmas else torch.zeros(0)


def dense_branch(x: Tensor, weights, biases, betas) -> Tensor:
    """The branch of steps "LipSwish (beta; None: none), then x W^T + b" with autograd."""
    h = x
    for w, b, beta in zip(weights, biases, betas):
        h = F.linear(h if beta is None else lipswish(h, beta), w, b)
    return h


def dense_jacobian_block(x: Tensor, eps: Tensor, weights, biases, betas, logdet_coeffs, neumann_coeffs):
    """(g, logdet, surrogate, w~) of the fused block by autograd: J from D backward passes, the series
    from J (logdet differentiable through every term: the basic estimator), surrogate = <w~^T J, eps>
    with w~ detached (so its gradient is the Neumann gradient)."""
    with torch.enable_grad():
        g = dense_branch(x, weights, biases, betas)
        rows = [torch.autograd.grad(g[:, e].sum(), x, create_graph=True)[0] for e in range(g.shape[1])]
        jac = torch.stack(rows, 1)  # (B, e, d)
        logdet, w_tilde = _series_from_jacobian(jac, eps, logdet_coeffs, neumann_coeffs)
        surrogate = (w_tilde.detach().unsqueeze(2) * jac * eps.unsqueeze(1)).sum((1, 2))
    return g, logdet, surrogate, w_tilde.detach()


def jacobian_series_backward(z: Tensor, eps: Tensor, logdet_coeffs, grad_logdet: Tensor, grad_g: Tensor) -> Tensor:
    """The co-tangents of the last stack for sum_b grad_logdet_b logdet_b + <grad_g, g>, by autograd."""
    batch = eps.shape[0]
    leaf = z.detach().requires_grad_(True)
    with torch.enable_grad():
        _, logdet, _, _ = jacobian_series(leaf, None, eps, logdet_coeffs, [])
        grad, = torch.autograd.grad((logdet * grad_logdet).sum(), leaf, allow_unused=True)
    grad = torch.zeros_like(z) if grad is None else grad.clone()
    grad[:batch] = grad_g
    return grad
