"""Bad input, in one place: every case gets a clear error that names the argument, the expected
and the actual value, or a defined result (docs/guide.md, "Bad input"). Nothing is adopted silently.

The aliasing checks of the in-place ops live with the ops' own tests (test_logdet_series.py,
test_power_iteration.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from resflow_cuda import nn as rnn
from resflow_cuda.models import ResidualFlow

INF = float("inf")
NAN = float("nan")


def _mlp(dim=4, hidden=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(rnn.InducedNormLinear(dim, hidden, coeff=0.9, n_iterations=3), rnn.LipSwish(),
                         rnn.InducedNormLinear(hidden, dim, coeff=0.9, n_iterations=3))


def _cnn(channels=2, hidden=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(rnn.InducedNormConv2d(channels, hidden, 3, 1, 1, coeff=0.9, n_iterations=3), rnn.LipSwish(),
                         rnn.InducedNormConv2d(hidden, channels, 3, 1, 1, coeff=0.9, n_iterations=3))


def _conditioner(c_in, c_out, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, c_out, 3, padding=1))


def _flow(**kwargs):
    torch.manual_seed(0)
    return ResidualFlow((4, 1, 8, 8), n_blocks=(1, 1), intermediate_dim=8, fc_idim=16, n_lipschitz_iters=2, **kwargs)


def _seed(seed=0):
    """The draws of one estimate: torch's probes and NumPy's roulette (rng='numpy')."""
    torch.manual_seed(seed)
    np.random.seed(seed)


# -- checkpoints of the Lipschitz convolutions ----------------------------------------------------

CONVS = [rnn.SpectralNormConv2d, rnn.InducedNormConv2d]


def _trained_conv(cls):
    torch.manual_seed(0)
    layer = cls(2, 3, 3, 1, 1, n_iterations=2)
    layer(torch.randn(1, 2, 5, 5))  # the first forward fixes the operator: u (3*5*5), v (2*5*5)
    return layer


@pytest.mark.parametrize("cls", CONVS)
@pytest.mark.parametrize("key,size", [("u", 10), ("v", 51)])
def test_checkpoint_u_v_of_another_size_is_refused(cls, key, size):
    state = _trained_conv(cls).state_dict()
    expected = tuple(state[key].shape)
    state[key] = torch.randn(size)
    fresh = cls(2, 3, 3, 1, 1, n_iterations=2)
    with pytest.raises(RuntimeError, match=rf"size mismatch for {key}: .*torch.Size\(\[{size}\]\) from checkpoint, "
                                           rf"the shape in current model is torch.Size\(\[{expected[0]}\]\)"):
        fresh.load_state_dict(state)
    with pytest.raises(RuntimeError, match=f"size mismatch for {key}"):  # as torch: strict or not
        fresh.load_state_dict(state, strict=False)


@pytest.mark.parametrize("cls", CONVS)
def test_checkpoint_u_v_of_another_input_size_is_refused(cls):
    # u and v of a 5x5 operator with spatial_dims saying 6x6: they disagree with the checkpoint's own geometry
    state = _trained_conv(cls).state_dict()
    state["spatial_dims"] = torch.tensor([6.0, 6.0])
    with pytest.raises(RuntimeError, match=r"size mismatch for u: .*\[75\]\) from checkpoint, .*\[108\]\)"):
        cls(2, 3, 3, 1, 1, n_iterations=2).load_state_dict(state)


@pytest.mark.parametrize("cls", CONVS)
def test_checkpoint_of_the_same_geometry_loads_exactly(cls):
    trained = _trained_conv(cls)
    fresh = cls(2, 3, 3, 1, 1, n_iterations=2).eval()
    fresh.load_state_dict(trained.state_dict())
    trained.eval()
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(2, 2, 5, 5)
    assert torch.equal(fresh(x), trained(x))  # the same weights and buffers: bit-equal


@pytest.mark.parametrize("cls", CONVS)
@pytest.mark.parametrize("key", ["u", "v"])
def test_checkpoint_missing_u_or_v(cls, key):
    state = _trained_conv(cls).state_dict()
    kept = "v" if key == "u" else "u"
    del state[key]
    with pytest.raises(RuntimeError, match=f'Missing key\\(s\\) in state_dict: "{key}"'):
        cls(2, 3, 3, 1, 1, n_iterations=2).load_state_dict(state)
    # strict=False, as torch: reported, and the layer keeps a vector of the checkpoint's geometry
    fresh = cls(2, 3, 3, 1, 1, n_iterations=2)
    result = fresh.load_state_dict(state, strict=False)
    assert result.missing_keys == [key] and result.unexpected_keys == []
    assert torch.equal(getattr(fresh, kept), state[kept])
    mine = getattr(fresh, key)
    assert mine.shape == (75 if key == "u" else 50,)
    assert math.isclose(float(mine.norm()), 1.0, rel_tol=1e-5)  # a unit vector, up to float32 rounding


@pytest.mark.parametrize("cls", CONVS + [rnn.SpectralNormLinear, rnn.InducedNormLinear])
def test_checkpoint_extra_keys(cls):
    layer = _trained_conv(cls) if cls in CONVS else cls(3, 2, n_iterations=2)
    state = dict(layer.state_dict(), extra=torch.ones(1))
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "extra"'):
        layer.load_state_dict(state)
    assert layer.load_state_dict(state, strict=False).unexpected_keys == ["extra"]


@pytest.mark.parametrize("cls", [rnn.SpectralNormLinear, rnn.InducedNormLinear])
def test_linear_checkpoint_u_of_another_size_is_refused(cls):
    state = cls(3, 2, n_iterations=2).state_dict()
    state["u"] = torch.randn(5)
    with pytest.raises(RuntimeError, match=r"size mismatch for u: .*\[5\]\) from checkpoint, .*\[2\]\)"):
        cls(3, 2, n_iterations=2).load_state_dict(state)


# -- an empty batch -------------------------------------------------------------------------------


def _blocks():
    return {
        "iResBlock": lambda: (rnn.iResBlock(_mlp()), (0, 4)),
        "iResBlock-conv": lambda: (rnn.iResBlock(_cnn()), (0, 2, 6, 6)),
        "iResBlock-2d-exact": lambda: (rnn.iResBlock(_mlp(dim=2)), (0, 2)),  # eval: the exact determinant path
        "ImplicitBlock": lambda: (rnn.ImplicitBlock(_mlp(seed=1), _mlp(seed=2)), (0, 4)),
        "CouplingBlock": lambda: (rnn.CouplingBlock(4, _conditioner(2, 4)), (0, 4, 6, 6)),
        "AdditiveCoupling": lambda: (rnn.AdditiveCoupling(4, _conditioner(2, 2)), (0, 4, 6, 6)),
        "MaskedCouplingBlock": lambda: (rnn.MaskedCouplingBlock(4, _conditioner(4, 8)), (0, 4, 6, 6)),
        "ChannelCouplingBlock": lambda: (rnn.ChannelCouplingBlock(4, _conditioner(2, 4)), (0, 4, 6, 6)),
        "InvertibleConv2dLU": lambda: (rnn.InvertibleConv2dLU(4), (0, 4, 6, 6)),
    }


@pytest.mark.parametrize("name", list(_blocks()))
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_gives_empty_outputs(name, training):
    block, shape = _blocks()[name]()
    block.train(training)
    x = torch.randn(shape)
    y, logp = block(x, torch.zeros(0, 1))
    assert y.shape == x.shape and logp.shape == (0, 1)
    assert block(x).shape == x.shape
    back, logp_back = block.inverse(y, logp)
    assert back.shape == x.shape and logp_back.shape == (0, 1)


def test_empty_batch_through_residual_flow():
    flow = _flow()
    z, logp = flow(torch.rand(0, 1, 8, 8), torch.zeros(0, 1))
    assert z.shape == (0, 64) and logp.shape == (0, 1)
    x, logp_back = flow.eval().inverse(z, logp)
    assert x.shape == (0, 1, 8, 8) and logp_back.shape == (0, 1)


def test_empty_batch_through_squeeze():
    squeeze = rnn.SqueezeLayer(2)
    y = squeeze(torch.rand(0, 3, 8, 6))
    assert y.shape == (0, 12, 4, 3)  # pixel_unshuffle alone would return (0, 3, 8, 6)
    assert squeeze.inverse(y).shape == (0, 3, 8, 6)


# -- NaN / Inf inputs propagate -------------------------------------------------------------------


@pytest.mark.parametrize("value", [INF, -INF, NAN])
@pytest.mark.parametrize("neumann_grad", [True, False])
def test_non_finite_input_gives_non_finite_outputs_of_that_sample(value, neumann_grad):
    block = rnn.iResBlock(_mlp(), neumann_grad=neumann_grad).train()
    x = torch.randn(3, 4)
    x[1, 2] = value
    x.requires_grad_(True)
    _seed()
    y, logp = block(x, torch.zeros(3, 1))
    # the affected sample never looks finite; the others are untouched by it
    assert not torch.isfinite(y[1]).all() and not torch.isfinite(logp[1]).all()
    assert torch.isfinite(y[[0, 2]]).all() and torch.isfinite(logp[[0, 2]]).all()
    logp.sum().backward()
    assert not torch.isfinite(x.grad[1]).all()


def test_non_finite_input_in_eval_exact_determinant():
    block = rnn.iResBlock(_mlp(dim=2)).eval()
    x = torch.randn(3, 2)
    x[0, 1] = INF
    y, logp = block(x, torch.zeros(3, 1))
    assert not torch.isfinite(y[0]).all() and not torch.isfinite(logp[0]).all()
    assert torch.isfinite(logp[1:]).all()


def test_non_finite_input_through_residual_flow():
    flow = _flow().train()
    x = torch.rand(2, 1, 8, 8)
    x[0, 0, 3, 4] = INF
    _seed()
    z, logp = flow(x, torch.zeros(2, 1))
    assert not torch.isfinite(z[0]).all() and not torch.isfinite(logp[0]).all()
    assert torch.isfinite(z[1]).all() and torch.isfinite(logp[1]).all()


def test_non_finite_input_to_the_solvers_is_refused():
    # Fixed-point inverse and root solves cannot converge on NaN / Inf: a clear error instead.
    y = torch.randn(2, 4)
    y[0, 0] = INF
    with pytest.raises(ValueError, match="y contains NaN or Inf"):
        rnn.iResBlock(_mlp()).inverse(y)
    with pytest.raises(ValueError, match="input contains NaN or Inf"):
        rnn.ImplicitBlock(_mlp(seed=1), _mlp(seed=2))(y)


# -- integer, other-dtype and other-device inputs -------------------------------------------------

ENTRY_CASES = {
    "iResBlock": (lambda: rnn.iResBlock(_mlp()), (3, 4), "iResBlock"),
    "ImplicitBlock": (lambda: rnn.ImplicitBlock(_mlp(seed=1), _mlp(seed=2)), (3, 4), "ImplicitBlock.forward"),
    "CouplingBlock": (lambda: rnn.CouplingBlock(4, _conditioner(2, 4)), (2, 4, 6, 6), "CouplingBlock"),
    "MaskedCouplingBlock": (lambda: rnn.MaskedCouplingBlock(4, _conditioner(4, 8)), (2, 4, 6, 6),
                            "MaskedCouplingBlock"),
    "InvertibleConv2dLU": (lambda: rnn.InvertibleConv2dLU(4), (2, 4, 6, 6), "InvertibleConv2dLU"),
    "ResidualFlow": (_flow, (2, 1, 8, 8), "iResBlock"),  # named by its first block, which refuses it
}


@pytest.mark.parametrize("name", list(ENTRY_CASES))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input_is_a_type_error(name, dtype):
    make, shape, owner = ENTRY_CASES[name]
    x = torch.ones(shape, dtype=dtype)
    with pytest.raises(TypeError, match=rf"{owner}: expected x to have a floating-point dtype \(torch.float32, "
                                        rf"torch.float64, torch.float16 or torch.bfloat16\), but got {dtype}"):
        make()(x, torch.zeros(shape[0], 1))


def test_integer_input_to_inverse_is_a_type_error():
    with pytest.raises(TypeError, match=r"iResBlock.inverse: expected y to have a floating-point dtype"):
        rnn.iResBlock(_mlp()).inverse(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"ImplicitBlock.inverse: expected z to have a floating-point dtype"):
        rnn.ImplicitBlock(_mlp(seed=1), _mlp(seed=2)).inverse(torch.ones(2, 4, dtype=torch.int64))


@pytest.mark.parametrize("name", list(ENTRY_CASES))
def test_float64_input_to_a_float32_module_is_a_type_error(name):
    make, shape, owner = ENTRY_CASES[name]
    with pytest.raises(TypeError, match=rf"{owner}: expected x to have the dtype of the parameters \(torch.float32\), "
                                        rf"but got torch.float64"):
        make()(torch.rand(shape, dtype=torch.float64), torch.zeros(shape[0], 1))


def test_float64_module_takes_float64_input():
    block = rnn.iResBlock(_mlp()).double()
    _seed()
    y, logp = block(torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64))
    assert y.dtype == logp.dtype == torch.float64


def test_16_bit_input_is_accepted_under_autocast_only():
    # Under autocast the products run in the autocast dtype: a 16-bit input is the documented exception.
    block = rnn.iResBlock(_mlp())
    x = torch.randn(3, 4).bfloat16()
    with pytest.raises(TypeError, match=r"expected x to have the dtype of the parameters \(torch.float32\), but got "
                                        r"torch.bfloat16"):
        block(x, torch.zeros(3, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _seed()
        y, logp = block(x, torch.zeros(3, 1))
    assert y.shape == x.shape and torch.isfinite(logp).all()


@pytest.mark.parametrize("name", list(ENTRY_CASES))
def test_input_on_another_device_is_a_value_error(name):
    # The meta device stands in for a second device: the check runs before any computation.
    make, shape, owner = ENTRY_CASES[name]
    with pytest.raises(ValueError, match=rf"{owner}: expected x on the device of the parameters \(cpu\), "
                                         rf"but got meta"):
        make()(torch.empty(shape, device="meta"), torch.zeros(shape[0], 1))


# -- channels_last images -------------------------------------------------------------------------

# Same operators on the same values; only the order of the convolutions' inner sums may differ
# between the two layouts, so float32 rounding: the default float32 tolerances of assert_close for
# single layers, and 1e-4 relative for the log-det, a sum of series terms that each carry such rounding.
SERIES_TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [
    lambda: rnn.SpectralNormConv2d(3, 5, 3, 1, 1, n_iterations=3),
    lambda: rnn.InducedNormConv2d(3, 5, 3, 1, 1, n_iterations=3),
    lambda: rnn.InducedNormConv2d(3, 5, 1, 1, 0, n_iterations=3),
    lambda: rnn.LopConv2d(3, 5, 3, 1, 1, domain=1, codomain=2),
], ids=["SpectralNormConv2d", "InducedNormConv2d", "InducedNormConv2d-1x1", "LopConv2d"])
def test_channels_last_into_conv_layers_equals_contiguous(make):
    torch.manual_seed(0)
    layer = make().eval()
    x = torch.randn(2, 3, 6, 7)
    layer(x)  # the first forward fixes the operator's input size
    expected = layer(x)
    got = layer(x.contiguous(memory_format=torch.channels_last))
    assert_close(got, expected)


@pytest.mark.parametrize("training", [True, False])
def test_channels_last_into_a_conv_block_equals_contiguous(training):
    block = rnn.iResBlock(_cnn(channels=3)).train(training)
    x = torch.randn(2, 3, 6, 6)
    outs = []
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        _seed()
        outs.append(block(inp, torch.zeros(2, 1)))
    assert_close(outs[1][0], outs[0][0])
    assert_close(outs[1][1], outs[0][1], **SERIES_TOL)


@pytest.mark.parametrize("kwargs", [dict(block_type="resblock"),
                                    dict(block_type="coupling", init_layer=rnn.LogitTransform(0.05))],
                         ids=["resblock", "coupling"])
def test_channels_last_into_residual_flow_equals_contiguous(kwargs):
    flow = _flow(**kwargs).train()
    x = torch.rand(2, 1, 8, 8)
    flow(x, torch.zeros(2, 1))  # lazy initialisation of the convolutions, then both runs from the same state
    outs = []
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        _seed()
        outs.append(flow(inp, torch.zeros(2, 1)))
    assert_close(outs[1][0], outs[0][0], **SERIES_TOL)
    assert_close(outs[1][1], outs[0][1], **SERIES_TOL)


# -- constructor arguments ------------------------------------------------------------------------

LIPSCHITZ_LAYERS = {
    "SpectralNormLinear": lambda c: rnn.SpectralNormLinear(3, 2, coeff=c),
    "InducedNormLinear": lambda c: rnn.InducedNormLinear(3, 2, coeff=c),
    "SpectralNormConv2d": lambda c: rnn.SpectralNormConv2d(3, 2, 3, 1, 1, coeff=c),
    "InducedNormConv2d": lambda c: rnn.InducedNormConv2d(3, 2, 3, 1, 1, coeff=c),
    "LopLinear": lambda c: rnn.LopLinear(3, 2, coeff=c, domain=2, codomain=INF),
    "LopConv2d": lambda c: rnn.LopConv2d(3, 2, 3, 1, 1, coeff=c, domain=2, codomain=INF),
    "get_linear": lambda c: rnn.get_linear(3, 2, coeff=c, domain=2, codomain=2),
    "get_conv2d": lambda c: rnn.get_conv2d(3, 2, 3, 1, 1, coeff=c, domain=2, codomain=2),
    "get_linear-lop": lambda c: rnn.get_linear(3, 2, coeff=c, domain=1, codomain=2),
}


@pytest.mark.parametrize("name", list(LIPSCHITZ_LAYERS) + ["get_conv2d-default-norms"])
@pytest.mark.parametrize("coeff", [0, 0.0, -0.5, NAN, -INF])
def test_non_positive_coeff_is_refused(name, coeff):
    make = LIPSCHITZ_LAYERS.get(name, lambda c: rnn.get_conv2d(3, 2, 3, 1, 1, coeff=c))
    with pytest.raises(ValueError, match=rf"coeff must be > 0 \(the Lipschitz bound of the layer\), got {coeff}"):
        make(coeff)


@pytest.mark.parametrize("name", list(LIPSCHITZ_LAYERS))
def test_positive_coeff_is_kept(name):
    assert LIPSCHITZ_LAYERS[name](0.5).coeff == 0.5


def test_factories_without_norm_orders_name_domain():
    # get_linear / get_conv2d default to domain=None (as the reference): not a norm order
    with pytest.raises(ValueError, match=r"domain must be a norm order >= 1 \(or inf\), got None"):
        rnn.get_conv2d(3, 2, 3, 1, 1)
    with pytest.raises(ValueError, match=r"domain must be a norm order >= 1 \(or inf\), got None"):
        rnn.get_linear(3, 2)


@pytest.mark.parametrize("cls,args", [(rnn.InducedNormLinear, (3, 2)), (rnn.InducedNormConv2d, (3, 2, 3, 1, 1))])
@pytest.mark.parametrize("norm", ["domain", "codomain"])
@pytest.mark.parametrize("value", [None, 0.5, NAN, "2"])
def test_bad_norm_orders_are_refused(cls, args, norm, value):
    with pytest.raises(ValueError, match=rf"{norm} must be a norm order >= 1 \(or inf\), got {value!r}"):
        cls(*args, **{norm: value})


BLOCKS = {"iResBlock": lambda **kw: rnn.iResBlock(_mlp(), **kw),
          "ImplicitBlock": lambda **kw: rnn.ImplicitBlock(_mlp(seed=1), _mlp(seed=2), **kw)}


@pytest.mark.parametrize("owner", list(BLOCKS))
@pytest.mark.parametrize("kwargs,match", [
    (dict(geom_p=0), r"expected geom_p in \(0, 1\), but got 0"),
    (dict(geom_p=-0.5), r"expected geom_p in \(0, 1\), but got -0.5"),
    (dict(geom_p=1), r"expected geom_p in \(0, 1\), but got 1"),
    (dict(geom_p=1.5), r"expected geom_p in \(0, 1\), but got 1.5"),
    (dict(geom_p=NAN), r"expected geom_p in \(0, 1\), but got nan"),
    (dict(geom_p="0.5"), r"expected geom_p in \(0, 1\), but got '0.5'"),
    (dict(lamb=0.0), r"expected lamb > 0 and finite, but got 0.0"),
    (dict(lamb=INF), r"expected lamb > 0 and finite, but got inf"),
    (dict(lamb=NAN), r"expected lamb > 0 and finite, but got nan"),
    (dict(n_dist="normal"), r"expected n_dist to be one of \('geometric', 'poisson'\), but got 'normal'"),
    (dict(n_samples=0), r"expected n_samples to be an integer >= 1, but got 0"),
    (dict(n_samples=True), r"expected n_samples to be an integer >= 1, but got True"),
    (dict(n_exact_terms=-1), r"expected n_exact_terms to be an integer >= 0, but got -1"),
    (dict(n_power_series=0), r"expected n_power_series to be None or an integer >= 1, but got 0"),
])
def test_bad_estimator_arguments_are_refused(owner, kwargs, match):
    with pytest.raises(ValueError, match=f"{owner}: {match}"):
        BLOCKS[owner](**kwargs)


@pytest.mark.parametrize("kwargs,name", [
    (dict(inverse_atol=-1e-5), "inverse_atol"), (dict(inverse_atol=0.0), "inverse_atol"),
    (dict(inverse_rtol=NAN), "inverse_rtol"), (dict(inverse_rtol=INF), "inverse_rtol"),
])
def test_bad_inverse_tolerances_are_refused(kwargs, name):
    value = next(iter(kwargs.values()))
    with pytest.raises(ValueError, match=rf"iResBlock: expected {name} to be a finite number > 0, but got {value!r}"):
        rnn.iResBlock(_mlp(), **kwargs)


@pytest.mark.parametrize("name", ["eps_forward", "eps_backward", "eps_sample"])
def test_bad_solver_tolerances_are_refused(name):
    with pytest.raises(ValueError, match=rf"ImplicitBlock: expected {name} to be a finite number > 0, but got -1.0"):
        rnn.ImplicitBlock(_mlp(seed=1), _mlp(seed=2), **{name: -1.0})


def test_valid_estimator_arguments_are_kept():
    block = rnn.iResBlock(_mlp(), geom_p=0.3, lamb=3.0, inverse_atol=1e-8, inverse_rtol=1e-7)
    # geom_p is stored as its logit, in float64 (the reference's parameter)
    assert math.isclose(torch.sigmoid(block.geom_p).item(), 0.3, rel_tol=1e-12)
    assert block.inverse_atol == 1e-8 and block.inverse_rtol == 1e-7
