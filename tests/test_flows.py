"""resflow_cuda.nn.flows: every layer against the formulas of the reference (reference.md §1.5),
its exact log-det against a brute-force Jacobian, inverse round trips, state and errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from jacobians import brute_logdet

from resflow_cuda.nn import flows


def _check_flow(layer, x, atol=1e-9):
    """forward's log-det = brute force, inverse undoes forward and returns the log-density back."""
    logp = torch.randn(x.shape[0], 1, dtype=x.dtype).to(x.device)
    y, logpy = layer(x, logp)
    torch.testing.assert_close(layer(x), y)  # the same ops without logp: equal
    # float64, no iteration: slogdet (LU) of the n x n Jacobian and closed-form inverses err by ~n*cond*2^-53 <= 1e-13
    # (n <= 12, cond <= 13 here); 1e-9 keeps 1e4x, and rtol 1e-9 (was 1e-7) fails on float32 rounding (2^-24).
    torch.testing.assert_close(logp - logpy, brute_logdet(layer, x), atol=atol, rtol=1e-9)
    x2, logp2 = layer.inverse(y, logpy)
    torch.testing.assert_close(x2, x, atol=atol, rtol=1e-9)
    torch.testing.assert_close(logp2, logp, atol=atol, rtol=1e-9)
    torch.testing.assert_close(layer.inverse(y), x2)  # the same ops without logp: equal


def test_actnorm_initialises_from_the_first_batch_and_then_is_a_fixed_affine_map(device):
    torch.manual_seed(0)
    x = (torch.randn(64, 3, 4, 5, dtype=torch.float64) * torch.tensor([0.1, 2.0, 5.0]).view(1, 3, 1, 1) + 3).to(device)
    layer = flows.ActNorm2d(3).double().to(device)
    assert layer.initialized.dtype == torch.int64 and int(layer.initialized) == 0
    with pytest.raises(RuntimeError, match="not initialised"):
        layer.inverse(x)
    y = layer(x)
    flat = x.transpose(0, 1).reshape(3, -1)
    var = flat.var(dim=1)  # unbiased, as the reference
    # float64 statistics of 1280 values in another reduction order: ~1e-15 relative; the default 1e-7 is loose, but
    # a biased variance (1280/1279) moves the weight by 4e-4 and a wrong axis by O(1)
    torch.testing.assert_close(layer.bias.detach(), -flat.mean(1))
    torch.testing.assert_close(layer.weight.detach(), -0.5 * torch.log(torch.clamp(var, min=0.2)))
    assert int(layer.initialized) == 1
    assert y[:, 1:].transpose(0, 1).reshape(2, -1).std(1).sub(1).abs().max() < 1e-6  # var > 0.2: unit variance
    _check_flow(layer, torch.randn(3, 3, 2, 2, dtype=torch.float64).to(device))  # no re-initialisation later
    torch.testing.assert_close(layer.bias.detach(), -flat.mean(1))  # as above
    assert list(layer.state_dict()) == ["weight", "bias", "initialized"]


def test_actnorm_logdet_is_the_weight_sum_per_position_and_load_resets_the_cache(device):
    layer = flows.ActNorm1d(4).double().to(device)
    _check_flow(layer, torch.randn(5, 4, dtype=torch.float64).to(device) * 3)
    fresh = flows.ActNorm1d(4).double().to(device)
    fresh(torch.randn(7, 4, dtype=torch.float64).to(device))  # initialised from other data
    fresh.load_state_dict({**layer.state_dict(), "initialized": torch.tensor(0)})
    x = torch.randn(9, 4, dtype=torch.float64).to(device) + 5
    fresh(x)  # not initialised after loading 0: initialises from x
    torch.testing.assert_close(fresh.bias.detach(), -x.mean(0))  # float64 mean of 9 values: rounding only
    with pytest.raises(ValueError, match="4 channels"):
        layer(torch.randn(2, 3, dtype=torch.float64).to(device))


