"""resflow_cuda against numbers written by rtqichen/residual-flows' own code (commit 8170138c850a).

The fixtures tests/data/reference_resflow_{geometric,factor_out,lipschitz,learnable_ord,power_series}_small.pt
are written by tests/data/make_reference_resflow.py, which runs the reference's iResBlock, ResidualFlow,
SpectralNorm*, Lop* and InducedNormConv2d in float64 on the CPU. Each test loads our counterpart from the
stored state_dict, replays the generator's seeded calls under its default dtype (float64): NumPy's
global RNG for the roulette's number of terms, torch's for the probes and lazy u / v, as the reference
draws them; and compares outputs, every gradient and the buffers the calls leave behind.

Why the default dtype: the reference's normalisation factor ``torch.max(torch.ones(1), sigma / coeff)``
takes the dtype of its float32 ``torch.ones(1)`` (a 1-dim tensor wins type promotion over the 0-dim
sigma), so a float64 layer under the default float32 dtype divides its weight by a factor rounded to
float32 (relative error up to 2**-24); ours keeps the weight's dtype. Under a float64 default both are
float64, which lets these tests compare to float64 rounding; ``test_float64_layer_under_float32_default``
shows the quirk (docs/parity.md#lipschitz-layers).

Tolerances: everything is float64. Our code reaches the same values by other routes (fused power
iteration and series kernels, forward-mode Jacobians, closed forms, other summation orders), so the
results differ from the reference's by accumulated float64 rounding: about 1.1e-16 relative per
operation, a few thousand operations deep at most (200 power-iteration steps and ten restarts, 20 + n
series terms), i.e. below about 1e-12 relative. The bounds (rtol 1e-11, and atol 1e-13 for entries
that cancel to about zero) keep a margin over that for other CPU kernel sets and thread counts and are
still far below what a real difference gives: the reference's float32-rounded factor (up to 2**-24
relative, see below), and orders of magnitude more for a missed or extra series term, another random
draw, norm order or power-iteration step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from resflow_cuda import models
from resflow_cuda import nn as rnn

DATA = Path(__file__).resolve().parent / "data"
F64 = torch.float64

pytestmark = [pytest.mark.filterwarnings("ignore:.*did not converge"), pytest.mark.parity]

# Float64 rounding accumulated over at most a few thousand operations (see the module docstring).
RTOL, ATOL = 1e-11, 1e-13


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)  # as the generator (see the module docstring)
    yield
    torch.set_default_dtype(previous)


def _load(name):
    return torch.load(DATA / f"reference_resflow_{name}_small.pt")


def _close(actual, expected, what, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual.detach(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _grads(module, loss, *inputs):
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    out = torch.autograd.grad(loss, [p for _, p in named] + list(inputs), allow_unused=True)
    return {n: g for (n, _), g in zip(named, out) if g is not None}, out[len(named):]


def _same_grads(ours, reference, what):
    assert sorted(ours) == sorted(reference), what  # the same parameters get a gradient
    for name, grad in reference.items():
        _close(ours[name], grad, f"{what} {name}")


def _seed(seed):
    np.random.seed(seed)
    torch.manual_seed(seed)


def _forward_and_gradients(layer, case) -> None:
    """A training forward of the stored x after the stored seed + 1 (the reference's draws in that
    forward): the output and the gradients of sum(y * w) w.r.t. the parameters and x."""
    torch.manual_seed(case["seed"] + 1)
    xr = case["x"].clone().requires_grad_(True)
    y = layer(xr)
    _close(y, case["y"], "y")
    grads, (grad_x,) = _grads(layer, (y * case["w"]).sum(), xr)
    _same_grads(grads, case["grads"], "gradient of")
    _close(grad_x, case["grad_x"], "gradient of x")


# ---------------------------------------------------------------- iResBlock

def _dense_branch(dim, hidden):
    return torch.nn.Sequential(rnn.InducedNormLinear(dim, hidden, coeff=0.9, n_iterations=5), rnn.Swish(),
                               rnn.InducedNormLinear(hidden, dim, coeff=0.9, n_iterations=5))


def _conv_branch(channels, hidden):
    return torch.nn.Sequential(rnn.InducedNormConv2d(channels, hidden, 3, 1, 1, coeff=0.9, n_iterations=5),
                               rnn.Swish(), rnn.InducedNormConv2d(hidden, channels, 1, 1, 0, coeff=0.9, n_iterations=5))


def _branch_for(case):
    x = case["x"]
    if x.dim() == 4:
        return _conv_branch(x.shape[1], case["state_dict"]["nnet.0.weight"].shape[0])
    return _dense_branch(x.shape[1], case["state_dict"]["nnet.0.weight"].shape[0])


def _replay_block(case, fast_path):
    torch.manual_seed(1234)  # other initial weights: everything must come from the state_dict
    block = rnn.iResBlock(_branch_for(case), **case["kwargs"], fast_path=fast_path).double()
    block.load_state_dict(case["state_dict"])  # strict
    seed, x, logpx = case["seed"], case["x"], case["logpx"]
    block.train()
    _seed(seed + 1)
    xr = x.clone().requires_grad_(True)
    y, logpy = block(xr, logpx)
    _close(y, case["train_y"], "training y")
    _close(logpy, case["train_logpy"], "training logpy")
    loss = (0.5 * y.pow(2).flatten(1).sum(1) - logpy.squeeze(1)).mean()
    grads, (grad_x,) = _grads(block, loss, xr)
    _same_grads(grads, case["train_grads"], "training gradient of")
    _close(grad_x, case["train_grad_x"], "training gradient of x")
    buffers = dict(block.named_buffers())
    for name, value in case["train_buffers"].items():  # the roulette's n and the estimate's moments
        _close(buffers[name], value, f"buffer {name} after training")
    block.eval()
    _seed(seed + 2)
    y, logpy = block(x.clone(), logpx)
    _close(y, case["eval_y"], "eval y")
    _close(logpy, case["eval_logpy"], "eval logpy")


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("name", ["dense", "dense_samples", "brute_2d", "conv"])
def test_geometric_roulette_with_the_basic_estimator(name, fast_path):
    _replay_block(_load("geometric")[name], fast_path)


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("name", ["neumann", "basic", "exact_trace", "conv"])
def test_n_power_series_in_training_and_eval(name, fast_path):
    """In training the series is truncated at n_power_series (no draws); in eval the reference ignores
    it and runs the roulette with 20 exact terms, drawing n from NumPy as in training."""
    _replay_block(_load("power_series")[name], fast_path)


# ---------------------------------------------------------------- ResidualFlow

def _replay_model(case):
    torch.manual_seed(1234)
    model = models.ResidualFlow(case["input_size"], init_layer=rnn.LogitTransform(0.05), **case["kwargs"]).double()
    model.load_state_dict(case["state_dict"])  # strict
    seed, x = case["seed"], case["x"]
    zeros = torch.zeros(x.shape[0], 1, dtype=F64)
    model.eval()
    _seed(seed + 1)
    with torch.no_grad():
        z, delta = model(x, zeros)
        x_inv = model.inverse(case["z"])
    _close(z, case["z"], "eval z")
    _close(delta, case["delta"], "eval delta")
    # The inverse is a fixed-point iteration per block stopped by the reference's rule (squared step
    # below 1e-5 + 1e-5 |y|): both stop after the same iterations, so they agree to rounding as well.
    _close(x_inv, case["x_inv"], "inverse of z")
    model.train()
    _seed(seed + 2)
    xr = x.clone().requires_grad_(True)
    z, delta = model(xr, zeros)
    _close(z, case["z_train"], "training z")
    _close(delta, case["delta_train"], "training delta")
    loss = (0.5 * z.pow(2).sum(1) + delta.squeeze(1)).mean()
    grads, (grad_x,) = _grads(model, loss, xr)
    _same_grads(grads, case["grads"], "training gradient of")
    _close(grad_x, case["grad_x"], "training gradient of x")
    buffers = dict(model.named_buffers())
    for name, value in case["buffers"].items():
        _close(buffers[name], value, f"buffer {name} after training")


@pytest.mark.parametrize("name", [pytest.param("roulette", marks=pytest.mark.slow), "poisson_grad_in_forward"])
def test_factor_out_model(name):
    _replay_model(_load("factor_out")[name])


@pytest.mark.slow  # the block-level cases of test_n_power_series_in_training_and_eval run by default
def test_model_with_n_power_series():
    _replay_model(_load("power_series")["model"])


# ---------------------------------------------------------------- SpectralNorm*, Lop*

def _layer_for(name, case):
    w = case["state_dict"]["weight"]
    if name.startswith("lop_"):
        order = {"1": 1, "2": 2, "i": float("inf")}
        p, q = (order[t] for t in name.split("_")[2:4])
        local = name.endswith("_local")
        if w.dim() == 2:
            return rnn.LopLinear(w.shape[1], w.shape[0], coeff=0.7, domain=p, codomain=q, local_constraint=local)
        return rnn.LopConv2d(w.shape[1], w.shape[0], 3, 1, 1, coeff=0.7, domain=p, codomain=q, local_constraint=local)
    settings = {
        "sn_linear": dict(coeff=0.8, n_iterations=3), "sn_linear_tol": dict(coeff=0.9, atol=1e-3, rtol=1e-3),
        "sn_conv": dict(coeff=0.8, n_iterations=2), "sn_conv_stride": dict(coeff=0.8, n_iterations=4),
        "sn_conv_tol": dict(coeff=0.9, atol=1e-3, rtol=1e-3), "sn_conv_1x1": dict(coeff=0.8, n_iterations=2),
        "sn_conv_eval": dict(coeff=0.8, n_iterations=2),
    }[name]
    if w.dim() == 2:
        return rnn.SpectralNormLinear(w.shape[1], w.shape[0], **settings)
    k = w.shape[-1]
    stride = 2 if name == "sn_conv_stride" else 1
    return rnn.SpectralNormConv2d(w.shape[1], w.shape[0], k, stride, k // 2, **settings)


LAYER_CASES = [
    "sn_linear", "sn_linear_tol", "sn_conv", "sn_conv_stride", "sn_conv_tol", "sn_conv_1x1", "sn_conv_eval"] + [
    f"lop_linear_{pq}_{kind}" for pq in ("1_1", "1_2", "1_i", "2_i", "i_i") for kind in ("local", "global")] + [
    f"lop_conv_{pq}_local" for pq in ("1_1", "1_2", "1_i", "2_i", "i_i")] + ["lop_conv_1_2_global"]


@pytest.mark.parametrize("name", LAYER_CASES)
def test_spectral_norm_and_lop_layers(name):
    """From the state before the first forward (for the convolutions: no u / v yet, drawn lazily from
    torch's RNG in that forward): the output, the gradients of sum(y * w), and u, v, scale after the
    power iteration of a training forward; then an eval forward."""
    case = _load("lipschitz")[name]
    torch.manual_seed(1234)
    layer = _layer_for(name, case).double()
    layer.load_state_dict(case["state_dict"])  # strict
    layer.train(case["train"])
    _forward_and_gradients(layer, case)
    buffers = dict(layer.named_buffers())
    assert sorted(buffers) == sorted(case["buffers"])
    for key, value in case["buffers"].items():
        _close(buffers[key], value, f"buffer {key}")
    layer.eval()
    with torch.no_grad():
        _close(layer(case["x"]), case["eval_y"], "eval y")


# ---------------------------------------------------------------- learnable norm orders

@pytest.mark.parametrize("name", [pytest.param("conv3x3", marks=pytest.mark.slow), "conv1x1"])
def test_learnable_norm_orders_on_convolutions(name):
    """The lazy initialisation (200 steps, then 10 restarts with the orders asym_squash(domain),
    asym_squash(codomain)), the forward and its gradients, an update after a weight change, and
    compute_one_iter with its gradients with respect to the orders."""
    case = _load("learnable_ord")[name]
    state = case["state_dict"]
    torch.manual_seed(1234)
    domain = torch.nn.Parameter(torch.tensor(0.0, dtype=F64))
    codomain = torch.nn.Parameter(torch.tensor(0.0, dtype=F64))
    w = state["weight"]
    layer = rnn.InducedNormConv2d(w.shape[1], w.shape[0], case["kernel"], 1, case["padding"], coeff=0.8, domain=domain,
                                  codomain=codomain, n_iterations=3).double()
    layer.load_state_dict(state)  # strict; sets the orders too
    assert domain.item() == state["domain"].item() and codomain.item() == state["codomain"].item()
    _forward_and_gradients(layer, case)
    for key, value in case["state_after_forward"].items():
        _close(layer.state_dict()[key], value, f"{key} after the first forward")
    with torch.no_grad():
        layer.weight.add_(case["noise"])
        layer.compute_weight(update=True)
    for key, value in case["state_after_update"].items():
        _close(layer.state_dict()[key], value, f"{key} after compute_weight(update=True)")
    sigma = layer.compute_one_iter()
    _close(sigma, case["one_iter"], "compute_one_iter")
    got = dict(zip(("domain", "codomain"), torch.autograd.grad(sigma, [domain, codomain])))
    for key, value in case["one_iter_grads"].items():
        _close(got[key], value, f"gradient of compute_one_iter with respect to the {key} order")


@pytest.mark.xfail(strict=True, reason="deliberate difference: under the default float32 dtype the reference "
                   "rounds a float64 layer's factor max(1, sigma / coeff) to float32 (its torch.ones(1)); ours "
                   "keeps float64, so the normalised weight differs by up to 2**-24 relative")
def test_float64_layer_under_float32_default():
    case = _load("lipschitz")["sn_linear_float32_default"]
    torch.set_default_dtype(torch.float32)  # the autouse fixture restores the previous default
    torch.manual_seed(1234)
    layer = rnn.SpectralNormLinear(5, 7, coeff=0.8, n_iterations=3).double()
    layer.load_state_dict(case["state_dict"])
    torch.manual_seed(case["seed"] + 1)
    y = layer(case["x"])
    # The float64 bound of the other tests; the float32-rounded factor misses it.
    _close(y, case["y"], "y")
