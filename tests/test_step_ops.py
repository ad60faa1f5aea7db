"""The ops of a block's training step outside its series (resflow_cuda.step_ops), against the pure-PyTorch
reference: moments_ (a block's training statistics, the mean of its log-det estimate and of its square; also
against torch.mean, the reference implementation's own) and foreach_add_scaled (a backward-in-forward block's
parameter gradients, g's share plus the log-det's times the upstream gradient)."""

from __future__ import annotations

import pytest
import torch

from resflow_cuda import reference, step_ops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# one value, a batch, an odd 2-D batch, more than one CPU chunk (2^14 elements) in several chunks
SHAPES = [(1,), (64,), (7, 3), (40_001,)]


def _values(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)


def _buffers(dtype, device):
    return torch.zeros(1, dtype=dtype, device=device), torch.zeros(1, dtype=dtype, device=device)


def _run(fn, x, out_dtype=torch.float32):
    mean, square = _buffers(out_dtype, x.device)
    fn(x, mean, square)
    return torch.cat([mean, square]).cpu()


def _sum_error(x, u):
    """n u (mean|x|, mean x²): how far two orders of summing x and x² over n terms at unit roundoff u may put
    the two means apart (the worst case of recursive summation, (n - 1) u sum|term|, over n)."""
    x = x.detach().double().cpu().reshape(-1)
    return x.numel() * u * torch.stack([x.abs().mean(), (x ** 2).mean()])


def _ulps(dtype, values):
    """One unit in the last place of ``dtype`` at each of ``values`` (float64 tensors)."""
    return torch.finfo(dtype).eps * values.abs().double()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=["f32-buffers", "f64-buffers"])
