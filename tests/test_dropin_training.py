"""The drop-in promise end to end: the reference toy scripts' model builders and training loops,
run with this library's classes under the references' module names, give the references' losses.

- residual-flows' ``train_toy.py`` (``--arch iresnet``) with its ``fullsort`` and ``maxmin``
  activations: against tests/data/reference_toy_small.pt, written by tests/data/make_reference_toy.py
  running residual-flows' layers (commit 8170138c850a);
- the same loop with the ``swish`` activation: against normflows' classes (its iResBlock,
  InducedNormLinear and Swish; normflows has no FullSort or MaxMin);
- ImpFlow's ``train_toy.py`` (``--arch implicit --act sin``, first call ``model(x, restore=True)``)
  and a tabular stack with ``Zero``: against tests/data/reference_implicit_toy_small.pt, written by
  tests/data/make_reference_implicit_flow.py running ImpFlow's code (commit d8babe48bdea).

The loop is the scripts' (loss ``-mean(log N(z) - delta_logp)``, Adam with weight decay,
``update_lipschitz`` by ``isinstance`` on our classes after every step, the test loss in eval mode after
``update_lipschitz(model, 200)``): tests/data/toy_loop.py, which the generators run with the
references' classes (its docstring says how it deviates from the scripts).
"""

from __future__ import annotations

import types
from pathlib import Path

import normflows as nf
import numpy as np
import pytest
import torch

import resflow_cuda.nn as ours
from data.toy_loop import COEFF, DIMS, F64, N_BLOCKS, N_LIP, train, update_lipschitz_by_isinstance
from resflow_cuda import models

DATA = Path(__file__).resolve().parent / "data"

# The reference's modules, as a script that patches ours in sees them: ``layers`` and ``layers.base``.
layers = base_layers = ours


def activation_table(base):
    """The toy script's table, built at import from ``layers.base`` (residual-flows and ImpFlow)."""
    table = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "elu": torch.nn.ELU, "selu": torch.nn.SELU,
             "fullsort": base.FullSort, "maxmin": base.MaxMin, "swish": base.Swish, "lcube": base.LipschitzCube}
    if hasattr(base, "Sin"):
        table |= {"identity": base.Identity, "sin": base.Sin}
    return table


def build_nnet(base, activation_fn, preact=True):
    """The toy scripts' build_nnet: (act, linear) per layer (ImpFlow's: no activation before the first)."""
    nnet = []
    for i, (in_dim, out_dim) in enumerate(zip(DIMS[:-1], DIMS[1:])):
        if preact or i > 0:
            nnet.append(activation_fn())
        nnet.append(base.InducedNormLinear(in_dim, out_dim, coeff=COEFF, n_iterations=N_LIP, atol=None, rtol=None,
                                           domain=2, codomain=2, zero_init=(out_dim == 2)))
    return torch.nn.Sequential(*nnet)


def update_lipschitz(base):
    """The scripts' update_lipschitz: by isinstance on the library's Lipschitz classes."""
    return update_lipschitz_by_isinstance(tuple(getattr(base, name) for name in (
        "SpectralNormConv2d", "SpectralNormLinear", "InducedNormConv2d", "InducedNormLinear") if hasattr(base, name)))


def iresnet_toy(base, act, seed):
    np.random.seed(seed)
    torch.manual_seed(seed)
    blocks = [base.iResBlock(build_nnet(base, act), n_dist="geometric", n_power_series=None, exact_trace=False,
                             brute_force=False, n_samples=1, neumann_grad=False, grad_in_forward=False)
              for _ in range(N_BLOCKS)]
    return ours.SequentialFlow(blocks).double()


def assert_same_state(model, state):
    got = model.state_dict()
    assert list(got) == list(state)
    for key, value in state.items():
        # the same draws at construction; float32 power iteration in another summation order: ~1e-7 relative
        torch.testing.assert_close(got[key].to(value.dtype), value, atol=1e-6, rtol=1e-5, msg=key)


@pytest.fixture(scope="module")
def residual_flows_runs():
    return torch.load(DATA / "reference_toy_small.pt")["toy"]


@pytest.fixture(scope="module")
def impflow_runs():
    return torch.load(DATA / "reference_implicit_toy_small.pt")


@pytest.mark.parity
@pytest.mark.parametrize("name", ["fullsort", "maxmin"])
def test_residual_flows_toy_script_with_our_layers_gives_its_losses(residual_flows_runs, name):
    ref = residual_flows_runs[name]
    table = activation_table(base_layers)
    model = iresnet_toy(layers, table[name], ref["seed"])
    assert_same_state(model, ref["initial_state"])
    model.load_state_dict(ref["initial_state"])  # the run itself starts from the reference's float64 weights
    assert "fast_path=autograd" in repr(model)  # the branches' sort / pair choices are not elementwise: visibly
    losses, test_loss = train(model, update_lipschitz(base_layers), ref["train_x"], ref["test_x"])
    # float64, the same draws and formulas: the first loss agrees to ~1e-14 (sums in other orders). Adam divides each
    # gradient by its RMS (+ eps 1e-8), which lifts the ~1e-16 rounding of gradient entries near 1e-8 to ~lr * 1e-8
    # in the update: the later losses agree to ~1e-10 relative (measured); 1e-8 leaves 50x
    torch.testing.assert_close(torch.tensor(losses, dtype=F64), torch.tensor(ref["train_losses"], dtype=F64), atol=0,
                               rtol=1e-8)
    torch.testing.assert_close(test_loss, ref["test_loss"], atol=0, rtol=1e-8)


