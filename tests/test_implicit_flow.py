"""resflow_cuda.models.ImplicitFlow (ImpFlow's multi-scale model) against ImpFlow's own numbers
(tests/data/reference_implicit_flow_small.pt, written by tests/data/make_reference_implicit_flow.py
running ImpFlow's ImplicitFlow, commit d8babe48bdea), and its layout."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from resflow_cuda.models import IMPLICIT_ACT_FNS, ImplicitFlow, ResidualFlow, StackedImplicitBlocks, toy_model
from resflow_cuda.nn import FullSort, ImplicitBlock, LogitTransform, MaxMin, Sin, Zero

FIXTURE = Path(__file__).resolve().parent / "data" / "reference_implicit_flow_small.pt"
F64 = torch.float64
# The generator's configuration (make_reference_implicit_flow.py, MODEL), with init_layer=LogitTransform(0.05).
MODEL = dict(input_size=(3, 1, 8, 8), n_blocks=[1, 1], intermediate_dim=4, factor_out=True, actnorm=True, coeff=0.9,
             vnorms="2222", n_lipschitz_iters=5, n_power_series=None, n_exact_terms=2, kernels="3-1-3",
             activation_fn="sin", fc_end=True, fc_idim=4, preact=True, neumann_grad=True, grad_in_forward=True)


def _loss(z, delta):
    return -((-0.5 * math.log(2 * math.pi) - z.pow(2) / 2).sum(1, keepdim=True) - delta).mean()


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE)["model"]


@pytest.mark.parity
def test_matches_impflows_implicit_flow(reference):
    ref = reference
    torch.manual_seed(99)  # other initial weights: everything must come from the state_dict
    model = ImplicitFlow(init_layer=LogitTransform(0.05), **MODEL).double()
    model.load_state_dict(ref["state_dict"])  # strict, without a dummy forward
    assert list(model.state_dict()) == list(ref["state_dict"])  # ImpFlow's keys in ImpFlow's order (copies aside)
    np.random.seed(1)
    torch.manual_seed(1)
    x = ref["x"].clone().requires_grad_(True)
    z, delta = model(x, torch.zeros(3, 1, dtype=F64))
    _loss(z, delta).backward()
    # Every block's forward solve stops at ||F|| < 1e-6 sqrt(numel) (Broyden; ours and ImpFlow's iterates differ in
    # the first step and the best-iterate choice): z agrees to ~5e-7 (measured), the log-dets (Lipschitz in z, with
    # the same draws) and the gradients (implicit, solved to 1e-10) inherit errors of that size; 5e-6 leaves ~10x.
    torch.testing.assert_close(z.detach(), ref["train_z"], atol=5e-6, rtol=0)
    torch.testing.assert_close(delta.detach(), ref["train_delta"], atol=5e-6, rtol=0)
    torch.testing.assert_close(x.grad, ref["train_grad_x"], atol=5e-6, rtol=1e-5)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref["train_grads"])
    for name, g in grads.items():
        torch.testing.assert_close(g, ref["train_grads"][name], atol=5e-6, rtol=1e-5, msg=name)
    model.eval()
    np.random.seed(2)
    torch.manual_seed(2)
    with torch.no_grad():
        z, delta = model(ref["x"], torch.zeros(3, 1, dtype=F64))
        torch.testing.assert_close(z, ref["eval_z"], atol=5e-6, rtol=0)
        torch.testing.assert_close(delta, ref["eval_delta"], atol=5e-6, rtol=0)
        # the inverse solves stop at 1e-5 sqrt(numel) (eps_sample), through two scales: ~7e-6 measured
        torch.testing.assert_close(model.inverse(z), ref["inverse_x"], atol=5e-5, rtol=0)


def test_layout_follows_impflow():
    torch.manual_seed(0)
    model = ImplicitFlow((2, 1, 8, 8), n_blocks=[2, 1], intermediate_dim=4, fc_idim=4, n_lipschitz_iters=1,
                         preact=True, activation_fn="sin", actnorm=True)
    first, last = model.transforms
    assert isinstance(first, StackedImplicitBlocks) and isinstance(last, StackedImplicitBlocks)
    kinds = [type(m).__name__ for m in last.chain]
    # ImpFlow's defaults: 2 FC end blocks (residual-flows: 4), each followed by an FC ActNorm
    assert kinds == ["ImplicitBlock", "ActNorm2d", "ImplicitBlock", "FCWrapper", "ImplicitBlock", "FCWrapper"]
    blocks = [m for m in first.chain if isinstance(m, ImplicitBlock)]
    # first_resblock (default True): the first branches of scale 0 start with the convolution, the others with the
    # activation (preact); ImpFlow builds nnet_x and nnet_z alike
    for net in (blocks[0].nnet_x, blocks[0].nnet_z):
        assert type(net[0]).__name__.endswith("Conv2d")
    for net in (blocks[1].nnet_x, blocks[1].nnet_z):
        assert isinstance(net[0], Sin)
    assert blocks[0].nnet_x is not blocks[0].nnet_z
    assert set(IMPLICIT_ACT_FNS) >= {"sin", "zero", "swish", "elu"}
    assert isinstance(IMPLICIT_ACT_FNS["zero"](True), Zero)


def test_single_scale_first_block_has_no_preactivation_as_impflow():
    """ImpFlow marks the first block of a scale with first_resblock also when the scale does not squeeze;
    residual-flows only in squeezing scales."""
    options = dict(n_blocks=[2], intermediate_dim=4, fc_end=False, n_lipschitz_iters=1, preact=True,
                   first_resblock=True, activation_fn="swish")
    implicit = ImplicitFlow((2, 1, 4, 4), **options)
    residual = ResidualFlow((2, 1, 4, 4), **options)
    assert type(implicit.transforms[0].chain[0].nnet_x[0]).__name__.endswith("Conv2d")
    assert type(residual.transforms[0].chain[0].nnet[0]).__name__ == "LipSwish"


def test_forward_takes_restore_and_round_trips():
    torch.manual_seed(0)
    model = ImplicitFlow((2, 1, 4, 4), n_blocks=[1], intermediate_dim=4, fc_idim=4, n_lipschitz_iters=5,
                         activation_fn="sin").double()
    x = torch.rand(2, 1, 4, 4, dtype=F64)
    with torch.no_grad():
        z = model(x, restore=True)  # the scripts' first call
        z2, delta = model(x, torch.zeros(2, 1, dtype=F64), restore=True)
    # float64, the same solves (restore has no effect): equal
    torch.testing.assert_close(z2, z, atol=0, rtol=0)
    # forward solves to 1e-6 sqrt(16), inverse solves to 1e-5 sqrt(16) per block (3 blocks, contractions <= 0.9)
    torch.testing.assert_close(model.inverse(z), x, atol=1e-4, rtol=0)
    assert z.shape == (2, 16) and delta.shape == (2, 1)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="activation_fn: expected one of"):
        ImplicitFlow((2, 1, 4, 4), n_blocks=[1], activation_fn="fullsort")  # not in ImpFlow's model table
    with pytest.raises(ValueError, match="input_size"):
        ImplicitFlow((1, 4, 4))


def test_toy_and_tabular_tables():
    """The toy scripts' activation table (names the scripts look up at import) in toy_model, and ImpFlow's tabular
    model as toy_model with dim."""
    torch.manual_seed(0)
    for name, kind in (("fullsort", FullSort), ("maxmin", MaxMin), ("sin", Sin), ("tanh", torch.nn.Tanh)):
        model = toy_model(n_blocks=1, dims=(8,), activation_fn=name, vnorms="222", n_lipschitz_iters=2)
        assert isinstance(model.chain[0].nnet[0], kind)
    tabular = toy_model(n_blocks=2, dims=(8, 8), activation_fn="sin", vnorms="2222", n_lipschitz_iters=None,
                        atol=1e-3, rtol=1e-3, arch="implicit", dim=6, n_exact_terms=2, eps_forward=1e-5)
    block = tabular.chain[0]
    assert block.eps_forward == 1e-5 and block.n_exact_terms == 2 and not block.grad_in_forward
    assert block.nnet_x[-1].weight.shape == (6, 8) and block.nnet_x[-1].weight.abs().max() < 1e-2  # zero_init
    z, delta = tabular(torch.randn(4, 6), torch.zeros(4, 1))
    assert z.shape == (4, 6) and delta.shape == (4, 1)
    with pytest.raises(ValueError, match="activation_fn: expected one of"):
        toy_model(activation_fn="cosine")