@pytest.mark.parametrize("shape", [(5, 4), (5, 4, 3, 2)], ids=["1d", "2d"])
def test_actnorm_log_density_takes_a_tensor_or_a_float(shape):
    layer = (flows.ActNorm1d if len(shape) == 2 else flows.ActNorm2d)(4).double()
    x = torch.randn(shape, dtype=torch.float64) * 3
    layer(x)  # data initialisation
    logpx = torch.randn(shape[0], 1, dtype=torch.float64)
    # the reference's log-det: the weight expanded over every position and summed per sample
    view = (1, -1) + (1,) * (len(shape) - 2)
    logdet = layer.weight.detach().view(view).expand(shape).reshape(shape[0], -1).sum(1, keepdim=True)
    y, logp = layer(x, logpx)
    _, logp_float = layer(x, 0.5)
    # float64 sums of 4 or 24 equal-magnitude terms in another order (and sum * positions): ~1e-15 relative
    torch.testing.assert_close(logp, logpx - logdet, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logp_float, 0.5 - logdet, rtol=1e-12, atol=1e-12)
    x_back, logpx_back = layer.inverse(y, logp)
    torch.testing.assert_close(logpx_back, logpx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_back, x, rtol=1e-12, atol=1e-12)


def test_actnorm_trains_on_one_op_each_way_as_on_atens_ops():
    # a contiguous x of the parameters' dtype takes flow_ops.actnorm (one op forward, one backward); a
    # channels_last x the ATen expression: the same values and gradients to rounding
    layer = flows.ActNorm2d(3).double()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64) * 2 + 1
    layer(x)
    results = []
    for inp in (x, x.to(memory_format=torch.channels_last)):
        inp = inp.clone().requires_grad_(True)
        logpx = torch.randn(5, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y, logp = layer(inp, logpx)
            grads = torch.autograd.grad((y.square().sum() + 3 * logp.sum()), [inp, logpx, *layer.parameters()])
        names = {e.name for e in prof.events()}
        results.append((y, logp, *grads))
        fused = inp.is_contiguous()
        assert ({"resflow_cuda::actnorm", "resflow_cuda::actnorm_backward"} <= names) == fused
    for a, b in zip(*results):
        # float64: exp and per-channel sums of 80 terms in two orders, ~1e-15 relative
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_actnorm_under_forward_mode_ad_and_torch_func_takes_atens_ops():
    # the fused op has a backward formula only: a dual level or a torch.func transform takes the ATen expression
    import torch.autograd.forward_ad as fwAD

    layer = flows.ActNorm2d(3).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    layer(x)
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        y = layer(fwAD.make_dual(x, tangent))
        jvp = fwAD.unpack_dual(y).tangent
    torch.testing.assert_close(jvp, tangent * torch.exp(layer.weight.detach()).view(1, -1, 1, 1), rtol=0, atol=0)
    jac = torch.func.jacrev(layer)(x[:1])
    assert jac.shape == (1, 3, 2, 2, 1, 3, 2, 2)
    torch.testing.assert_close(jac.reshape(12, 12).diagonal(), torch.exp(layer.weight.detach()).repeat_interleave(4),
                               rtol=0, atol=0)  # a diagonal map: exp(weight) per channel, exactly


@pytest.mark.parametrize("logpx", ["0-dim", "(1, 1)", "float16", "(B,)"])
def test_actnorm_log_density_broadcasts_and_promotes_as_the_expression(logpx):
    # any logpx but a (B, 1) tensor of the result's dtype keeps the old expression's broadcasting and promotion
    layer = flows.ActNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    layer(x)
    value = {"0-dim": torch.tensor(0.5), "(1, 1)": torch.full((1, 1), 0.5),
             "float16": torch.full((4, 1), 0.5, dtype=torch.float16), "(B,)": torch.full((4,), 0.5)}[logpx]
    expected = value - (layer.weight.detach().sum() * 4).expand(4, 1)
    _, logp = layer(x, value)
    assert logp.shape == expected.shape and logp.dtype == expected.dtype
    torch.testing.assert_close(logp.detach(), expected, rtol=1e-6, atol=1e-6)  # float32 sums of 3 weights


def test_squeeze_is_the_reference_reshape_permute_and_pixel_shuffle_inverts_it(device):
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64).to(device)
    layer = flows.SqueezeLayer(2)
    expected = x.reshape(2, 3, 2, 2, 3, 2).permute(0, 1, 3, 5, 2, 4).reshape(2, 12, 2, 3)
    torch.testing.assert_close(layer(x), expected)  # data movement only: equal
    _check_flow(layer, x[:, :, :2, :2])
    with pytest.raises(ValueError, match="divisible by 2"):
        layer(torch.randn(1, 1, 3, 4).to(device))


