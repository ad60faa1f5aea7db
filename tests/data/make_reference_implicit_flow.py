"""Writes tests/data/reference_implicit_flow_small.pt (``model``) and
tests/data/reference_implicit_toy_small.pt (the rest) by running ImpFlow's own code.

Usage: python make_reference_implicit_flow.py IMPFLOW_DIR OUT_DIR
where IMPFLOW_DIR holds ``lib/`` of thu-ml/implicit-normalizing-flows (commit d8babe48bdea, e.g.
``git archive d8babe48bdea | tar x -C IMPFLOW_DIR``). The code is from the PyTorch 1.4 era: see
impflow_env.py for the stand-ins it needs; nothing of the reference is changed.

It records, in float64,
- ``activations``: ImpFlow's ``Sin`` and ``Zero`` (``lib.layers.base``) on inputs with NaN and
  infinities: outputs, and for Sin the first and second input gradients;
- ``model``: ImpFlow's multi-scale ``ImplicitFlow`` (``lib/implicit_flow.py``, a small
  configuration with the ``sin`` activation, LogitTransform, ActNorm, factor-out and FC end blocks):
  its state_dict after the scripts' ``model(x, restore=True)`` (here and below without imBlock's
  frozen copies ``nnet_x_copy`` / ``nnet_z_copy``, which equal the branches), a training forward (Russian roulette,
  Neumann gradient, backward-in-forward) with the loss's gradients, an eval forward and an inverse;
- ``tabular``: a stack of ``imBlock``s as ImpFlow's ``train_tabular.py`` builds them (MLPs without
  pre-activation, ``zero_init`` on the output layer) with the ``zero`` activation in one branch and
  a ``Zero`` module as the other, in eval mode (exact log-dets; ImpFlow's estimators fail on the
  training path for such branches, which do not depend on their input);
- ``toy``: a few steps of the training loop of ImpFlow's ``train_toy.py`` (``--arch implicit
  --act sin``: its first call ``model(x, restore=True)``, then the loop of tests/data/toy_loop.py,
  which says how it deviates from the script; no ``DataParallel``, which on the CPU only calls the
  module).
"""

import math
import sys

import impflow_env
import numpy as np
import torch
from toy_loop import COEFF, F64, N_BLOCKS, N_LIP, batches, train, update_lipschitz_by_isinstance
from toy_loop import DIMS as TOY_DIMS

impflow_env.install(sys.argv[1])

import lib.layers as layers  # noqa: E402
import lib.layers.base as base_layers  # noqa: E402
from lib.implicit_flow import ImplicitFlow  # noqa: E402

MODEL = dict(input_size=(3, 1, 8, 8), n_blocks=[1, 1], intermediate_dim=4, factor_out=True, actnorm=True, coeff=0.9,
             vnorms="2222", n_lipschitz_iters=5, n_power_series=None, n_exact_terms=2, kernels="3-1-3",
             activation_fn="sin", fc_end=True, fc_idim=4, preact=True, neumann_grad=True, grad_in_forward=True)


def standard_normal_logprob(z):
    return -0.5 * math.log(2 * math.pi) - z.pow(2) / 2


def state_dict(model):
    """The state_dict without imBlock's frozen copies (kept small; the copies equal the branches)."""
    return {k: v.clone() for k, v in model.state_dict().items() if "_copy." not in k}


