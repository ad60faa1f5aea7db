"""The power-iteration ops against the pure-PyTorch reference loop and exact operator norms."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch.testing import assert_close

import resflow_cuda
from resflow_cuda import nn as rnn, ops, reference as R
from conftest import TOLERANCES as DTYPE_TOLERANCES

INF = float("inf")
# (domain p, codomain q): the spectral norm, the projmax cases, general Hoelder duals, q = 1.
NORMS = [(2, 2), (1, 2), (2, INF), (3, 1.5), (1.5, 3), (2, 1)]
TOLERANCES = [(None, None), (1e-3, 1e-3), (1e-5, 0.0)]


def _start(weight_shape, p, q, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out_dim, in_dim = weight_shape[-2], weight_shape[-1]
    w = torch.randn(weight_shape, generator=g, dtype=torch.float64).to(dtype)
    u = R.normalize_u(torch.randn(out_dim, generator=g, dtype=torch.float64), q).to(dtype)
    v = R.normalize_v(torch.randn(in_dim, generator=g, dtype=torch.float64), p).to(dtype)
    return w, u, v


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


def _cpu(result):
    return tuple(t.cpu() for t in result)


def _assert_same(got, expected):
    """u and v bit for bit (the ATen loop on the reference's operations); sigma up to rounding: we
    take it as <A^T u, v> (or <u, A v>) from the loop's last product, the reference applies A again."""
    u, v, sigma, iterations = got
    eu, ev, esigma, eiterations = expected
    assert torch.equal(u, eu) and torch.equal(v, ev)  # the same ATen calls in the same order, in one process
    # one bilinear form two ways, conv sums of <= 36 terms then dots of <= 120: both sides together err by at most
    # 281*2^-53*|u|^T|A||v| <= 7e-14 sigma (|u|^T|A||v| <= 2.2 sigma here); a float32 sigma would be off by ~6e-8
    assert_close(sigma, esigma, atol=0, rtol=1e-13 if sigma.dtype == torch.float64 else 1e-5)
    assert int(iterations) == eiterations


def _assert_rounding_close(got, expected):
    """Up to float rounding (the fused dense kernels, the CUDA convolutions), with the same number of
    iterations."""
    u, v, sigma, iterations = got
    eu, ev, esigma, eiterations = expected
    # Hoelder maps raise small components to powers below 1, which magnifies rounding near 0. float64: <= 60 steps
    # of <= 45-term sums in another order (~sqrt(45)*2^-53 each, carried by a contracting iteration) ~1e-14, ~d / (2
    # sqrt c) at a component c of the max: 1e-11 holds for c >= 1e-4 and fails on float32 rounding (2^-24 ~ 6e-8).
    tol = dict(atol=1e-5, rtol=1e-4) if u.dtype == torch.float32 else dict(atol=1e-12, rtol=1e-11)
    assert_close(u, eu, **tol)
    assert_close(v, ev, **tol)
    assert_close(sigma, esigma, **tol)
    assert int(iterations) == eiterations


@pytest.mark.parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("atol,rtol", TOLERANCES, ids=["fixed", "tol1e-3", "atol-only"])
@pytest.mark.parametrize("p,q", NORMS, ids=[f"{p}->{q}" for p, q in NORMS])
@pytest.mark.parametrize("shape", [(17, 9), (5, 40), (1, 1)], ids=["tall", "wide", "1x1"])
def test_dense_equals_the_reference(shape, p, q, atol, rtol, dtype, device):
    w, u, v = _start(shape, p, q, 1, dtype)
    for u_first in (True, False):
        got = _cpu(ops.power_iteration(*_on(device, w, u, v), 60, atol, rtol, p, q, u_first))
        _assert_rounding_close(got, R.power_iteration(w, u, v, 60, atol, rtol, p, q, u_first))


@pytest.mark.parity
def test_batched_matrices_converge_independently(device):
    w, u, v = _start((4, 12, 7), 2, 2, 2)
    w[1] *= 0  # a zero matrix: u, v become 0 (F.normalize's eps) and the test passes at once
    u_all, v_all, sigma, iterations = _cpu(ops.power_iteration(
        *_on(device, w, u.expand(4, 12).contiguous(), v.expand(4, 7).contiguous()), 100, 1e-4, 1e-4))
    assert u_all.shape == (4, 12) and sigma.shape == (4,) and iterations.dtype == torch.long
    for b in range(4):
        _assert_rounding_close((u_all[b], v_all[b], sigma[b], iterations[b]),
                               R.power_iteration(w[b], u, v, 100, 1e-4, 1e-4))
    assert len(set(iterations.tolist())) > 1


def test_empty_batch(device):
    u, v, sigma, iterations = ops.power_iteration(*_on(device, torch.randn(0, 3, 2), torch.randn(0, 3),
                                                       torch.randn(0, 2)), 5)
    assert u.shape == (0, 3) and v.shape == (0, 2) and sigma.shape == (0,) and iterations.shape == (0,)


@pytest.mark.parity
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_types_compute_in_float(dtype, device):
    w, u, v = _start((16, 8), 2, 2, 3)
    u1, v1, sigma, _ = _cpu(ops.power_iteration(*_on(device, w.to(dtype), u.to(dtype), v.to(dtype)), 30))
    eu, ev, esigma, _ = R.power_iteration(w.to(dtype).float(), u.to(dtype).float(), v.to(dtype).float(), 30)
    assert u1.dtype == dtype and sigma.dtype == torch.float32
    assert_close(u1, eu.to(dtype))
    assert_close(sigma, esigma)


def test_sigma_converges_to_the_spectral_norm(device):
    w, u, v = _start((48, 32), 2, 2, 4, torch.float64)
    _, _, sigma, _ = _cpu(ops.power_iteration(*_on(device, w, u, v), 2000, 1e-12, 1e-12))
    # stops on steps < ~1e-12 (gap s2/s1 = 0.96): sigma's error is second order in u, v's, so rounding (~48*2^-53)
    # of both sides dominates; 1e-8 is loose, but the second singular value would be off by 4e-2
    assert_close(sigma, torch.linalg.matrix_norm(w, 2), rtol=1e-8, atol=0)


def test_sigma_reaches_an_exact_induced_norm_candidate():
    # ||W||_{1->2} is the largest column l2 norm and ||W||_{2->inf} the largest row l2 norm; power
    # iteration ends on one column (row), a local maximum: hence the reference's random restarts.
    w, u, v = _start((10, 6), 1, 2, 5, torch.float64)
    _, v1, sigma, _ = ops.power_iteration(w, u, v, 50, None, None, 1, 2)
    column = int(v1.argmax())
    assert_close(sigma, w[:, column].norm())  # v is one-hot: sigma = <c / |c|, c> = |c| to a few ulps
    assert sigma <= w.norm(dim=0).max()
    w, u, v = _start((10, 6), 2, INF, 6, torch.float64)
    u1, _, sigma, _ = ops.power_iteration(w, u, v, 50, None, None, 2, INF)
    assert_close(sigma, w[int(u1.argmax())].norm())  # as above with u one-hot and a row
    assert sigma <= w.norm(dim=1).max()


def _conv_start(out_c, in_c, k, hw, stride, padding, p, q, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_c, in_c, k, k, generator=g, dtype=torch.float64).to(dtype)
    matvec, _ = R.conv_operator(w, hw, stride, padding)
    n_in = in_c * hw[0] * hw[1]
    n_out = matvec(torch.zeros(n_in, dtype=dtype)).numel()
    u = R.normalize_u(torch.randn(n_out, generator=g, dtype=torch.float64), q).to(dtype)
    v = R.normalize_v(torch.randn(n_in, generator=g, dtype=torch.float64), p).to(dtype)
    return w, u, v


CONVS = [(4, 3, 3, (6, 5), (1, 1), (1, 1)), (2, 5, 3, (6, 5), (1, 1), (1, 1)), (5, 2, 3, (7, 7), (2, 2), (1, 1)),
         (3, 3, 1, (4, 4), (1, 1), (0, 0))]


@pytest.mark.parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("conv", CONVS, ids=["3x3", "3x3-narrowing", "3x3-stride2", "1x1"])
@pytest.mark.parametrize("p,q", [(2, 2), (1, 2), (3, 1.5)], ids=["2->2", "1->2", "3->1.5"])
@pytest.mark.parametrize("atol,rtol", TOLERANCES[:2], ids=["fixed", "tol1e-3"])
def test_conv_equals_the_reference(conv, p, q, atol, rtol, dtype, device):
    # A^T of a stride-1 convolution that widens the channels runs as a conv2d with the flipped kernel
    # (the same sums in another order); the others run the reference's conv2d / conv_transpose2d, bit
    # for bit in float64. float32 convolutions call oneDNN directly where ATen's conv2d picks its
    # im2col kernel for some shapes: up to rounding. On CUDA, cuDNN's convolutions (TF32 off) sum in
    # their own order: up to rounding.
    out_c, in_c, k, hw, stride, padding = conv
    w, u, v = _conv_start(out_c, in_c, k, hw, stride, padding, p, q, 7, dtype)
    matvec, rmatvec = R.conv_operator(w, hw, stride, padding)
    flipped = stride == (1, 1) and out_c < in_c
    compare = _assert_rounding_close if flipped or dtype == torch.float32 or device != "cpu" else _assert_same
    for u_first in (True, False):
        got = _cpu(ops.conv_power_iteration(*_on(device, w, u, v), hw, stride, padding, 40, atol, rtol, p, q,
                                            u_first))
        compare(got, R.power_iteration(w, u, v, 40, atol, rtol, p, q, u_first, matvec, rmatvec))


def test_float32_conv_on_onednn_equals_the_aten_path():
    """float32 convolutions call oneDNN directly (ATen's conv2d would run the narrow-input 6 -> 32
    channel 3x3 convolution at 8x8 in its im2col kernel); with oneDNN switched off the op runs ATen's
    conv2d: the same u, v and sigma up to rounding, also for a non-contiguous weight."""
    w, u, v = _conv_start(32, 6, 3, (8, 8), (1, 1), (1, 1), 2, 2, 3)
    strided = w.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous()
    for u_first in (True, False):
        got = ops.conv_power_iteration(strided, u, v, (8, 8), (1, 1), (1, 1), 6, u_first=u_first)
        torch.backends.mkldnn.enabled = False
        try:
            plain = ops.conv_power_iteration(w, u, v, (8, 8), (1, 1), (1, 1), 6, u_first=u_first)
        finally:
            torch.backends.mkldnn.enabled = True
        _assert_rounding_close(got, plain)


def test_conv_sigma_converges_to_the_operator_norm(device):
    w, u, v = _conv_start(3, 2, 3, (5, 4), (1, 1), (1, 1), 2, 2, 8, torch.float64)
    matvec, _ = R.conv_operator(w, (5, 4), (1, 1), (1, 1))
    dense = torch.stack([matvec(e) for e in torch.eye(2 * 5 * 4, dtype=torch.float64)], dim=1)
    _, _, sigma, _ = _cpu(ops.conv_power_iteration(*_on(device, w, u, v), (5, 4), (1, 1), (1, 1), 3000, 1e-13,
                                                   1e-13))
    # stops on steps < ~1e-13 (gap s2/s1 = 0.99, well before 3000 iterations): as above, rounding of 40-term sums
    # dominates; 1e-7 is loose, a wrong operator or transpose is off by O(1)
    assert_close(sigma, torch.linalg.matrix_norm(dense, 2), rtol=1e-7, atol=0)


def test_zero_iterations_return_the_start(device):
    w, u, v = _start((6, 4), 2, 2, 9)
    u1, v1, sigma, iterations = _cpu(ops.power_iteration(*_on(device, w, u, v), 0))
    assert torch.equal(u1, u) and torch.equal(v1, v) and int(iterations) == 0
    assert_close(sigma, u @ w @ v)


def test_nan_weight_propagates(device):
    w, u, v = _start((6, 4), 2, 2, 10)
    w[2, 1] = float("nan")
    u1, _, sigma, _ = _cpu(ops.power_iteration(*_on(device, w, u, v), 3))
    assert torch.isnan(sigma) and torch.isnan(u1).all()


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

W, U, V = _start((6, 4), 2, 2, 11)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(domain=0.5), r"expected domain \(the input norm p\) >= 1, but got 0.5"),
    (dict(codomain=0.0), r"expected codomain \(the output norm q\) >= 1, but got 0"),
    (dict(max_iterations=-1), r"expected max_iterations >= 0, but got -1"),
    (dict(atol=1e-3), r"expected atol and rtol to be given together"),
    (dict(atol=-1.0, rtol=0.0), r"expected atol >= 0 and rtol >= 0"),
])
def test_bad_options_are_refused(kwargs, pattern):
    args = dict(max_iterations=5)
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=pattern):
        ops.power_iteration(W, U, V, **args)