def test_logit_transform_normalize_zero_mean_and_invertible_matrices(device):
    torch.manual_seed(0)
    u = torch.rand(3, 2, 2, 2, dtype=torch.float64).to(device)
    layer = flows.LogitTransform(0.05)
    s = 0.05 + 0.9 * u
    torch.testing.assert_close(layer(u), torch.log(s / (1 - s)))  # float64, the same formula: a few ulps
    _check_flow(layer, u)
    assert flows.Normalize([0.5], [0.3]).std.dtype == torch.float32  # float32 buffers, as the reference
    norm = flows.Normalize([0.5, 0.2], [0.3, 2.0]).double().to(device)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64).to(device)
    y = norm(x)
    torch.testing.assert_close(y[:, 2], x[:, 2])  # no statistics for channel 2: untouched
    # the float32 buffers hold 0.2 as 0.2 + 3e-9 (2^-24 relative): y differs by 1.5e-9, under the default 1e-7
    torch.testing.assert_close(y[:, 1], (x[:, 1] - 0.2) / 2.0)
    _check_flow(norm, x)
    _check_flow(flows.ZeroMeanTransform(), x)
    conv = flows.InvertibleConv2d(3).double()
    assert sorted(conv.weight.detach().sum(0).tolist()) == [1.0, 1.0, 1.0]  # a permutation at init
    with torch.no_grad():
        conv.weight.add_(0.3 * torch.randn(3, 3, dtype=torch.float64))
    _check_flow(conv.to(device), x)
    lin = flows.InvertibleLinear(4).double()
    with torch.no_grad():
        lin.weight.add_(0.3 * torch.randn(4, 4, dtype=torch.float64))
    _check_flow(lin.to(device), torch.randn(3, 4, dtype=torch.float64).to(device))


def test_moving_batch_norm_subtracts_the_running_mean_before_its_update(device):
    layer = flows.MovingBatchNorm1d(2).double().to(device)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -1.0]))
    x = torch.randn(8, 2, dtype=torch.float64).to(device) + 4
    zero = torch.zeros(8, 1, dtype=torch.float64, device=device)
    y, logp = layer(x, zero)
    # float64, the same ops up to the order of a mean of 8: rounding only (default 1e-7 is loose; a wrong momentum
    # or a mean subtracted after its update errs by O(0.1))
    torch.testing.assert_close(y, x + layer.bias.detach())  # running mean was 0 before this batch
    torch.testing.assert_close(layer.running_mean, 0.1 * x.mean(0))
    # log-det 0: logp passes through, bit-exact
    assert float(layer.step) == 1.0 and torch.equal(logp, zero)
    layer.eval()
    torch.testing.assert_close(layer.inverse(layer(x)), x)  # x - m + b - b + m: a few ulps
    assert list(layer.state_dict()) == ["bias", "step", "running_mean"]


def test_sequential_flow_and_inverse_compose_log_dets(device):
    torch.manual_seed(1)
    chain = flows.SequentialFlow([flows.ActNorm2d(2), flows.SqueezeLayer(2), flows.InvertibleConv2d(8),
                                  flows.ActNorm2d(8)]).double().to(device)
    x = torch.randn(4, 2, 2, 2, dtype=torch.float64).to(device)
    zero = torch.zeros(4, 1, dtype=torch.float64, device=device)
    chain(x)  # data initialisation of both ActNorms
    with torch.no_grad():
        chain.chain[2].weight.add_(0.2 * torch.randn(8, 8, dtype=torch.float64).to(device))
    _check_flow(chain, torch.randn(2, 2, 2, 2, dtype=torch.float64).to(device))
    assert [k.split(".")[1] for k in chain.state_dict()] == ["0", "0", "0", "2", "3", "3", "3"]
    inv = flows.Inverse(chain)
    y = chain(x)
    # float64 round trips through 8 x 8 maps (cond <= 13): ~1e-14 (default 1e-7 is loose; a wrong order is O(1))
    torch.testing.assert_close(inv(y), x)
    z, logp = inv(y, zero)
    torch.testing.assert_close(z, x)
    torch.testing.assert_close(logp, chain(x, zero)[1].neg())  # same log-dets


class _Spy(torch.nn.Module):
    """A flow layer without ``restore`` that records its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def forward(self, x, logpx=None):
        self.seen.append("none")
        return x if logpx is None else (x, logpx)


class _RestoreSpy(_Spy):
    """A flow layer with ImpFlow's ``restore`` that records what it gets."""

    def forward(self, x, logpx=None, restore=False):
        self.seen.append(restore)
        return x if logpx is None else (x, logpx)