def activations():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=g, dtype=F64)
    x[0, 0], x[0, 1], x[0, 2] = float("nan"), float("inf"), 0.25
    x = x.requires_grad_(True)
    y = base_layers.Sin()(x)
    w = torch.randn(y.shape, generator=g, dtype=F64)
    (grad,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
    (grad2,) = torch.autograd.grad((grad * w).sum(), x)
    return {"x": x.detach(), "w": w, "sin": y.detach(), "sin_grad": grad.detach(), "sin_grad2": grad2,
            "zero": base_layers.Zero()(x).detach()}


def model_case(seed):
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = ImplicitFlow(init_layer=layers.LogitTransform(0.05), **MODEL).double()
    x = torch.rand(*MODEL["input_size"], dtype=F64)
    with torch.no_grad():
        model(x, restore=True)
    out = {"x": x, "state_dict": state_dict(model)}
    np.random.seed(seed + 1)
    torch.manual_seed(seed + 1)
    x_in = x.clone().requires_grad_(True)
    z, delta = model(x_in, torch.zeros(x.shape[0], 1, dtype=F64))
    loss = -(standard_normal_logprob(z).sum(1, keepdim=True) - delta).mean()
    loss.backward()
    out["train_z"], out["train_delta"], out["train_grad_x"] = z.detach(), delta.detach(), x_in.grad.clone()
    out["train_grads"] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.eval()
    np.random.seed(seed + 2)
    torch.manual_seed(seed + 2)
    with torch.no_grad():
        z, delta = model(x, torch.zeros(x.shape[0], 1, dtype=F64))
        out["eval_z"], out["eval_delta"] = z, delta
        out["inverse_x"] = model.inverse(z)
    return out


def mlp(dims, activation_fn, coeff, n_iterations, atol=None, rtol=None):
    """The MLP of ImpFlow's toy and tabular scripts: linear, then (act, linear) per further layer."""
    nnet = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            nnet.append(activation_fn())
        nnet.append(base_layers.get_linear(in_dim, out_dim, coeff=coeff, n_iterations=n_iterations, atol=atol,
                                           rtol=rtol, domain=2, codomain=2, zero_init=(out_dim == dims[-1])))
    return torch.nn.Sequential(*nnet)


def tabular_case(seed):
    np.random.seed(seed)
    torch.manual_seed(seed)
    dims = (6, 12, 12, 6)
    blocks = [
        layers.imBlock(mlp(dims, base_layers.Sin, 0.9, 5), base_layers.Zero(), n_exact_terms=2,
                       neumann_grad=False, grad_in_forward=False),
        layers.imBlock(mlp(dims, base_layers.Zero, 0.9, 5), mlp(dims, base_layers.Sin, 0.9, 5), n_exact_terms=2,
                       neumann_grad=False, grad_in_forward=False),
    ]
    model = layers.SequentialFlow(blocks).double()
    with torch.no_grad():  # move the zero_init'ed output layers off zero, for a non-trivial map
        for name, p in model.named_parameters():
            if name.endswith(".weight"):
                p.normal_(0, 0.3)
    update = [m for m in model.modules() if isinstance(m, base_layers.InducedNormLinear)]
    for m in update:
        m.compute_weight(update=True, n_iterations=50)
    x = torch.randn(5, 6, dtype=F64)
    model.eval()
    with torch.no_grad():
        z, delta = model(x, torch.zeros(5, 1, dtype=F64), restore=True)
        x_back = model.inverse(z)
    return {"x": x, "state_dict": state_dict(model), "z": z, "delta": delta,
            "inverse_x": x_back}


def toy_case(seed):
    train_x, test_x = batches(seed + 100, extra=1)
    first, train_x = train_x[0], train_x[1:]
    np.random.seed(seed)
    torch.manual_seed(seed)
    blocks = [layers.imBlock(mlp(TOY_DIMS, base_layers.Sin, COEFF, N_LIP), mlp(TOY_DIMS, base_layers.Sin, COEFF, N_LIP),
                             n_dist="geometric", n_power_series=None, exact_trace=False, brute_force=False, n_samples=1,
                             neumann_grad=False, grad_in_forward=False)
              for _ in range(N_BLOCKS)]
    model = layers.SequentialFlow(blocks).double()
    out = {"seed": seed, "first_x": first, "train_x": train_x, "test_x": test_x, "initial_state": state_dict(model)}
    with torch.no_grad():
        model(first, restore=True)
    update_lipschitz = update_lipschitz_by_isinstance((base_layers.SpectralNormConv2d, base_layers.SpectralNormLinear,
                                                       base_layers.InducedNormConv2d, base_layers.InducedNormLinear))
    out["train_losses"], out["test_loss"] = train(model, update_lipschitz, train_x, test_x)
    return out


if __name__ == "__main__":
    torch.save({"model": model_case(0)}, f"{sys.argv[2]}/reference_implicit_flow_small.pt")
    torch.save({"activations": activations(), "tabular": tabular_case(5), "toy": toy_case(7)},
               f"{sys.argv[2]}/reference_implicit_toy_small.pt")
