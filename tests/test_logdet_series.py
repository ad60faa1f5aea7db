"""logdet_series_accumulate_: the fused per-term step of the log-det power series, against the
pure-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from resflow_cuda import functional, ops, reference
from conftest import TOLERANCES

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (5000, 2): narrow samples of two values (the toy flows'), more than one grid pass of CUDA's warp-per-sample
# rows; (600, 131): samples of an odd width (one-element packs), more than one pass of its block-per-sample rows.
SHAPES = [(3, 5), (4, 3, 5, 5), (1, 1), (7, 33), (2, 1000), (5, 2, 3), (5000, 2), (600, 131)]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, eps, neumann = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    logdet = torch.randn(shape[0], generator=g).to(_acc(dtype))
    return w, eps, logdet, neumann


def _on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _run_both(w, eps, logdet, neumann, lc, nc):
    """The op on the tensors' device (results copied to the CPU) and the reference on the CPU."""
    got = (logdet.clone(), None if neumann is None else neumann.clone())
    expected = tuple(None if t is None else t.cpu().clone() for t in (logdet, neumann))
    ops.logdet_series_accumulate_(w, eps, got[0], got[1], lc, nc)
    reference.logdet_series_accumulate_(w.cpu(), eps.cpu(), expected[0], expected[1], lc, nc)
    return _on("cpu", *got), expected


def _sum_rounding(w, eps, lc):
    """How far two summation orders of one sample's terms t = lc w eps may drift apart: sqrt(n) u sum|t|
    for n terms (recursive summation errs by ~u sum|t| typically, (n - 1) u sum|t| at worst), at the
    accumulation type's unit roundoff u, the largest over the samples. It matters only in float32, for samples
    of a hundred terms and more (CUDA's per-thread runs and block tree against the CPU's lanes), where two
    orders drift apart by more than the elementwise tolerance."""
    rows = w.shape[0]
    terms = (w.cpu().reshape(rows, -1).double() * eps.cpu().reshape(rows, -1).double() * lc).abs()
    if terms.numel() == 0:
        return 0.0
    return float(terms.shape[1] ** 0.5 * UNIT_ROUNDOFF[_acc(w.dtype)] * terms.sum(1).max())


def _assert_close(got, expected, dtype, sum_rounding=0.0):
    tol = dict(TOLERANCES[_acc(dtype)] if dtype in (torch.float32, torch.float64) else dict(atol=1e-4, rtol=1e-4))
    tol["atol"] += sum_rounding
    torch.testing.assert_close(got[0], expected[0], **tol)
    if expected[1] is not None:
        torch.testing.assert_close(got[1], expected[1], **TOLERANCES[dtype])


@pytest.mark.parity
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_neumann", [True, False])
def test_matches_reference(shape, dtype, with_neumann, device):
    w, eps, logdet, neumann = _on(device, *_inputs(shape, dtype))
    got, expected = _run_both(w, eps, logdet, neumann if with_neumann else None, -0.5, 1.5)
    _assert_close(got, expected, dtype, _sum_rounding(w, eps, -0.5))


@pytest.mark.parity
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (4, 3, 5, 5), (5000, 2), (600, 131)], ids=str)
@pytest.mark.parametrize("with_neumann", [True, False])
def test_scale_multiplies_w_in_place_first(shape, dtype, with_neumann, device):
    w, eps, logdet, neumann = _on(device, *_inputs(shape, dtype))
    scale = torch.rand(shape, generator=torch.Generator().manual_seed(7)).to(dtype).to(device)
    neumann = neumann if with_neumann else None
    got_w, expected_w = w.clone(), w.cpu().clone()
    got = (logdet.clone(), None if neumann is None else neumann.clone())
    expected = tuple(None if t is None else t.cpu().clone() for t in (logdet, neumann))
    ops.logdet_series_accumulate_(got_w, eps, got[0], got[1], -0.5, 1.5, scale)
    reference.logdet_series_accumulate_(expected_w, eps.cpu(), expected[0], expected[1], -0.5, 1.5, scale.cpu())
    # w * scale once rounded into w's dtype, here and in the twin
    torch.testing.assert_close(got_w.cpu(), expected_w, **TOLERANCES[dtype])
    _assert_close(_on("cpu", *got), expected, dtype, _sum_rounding(expected_w, eps, -0.5))
    if dtype not in (torch.float32, torch.float64):
        return  # the half types' sums read the product before its rounding into w (the twin does the same)
    # the same as multiplying first and accumulating the product (the composite's old two ops)
    w2, l2, n2 = w.clone(), logdet.clone(), None if neumann is None else neumann.clone()
    w2.mul_(scale)
    ops.logdet_series_accumulate_(w2, eps, l2, n2, -0.5, 1.5)
    _assert_close(_on("cpu", got[0], got[1]), _on("cpu", l2, n2), dtype, _sum_rounding(expected_w, eps, -0.5))