def test_sequential_flow_passes_impflows_restore_to_the_layers_that_take_it():
    """ImpFlow's container passes ``restore`` to every layer; ours only to those whose forward takes it, so that
    ImpFlow's scripts (first call ``model(x, restore=True)``) run with this library's layers."""
    plain, taker, nested_taker = _Spy(), _RestoreSpy(), _RestoreSpy()
    chain = flows.SequentialFlow([flows.ActNorm1d(2), plain, taker, flows.SequentialFlow([nested_taker])])
    x = torch.randn(5, 2)
    chain(x, restore=True)
    chain(x, torch.zeros(5, 1), restore=True)
    chain(x)
    assert plain.seen == ["none"] * 3
    assert taker.seen == nested_taker.seen == [True, True, False]
    torch.testing.assert_close(chain(x, restore=True), chain(x))  # float32, the same computation: equal
    with pytest.raises(TypeError):
        chain(x, restore=True, other=1)  # only restore is ImpFlow's


def test_logdet_sign_convention_matches_a_known_scaling(device):
    # y = 2x in d dims: log|det| = d log 2, returned as logpx - d log 2
    layer = flows.ActNorm1d(3).to(device)
    layer.initialized.fill_(1)
    with torch.no_grad():
        layer.weight.fill_(math.log(2.0))
    y, logp = layer(torch.ones(2, 3, device=device), torch.zeros(2, 1, device=device))
    torch.testing.assert_close(y, torch.full((2, 3), 2.0, device=device))
    torch.testing.assert_close(logp, torch.full((2, 1), -3 * math.log(2.0), device=device))


def _flow_chains(dtype):
    """Every flow layer, in an image chain and a flat one, initialised on the CPU (ActNorm's statistics)."""
    torch.manual_seed(2)
    image = flows.SequentialFlow([flows.LogitTransform(0.05), flows.Normalize([0.5, 0.4], [0.3, 0.2]),
                                  flows.ActNorm2d(2), flows.SqueezeLayer(2), flows.InvertibleConv2d(8),
                                  flows.MovingBatchNorm2d(8), flows.ActNorm2d(8), flows.ZeroMeanTransform()]).to(dtype)
    inverted = flows.ActNorm1d(5)
    inverted.initialized.fill_(1)  # its inverse runs first: no data initialisation
    flat = flows.SequentialFlow([flows.ActNorm1d(5), flows.InvertibleLinear(5), flows.MovingBatchNorm1d(5),
                                 flows.Inverse(inverted)]).to(dtype)
    inputs = torch.rand(4, 2, 4, 4, dtype=torch.float64).to(dtype), torch.randn(6, 5, dtype=torch.float64).to(dtype)
    for chain, x in zip((image, flat), inputs):
        chain(x)
        with torch.no_grad():
            for p in chain.parameters():
                p.add_(0.2 * torch.randn(p.shape, dtype=torch.float64).to(dtype))
    return (image, flat), inputs


def _forward_backward_inverse(chain, x):
    x = x.clone().requires_grad_(True)
    y, logp = chain(x, torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device))
    grads = torch.autograd.grad(y.square().sum() + logp.sum(), [x, *chain.parameters()])
    back, logp_back = chain.inverse(y.detach(), logp.detach())
    return [t.detach().cpu() for t in (y, logp, *grads, back, logp_back, *chain.buffers())]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_flow_layers_on_cuda_match_the_cpu(dtype, cuda):
    """Forward with log-det, gradients, inverse and the running statistics on CUDA against the CPU."""
    chains, inputs = _flow_chains(dtype)
    for chain, x in zip(chains, inputs):
        moved = copy.deepcopy(chain).to(cuda)
        expected = _forward_backward_inverse(chain, x)
        got = _forward_backward_inverse(moved, x.to(cuda))
        # elementwise maps, 8 x 8 channel mixing, their inverses and slogdets (cond <= 13) in another order
        # on each device: float64 ~1e-14 (_check_flow's 1e-9 keeps 1e4x); float32 ~10 2^-24 relative of
        # outputs, log-dets (sums of up to 64 terms of O(1)) to ~1e-5 absolute
        tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)
        for i, (a, b) in enumerate(zip(got, expected)):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"output {i}: {m}")
