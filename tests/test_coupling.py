"""Coupling flows (resflow_cuda.nn.coupling) and ResidualFlow(block_type='coupling').

- every layer and mask type: log-det against a brute-force Jacobian (float64), round trips, the
  log-density conventions, the formulas and masks written out by hand;
- the reference: tests/data/reference_coupling_small.pt was made by running rtqichen/residual-flows
  (commit 8170138c) itself on torch 2.13 CPU in float64, with tests/data/make_reference_coupling.py
  (``python make_reference_coupling.py REFERENCE_DIR OUT``, REFERENCE_DIR holding the extracted
  ``resflows/`` package). Recipe: for each model of ``MODELS`` below, ``torch.manual_seed(0)``,
  ``ResidualFlow(shape, block_type='coupling', **kwargs).double()`` (``init_layer`` a
  ``LogitTransform(0.05)``), ``x`` from ``torch.Generator().manual_seed(1)`` (``randn``, or ``rand``
  scaled to [0.05, 0.95]), one training-mode forward under ``torch.manual_seed(2)`` (ActNorm and
  MovingBatchNorm state), then it stores the state_dict, eval outputs ``z, delta`` of
  ``model(x, zeros)`` and ``model.inverse(z, delta)``, and, in training mode after
  ``torch.manual_seed(5)`` (dropout draws), the outputs and the gradients of
  ``mean(|z|²/2 + delta)`` with respect to every parameter and ``x``. For each layer of ``LAYERS``
  (CouplingBlock, ChannelCouplingBlock, MaskedCouplingBlock incl. odd H / W and a channel mask)
  after ``torch.manual_seed(seed)`` with a small ELU network, it stores the state_dict, the forward
  with ``logpx``, the inverse of its output, and the gradients of
  ``(Σ y² + Σ sin y) / 2 + Σ logpy``. All tensors share one storage per dtype (file size);
- normflows 1.7.3 on shared weights: MaskedAffineFlow (Real NVP, NICE), AffineCouplingBlock
  (sigmoid_inv / exp / no scale, channel and channel_inv splits), Invertible1x1Conv(use_lu=True);
- errors, and the whole coupling ResidualFlow: module order, exact log-density against a
  brute-force Jacobian of the flattened model, a training step.
"""

from __future__ import annotations

from pathlib import Path

import normflows as nf
import pytest
import torch
from jacobians import brute_logdet
from torch import nn

from resflow_cuda import models
from resflow_cuda import nn as rnn
from resflow_cuda.nn import (AdditiveCoupling, AffineCoupling, ChannelCouplingBlock, CouplingBlock, InvertibleConv2dLU,
                             LogitTransform, MaskedCouplingBlock, coupling_mask)

FIXTURE = Path(__file__).resolve().parent / "data" / "reference_coupling_small.pt"
F64 = torch.float64

MODELS = {
    "channel": (dict(n_blocks=[2, 1], intermediate_dim=4, factor_out=True, quadratic=True, actnorm=True,
                     batchnorm=True, fc_end=True, fc_idim=4, activation_fn="swish", kernels="3-1-3"), (2, 2, 8, 8)),
    "checkerboard": (dict(n_blocks=[2, 1], intermediate_dim=4, factor_out=True, init_layer="logit", preact=True,
                          first_resblock=True, actnorm=True, fc_actnorm=True, fc_end=True, fc_idim=4, kernels="3-3",
                          activation_fn="softplus", dropout=0.2), (2, 1, 8, 8)),
}
LAYERS = {  # name: (class, dim, swap / mask type, network (in, out), input shape)
    "coupling_swap0": (CouplingBlock, 6, False, (3, 6), (5, 6)),
    "coupling_swap1": (CouplingBlock, 6, True, (3, 6), (5, 6)),
    "channel0": (ChannelCouplingBlock, 4, "channel0", (2, 4), (2, 4, 3, 3)),
    "channel1": (ChannelCouplingBlock, 4, "channel1", (2, 4), (2, 4, 3, 3)),
    "checkerboard0": (MaskedCouplingBlock, 3, "checkerboard0", (3, 6), (2, 3, 3, 5)),
    "checkerboard1": (MaskedCouplingBlock, 3, "checkerboard1", (3, 6), (2, 3, 3, 5)),
    "masked_channel1": (MaskedCouplingBlock, 4, "channel1", (4, 8), (2, 4, 3, 4)),
}


