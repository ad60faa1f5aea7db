"""actnorm / actnorm_backward (resflow_cuda.flow_ops): ActNorm's map, log-density and gradients in one op each
way, against the pure-PyTorch reference (residual-flows' ActNorm arithmetic, differentiated by autograd)."""

from __future__ import annotations

import pytest
import torch

from resflow_cuda import flow_ops, reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# ActNorm2d, ActNorm1d, a 3-D input, one channel, an empty batch
SHAPES = [(6, 3, 4, 5), (9, 4), (2, 3, 7), (5, 1, 2, 2), (0, 3, 2, 2)]
# float32: exp and the per-channel sums in another order than ATen's: a few ulps; half types: their rounding
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def _inputs(shape, dtype, device="cpu", logp_shape="column", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    weight = torch.randn(shape[1], generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(shape[1], generator=g, dtype=torch.float64)
    logp = None if logp_shape is None else torch.randn(
        (shape[0], 1) if logp_shape == "column" else (shape[0],), generator=g, dtype=torch.float64)
    return [None if t is None else t.to(dtype).to(device) for t in (x, weight, bias, logp)]


def _sum_error(terms, dtype):
    """How far the reference's per-channel sums of ``terms`` (B, C, ...) in dtype may be from exact: recursive
    summation's bound (n - 1) u sum|t| over n terms at dtype's unit roundoff u, the largest over the channels
    (ours sum in float64: exact by comparison)."""
    per_channel = terms.detach().double().cpu().transpose(0, 1).reshape(terms.shape[1], -1).abs()
    if per_channel.numel() == 0:
        return 0.0
    return float(per_channel.shape[1] * torch.finfo(dtype).eps / 2 * per_channel.sum(1).max())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sign", [-1, 1])
def test_matches_reference(shape, dtype, sign, device):
    x, weight, bias, logp = _inputs(shape, dtype, device)
    y, logp_out = flow_ops.actnorm(x, weight, bias, logp, sign)
    y_ref, logp_ref = reference.actnorm(x.cpu(), weight.cpu(), bias.cpu(), logp.cpu(), sign)
    assert y.shape == x.shape and y.dtype == dtype and logp_out.shape == logp.shape
    torch.testing.assert_close(y.cpu(), y_ref, **TOL[dtype])
    torch.testing.assert_close(logp_out.cpu(), logp_ref, **TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("logp_shape", ["column", "flat", None])
def test_gradients_match_reference(shape, dtype, logp_shape, device):
    inputs = _inputs(shape, dtype, device, logp_shape)
    g = torch.Generator().manual_seed(1)
    grad_y = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    grad_logp = None if logp_shape is None else torch.randn(inputs[3].shape, generator=g).to(dtype).to(device)
    grads = []
    for fn, args in ((flow_ops.actnorm, inputs), (reference.actnorm, [None if t is None else t.cpu() for t in inputs])):
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in args]
        y, logp = fn(*leaves, -1)
        outputs, upstream = [y], [grad_y.to(y.device)]
        if logp_shape is not None:
            outputs.append(logp)
            upstream.append(grad_logp.to(y.device))
        wanted = [t for t in leaves if t is not None]
        grads.append([t.cpu() for t in torch.autograd.grad(outputs, wanted, upstream)])
    # the weight's and bias's gradients sum B*S products g y and g e^w per channel (float64 here, in dtype by
    # autograd): the reference's sums may err by their bound
    y_ref = reference.actnorm(*[None if t is None else t.cpu() for t in inputs], -1)[0]
    bound = max(_sum_error(grad_y.cpu() * y_ref, dtype), _sum_error(grad_y.cpu() * torch.exp(inputs[1].cpu()).view(
        (1, -1) + (1,) * (len(shape) - 2)), dtype))
    tol = dict(TOL[dtype], atol=TOL[dtype]["atol"] + bound)
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, **tol)


def test_gradcheck_and_gradgradcheck():
    x, weight, bias, logp = (t.requires_grad_(True) for t in _inputs((3, 2, 2, 3), torch.float64))
    for sign in (-1, 1):
        assert torch.autograd.gradcheck(lambda *a: flow_ops.actnorm(*a, sign), (x, weight, bias, logp))
        # the backward under create_graph runs on ATen ops: differentiable again
        assert torch.autograd.gradgradcheck(lambda *a: flow_ops.actnorm(*a, sign), (x, weight, bias, logp))
    assert torch.autograd.gradcheck(lambda *a: flow_ops.actnorm(*a, None, -1)[0], (x, weight, bias))


def test_a_loss_of_one_output_gets_the_gradient_of_that_output_only():
    x, weight, bias, logp = (t.requires_grad_(True) for t in _inputs((4, 3, 2, 2), torch.float64))
    for pick in (0, 1):
        out = flow_ops.actnorm(x, weight, bias, logp, -1)[pick]
        expected = reference.actnorm(x, weight, bias, logp, -1)[pick]
        got = torch.autograd.grad(out.sum(), [x, weight, bias, logp], allow_unused=True)
        want = torch.autograd.grad(expected.sum(), [x, weight, bias, logp], allow_unused=True)
        for a, b, leaf in zip(got, want, (x, weight, bias, logp)):
            zero = torch.zeros_like(leaf)  # no gradient (None) and a zero gradient are the same answer
            torch.testing.assert_close(zero if a is None else a, zero if b is None else b, rtol=1e-12, atol=1e-12)


def test_nan_and_inf_propagate(device):
    x, weight, bias, logp = _inputs((3, 2, 2, 2), torch.float32, device)
    x[1, 0, 0, 0] = float("nan")
    weight[1] = float("inf")
    y, logp_out = flow_ops.actnorm(x, weight, bias, logp, -1)
    assert y[1, 0, 0, 0].isnan() and y[:, 1].isinf().any() and (logp_out == float("-inf")).all()


def test_layouts_and_deterministic_sums(device):
    x, weight, bias, logp = _inputs((7, 3, 5, 5), torch.float32, device)
    expected = flow_ops.actnorm(x, weight, bias, logp, -1)
    channels_last = x.to(memory_format=torch.channels_last)
    got = flow_ops.actnorm(channels_last, weight, bias, logp, -1)
    assert got[0].is_contiguous()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])  # the same values, copied first
    grad = torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(flow_ops.actnorm_backward(grad, logp, x, weight, bias, -1))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("args,match", [
    (lambda x, w, b, l: (x[0, 0, 0], w, b, l, -1), r"expected x to have shape \(B, C, \.\.\.\)"),
    (lambda x, w, b, l: (x, w[:2], b, l, -1), r"expected weight to have shape \[3\] \(one value per channel"),
    (lambda x, w, b, l: (x, w, b.double(), l, -1), r"expected bias to have the dtype of x \(Float\), but got Double"),
    (lambda x, w, b, l: (x.long(), w, b, l, -1), "expected x to have a floating-point dtype"),
    (lambda x, w, b, l: (x, w, b, l[:3], -1), r"expected logp to have one value per sample of x .*but got \[3, 1\]"),
    (lambda x, w, b, l: (x, w, b, l.double(), -1), r"expected logp to have the dtype of x"),
    (lambda x, w, b, l: (x, w, b, l, 2), "expected sign to be 1 or -1, but got 2"),
])
def test_errors_name_the_argument(args, match):
    x, weight, bias, logp = _inputs((4, 3, 2, 2), torch.float32)
    with pytest.raises(RuntimeError, match=match):
        flow_ops.actnorm(*args(x, weight, bias, logp))


