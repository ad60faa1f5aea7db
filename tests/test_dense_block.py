"""The fused dense block (resflow_cuda.dense_block): its kernels and composite ops against the autograd
oracles of resflow_cuda.reference, opcheck, bad input, and which blocks take it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from resflow_cuda import dense_block, dense_ops, reference
from resflow_cuda.nn import InducedNormLinear, LipSwish, SpectralNormLinear, iResBlock

DTYPES = [torch.float32, torch.float64]
# Float64: the op and the oracle differ in summation order only (a few dozen terms of O(1) values,
# each rounding at 2**-53): 1e-12 relative leaves a margin of ~100x. Float32: the same at 2**-24,
# with the oracle's own rounding of f'(h) from a different formula: 2e-5.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def _close(got, expected, dtype, scale=1.0):
    # atol = RTOL x the magnitude of the terms a result sums (``scale``): entries that cancel to near zero
    # keep the absolute error of their terms, which rtol alone would not allow.
    torch.testing.assert_close(got, expected, rtol=RTOL[dtype], atol=RTOL[dtype] * scale)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
# (700, 7, 4): the CPU kernel's chunks (4096 primal elements at 4 blocks) end in the middle of a row
@pytest.mark.parametrize("batch,width,blocks", [(5, 7, 4), (1, 1, 1), (33, 64, 3), (0, 4, 0), (700, 7, 4)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("keep", [False, True])
def test_jacobian_lipswish_matches_the_oracle(dtype, batch, width, blocks, with_bias, keep):
    g = _gen()
    z = torch.randn(blocks * batch, 2 * width, generator=g, dtype=dtype)[:, ::2]  # not contiguous
    bias = torch.randn(width, generator=g, dtype=dtype) if with_bias else None
    beta = torch.tensor([0.3], dtype=dtype)
    got = dense_ops._OPS.jacobian_lipswish(z, bias, beta, batch, keep)
    expected = reference.jacobian_lipswish(z, bias, beta, batch, keep)
    assert len(got) == len(expected) == 4
    for a, b in zip(got, expected):
        _close(a, b, dtype)
    kept_rows = 2 * batch if keep and blocks >= 2 else 0
    assert got[2].shape == (kept_rows, width) and got[3].shape == (kept_rows // 2, width)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,width,blocks", [(5, 7, 1), (1, 1, 1), (40, 64, 1), (0, 3, 1), (6, 9, 4), (3, 2, 0),
                                                 (700, 7, 3)])  # several CPU chunks, split mid-row
def test_jacobian_lipswish_backward_matches_the_oracle(dtype, batch, width, blocks):
    g = _gen(1)
    grad, h, t = (torch.randn(rows, width, generator=g, dtype=dtype) * 3
                  for rows in ((1 + blocks) * batch, batch, blocks * batch))
    beta = torch.tensor([-0.4], dtype=dtype)
    got_grad, got_beta = dense_ops._OPS.jacobian_lipswish_backward(grad, h, t, beta)
    expected_grad, expected_beta = reference.jacobian_lipswish_backward(grad, h, t, beta)
    _close(got_grad, expected_grad, dtype)
    _close(got_beta, expected_beta, dtype, scale=max(batch * width, 1))  # a sum of batch x width terms


def _coeffs(n, seed=2):
    rng = np.random.default_rng(seed)
    logdet = [float(c) for c in rng.uniform(-1, 1, n)]
    return logdet, [float(c) for c in rng.uniform(-1, 1, n)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,dim,terms", [(6, 2, 4), (3, 5, 1), (1, 1, 40), (17, 16, 9)])
@pytest.mark.parametrize("neumann", [True, False])
def test_jacobian_series_matches_the_oracle(dtype, batch, dim, terms, neumann):
    g = _gen(3)
    z = torch.randn((2 + dim) * batch, dim, generator=g, dtype=dtype) * 0.3
    eps = torch.randn(batch, dim, generator=g, dtype=dtype)
    bias = torch.randn(dim, generator=g, dtype=dtype)
    logdet_coeffs, neumann_coeffs = _coeffs(terms)
    neumann_coeffs = neumann_coeffs if neumann else []
    got = dense_ops._OPS.jacobian_series(z, bias, eps, logdet_coeffs, neumann_coeffs)
    expected = reference.jacobian_series(z, bias, eps, logdet_coeffs, neumann_coeffs)
    for a, b in zip(got, expected):
        _close(a, b.to(a.dtype), dtype)


def _layers(dtype, dims=(3, 16, 9, 3), seed=4):
    g = _gen(seed)
    weights = [torch.randn(b, a, generator=g, dtype=dtype) / a ** 0.5 for a, b in zip(dims, dims[1:])]
    us = [torch.nn.functional.normalize(torch.randn(w.shape[0], generator=g, dtype=dtype), dim=0) for w in weights]
    vs = [torch.nn.functional.normalize(torch.randn(w.shape[1], generator=g, dtype=dtype), dim=0) for w in weights]
    return weights, us, vs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("detach", [False, True])
def test_lipschitz_normalize_and_its_backward_match_the_oracle(dtype, detach):
    weights, us, vs = _layers(dtype)
    # coeffs below and above each sigma: both branches of max(1, sigma / coeff)
    coeffs = [0.05, 10.0, 0.2]
    scales = [torch.zeros((), dtype=dtype) for _ in weights]
    got, sigmas = dense_ops.lipschitz_normalize_(weights, us, vs, scales, coeffs)
    leaves = [w.clone().requires_grad_(True) for w in weights]
    with torch.enable_grad():
        expected, expected_sigmas = reference.lipschitz_normalize(leaves, us, vs, coeffs, detach)
    for a, b in zip(got, expected):
        _close(a, b.detach(), dtype)
    _close(sigmas, expected_sigmas.detach(), dtype)
    for scale, sigma in zip(scales, sigmas):
        assert scale.item() == sigma.item()  # the scale buffers get sigma
    grads = [torch.randn(w.shape, generator=_gen(5), dtype=dtype) for w in weights]
    expected_grads = torch.autograd.grad(expected, leaves, grads)
    got_grads = dense_ops.lipschitz_normalize_backward(grads, weights, us, vs, sigmas, coeffs, [detach] * len(weights))
    for a, b in zip(got_grads, expected_grads):
        _close(a, b, dtype, scale=10.0)  # series terms of up to 40 powers of J with |J| ~ 1: partial sums up to ~10


def test_lipschitz_normalize_backward_splits_the_gradient_at_a_tie_as_torch_max():
    # sigma = u^T W v = 2 exactly and coeff = 2: torch.max gives each of its equal inputs half the gradient.
    w = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    u = v = torch.tensor([1.0, 0.0], dtype=torch.float64)
    grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    leaf = w.clone().requires_grad_(True)
    with torch.enable_grad():
        (expected,), _ = reference.lipschitz_normalize([leaf], [u], [v], [2.0])
    expected_grad, = torch.autograd.grad(expected, leaf, grad)
    _, sigmas = dense_ops.lipschitz_normalize_([w], [u], [v], [torch.zeros((), dtype=torch.float64)], [2.0])
    got, = dense_ops.lipschitz_normalize_backward([grad], [w], [u], [v], sigmas, [2.0], [False])
    assert sigmas.item() == 2.0
    torch.testing.assert_close(got, expected_grad, rtol=0, atol=0)
    # by hand: <G, W> = 6, factor 1, dfactor/dsigma = 0.5 / coeff = 0.25: G[0, 0] - 6 * 0.25 u0 v0 = -0.5
    # (a full or no gradient to sigma would give -2 or 1)
    assert got[0, 0].item() == -0.5


def _block_args(dtype, dims=(3, 16, 9, 3), batch=11, identity=None, seed=6):
    weights, _, _ = _layers(dtype, dims, seed)
    g = _gen(seed + 1)
    x = torch.randn(batch, dims[0], generator=g, dtype=dtype)
    eps = torch.randn(batch, dims[0], generator=g, dtype=dtype)
    biases = [torch.randn(w.shape[0], generator=g, dtype=dtype) * 0.1 for w in weights]
    biases[1] = None
    betas = [torch.randn(1, generator=g, dtype=dtype) for _ in weights]
    if identity is not None:  # a step without activation: the first, or one after a bias (step 1)
        betas[identity] = None
    return x, eps, weights, biases, betas


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,dim,terms", [(6, 2, 4), (3, 5, 1), (1, 1, 9), (17, 16, 6)])
def test_jacobian_series_backward_matches_the_oracle(dtype, batch, dim, terms):
    g = _gen(10)
    z = torch.randn((2 + dim) * batch, dim, generator=g, dtype=dtype) * 0.3
    eps = torch.randn(batch, dim, generator=g, dtype=dtype)
    grad_logdet = torch.randn(batch, generator=g, dtype=dtype)
    grad_g = torch.randn(batch, dim, generator=g, dtype=dtype)
    logdet_coeffs, _ = _coeffs(terms)
    got = dense_ops.jacobian_series_backward(z, eps, logdet_coeffs, grad_logdet, grad_g)
    _close(got, reference.jacobian_series_backward(z, eps, logdet_coeffs, grad_logdet, grad_g), dtype,
           scale=10.0)  # sums of O(terms) products of powers, |.| <= ~10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("identity", [None, 0, 1])
@pytest.mark.parametrize("estimator", ["neumann", "basic"])
def test_dense_jacobian_forward_and_backward_match_the_autograd_oracle(dtype, identity, estimator):
    x, eps, weights, biases, betas = _block_args(dtype, identity=identity)
    logdet_coeffs, neumann_coeffs = _coeffs(5)
    neumann_coeffs = neumann_coeffs if estimator == "neumann" else []
    g, logdet, value, w_tilde, hs, stacks, activated = dense_ops.dense_jacobian_forward(
        x, eps, weights, biases, betas, logdet_coeffs, neumann_coeffs)
    leaves = [t.clone().requires_grad_(True) for t in [x, *weights]]
    bias_leaves = [None if b is None else b.clone().requires_grad_(True) for b in biases]
    beta_leaves = [None if b is None else b.clone().requires_grad_(True) for b in betas]
    eg, elogdet, evalue, ew_tilde = reference.dense_jacobian_block(leaves[0], eps, leaves[1:], bias_leaves,
                                                                   beta_leaves, logdet_coeffs, neumann_coeffs)
    _close(g, eg.detach(), dtype, scale=10.0)  # stacks of O(1) values through 3 layers of 16: |g| <= ~10
    _close(logdet, elogdet.detach().to(logdet.dtype), dtype, scale=10.0)
    if estimator == "neumann":
        _close(value, evalue.detach().to(value.dtype), dtype, scale=10.0)
        _close(w_tilde, ew_tilde.to(w_tilde.dtype), dtype, scale=10.0)
        # held for the backward: the rows its seed covers, not the D direction tangents
        batch = x.shape[0]
        assert all(a.shape[0] == 2 * batch for a in activated)
        assert [s.shape[0] for s in stacks] == [batch if b is not None else 0 for b in betas] + [0]
    else:
        assert value.numel() == 0 and w_tilde.numel() == 0
    grad_g = torch.randn(g.shape, generator=_gen(8), dtype=dtype)
    grad_value = torch.randn(g.shape[0], generator=_gen(9), dtype=dtype)
    if estimator == "neumann":
        seed = torch.cat([grad_g, w_tilde * grad_value.unsqueeze(1)])
        through = evalue  # the surrogate: its gradient is the Neumann gradient
    else:
        seed = dense_ops.jacobian_series_backward(stacks[-1], eps, logdet_coeffs, grad_value, grad_g)
        through = elogdet  # the basic estimator: differentiated through every term
    grad_x, grad_weights, grad_biases, grad_betas = dense_ops.dense_jacobian_backward(
        seed, weights, biases, betas, hs, stacks, activated)
    wrt = leaves + [b for b in bias_leaves + beta_leaves if b is not None]
    expected = torch.autograd.grad((eg * grad_g).sum() + (through * grad_value).sum(), wrt)
    got = [grad_x, *grad_weights, *[b for b, ref in zip(grad_biases, biases) if ref is not None],
           *[b for b, ref in zip(grad_betas, betas) if ref is not None]]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        _close(a, b.reshape(a.shape), dtype, scale=100.0)  # sums over the batch of O(10) terms
    assert grad_biases[1].numel() == 0 and (identity is None or grad_betas[identity].numel() == 0)


@pytest.mark.parametrize("identity", [None, 1])
def test_composite_ops_pass_opcheck(identity):
    x, eps, weights, biases, betas = _block_args(torch.float64, identity=identity)
    lc, nc = _coeffs(3)
    out = dense_ops.dense_jacobian_forward(x, eps, weights, biases, betas, lc, nc)
    torch.library.opcheck(torch.ops.resflow_cuda.dense_jacobian_forward, (x, eps, weights, biases, betas, lc, nc))
    seed = torch.cat([out[0], out[3]])
    torch.library.opcheck(torch.ops.resflow_cuda.dense_jacobian_backward, (seed, weights, biases, betas, *out[4:]))
    basic = dense_ops.dense_jacobian_forward(x, eps, weights, biases, betas, lc, [])
    torch.library.opcheck(torch.ops.resflow_cuda.dense_jacobian_forward, (x, eps, weights, biases, betas, lc, []))
    seed = dense_ops.jacobian_series_backward(basic[5][-1], eps, lc, torch.ones(x.shape[0], dtype=x.dtype), basic[0])
    torch.library.opcheck(torch.ops.resflow_cuda.jacobian_series_backward,
                          (basic[5][-1], eps, lc, torch.ones(x.shape[0], dtype=x.dtype), basic[0]))
    torch.library.opcheck(torch.ops.resflow_cuda.dense_jacobian_backward, (seed, weights, biases, betas, *basic[4:]))


def test_ops_pass_opcheck():
    lc, nc = _coeffs(3)
    z = torch.randn(12, 5, dtype=torch.float64)
    for keep in (False, True):
        torch.library.opcheck(torch.ops.resflow_cuda.jacobian_lipswish,
                              (z, None, torch.tensor([0.2], dtype=z.dtype), 3, keep))
    torch.library.opcheck(torch.ops.resflow_cuda.jacobian_lipswish_backward,
                          (z[:6], z[6:9], z[9:], torch.tensor([0.2], dtype=z.dtype)))
    torch.library.opcheck(torch.ops.resflow_cuda.jacobian_series, (torch.randn(8, 2, dtype=z.dtype), None,
                                                                   torch.randn(2, 2, dtype=z.dtype), lc, nc))
    ws, us, vs = _layers(torch.float64)
    scales = [torch.zeros((), dtype=torch.float64) for _ in ws]
    torch.library.opcheck(torch.ops.resflow_cuda.lipschitz_normalize_,
                          (ws, us, vs, [0.5] * 3, [torch.empty_like(w) for w in ws], ws[0].new_empty(3), scales))
    _, sigmas = dense_ops.lipschitz_normalize_(ws, us, vs, scales, [0.5] * 3)
    torch.library.opcheck(torch.ops.resflow_cuda.lipschitz_normalize_backward,
                          ([torch.ones_like(w) for w in ws], ws, us, vs, sigmas, [0.5] * 3, [False] * 3))


def test_bad_input_is_refused_with_the_argument_named():
    z = torch.randn(6, 4)
    beta = torch.tensor([0.1])
    with pytest.raises(RuntimeError, match=r"jacobian_lipswish: expected z to have a positive multiple of batch \(4\) "
                                           r"rows, but got 6"):
        dense_ops._OPS.jacobian_lipswish(z, None, beta, 4)
    with pytest.raises(RuntimeError, match=r"expected bias of shape \[4\], but got \[3\]"):
        dense_ops._OPS.jacobian_lipswish(z, torch.zeros(3), beta, 3)
    with pytest.raises(RuntimeError, match="expected z to be float32 or float64, but got Half"):
        dense_ops._OPS.jacobian_lipswish(z.half(), None, beta.half(), 3)
    with pytest.raises(RuntimeError, match=r"jacobian_series: expected z of shape \[8, 2\]"):
        dense_ops._OPS.jacobian_series(torch.zeros(6, 2), None, torch.zeros(2, 2), [1.0], [1.0])
    with pytest.raises(RuntimeError, match="expected neumann_coeffs to be empty or to have one entry per term"):
        dense_ops._OPS.jacobian_series(torch.zeros(8, 2), None, torch.zeros(2, 2), [1.0], [1.0, 2.0])
    with pytest.raises(RuntimeError, match=r"expected us\[0\] of shape \[3\] and vs\[0\] of shape \[2\]"):
        dense_ops.lipschitz_normalize_([torch.zeros(3, 2)], [torch.zeros(2)], [torch.zeros(2)], [torch.zeros(())],
                                       [1.0])
    x, eps, weights, biases, betas = _block_args(torch.float64)
    with pytest.raises(RuntimeError, match="a residual branch must keep the shape"):
        dense_ops.dense_jacobian_forward(x, eps, weights[:2], biases[:2], betas[:2], [1.0], [1.0])
    out = dense_ops.dense_jacobian_forward(x, eps, weights, biases, betas, [1.0], [1.0])
    stacks = list(out[5])
    step = next(i for i, beta in enumerate(betas) if beta is not None)
    stacks[step] = stacks[step][:-1]
    with pytest.raises(RuntimeError, match=rf"dense_jacobian_backward: expected stacks\[{step}\] to have at least "
                                           rf"{2 * x.shape[0]} rows \(the whole stack\) or exactly {x.shape[0]}"):
        dense_ops.dense_jacobian_backward(torch.cat([out[0], out[3]]), weights, biases, betas, out[4], stacks, out[6])


def _mlp(layer, dims=(3, 24, 24, 3)):
    steps = []
    for a, b in zip(dims, dims[1:]):
        steps += [LipSwish(), layer(a, b, coeff=0.9, n_iterations=3)]
    return torch.nn.Sequential(*steps)


def _ops_of(block, x):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y, logp = block(x, torch.zeros(x.shape[0], 1, dtype=x.dtype))
        (y.sum() + logp.sum()).backward()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("layer", [InducedNormLinear, SpectralNormLinear])
@pytest.mark.parametrize("neumann_grad,grad_in_forward", [(True, True), (True, False), (False, False), (False, True)])
def test_a_small_dense_block_trains_on_the_fused_ops(layer, neumann_grad, grad_in_forward):
    block = iResBlock(_mlp(layer), neumann_grad=neumann_grad, grad_in_forward=grad_in_forward).double()
    names = _ops_of(block, torch.randn(8, 3, dtype=torch.float64))
    assert {"resflow_cuda::dense_jacobian_forward", "resflow_cuda::dense_jacobian_backward",
            "resflow_cuda::lipschitz_normalize_", "resflow_cuda::lipschitz_normalize_backward"} <= names
    assert "resflow_cuda::linearized_logdet_series" not in names


@pytest.mark.parametrize("why", ["wide", "eval", "elu", "autocast"])
def test_other_blocks_take_the_linearized_path(why):
    dims = (20, 8, 20) if why == "wide" else (3, 8, 3)
    net = _mlp(InducedNormLinear, dims)
    if why == "elu":
        net[2] = torch.nn.ELU()
    block = iResBlock(net, neumann_grad=True, grad_in_forward=True)
    x = torch.randn(6, dims[0])
    if why == "eval":
        block.eval()
        x = torch.randn(6, 3, 2)[..., 0]  # D = 3, not the 2-D brute-force determinant
    context = torch.autocast("cpu", dtype=torch.bfloat16) if why == "autocast" else torch.enable_grad()
    with context:
        names = _ops_of(block, x) if why != "eval" else _eval_ops(block, x)
    assert "resflow_cuda::dense_jacobian_forward" not in names
    assert "resflow_cuda::linearized_logdet_series" in names


def _eval_ops(block, x):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        block(x, torch.zeros(x.shape[0], 1))
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neumann_grad", [True, False])
def test_the_fused_block_agrees_with_the_linearized_path(dtype, neumann_grad, monkeypatch):
    # Two routes of this library over the same draws (the normflows and reference-fixture tests compare
    # the fused route with the reference code); the difference is rounding only.
    block = iResBlock(_mlp(InducedNormLinear), neumann_grad=neumann_grad, grad_in_forward=neumann_grad).to(dtype)
    twin = copy.deepcopy(block)
    x = torch.randn(9, 3, dtype=dtype)
    results = []
    for net, max_dim in ((block, dense_block.MAX_DIM), (twin, 0)):
        monkeypatch.setattr(dense_block, "MAX_DIM", max_dim)
        np.random.seed(0)
        torch.manual_seed(1)
        x_in = x.clone().requires_grad_(True)
        y, logp = net(x_in, torch.zeros(9, 1, dtype=dtype))
        ((y ** 2).sum() + (logp * 3).sum()).backward()
        results.append([y, logp, x_in.grad, *(p.grad for p in net.nnet.parameters()), *net.nnet.buffers()])
    for a, b in zip(*results):
        _close(a.detach(), b.detach(), dtype, scale=10.0)  # gradients summed over 9 samples of O(1) terms


def test_the_fused_blocks_gradients_refuse_a_second_differentiation():
    # a clear error at the create_graph backward, not a second derivative silently missing the log-det's part
    block = iResBlock(_mlp(InducedNormLinear), neumann_grad=False, grad_in_forward=False).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y, logp = block(x, torch.zeros(5, 1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="create_graph=True.*fast_path=False"):
        torch.autograd.grad(logp.sum() + y.sum(), x, create_graph=True)
    plain = iResBlock(_mlp(InducedNormLinear), neumann_grad=False, grad_in_forward=False, fast_path=False).double()
    y, logp = plain(x, torch.zeros(5, 1, dtype=torch.float64))
    grad_x, = torch.autograd.grad(logp.sum(), x, create_graph=True)
    assert grad_x.requires_grad  # fast_path=False: the second derivative is there