def test_matches_reference(shape, dtype, out_dtype, device):
    x = _values(shape, dtype).to(device)
    got = _run(step_ops.moments_, x, out_dtype).double()
    expected = _run(reference.moments_, x.cpu(), out_dtype).double()
    # Both sum the same values in float64 (the reference in torch's order): apart by at most ~n 2^-53 mean|term|
    # (recursive summation's bound; it matters for float64 x, where a mean near 0 cancels), then rounded to x's
    # dtype, where they agree or, next to a rounding boundary, are neighbours: one ulp of x's dtype.
    assert ((got - expected).abs() <= _sum_error(x, 2.0**-53) + _ulps(dtype, expected)).all(), (got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_matches_torch_mean_as_the_reference_block_computes_it(dtype, device):
    # The reference block: last_firmom = mean(value), last_secmom = mean(value ** 2), in value's dtype. torch.mean
    # sums in value's dtype (float32 for float16) in its own order; ours in float64: apart by the float sum's
    # error, at most ~n u sum|x| for n terms (u = 2^-24 float32, 2^-53 float64), plus one ulp of the result.
    x = _values((1000,), dtype).to(device)
    got = _run(step_ops.moments_, x, dtype).double()
    expected = torch.stack([x.mean(), (x ** 2).mean()]).cpu().double()
    bound = _sum_error(x, 2.0**-53 if dtype == torch.float64 else 2.0**-24) + _ulps(dtype, expected)
    assert ((got - expected).abs() <= bound).all(), (got, expected)


def test_squares_are_rounded_to_the_values_dtype_as_the_reference_squares():
    # float16: 300 ** 2 = 90000 overflows to inf in float16, so the reference's mean(value ** 2) is inf; a square
    # taken in a wider type would give a finite, different number.
    x = torch.tensor([300.0, 0.0, 0.0, 0.0], dtype=torch.float16)
    got = _run(step_ops.moments_, x)
    assert got[0] == 75.0 and got[1] == float("inf")
    assert (x ** 2).mean().item() == float("inf")


def test_empty_gives_nan_as_torch_mean(device):
    got = _run(step_ops.moments_, torch.empty(0, device=device))
    assert got.isnan().all() and torch.empty(0).mean().isnan()


def test_nan_and_inf_propagate(device):
    x = _values((9,), torch.float32)
    x[4] = float("nan")
    assert _run(step_ops.moments_, x.to(device)).isnan().all()
    x[4] = float("-inf")
    got = _run(step_ops.moments_, x.to(device))
    assert got[0] == float("-inf") and got[1] == float("inf")


def test_layouts(device):
    x = _values((6, 5), torch.float32).to(device)
    for view in (x.t(), x[:, ::2], x.reshape(-1)[::3]):
        # a strided view's own elements (a wrong stride would read others): the oracle's means of the same values,
        # both summed in float64 (30 terms or fewer, ~1e-15 apart) and rounded to float32: within one ulp
        got = _run(step_ops.moments_, view).double()
        expected = _run(reference.moments_, view.cpu()).double()
        assert ((got - expected).abs() <= _ulps(torch.float32, expected)).all(), (view.stride(), got, expected)


def test_writes_into_views_of_a_larger_buffer_and_leaves_the_rest(device):
    x = _values((10,), torch.float32).to(device)
    buffer = torch.full((4,), 7.0, device=device)
    step_ops.moments_(x, buffer[1:2], buffer[3:4])
    expected = _run(step_ops.moments_, x)
    assert torch.equal(buffer.cpu(), torch.tensor([7.0, expected[0], 7.0, expected[1]]))


def test_deterministic_across_thread_counts():
    x = _values((100_003,), torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(_run(step_ops.moments_, x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("args,match", [
    (lambda x, m, s: (x.long(), m, s), "expected x to have a floating-point dtype"),
    (lambda x, m, s: (x, m.long(), s), "expected mean to have a floating-point dtype"),
    (lambda x, m, s: (x, torch.zeros(2), s), r"expected mean to have one element \(a \[1\] buffer\), but got shape "
                                            r"\[2\]"),
    (lambda x, m, s: (x, m, torch.zeros(0)), r"expected mean_square to have one element .*but got shape \[0\]"),
    (lambda x, m, s: (x, m, s.double()), r"expected mean_square to have the dtype of mean \(Float\), but got Double"),
    (lambda x, m, s: (x, x[:1], s), r"expected mean not to share memory with x \(mean is written in place"),
    (lambda x, m, s: (x, m, m), r"expected mean_square not to share memory with mean \(both are written"),
    (lambda x, m, s: (x, m, torch.zeros(()).expand(1)), None),  # a 0-stride one-element view: one element, accepted
])
def test_errors_name_the_argument(args, match):
    x, (mean, square) = _values((5,), torch.float32), _buffers(torch.float32, "cpu")
    if match is None:
        step_ops.moments_(*args(x, mean, square))
        return
    with pytest.raises(RuntimeError, match=match):
        step_ops.moments_(*args(x, mean, square))
    assert mean.item() == 0.0 and square.item() == 0.0  # refused before anything is written


def test_refuses_tensors_that_require_grad():
    x = _values((5,), torch.float32).requires_grad_(True)
    mean, square = _buffers(torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="not differentiable, but its argument x requires grad"):
        step_ops.moments_(x, mean, square)
    with torch.no_grad():
        step_ops.moments_(x, mean, square)
    assert mean.item() == pytest.approx(x.detach().mean().item(), rel=1e-6)


@pytest.mark.parametrize("shape,dtype", [((5,), torch.float32), ((3, 4), torch.float64), ((7,), torch.bfloat16)])
def test_opcheck(shape, dtype):
    x = _values(shape, dtype)
    mean, square = _buffers(torch.float32, "cpu")
    torch.library.opcheck(torch.ops.resflow_cuda.moments_, (x, mean, square))


def test_torch_compile():
    def step(x, mean, square):
        step_ops.moments_(x, mean, square)
        return mean * 2, square + 1

    x = _values((33,), torch.float32)
    expected = step(x, *_buffers(torch.float32, "cpu"))
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, *_buffers(torch.float32, "cpu"))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same op on the same values


# ---------------------------------------------------------------------------------------------
# foreach_add_scaled
# ---------------------------------------------------------------------------------------------

# a conv weight, its bias, a LipSwish beta, an odd-sized matrix, an empty tensor
PAIR_SHAPES = [(8, 2, 3, 3), (8,), (1,), (5, 7), (0, 3)]


def _pairs(dtype, device, seed=3, shapes=PAIR_SHAPES):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device) for s in shapes]
    b = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device) for s in shapes]
    return a, b, torch.tensor([-0.375], dtype=dtype, device=device)