def _net(n_in: int, n_out: int, flat: bool, hidden: int = 6) -> nn.Module:
    if flat:
        return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)).double()
    return nn.Sequential(nn.Conv2d(n_in, hidden, 3, 1, 1), nn.Tanh(), nn.Conv2d(hidden, n_out, 1)).double()


def _check_flow(layer, x, atol=1e-10):
    """forward's log-det = brute force, inverse undoes forward and gives the log-density back,
    the outputs without logp are the same and the log-densities have shape (B, 1)."""
    logp = torch.randn(x.shape[0], 1, dtype=x.dtype)
    y, logpy = layer(x, logp)
    assert logpy.shape == (x.shape[0], 1)
    torch.testing.assert_close(layer(x), y)  # the same ops without logp: equal
    # float64, no iteration: slogdet (LU) of the n x n Jacobian and closed-form inverses err by ~n*cond*2^-53 <= 1e-13
    # (n*cond <= 1e3 here); atol / rtol keep 100x and still fail on float32 rounding (2^-24 ~ 6e-8).
    torch.testing.assert_close(logp - logpy, brute_logdet(layer, x), atol=atol, rtol=1e-8)
    x2, logp2 = layer.inverse(y, logpy)
    torch.testing.assert_close(x2, x, atol=atol, rtol=1e-8)
    torch.testing.assert_close(logp2, logp, atol=atol, rtol=1e-8)
    torch.testing.assert_close(layer.inverse(y), x2)  # the same ops without logp: equal
    return y, logp - logpy


# -- masks and formulas -----------------------------------------------------------------------------

def test_masks_are_the_reference_patterns_on_the_inputs_device_and_dtype():
    x = torch.zeros(2, 3, 3, 5, dtype=F64)
    even = torch.tensor([[1, 0, 1, 0, 1], [0, 1, 0, 1, 0], [1, 0, 1, 0, 1]], dtype=F64)
    # exact 0 / 1 values: equal
    torch.testing.assert_close(coupling_mask(x, "checkerboard0"), even.view(1, 1, 3, 5))
    torch.testing.assert_close(coupling_mask(x, "checkerboard1"), (1 - even).view(1, 1, 3, 5))
    x = torch.zeros(2, 4, 2, 2, dtype=torch.float16)
    assert coupling_mask(x, "channel0").flatten().tolist() == [1, 1, 0, 0]
    assert coupling_mask(x, "channel1").flatten().tolist() == [0, 0, 1, 1]
    assert coupling_mask(x, "channel0").dtype == torch.float16
    meta = torch.empty(2, 4, 6, 7, device="meta")  # built where x lives: no CPU tensor involved
    for mask_type in ("channel0", "channel1", "checkerboard0", "checkerboard1"):
        assert coupling_mask(meta, mask_type).device.type == "meta"


@pytest.mark.parametrize("mask_type", ["channel0", "channel1"])
def test_affine_channel_coupling_is_the_real_nvp_formula(mask_type):
    net = _net(2, 4, flat=False)
    layer = AffineCoupling(4, net, mask_type)
    x = torch.randn(3, 4, 2, 3, dtype=F64)
    kept, changed = (slice(0, 2), slice(2, 4)) if mask_type == "channel0" else (slice(2, 4), slice(0, 2))
    f = net(x[:, kept])
    scale = torch.sigmoid(f[:, :2] + 2)
    y, delta = layer(x, torch.zeros(3, 1, dtype=F64))
    torch.testing.assert_close(y[:, kept], x[:, kept], atol=0, rtol=0)  # passed through untouched: bit-exact
    # float64, the same formulas (sums of <= 12 log-scales) in another order: ~1e-15; the default 1e-7 is loose,
    # but a wrong mask, split or scale errs by O(1)
    torch.testing.assert_close(y[:, changed], x[:, changed] * scale + f[:, 2:])
    torch.testing.assert_close(-delta, scale.log().sum((1, 2, 3)).unsqueeze(1))
    layer_exp = AffineCoupling(4, net, mask_type, scale_fn="exp")
    torch.testing.assert_close(layer_exp(x)[:, changed], x[:, changed] * f[:, :2].exp() + f[:, 2:])