def test_backward_errors_name_the_argument_and_refuse_grad():
    x, weight, bias, logp = _inputs((4, 3, 2, 2), torch.float32)
    with pytest.raises(RuntimeError, match=r"expected grad_y to have the shape of x \[4, 3, 2, 2\]"):
        flow_ops.actnorm_backward(x[:2], logp, x, weight, bias, -1)
    with pytest.raises(RuntimeError, match=r"expected grad_logp to have one value per sample of x"):
        flow_ops.actnorm_backward(x, logp[:1], x, weight, bias, -1)
    with pytest.raises(RuntimeError, match="not differentiable, but its argument grad_y requires grad"):
        flow_ops.actnorm_backward(x.clone().requires_grad_(True), logp, x, weight, bias, -1)


def test_opcheck_and_compile():
    x, weight, bias, logp = _inputs((3, 2, 2, 2), torch.float32)
    for args in ((x, weight, bias, logp, -1), (x, weight, bias, None, 1)):
        torch.library.opcheck(torch.ops.resflow_cuda.actnorm, args)
    torch.library.opcheck(torch.ops.resflow_cuda.actnorm_backward, (torch.randn_like(x), logp, x, weight, bias, -1))

    def step(x, weight, bias, logp):
        y, logp_out = flow_ops.actnorm(x, weight, bias, logp, -1)
        return y * 2, logp_out + 1

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, weight, bias, logp)
    for a, b in zip(got, step(x, weight, bias, logp)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same op on the same values