@pytest.mark.parity
def test_residual_flows_toy_loop_gives_normflows_losses_with_normflows_classes():
    torch.manual_seed(3)
    batches = [torch.randn(48, 2, dtype=F64) * 1.5 for _ in range(4)]
    test = torch.randn(128, 2, dtype=F64) * 1.5
    normflows_base = types.SimpleNamespace(iResBlock=nf.flows.residual.iResBlock, Swish=nf.nets.lipschitz.Swish,
                                           InducedNormLinear=nf.nets.lipschitz.InducedNormLinear,
                                           InducedNormConv2d=nf.nets.lipschitz.InducedNormConv2d)
    theirs = iresnet_toy(normflows_base, normflows_base.Swish, 11)
    mine = iresnet_toy(layers, activation_table(base_layers)["swish"], 11)
    assert_same_state(mine, theirs.state_dict())
    mine.load_state_dict(theirs.state_dict())
    assert "fast_path=linearized" in repr(mine)
    runs = []
    for model, base in ((theirs, normflows_base), (mine, base_layers)):
        np.random.seed(12)
        torch.manual_seed(12)
        runs.append(train(model, update_lipschitz(base), batches, test))
    # as above (float64, same draws; the fused LipSwish and forward-mode Jacobians reorder sums, Adam lifts it to
    # ~1e-11 relative, measured)
    torch.testing.assert_close(torch.tensor(runs[1][0], dtype=F64), torch.tensor(runs[0][0], dtype=F64), atol=0,
                               rtol=1e-8)
    torch.testing.assert_close(runs[1][1], runs[0][1], atol=0, rtol=1e-8)


@pytest.mark.parity
def test_impflow_toy_script_with_our_layers_gives_its_losses(impflow_runs):
    ref = impflow_runs["toy"]
    table = activation_table(base_layers)
    np.random.seed(ref["seed"])
    torch.manual_seed(ref["seed"])
    blocks = [layers.ImplicitBlock(build_nnet(base_layers, table["sin"], preact=False),
                                   build_nnet(base_layers, table["sin"], preact=False), n_dist="geometric",
                                   n_power_series=None, exact_trace=False, brute_force=False, n_samples=1,
                                   neumann_grad=False, grad_in_forward=False)
              for _ in range(N_BLOCKS)]
    model = layers.SequentialFlow(blocks).double()
    assert_same_state(model, ref["initial_state"])
    model.load_state_dict(ref["initial_state"])
    # the script's builder is toy_model's
    np.random.seed(ref["seed"])
    torch.manual_seed(ref["seed"])
    built = models.toy_model(N_BLOCKS, DIMS[1:-1], "sin", COEFF, "2222", N_LIP, arch="implicit").double()
    assert_same_state(built, ref["initial_state"])
    with torch.no_grad():
        model(ref["first_x"], restore=True)  # the script's first call
    losses, test_loss = train(model, update_lipschitz(base_layers), ref["train_x"], ref["test_x"])
    # The forward solves stop at ||F|| < 1e-6 sqrt(numel) (Broyden; ours and ImpFlow's iterates differ in the first
    # step and the best-iterate choice): ||dz|| <= ~1e-6 sqrt(128) / (1 - 0.9), and the loss, a batch mean of
    # |z|^2 / 2 - logdet, moves by <= ~||z|| ||dz|| / B ~ 5e-6. (Broyden converges superlinearly: ~1e-9 measured.)
    torch.testing.assert_close(torch.tensor(losses, dtype=F64), torch.tensor(ref["train_losses"], dtype=F64),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(test_loss, ref["test_loss"], atol=1e-5, rtol=0)


@pytest.mark.parity
def test_impflow_tabular_stack_with_zero_branches(impflow_runs):
    ref = impflow_runs["tabular"]
    dims = (6, 12, 12, 6)

    def mlp(act):
        steps = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            steps += ([act()] if i else []) + [ours.get_linear(a, b, coeff=0.9, domain=2, codomain=2)]
        return torch.nn.Sequential(*steps)

    model = layers.SequentialFlow([layers.ImplicitBlock(mlp(ours.Sin), ours.Zero()),
                                   layers.ImplicitBlock(mlp(ours.Zero), mlp(ours.Sin))]).double()
    model.load_state_dict(ref["state_dict"])
    model.eval()
    with torch.no_grad():
        z, delta = model(ref["x"], torch.zeros(5, 1, dtype=F64), restore=True)
        x_back = model.inverse(z)
    # forward solves to ||F|| < 1e-6 sqrt(30) as above; the eval log-dets are exact (6-D Jacobians)
    torch.testing.assert_close(z, ref["z"], atol=5e-6, rtol=0)
    torch.testing.assert_close(delta, ref["delta"], atol=5e-6, rtol=0)
    # the inverse solves stop at 1e-5 sqrt(30) (eps_sample)
    torch.testing.assert_close(x_back, ref["inverse_x"], atol=5e-5, rtol=0)