@pytest.mark.parity
def test_a_long_sample_crosses_chunks(device):
    w, eps, logdet, neumann = _on(device, *_inputs((2, (1 << 14) * 3 + 17), torch.float64))
    got, expected = _run_both(w, eps, logdet, neumann, 0.25, -2.0)
    _assert_close(got, expected, torch.float64)


@pytest.mark.parity
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "expanded_eps", "strided_logdet",
                                    "neumann_only_strided"])
def test_layouts(layout, device):
    # the layouts are made on the device: moving a strided view there would copy it densely
    w, eps, logdet, neumann = _on(device, *_inputs((3, 4, 5, 6), torch.float32))
    if layout == "channels_last":
        w, eps, neumann = (t.contiguous(memory_format=torch.channels_last) for t in (w, eps, neumann))
    elif layout == "transposed":
        w, eps, neumann = (t.transpose(1, 3) for t in (w, eps, neumann))
    elif layout == "expanded_eps":
        eps = eps[:1].expand_as(w)
    elif layout == "strided_logdet":
        logdet = torch.randn(6).to(device)[::2]
    else:
        neumann = torch.randn(3, 4, 6, 5).to(device).transpose(2, 3)
    got, expected = _run_both(w, eps, logdet, neumann, 1.0, -1.0)
    _assert_close(got, expected, torch.float32)
    before = neumann.clone()
    ops.logdet_series_accumulate_(w, eps, logdet, neumann, 1.0, -1.0)
    torch.testing.assert_close(neumann, before - w)  # the caller's tensor is the one updated


@pytest.mark.parity
@pytest.mark.parametrize("layout", ["transposed", "channels_last_scale"])
def test_scale_layouts_update_the_callers_w(layout, device):
    w, eps, logdet, neumann = _on(device, *_inputs((3, 4, 5, 6), torch.float32))
    scale = torch.rand(3, 4, 5, 6).to(device)
    if layout == "transposed":  # w through a contiguous copy, written back
        w, eps, scale = (t.transpose(1, 3) for t in (w, eps, scale))
        neumann = neumann.transpose(1, 3)
    else:
        scale = scale.contiguous(memory_format=torch.channels_last)
    before, expected_logdet = w.clone(), logdet.cpu().clone()
    ops.logdet_series_accumulate_(w, eps, logdet, neumann, 1.0, -1.0, scale)
    torch.testing.assert_close(w, before * scale)  # elementwise, one rounding each: equal in float32
    reference.logdet_series_accumulate_(before.cpu(), eps.cpu(), expected_logdet, None, 1.0, 0.0, scale.cpu())
    _assert_close((logdet.cpu(), None), (expected_logdet, None), torch.float32)


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0,)])
def test_empty_is_a_no_op(shape, device):
    w = torch.randn(shape).to(device)
    logdet = torch.randn(shape[0]).to(device)
    before = logdet.clone()
    ops.logdet_series_accumulate_(w, w.clone(), logdet, torch.zeros(shape, device=device), 1.0, 1.0)
    torch.testing.assert_close(logdet, before)