@pytest.mark.parametrize("u,v,pattern", [
    (torch.randn(5), V, r"expected u to have shape \[6\], but got \[5\]"),
    (U, torch.randn(3), r"expected v to have shape \[4\], but got \[3\]"),
    (U.double(), V, r"expected u to have the dtype of weight \(Float\), but got Double"),
])
def test_mismatched_vectors_are_refused(u, v, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        ops.power_iteration(W, u, v, 5)


def test_bad_weights_are_refused():
    with pytest.raises(RuntimeError, match=r"expected weight of shape \(out, in\) or \(batch, out, in\)"):
        ops.power_iteration(torch.randn(6), U, V, 5)
    with pytest.raises(RuntimeError, match=r"expected weight to have a floating-point dtype"):
        ops.power_iteration(torch.ones(6, 4, dtype=torch.long), U, V, 5)


def test_conv_input_size_the_transpose_cannot_reproduce_is_refused():
    w = torch.randn(2, 2, 3, 3)
    with pytest.raises(RuntimeError, match=r"is not reproduced by the transposed convolution"):
        ops.conv_power_iteration(w, torch.randn(2 * 3 * 3), torch.randn(2 * 6 * 6), (6, 6), (2, 2), (1, 1), 3)


# ----------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ----------------------------------------------------------------------------------------------

OPCHECK = list(itertools.product([(2, 2), (1.5, 3)], [(None, None), (1e-3, 1e-3)]))


@pytest.mark.parametrize("norms,tol", OPCHECK)
def test_opcheck(norms, tol):
    p, q = norms
    w, u, v = _start((9, 5), p, q, 12)
    torch.library.opcheck(torch.ops.resflow_cuda.power_iteration.default, (w, u, v, 10, *tol, float(p), float(q), True))
    wb = torch.stack([w, 2 * w])
    torch.library.opcheck(torch.ops.resflow_cuda.power_iteration.default,
                          (wb, torch.stack([u, u]), torch.stack([v, v]), 10, *tol, float(p), float(q), False))
    wc, uc, vc = _conv_start(3, 2, 3, (4, 4), (1, 1), (1, 1), p, q, 13)
    torch.library.opcheck(torch.ops.resflow_cuda.conv_power_iteration.default,
                          (wc, uc, vc, [4, 4], [1, 1], [1, 1], 10, *tol, float(p), float(q), True))


def test_compiled_call_has_no_graph_break():
    w, u, v = _start((9, 5), 2, 2, 14)

    def sigma_of(weight, u0, v0):
        u1, v1, sigma, _ = ops.power_iteration(weight, u0, v0, 7, 1e-4, 1e-4)
        return sigma * 2, u1, v1

    compiled = torch.compile(sigma_of, fullgraph=True)
    for a, b in zip(compiled(w, u, v), sigma_of(w, u, v)):
        assert_close(a, b)


def test_the_op_is_not_differentiable():
    w, u, v = _start((6, 4), 2, 2, 15)
    w.requires_grad_(True)
    _, _, sigma, _ = ops.power_iteration(w, u, v, 3)
    with pytest.raises(NotImplementedError, match="not differentiable"):
        sigma.backward()


# ----------------------------------------------------------------------------------------------
# The in-place list form used by update_lipschitz
# ----------------------------------------------------------------------------------------------


def _update_inputs(device="cpu"):
    starts = [_on(device, *_start(s, 2, 2, i)) for i, s in enumerate([(7, 5), (3, 12), (7, 5)])]
    weights = [w for w, _, _ in starts]
    us = [u.clone() for _, u, _ in starts]
    vs = [v.clone() for _, _, v in starts]
    return weights, us, vs, [torch.zeros((), device=device) for _ in starts], starts


def test_update_in_place_equals_one_call_per_matrix(device):
    # On CUDA the list runs in one launch of the kernel that power_iteration launches for one matrix: the
    # same arithmetic per matrix, so equal there too.
    weights, us, vs, sigmas, starts = _update_inputs(device)
    ops.power_iteration_update_(weights, us, vs, sigmas, 20, 1e-4, 1e-4, 2, 2, False)
    for (w, u, v), u1, v1, s1 in zip(starts, us, vs, sigmas):
        eu, ev, es, _ = ops.power_iteration(w, u, v, 20, 1e-4, 1e-4, 2, 2, False)
        assert torch.equal(u1, eu) and torch.equal(v1, ev) and torch.equal(s1, es)


def _mixed_update_inputs(device):
    """Every path of the list op: float32 and float64 matrices of several shapes (CUDA: one launch per
    dtype), a half type, a sigma of another dtype, a non-contiguous u and a matrix too long for the
    single-block kernel (CUDA: one by one)."""
    specs = [((8, 5), torch.float32, torch.float32), ((6, 7), torch.float64, torch.float64),
             ((4, 9), torch.float16, torch.float16), ((5, 5), torch.float32, torch.float32),
             ((3100, 10), torch.float64, torch.float64), ((1, 1), torch.float64, torch.float64),
             ((3, 40), torch.float32, torch.float64)]
    weights, us, vs, sigmas = [], [], [], []
    for i, (shape, dtype, sigma_dtype) in enumerate(specs):
        w, u, v = _on(device, *_start(shape, 2, 2, 20 + i, dtype))
        weights.append(w)
        us.append(torch.stack([u, u], 1)[:, 0] if i == 3 else u)  # made on the device: a move would densify it
        vs.append(v)
        sigmas.append(torch.zeros((), dtype=sigma_dtype, device=device))
    return weights, us, vs, sigmas


def test_update_in_place_of_every_kind_of_list_matches_the_cpu_op(device):
    got = _mixed_update_inputs(device)
    expected = _mixed_update_inputs("cpu")
    for args in (got, expected):
        ops.power_iteration_update_(*args, 30, None, None, 2, 2, True)
    for ours, theirs in zip(got[1:], expected[1:]):
        for a, b in zip(ours, theirs):
            assert a.device.type == device
            # 30 fixed steps (no stopping test to tip over) in the dtype's arithmetic, on both sides: two
            # roundings apart; atol 10 rtol for unit-vector components near 0, which rounding moves most
            tol = dict(DTYPE_TOLERANCES[a.dtype])
            tol["atol"] = max(tol["atol"], 10 * tol["rtol"])
            assert_close(a.cpu(), b, **tol)


def test_update_lipschitz_on_a_small_model_matches_the_cpu(device):
    """update_lipschitz on every kind of iterated layer (the list op for matrices, the conv op for k x k
    kernels), each with a fixed number of steps, against the same model on the CPU."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(rnn.InducedNormConv2d(3, 8, 3, 1, 1, n_iterations=6),
                                rnn.InducedNormConv2d(8, 4, 1, 1, 0, n_iterations=6),
                                rnn.SpectralNormConv2d(4, 3, 3, 1, 1, n_iterations=6))
    head = torch.nn.Sequential(rnn.InducedNormLinear(3 * 5 * 6, 16, n_iterations=6),
                               rnn.SpectralNormLinear(16, 12, n_iterations=6),
                               rnn.InducedNormLinear(12, 12, n_iterations=6))
    model(torch.randn(2, 3, 5, 6))  # the convolutions' lazy initialisation on the CPU, then the same state on both
    for dtype in (torch.float32, torch.float64):
        cpu = torch.nn.ModuleList([model, head]).to(dtype)
        with torch.no_grad():
            for p in cpu.parameters():
                p.mul_(1.3)
        moved = copy.deepcopy(cpu).to(device)
        resflow_cuda.update_lipschitz(cpu)
        resflow_cuda.update_lipschitz(moved)
        buffers = dict(moved.named_buffers())
        for name, expected in cpu.named_buffers():
            if name.rsplit(".", 1)[-1] in ("u", "v", "scale"):
                # as _assert_rounding_close: the same steps summed in other orders (cuDNN, the CUDA kernels)
                tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-11)
                assert_close(buffers[name].cpu(), expected, **tol, msg=name)


def test_update_in_place_refuses_mismatched_lists():
    weights, us, vs, sigmas, _ = _update_inputs()
    with pytest.raises(RuntimeError, match=r"expected as many us, vs and sigmas as weights \(3\), but got 2, 3 and 3"):
        ops.power_iteration_update_(weights, us[:2], vs, sigmas, 5)
    with pytest.raises(RuntimeError, match=r"expected weights\[0\] of shape \(out, in\)"):
        ops.power_iteration_update_([weights[0][None]] + weights[1:], us, vs, sigmas, 5)


@pytest.mark.parametrize("alias,match", [
    (lambda w, u, v, s: u.__setitem__(0, w[0].view(-1)[:7]), r"expected us\[0\] not to share memory with weights\[0\]"),
    (lambda w, u, v, s: v.__setitem__(1, w[2].view(-1)[10:22]),
     r"expected vs\[1\] not to share memory with weights\[2\] \(vs\[1\] is written in place, weights\[2\] is read\)"),
    (lambda w, u, v, s: s.__setitem__(2, u[2][3]), r"expected sigmas\[2\] not to share memory with us\[2\] \(both"),
    (lambda w, u, v, s: u.__setitem__(2, u[0]), r"expected us\[2\] not to share memory with us\[0\]"),
    (lambda w, u, v, s: v.__setitem__(0, u[0][:5]), r"expected vs\[0\] not to share memory with us\[0\]"),
    (lambda w, u, v, s: u.__setitem__(1, torch.zeros(1).expand(3)), r"expected us\[1\] not to have overlapping"),
    # a strided view (a column of the weight), where ATen does not decide overlap exactly
    (lambda w, u, v, s: u.__setitem__(0, w[0][:, 1]), r"expected us\[0\] not to share memory with weights\[0\]"),
])
def test_update_in_place_refuses_overlapping_outputs(alias, match):
    weights, us, vs, sigmas, _ = _update_inputs()
    alias(weights, us, vs, sigmas)
    before = [t.clone() for t in weights + us + vs + sigmas]
    with pytest.raises(RuntimeError, match=match):
        ops.power_iteration_update_(weights, us, vs, sigmas, 5)
    for got, expected in zip(weights + us + vs + sigmas, before):
        assert torch.equal(got, expected)  # refused before anything is written


@pytest.mark.emulated
def test_cuda_binding_refuses_overlapping_outputs_with_the_same_message():
    # The CUDA op's binding (csrc/cuda/power_iteration_binding.h), built against the CUDA emulation:
    # it calls the same check as the CPU op.
    import emulation

    weights, us, vs, sigmas, _ = _update_inputs()
    with pytest.raises(RuntimeError, match=r"expected us\[2\] not to share memory with us\[0\]"):
        emulation.ops().power_iteration_update_(weights, us[:2] + us[:1], vs, sigmas, 3, None, None, 2.0, 2.0, True)


def test_update_in_place_accepts_disjoint_slices_of_one_buffer():
    weights, us, vs, sigmas, _ = _update_inputs()
    flat = torch.cat([t.reshape(-1) for t in us + vs])  # every u and v side by side in one storage
    sizes = [t.numel() for t in us + vs]
    views = list(torch.split(flat, sizes))
    ops.power_iteration_update_(weights, views[:3], views[3:], [s.clone() for s in sigmas], 7, None, None, 2, 2, False)
    ops.power_iteration_update_(weights, us, vs, sigmas, 7, None, None, 2, 2, False)
    for got, expected in zip(views, us + vs):
        assert torch.equal(got, expected)  # the same steps on the same values: bit-equal


def test_update_in_place_opcheck():
    weights, us, vs, sigmas, _ = _update_inputs()
    torch.library.opcheck(torch.ops.resflow_cuda.power_iteration_update_.default,
                          (weights, us, vs, sigmas, 6, 1e-3, 1e-3, 2.0, 2.0, True))