@pytest.mark.parametrize("mask_type", ["checkerboard0", "checkerboard1"])
def test_checkerboard_couplings_keep_the_masked_positions_and_condition_on_them(mask_type):
    x = torch.randn(2, 3, 3, 5, dtype=F64)
    b = coupling_mask(x, mask_type)
    additive_net = _net(3, 3, flat=False)
    layer = AdditiveCoupling(3, additive_net, mask_type)
    y = layer(x)
    torch.testing.assert_close(y * b, x * b, atol=0, rtol=0)  # b is exactly 0 / 1: kept entries are bit-exact
    # float64, the same shift up to rounding (~1e-15); a shift conditioned on the wrong positions errs by O(1)
    torch.testing.assert_close(y * (1 - b), (x + additive_net(b * x)) * (1 - b))
    # changing the transformed positions does not change the shift: the Jacobian is triangular
    x2 = x + (1 - b) * torch.randn_like(x)
    torch.testing.assert_close(layer(x2) - x2, y - x)  # the same shift up to an ulp of x


@pytest.mark.parametrize("layer_kind", ["affine_sigmoid", "affine_exp", "additive"])
@pytest.mark.parametrize("mask_type,shape", [("channel0", (3, 6)), ("channel1", (3, 6)), ("channel0", (2, 4, 3, 2)),
                                             ("channel1", (2, 4, 2, 3)), ("checkerboard0", (2, 2, 3, 5)),
                                             ("checkerboard1", (2, 3, 4, 3))])
def test_coupling_logdet_is_exact_and_inverse_undoes_forward(layer_kind, mask_type, shape):
    c, flat = shape[1], len(shape) == 2
    channel = mask_type.startswith("channel")
    n_in = c // 2 if channel else c
    n_out = (c // 2 if channel else c) * (1 if layer_kind == "additive" else 2)
    net = _net(n_in, n_out, flat)
    if layer_kind == "additive":
        layer = AdditiveCoupling(c, net, mask_type)
    else:
        layer = AffineCoupling(c, net, mask_type, scale_fn=layer_kind.split("_")[1])
    x = torch.randn(shape, dtype=F64) * 2
    y, logdet = _check_flow(layer, x)
    if layer_kind == "additive":
        torch.testing.assert_close(logdet, torch.zeros_like(logdet), atol=0, rtol=0)  # logp is returned as is
    else:
        assert logdet.abs().min() > 1e-3  # a real scale, not the identity


@pytest.mark.parametrize("layer", ["coupling0", "coupling1", "channel0", "channel1", "checkerboard0", "checkerboard1",
                                   "masked_channel0"])
def test_reference_blocks_logdet_is_exact_and_inverse_undoes_forward(layer):
    if layer.startswith("coupling"):
        module, x = CouplingBlock(4, _net(2, 4, True), swap=layer.endswith("1")), torch.randn(3, 4, dtype=F64)
    elif layer.startswith("channel"):
        module, x = ChannelCouplingBlock(4, _net(2, 4, False), layer), torch.randn(2, 4, 3, 2, dtype=F64)
    else:
        mask = layer.removeprefix("masked_")
        module, x = MaskedCouplingBlock(2, _net(2, 4, False), mask), torch.randn(2, 2, 3, 3, dtype=F64)
    _check_flow(module, x)


@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (4, 5)])
def test_lu_conv_logdet_is_exact_and_inverse_undoes_forward(shape):
    layer = InvertibleConv2dLU(shape[1]).double()
    with torch.no_grad():  # away from the orthogonal initialisation, whose log-det is 0
        layer.log_S.add_(torch.randn(shape[1], dtype=F64) * 0.3)
        layer.U.add_(torch.randn_like(layer.U))
        layer.L.add_(torch.randn_like(layer.L))
    _, logdet = _check_flow(layer, torch.randn(shape, dtype=F64))
    positions = shape[2] * shape[3] if len(shape) == 4 else 1
    # the same sum of log_S up to rounding (~1e-15); a missing position factor errs by O(1)
    torch.testing.assert_close(logdet, (layer.log_S.sum() * positions).expand(shape[0], 1).detach())


def test_lu_conv_is_initialised_orthogonal_with_the_lu_structure():
    layer = InvertibleConv2dLU(5).double()
    w = layer.weight
    torch.testing.assert_close(w @ w.t(), torch.eye(5, dtype=F64), atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.log_S.sum(), torch.tensor(0.0, dtype=F64), atol=1e-6, rtol=0)
    assert sorted(layer.P.sum(0).tolist()) == [1.0] * 5 and set(layer.P.flatten().tolist()) == {0.0, 1.0}
    assert set(layer.sign_S.tolist()) <= {-1.0, 1.0}
    assert sorted(layer.state_dict()) == ["L", "P", "U", "log_S", "sign_S"]
    assert {n for n, _ in layer.named_parameters()} == {"L", "U", "log_S"}
    # float64 inverse of a 5 x 5 orthogonal matrix: ~5*2^-53 (default 1e-7 is loose; a wrong inverse errs by O(1))
    torch.testing.assert_close(layer.inverse_weight() @ w, torch.eye(5, dtype=F64))
    # only the strict triangles of L and U are used
    with torch.no_grad():
        layer.L.add_(torch.triu(torch.randn(5, 5, dtype=F64)))
        layer.U.add_(torch.tril(torch.randn(5, 5, dtype=F64)))
    torch.testing.assert_close(layer.weight, w)  # the same ops on the same (masked) values: equal