@pytest.mark.parity
def test_zero_and_negative_coefficients_and_nan(device):
    w, eps, logdet, neumann = _on(device, *_inputs((4, 6), torch.float64))
    got, expected = _run_both(w, eps, logdet, neumann, 0.0, 0.0)
    _assert_close(got, expected, torch.float64)
    torch.testing.assert_close(got[1], neumann.cpu())  # neumann + 0 * w: bit-exact
    w[2, 3] = float("nan")
    got, _ = _run_both(w, eps, logdet, neumann, -1.0, -3.0)
    assert torch.isnan(got[0][2]) and torch.isfinite(got[0][[0, 1, 3]]).all()
    assert torch.isnan(got[1][2, 3]) and torch.isfinite(got[1]).sum() == 23


def test_deterministic_across_thread_counts():
    w, eps, logdet, neumann = _inputs((3, 200_003), torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(_run_both(w, eps, logdet, neumann, 0.5, 0.5)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("args,match", [
    (lambda w, e, l, n: (w.long(), e, l, n), "expected w to have a floating-point dtype"),
    (lambda w, e, l, n: (w, e.double(), l, n), r"expected eps to have the dtype of w \(Float\), but got Double"),
    (lambda w, e, l, n: (w, e[:, :2], l, n), r"expected eps to have the shape of w \[3, 4\], but got \[3, 2\]"),
    (lambda w, e, l, n: (w, e, l.double(), n), r"expected logdet to have dtype Float .*but got Double"),
    (lambda w, e, l, n: (w, e, l[:2], n), r"expected logdet to have shape \[3\].*but got \[2\]"),
    (lambda w, e, l, n: (w, e, l, n[:, :1]), r"expected neumann to have the shape of w"),
    (lambda w, e, l, n: (w, e, l, w), "expected neumann not to share memory with w"),
    (lambda w, e, l, n: (w, e, l, n[:1].expand(3, 4)), "expected neumann not to have overlapping elements"),
    # Every output against every input and the other output; the kernels read w and eps while they
    # write, so an overlap would give a wrong result without an error.
    (lambda w, e, l, n: (w, e, l, e), r"expected neumann not to share memory with eps \(neumann is written"),
    (lambda w, e, l, n: (w, e, w.view(-1)[4:7], n), "expected logdet not to share memory with w"),
    (lambda w, e, l, n: (w, e, e.view(-1)[:3], None), "expected logdet not to share memory with eps"),
    (lambda w, e, l, n: (w, e, n.view(-1)[9:], n), r"expected neumann not to share memory with logdet \(both"),
    (lambda w, e, l, n: (w, e, l[:1].expand(3), n), "expected logdet not to have overlapping elements"),
    # A strided view (a column of w), where ATen does not decide overlap exactly.
    (lambda w, e, l, n: (w, e, w[:, 1], n), "expected logdet not to share memory with w"),
    (lambda w, e, l, n: (w[0, 0], e[0, 0], l, None), "batch dimension"),
])
def test_errors_name_the_argument(args, match):
    w, eps, logdet, neumann = _inputs((3, 4), torch.float32)
    with pytest.raises(RuntimeError, match=match):
        ops.logdet_series_accumulate_(*args(w, eps, logdet, neumann), 1.0, 1.0)


@pytest.mark.parametrize("args,match", [
    (lambda w, e, l, n: (w, e, l, n, w[:, :2]), r"expected scale to have the shape of w \[3, 4\], but got \[3, 2\]"),
    (lambda w, e, l, n: (w, e, l, n, w.double()), r"expected scale to have the dtype of w \(Float\)"),
    # w is written when scaled: it must share memory with no other argument
    (lambda w, e, l, n: (w, e, l, n, w), "expected w not to share memory with scale"),
    (lambda w, e, l, n: (w, w, l, n, e), "expected w not to share memory with eps"),
    (lambda w, e, l, n: (w, e, l, w, e), r"expected w not to share memory with neumann \(both are written"),
])
def test_scale_errors_name_the_argument(args, match):
    w, eps, logdet, neumann = _inputs((3, 4), torch.float32)
    before = w.clone()
    with pytest.raises(RuntimeError, match=match):
        ops.logdet_series_accumulate_(*args(w, eps, logdet, neumann)[:4], 1.0, 1.0, args(w, eps, logdet, neumann)[4])
    assert torch.equal(w, before)


def test_refused_overlap_writes_nothing():
    w, eps, logdet, neumann = _inputs((3, 4), torch.float32)
    before = (w.clone(), eps.clone(), neumann.clone())
    with pytest.raises(RuntimeError, match="expected logdet not to share memory with w"):
        ops.logdet_series_accumulate_(w, eps, w[:, 0], neumann, 1.0, 1.0)
    for got, expected in zip((w, eps, neumann), before):
        assert torch.equal(got, expected)


@pytest.mark.emulated
def test_cuda_binding_refuses_overlap_with_the_same_message():
    # The CUDA op's tensor binding (csrc/cuda/logdet_series_binding.h), built against the CUDA
    # emulation: it calls the same check as the CPU op.
    import emulation

    w, eps, logdet, neumann = _inputs((3, 4), torch.float32)
    with pytest.raises(RuntimeError, match="expected logdet not to share memory with w"):
        emulation.ops().logdet_series_accumulate_(w, eps, w[:, 0], neumann, 1.0, 1.0, 2)
    with pytest.raises(RuntimeError, match="expected neumann not to share memory with eps"):
        emulation.ops().logdet_series_accumulate_(w, eps, logdet, eps, 1.0, 1.0, 2)


def test_disjoint_outputs_in_one_buffer_are_accepted():
    w, eps, logdet, neumann = _inputs((3, 4), torch.float32)
    buffer = torch.cat([logdet, neumann.reshape(-1)])  # logdet and neumann side by side, not overlapping
    ops.logdet_series_accumulate_(w, eps, buffer[:3], buffer[3:].view(3, 4), 0.5, -1.0)
    ops.logdet_series_accumulate_(w, eps, logdet, neumann, 0.5, -1.0)
    # the same kernel on the same values: bit-equal
    assert torch.equal(buffer[:3], logdet) and torch.equal(buffer[3:].view(3, 4), neumann)


def test_refuses_tensors_that_require_grad():
    w, eps, logdet, neumann = _inputs((3, 4), torch.float32)
    with pytest.raises(RuntimeError, match="not differentiable, but its argument w requires grad"):
        ops.logdet_series_accumulate_(w.requires_grad_(True), eps, logdet, neumann, 1.0, 1.0)
    with torch.no_grad():
        ops.logdet_series_accumulate_(w, eps, logdet, neumann, 1.0, 1.0)


@pytest.mark.parametrize("shape,dtype", [((3, 5), torch.float32), ((2, 3, 4, 4), torch.float64),
                                         ((4, 7), torch.bfloat16)])
def test_opcheck(shape, dtype):
    w, eps, logdet, neumann = _inputs(shape, dtype)
    torch.library.opcheck(torch.ops.resflow_cuda.logdet_series_accumulate_, (w, eps, logdet, neumann, 0.5, -1.0))
    torch.library.opcheck(torch.ops.resflow_cuda.logdet_series_accumulate_, (w, eps, logdet, None, 0.5, 0.0))
    scale = torch.rand(shape).to(dtype)
    torch.library.opcheck(torch.ops.resflow_cuda.logdet_series_accumulate_,
                          (w, eps, logdet, neumann, 0.5, -1.0, scale))


@pytest.mark.parametrize("scaled", [False, True])
def test_torch_compile(scaled):
    scale = torch.rand(4, 6) if scaled else None

    def step(w, eps, logdet, neumann):
        functional.logdet_series_accumulate_(w, eps, logdet, neumann, 0.5, -1.0, scale)
        return logdet * 2, neumann + 1, w * 3

    w, eps, logdet, neumann = _inputs((4, 6), torch.float32)
    expected = step(w.clone(), eps, logdet.clone(), neumann.clone())
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(w.clone(), eps, logdet.clone(), neumann.clone())
    torch.testing.assert_close(got, expected)
    # the compiled step reads the scaled w after the op (the mutation is in the graph)
    torch.testing.assert_close(got[2], 3 * (w * scale if scaled else w))
