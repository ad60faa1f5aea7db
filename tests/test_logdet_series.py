"""logdet_series_accumulate_: the fused per-term step of the log-det power series, against the
pure-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from resflow_cuda import functional, ops, reference
from conftest import TOLERANCES

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(3, 5), (4, 3, 5, 5), (1, 1), (7, 33), (2, 1000), (5, 2, 3)]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, eps, neumann = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    logdet = torch.randn(shape[0], generator=g).to(_acc(dtype))
    return w, eps, logdet, neumann


def _run_both(w, eps, logdet, neumann, lc, nc):
    got = (logdet.clone(), None if neumann is None else neumann.clone())
    expected = (logdet.clone(), None if neumann is None else neumann.clone())
    ops.logdet_series_accumulate_(w, eps, got[0], got[1], lc, nc)
    reference.logdet_series_accumulate_(w, eps, expected[0], expected[1], lc, nc)
    return got, expected


def _assert_close(got, expected, dtype):
    torch.testing.assert_close(got[0], expected[0], **TOLERANCES[_acc(dtype)] if dtype in (torch.float32, torch.float64)
                               else dict(atol=1e-4, rtol=1e-4))
    if expected[1] is not None:
        torch.testing.assert_close(got[1], expected[1], **TOLERANCES[dtype])


@pytest.mark.parity
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_neumann", [True, False])
def test_matches_reference(shape, dtype, with_neumann):
    w, eps, logdet, neumann = _inputs(shape, dtype)
    got, expected = _run_both(w, eps, logdet, neumann if with_neumann else None, -0.5, 1.5)
    _assert_close(got, expected, dtype)


@pytest.mark.parity
def test_a_long_sample_crosses_chunks():
    w, eps, logdet, neumann = _inputs((2, (1 << 14) * 3 + 17), torch.float64)
    got, expected = _run_both(w, eps, logdet, neumann, 0.25, -2.0)
    _assert_close(got, expected, torch.float64)


@pytest.mark.parity
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "expanded_eps", "strided_logdet",
                                    "neumann_only_strided"])
def test_layouts(layout):
    w, eps, logdet, neumann = _inputs((3, 4, 5, 6), torch.float32)
    if layout == "channels_last":
        w, eps, neumann = (t.contiguous(memory_format=torch.channels_last) for t in (w, eps, neumann))
    elif layout == "transposed":
        w, eps, neumann = (t.transpose(1, 3) for t in (w, eps, neumann))
    elif layout == "expanded_eps":
        eps = eps[:1].expand_as(w)
    elif layout == "strided_logdet":
        logdet = torch.randn(6)[::2]
    else:
        neumann = torch.randn(3, 4, 6, 5).transpose(2, 3)
    got, expected = _run_both(w, eps, logdet, neumann, 1.0, -1.0)
    _assert_close(got, expected, torch.float32)
    before = neumann.clone()
    ops.logdet_series_accumulate_(w, eps, logdet, neumann, 1.0, -1.0)
    torch.testing.assert_close(neumann, before - w)  # the caller's tensor is the one updated


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0,)])
def test_empty_is_a_no_op(shape):
    w = torch.randn(shape)
    logdet = torch.randn(shape[0])
    before = logdet.clone()
    ops.logdet_series_accumulate_(w, w.clone(), logdet, torch.zeros(shape), 1.0, 1.0)
    torch.testing.assert_close(logdet, before)


@pytest.mark.parity
def test_zero_and_negative_coefficients_and_nan():
    w, eps, logdet, neumann = _inputs((4, 6), torch.float64)
    got, expected = _run_both(w, eps, logdet, neumann, 0.0, 0.0)
    _assert_close(got, expected, torch.float64)
    torch.testing.assert_close(got[1], neumann)  # neumann + 0 * w: bit-exact
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
    (lambda w, e, l, n: (w[0, 0], e[0, 0], l, None), "batch dimension"),
])
def test_errors_name_the_argument(args, match):
    w, eps, logdet, neumann = _inputs((3, 4), torch.float32)
    with pytest.raises(RuntimeError, match=match):
        ops.logdet_series_accumulate_(*args(w, eps, logdet, neumann), 1.0, 1.0)


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


def test_torch_compile():
    def step(w, eps, logdet, neumann):
        functional.logdet_series_accumulate_(w, eps, logdet, neumann, 0.5, -1.0)
        return logdet * 2, neumann + 1

    w, eps, logdet, neumann = _inputs((4, 6), torch.float32)
    expected = step(w, eps, logdet.clone(), neumann.clone())
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(w, eps, logdet.clone(), neumann.clone())
    torch.testing.assert_close(got, expected)