def _assert_sum_close(out, a, b, scale, dtype):
    """out against a + b * s: the exact value (in float64; float64 pairs: to 2^-53) within the roundings of a
    multiply and an add in dtype, or of one fused multiply-add (CUDA, FMA targets): at most one ulp of |b s| plus
    one of |a + b s| (the first matters where the two shares cancel)."""
    product = b.double().cpu() * scale.double().cpu().reshape(())
    exact = a.double().cpu() + product
    eps = torch.finfo(dtype).eps
    assert ((out.double().cpu() - exact).abs() <= eps * (product.abs() + exact.abs())).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_foreach_add_scaled_matches_reference(dtype, device):
    a, b, scale = _pairs(dtype, device)
    got = step_ops.foreach_add_scaled(a, b, scale)
    expected = reference.foreach_add_scaled([t.cpu() for t in a], [t.cpu() for t in b], scale.cpu())
    assert len(got) == len(a)
    for ai, bi, out, e in zip(a, b, got, expected):
        assert out.shape == ai.shape and out.dtype == dtype and out.is_contiguous() and out.device == ai.device
        _assert_sum_close(out, ai, bi, scale, dtype)
        _assert_sum_close(e, ai, bi, scale, dtype)  # the oracle's two roundings, for the bound's sake


def test_foreach_add_scaled_takes_more_pairs_than_one_launch_holds(device):
    # 30 pairs: two CUDA launches of at most 24; the CPU loop takes them all
    a, b, scale = _pairs(torch.float32, device, shapes=[(k % 7 + 1, 3) for k in range(30)])
    for ai, bi, out in zip(a, b, step_ops.foreach_add_scaled(a, b, scale)):
        _assert_sum_close(out, ai, bi, scale, torch.float32)


def test_foreach_add_scaled_layouts_and_edge_cases(device):
    a, b, scale = _pairs(torch.float32, device, shapes=[(6, 4)])
    view_a, view_b = a[0].t(), b[0][:, ::2]  # non-contiguous: copied, the output contiguous
    out = step_ops.foreach_add_scaled([view_a, view_b.t().contiguous().t()], [view_a, view_b], scale)
    _assert_sum_close(out[0], view_a, view_a, scale, torch.float32)
    assert out[0].is_contiguous() and out[1].shape == view_b.shape
    assert step_ops.foreach_add_scaled([], [], scale) == []
    a[0][1, 2] = float("nan")
    b[0][0, 0] = float("inf")
    out = step_ops.foreach_add_scaled(a, b, scale)[0]
    assert out[1, 2].isnan() and out[0, 0] == float("-inf") and out.isfinite().sum() == 22


@pytest.mark.parametrize("args,match", [
    (lambda a, b, s: (a, b[:1], s), "expected a and b to have the same number of tensors, but got 2 and 1"),
    (lambda a, b, s: (a, [b[0], b[1][:2]], s), r"expected b\[1\] to have the shape of a\[1\] \[3\], but got \[2\]"),
    (lambda a, b, s: (a, [b[0], b[1].double()], s), r"expected b\[1\] to have the dtype of a\[1\] \(Float\)"),
    (lambda a, b, s: ([a[0].long(), a[1]], b, s), r"expected a\[0\] to have a floating-point dtype"),
    (lambda a, b, s: (a, b, s.double()), r"expected scale to have the dtype of a\[0\] \(Float\), but got Double"),
    (lambda a, b, s: (a, b, torch.ones(2)), r"expected scale to have one element, but got shape \[2\]"),
])
def test_foreach_add_scaled_errors_name_the_argument(args, match):
    a, b, scale = _pairs(torch.float32, "cpu", shapes=[(2, 2), (3,)])
    with pytest.raises(RuntimeError, match=match):
        step_ops.foreach_add_scaled(*args(a, b, scale))


def test_foreach_add_scaled_refuses_tensors_that_require_grad():
    a, b, scale = _pairs(torch.float32, "cpu", shapes=[(3,)])
    with pytest.raises(RuntimeError, match=r"not differentiable, but its argument b requires grad"):
        step_ops.foreach_add_scaled(a, [b[0].requires_grad_(True)], scale)


def test_foreach_add_scaled_opcheck_and_compile():
    a, b, scale = _pairs(torch.float32, "cpu", shapes=[(4, 3), (5,)])
    torch.library.opcheck(torch.ops.resflow_cuda.foreach_add_scaled, (a, b, scale))

    def step(a, b, scale):
        return [t * 2 for t in step_ops.foreach_add_scaled(a, b, scale)]

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(a, b, scale)
    for g, e in zip(got, step(a, b, scale)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)  # the same op on the same values