def test_logp_conventions():
    layer = AffineCoupling(4, _net(2, 4, True), "channel1")
    x, logp = torch.randn(3, 4, dtype=F64), torch.randn(3, 1, dtype=F64)
    assert isinstance(layer(x), torch.Tensor) and isinstance(layer.inverse(x), torch.Tensor)
    y, logpy = layer(x, logp)
    x2, logpx = layer.inverse(y, logpy)
    assert logpy.shape == logpx.shape == (3, 1)
    assert (logpy > logp).all()  # sigmoid(s + 2) < 1: log-det < 0, so logpx - logdet > logpx
    additive = AdditiveCoupling(4, _net(2, 2, True), "channel0")
    assert additive(x, logp)[1] is logp and additive.inverse(x, logp)[1] is logp


# -- the reference ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE)


def _named_grads(module, loss, x):
    named = dict(module.named_parameters())
    names = sorted(named)
    grads = torch.autograd.grad(loss, [named[n] for n in names] + [x])
    return dict(zip(names, grads[:-1])), grads[-1]


@pytest.mark.parity
@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_match_the_reference(reference, name):
    ref = reference["layers"][name]
    cls, dim, option, (n_in, n_out), shape = LAYERS[name]
    flat = len(shape) == 2
    torch.manual_seed(1234)  # other initial weights: everything must come from the state_dict
    net = (nn.Sequential(nn.Linear(n_in, 4), nn.ELU(), nn.Linear(4, n_out)) if flat else
           nn.Sequential(nn.Conv2d(n_in, 4, 3, 1, 1), nn.ELU(), nn.Conv2d(4, n_out, 1)))
    layer = (cls(dim, net, swap=option) if cls is CouplingBlock else cls(dim, net, mask_type=option)).double()
    assert list(layer.state_dict()) == list(ref["state_dict"])
    layer.load_state_dict(ref["state_dict"])
    x = ref["x"].clone().requires_grad_(True)
    y, logpy = layer(x, ref["logpx"])
    # float64 against residual-flows' own run on another machine: the same ops up to the order of <= 36-term dot
    # products and libm ulps, ~1e-14 relative on these O(1) values; 1e-12 keeps 100x, 5e4 below float32 rounding.
    torch.testing.assert_close(y.detach(), ref["y"], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(logpy.detach(), ref["logpy"], atol=1e-12, rtol=1e-12)
    x_inv, logpx_inv = layer.inverse(ref["y"], ref["logpy"])
    torch.testing.assert_close(x_inv.detach(), ref["x_inv"], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(logpx_inv.detach(), ref["logpx_inv"], atol=1e-12, rtol=1e-12)
    loss = (y.pow(2).sum() + y.sin().sum()) / 2 + logpy.sum()
    grads, x_grad = _named_grads(layer, loss, x)
    assert sorted(grads) == sorted(ref["grads"])
    # gradients (<= 20) add up to ~100 products over the batch and positions in another order as well: ~1e-13
    for key, grad in grads.items():
        torch.testing.assert_close(grad, ref["grads"][key], atol=1e-11, rtol=1e-10, msg=key)
    torch.testing.assert_close(x_grad, ref["x_grad"], atol=1e-11, rtol=1e-10)


def _model(name, seed=1234):
    kwargs, shape = MODELS[name]
    kwargs = dict(kwargs)
    if kwargs.get("init_layer") == "logit":
        kwargs["init_layer"] = LogitTransform(0.05)
    torch.manual_seed(seed)
    return models.ResidualFlow(shape, block_type="coupling", **kwargs).double()


@pytest.mark.parity
@pytest.mark.parametrize("name", list(MODELS))
def test_models_load_the_reference_state_dict_and_match_outputs_and_gradients(reference, name):
    ref = reference["models"][name]
    model = _model(name)
    assert list(model.state_dict()) == list(ref["state_dict"])  # same keys in the same order
    model.load_state_dict(ref["state_dict"])  # strict
    x = ref["x"]
    zeros = torch.zeros(x.shape[0], 1, dtype=F64)
    model.eval()
    with torch.no_grad():
        z, delta = model(x, zeros)
        x_inv, logp_inv = model.inverse(ref["z"], ref["delta"])
    # As for the layers, through ~20 layers: ~20*36*2^-53 ~ 1e-13 relative; the log-dets (|delta| <= 150) add <= 64
    # log terms per layer in another order, ~64*2^-53*|delta| ~ 1e-12: under atol 1e-11, also for logp_inv ~ 0.
    torch.testing.assert_close(z, ref["z"], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(delta, ref["delta"], atol=1e-11, rtol=1e-12)
    torch.testing.assert_close(x_inv, ref["x_inv"], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(logp_inv, ref["logp_inv"], atol=1e-11, rtol=0)
    model.train()
    torch.manual_seed(5)
    xr = x.clone().requires_grad_(True)
    z, delta = model(xr, zeros)
    torch.testing.assert_close(z.detach(), ref["z_train"], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(delta.detach(), ref["delta_train"], atol=1e-11, rtol=1e-12)
    loss = (0.5 * z.pow(2).sum(1) + delta.squeeze(1)).mean()
    grads, x_grad = _named_grads(model, loss, xr)
    assert sorted(grads) == sorted(ref["grads"])
    for key, grad in grads.items():  # |grad| <= 120: ~1e-13 relative as above, atol for entries near 0
        torch.testing.assert_close(grad, ref["grads"][key], atol=1e-11, rtol=1e-10, msg=key)
    torch.testing.assert_close(x_grad, ref["x_grad"], atol=1e-11, rtol=1e-10)


# -- normflows --------------------------------------------------------------------------------------

class _ScaleShift(nn.Module):
    """Our conditioner layout (s then t along dim 1) from normflows-style separate s and t nets,
    optionally fed the full-size masked input rebuilt from the kept half (channel masks)."""

    def __init__(self, s, t, keep_first=None, half=None):
        super().__init__()
        self.s, self.t, self.keep_first, self.half = s, t, keep_first, half

    def forward(self, h):
        if self.keep_first is None:
            return torch.cat([self.s(h), self.t(h)], 1) if self.s is not None else self.t(h)
        pad = torch.zeros_like(h)
        full = torch.cat([h, pad] if self.keep_first else [pad, h], 1)
        part = slice(self.half, None) if self.keep_first else slice(0, self.half)
        out = [self.t(full)[:, part]]
        if self.s is not None:
            out.insert(0, self.s(full)[:, part])
        return torch.cat(out, 1)


@pytest.mark.parity
@pytest.mark.parametrize("case", ["checkerboard0", "checkerboard1", "channel0", "channel1"])
@pytest.mark.parametrize("additive", [False, True])
def test_masked_affine_flow_of_normflows(case, additive):
    if case.startswith("checkerboard"):
        x = torch.randn(3, 2, 4, 5, dtype=F64)
        s, t = _net(2, 2, False), _net(2, 2, False)
        keep_first = None
    else:
        x = torch.randn(3, 6, dtype=F64)
        s, t = _net(6, 6, True), _net(6, 6, True)
        keep_first = case == "channel0"
    b = coupling_mask(x, case)[0].expand(x.shape[1:]).clone()
    theirs = nf.flows.MaskedAffineFlow(b, t, None if additive else s)
    nnet = _ScaleShift(None if additive else s, t, keep_first, x.shape[1] // 2)
    ours = AdditiveCoupling(x.shape[1], nnet, case) if additive else AffineCoupling(x.shape[1], nnet, case, "exp")
    zeros = torch.zeros(3, 1, dtype=F64)
    y, logpy = ours(x, zeros)
    y_nf, logdet_nf = theirs(x)
    # float64, the same nets on the same masked inputs: x e^s + t up to an ulp, sums of <= 40 log-scales in another
    # order (<= 40*2^-53*sum|s| ~ 4e-14, sum|s| < 8 here); 1e-12 holds, 5e4 below float32 rounding (2^-24 ~ 6e-8).
    tol = dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y, y_nf, **tol)
    torch.testing.assert_close(-logpy.squeeze(1), logdet_nf if not additive else torch.zeros(3, dtype=F64), **tol)
    x_back, logpx = ours.inverse(y, zeros)
    x_nf, logdet_inv_nf = theirs.inverse(y_nf)
    torch.testing.assert_close(x_back, x_nf, **tol)
    # ours: logpy + log|det J_forward|; normflows: log|det J_inverse| = -log|det J_forward|
    torch.testing.assert_close(-logpx.squeeze(1), logdet_inv_nf if not additive else torch.zeros(3, dtype=F64),
                               **tol)


class _Interleave(nn.Module):
    """normflows' AffineCoupling reads shift = param[:, 0::2], scale = param[:, 1::2]."""

    def __init__(self, nnet, d):
        super().__init__()
        self.nnet, self.d = nnet, d

    def forward(self, h):
        f = self.nnet(h)
        s, t = f[:, :self.d], f[:, self.d:]
        return torch.stack([t, s], 2).flatten(1, 2)


@pytest.mark.parity
@pytest.mark.parametrize("split", ["channel", "channel_inv"])
@pytest.mark.parametrize("scale_map", ["sigmoid_inv", "exp", None])
def test_affine_coupling_block_of_normflows(split, scale_map):
    x = torch.randn(2, 4, 3, 3, dtype=F64)
    mask = "channel0" if split == "channel" else "channel1"
    if scale_map is None:
        net = _net(2, 2, False)
        ours = AdditiveCoupling(4, net, mask)
        theirs = nf.flows.AffineCouplingBlock(net, scale=False, split_mode=split)
    else:
        net = _net(2, 4, False)
        scale_fn = "sigmoid" if scale_map == "sigmoid_inv" else "exp"
        ours = ChannelCouplingBlock(4, net, mask) if scale_fn == "sigmoid" else AffineCoupling(4, net, mask, "exp")
        theirs = nf.flows.AffineCouplingBlock(_Interleave(net, 2), scale_map=scale_map, split_mode=split)
    zeros = torch.zeros(2, 1, dtype=F64)
    y, logpy = ours(x, zeros)
    y_nf, logdet_nf = theirs(x)
    # float64, the same net: the affine map up to an ulp, sums of 18 log-scales in another order (<= 18*2^-53*sum|log s|
    # ~ 1e-14, sum|log s| < 5 here); 1e-12 holds, 5e4 below float32 rounding (2^-24 ~ 6e-8).
    tol = dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y, y_nf, **tol)
    torch.testing.assert_close(-logpy.squeeze(1), logdet_nf, **tol)
    x_back, logpx = ours.inverse(y, zeros)
    x_nf, logdet_inv_nf = theirs.inverse(y)
    torch.testing.assert_close(x_back, x_nf, **tol)
    torch.testing.assert_close(-logpx.squeeze(1), logdet_inv_nf, **tol)


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore:torch.lu is deprecated")
def test_lu_conv_matches_normflows_invertible_1x1_conv():
    theirs = nf.flows.Invertible1x1Conv(5, use_lu=True).double()
    with torch.no_grad():
        theirs.log_S.add_(torch.randn(5, dtype=F64) * 0.3)
        theirs.U.add_(torch.randn(5, 5, dtype=F64))
    ours = InvertibleConv2dLU(5).double()
    ours.load_state_dict({k: getattr(theirs, k).detach().clone() for k in ("P", "L", "U", "sign_S", "log_S")})
    x = torch.randn(2, 5, 3, 4, dtype=F64)
    zeros = torch.zeros(2, 1, dtype=F64)
    # normflows' inverse applies W = P L U (our forward); its forward applies W⁻¹ (our inverse)
    y, logpy = ours(x, zeros)
    y_nf, logdet_nf = theirs.inverse(x)
    # float64 5 x 5 products and inverses in another order: ~5*cond(W)*2^-53*|x| ~ 1e-13 (cond(W) ~ 80, |x| < 3),
    # gradients sums of 24 positions: ~1e-14 relative; 1e-12 holds, 5e4 below float32 rounding (2^-24 ~ 6e-8).
    tol = dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y, y_nf, **tol)
    torch.testing.assert_close(-logpy, logdet_nf.expand(2, 1), **tol)
    x_back, logpx = ours.inverse(x, zeros)
    x_nf, logdet_inv_nf = theirs(x)
    torch.testing.assert_close(x_back, x_nf, **tol)
    torch.testing.assert_close(-logpx, logdet_inv_nf.expand(2, 1), **tol)
    loss = (y.sin().sum() - logpy.sum())
    loss_nf = (y_nf.sin().sum() + logdet_nf * 2)
    for name, g, g_nf in zip(("L", "U", "log_S"), torch.autograd.grad(loss, [ours.L, ours.U, ours.log_S]),
                             torch.autograd.grad(loss_nf, [theirs.L, theirs.U, theirs.log_S])):
        torch.testing.assert_close(g, g_nf, msg=name, **tol)


# -- errors -----------------------------------------------------------------------------------------

def test_bad_arguments_and_inputs_are_refused():
    with pytest.raises(ValueError, match=r"dim: a channel mask .* even .* got 3"):
        AffineCoupling(3, _net(1, 2, True), "channel0")
    with pytest.raises(ValueError, match=r"dim: .* even .* got 5"):
        CouplingBlock(5, _net(2, 4, True))
    with pytest.raises(ValueError, match=r"dim: .* even .* got 3"):
        AdditiveCoupling(3, _net(1, 1, True), "channel1")
    for make in (lambda: AffineCoupling(4, _net(2, 4, True), "diagonal"),
                 lambda: AdditiveCoupling(4, _net(2, 2, True), None),
                 lambda: MaskedCouplingBlock(4, _net(4, 8, False), "checkerboard2"),
                 lambda: coupling_mask(torch.zeros(1, 2, 2, 2), "chequerboard0")):
        with pytest.raises(ValueError, match=r"mask_type: expected one of 'channel0', .* but got"):
            make()
    with pytest.raises(ValueError, match=r"mask_type: expected one of 'channel0', 'channel1', but got 'checkerboard0'"):
        ChannelCouplingBlock(4, _net(2, 4, False), "checkerboard0")
    with pytest.raises(ValueError, match="scale_fn: expected one of 'sigmoid', 'exp', but got 'tanh'"):
        AffineCoupling(4, _net(2, 4, True), "channel0", scale_fn="tanh")
    layer = AffineCoupling(2, _net(2, 4, False), "checkerboard0")
    with pytest.raises(ValueError, match=r"x: .* expects a 4-D input \(B, C, H, W\), but got shape \(3, 2\)"):
        layer(torch.randn(3, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"y: .* expects a 4-D input"):
        layer.inverse(torch.randn(3, 2, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"x: AffineCoupling expects .* size 2 in dim 1, but got shape \(1, 3, 2, 2\)"):
        layer(torch.randn(1, 3, 2, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"x: CouplingBlock expects .* size 4 in dim 1, but got shape \(4,\)"):
        CouplingBlock(4, _net(2, 4, True))(torch.randn(4, dtype=F64))
    with pytest.raises(ValueError, match=r"nnet: .* expects the network to return shape \(3, 4\) .* returned \(3, 2\)"):
        CouplingBlock(4, _net(2, 2, True))(torch.randn(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="channel mask expects .* even size of dim 1"):
        coupling_mask(torch.zeros(2, 3), "channel0")
    with pytest.raises(ValueError, match="checkerboard mask expects a 4-D input"):
        coupling_mask(torch.zeros(2, 4), "checkerboard0")
    lu = InvertibleConv2dLU(3)
    with pytest.raises(ValueError, match=r"x: InvertibleConv2dLU expects \(B, 3, H, W\) or \(B, 3\), but got shape"):
        lu(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"y: InvertibleConv2dLU expects .* but got shape \(2, 4, 1, 1\)"):
        lu.inverse(torch.randn(2, 4, 1, 1))
    with pytest.raises(ValueError, match="num_channels: expected a positive int, but got 0"):
        InvertibleConv2dLU(0)
    with pytest.raises(ValueError, match="block_type: expected 'resblock' or 'coupling', but got 'glow'"):
        models.ResidualFlow((2, 2, 8, 8), block_type="glow")
    with pytest.raises(ValueError, match=r"channel coupling .* even number of channels, but got 3"):
        models.ResidualFlow((2, 3, 8, 8), n_blocks=[1, 1], block_type="coupling")  # RGB needs an init_layer


# -- ResidualFlow(block_type='coupling') --------------------------------------------------------------

def _describe(layer):
    if isinstance(layer, (ChannelCouplingBlock, MaskedCouplingBlock)):
        return f"{type(layer).__name__}:{layer.mask_type}"
    if isinstance(layer, CouplingBlock):
        return f"CouplingBlock:swap={layer.swap}:{type(layer.nnet).__name__}"
    if isinstance(layer, models.FCWrapper):
        return f"FCWrapper:{type(layer.fc_module).__name__}"
    return type(layer).__name__


def test_coupling_model_has_the_reference_module_order():
    torch.manual_seed(0)
    model = models.ResidualFlow((2, 1, 8, 8), n_blocks=[2, 1], intermediate_dim=4, init_layer=LogitTransform(0.05),
                                actnorm=True, fc_idim=4, block_type="coupling")
    assert [[_describe(m) for m in scale.chain] for scale in model.transforms] == [
        ["LogitTransform", "MaskedCouplingBlock:checkerboard0", "ActNorm2d", "MaskedCouplingBlock:checkerboard1",
         "ActNorm2d", "SqueezeLayer"],
        ["ChannelCouplingBlock:channel0", "ActNorm2d"]
        + ["CouplingBlock:swap=True:FCNet", "FCWrapper:ActNorm1d", "CouplingBlock:swap=False:FCNet",
           "FCWrapper:ActNorm1d"] * 2,
    ]
    assert isinstance(model.transforms[0], models.StackedCouplingBlocks)
    conv = model.transforms[0].chain[1].nnet  # checkerboard: c -> idim -> (1x1) idim -> 2c
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in conv if isinstance(m, nn.Conv2d)] == [
        (1, 4, (3, 3)), (4, 4, (1, 1)), (4, 2, (3, 3))]
    channel = model.transforms[1].chain[0].nnet  # channel split of c = 2: c/2 -> ... -> c
    assert [(m.in_channels, m.out_channels) for m in channel if isinstance(m, nn.Conv2d)] == [(1, 4), (4, 4), (4, 2)]
    fc = model.transforms[1].chain[2].nnet.nnet
    assert [(m.in_features, m.out_features) for m in fc if isinstance(m, nn.Linear)] == [(16, 4), (4, 4), (4, 32)]


@pytest.mark.parametrize("config", [
    dict(shape=(2, 1, 8, 8), init_layer=True, quadratic=True, actnorm=True, factor_out=True),
    dict(shape=(2, 2, 8, 8), fc_actnorm=True, preact=True, factor_out=False, batchnorm=True),
])
def test_coupling_model_log_density_is_exact(config):
    config = dict(config)
    shape = config.pop("shape")
    if config.pop("init_layer", False):
        config["init_layer"] = LogitTransform(0.05)
    torch.manual_seed(0)
    model = models.ResidualFlow(shape, n_blocks=[1, 1], intermediate_dim=4, fc_idim=4, kernels="3-3",
                                block_type="coupling", **config).double()
    x = torch.rand(shape, dtype=F64) * 0.8 + 0.1
    model(x)  # data initialisation (ActNorm), then a fixed map
    model.eval()
    with torch.no_grad():  # non-trivial weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    z, delta = model(x, torch.zeros(shape[0], 1, dtype=F64))
    assert z.shape == (shape[0], x[0].numel())
    # float64, no iteration: slogdet of the 128 x 128 Jacobian errs by ~n*cond*2^-53 ~ 3e-12 (cond <= 2e2), the
    # closed-form inverse and log-det sums (|delta| ~ 1e2) by ~1e-12; 1e-9 keeps >= 300x, below float32 rounding.
    torch.testing.assert_close(delta, -brute_logdet(model, x), atol=1e-9, rtol=1e-9)
    x_back, zeros = model.inverse(z, delta)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(zeros, torch.zeros_like(zeros), atol=1e-9, rtol=0)
    expected = -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * torch.log(torch.tensor(2 * torch.pi, dtype=F64))
    # the same sums of 128 squares in another order: ~1e-13; the default 1e-7 is loose, a wrong constant is O(1)
    torch.testing.assert_close(model.log_prob(x), expected - delta.squeeze(1))


def test_coupling_model_trains_one_step_with_dropout_after_an_in_place_elu():
    torch.manual_seed(0)
    model = models.ResidualFlow((4, 1, 8, 8), n_blocks=[1, 1], intermediate_dim=8, fc_idim=8, actnorm=True,
                                init_layer=LogitTransform(0.05), dropout=0.1, activation_fn="elu",
                                block_type="coupling")
    x = torch.rand(4, 1, 8, 8) * 0.9 + 0.05
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model.bits_per_dim(x).mean()
    optimizer.zero_grad()
    loss.backward()  # the reference's in-place dropout after ELU(inplace=True) fails here
    optimizer.step()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters())) == len(before)
    assert model.sample(3).shape == (3, 1, 8, 8)


def test_coupling_layers_are_exported():
    for name in ("AdditiveCoupling", "AffineCoupling", "ChannelCouplingBlock", "CouplingBlock", "InvertibleConv2dLU",
                 "MaskedCouplingBlock", "coupling_mask"):
        assert name in rnn.__all__ and hasattr(rnn, name)
    assert "StackedCouplingBlocks" in models.__all__
