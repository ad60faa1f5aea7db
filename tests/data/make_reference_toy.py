"""Writes tests/data/reference_toy_small.pt by running residual-flows' own layers.

Usage: python make_reference_toy.py RESFLOWS_DIR OUT
where RESFLOWS_DIR holds ``resflows/`` of rtqichen/residual-flows (commit 8170138c850a, e.g.
``git archive 8170138c850a | tar x -C RESFLOWS_DIR``). Nothing of the reference is changed.

It records
- ``activations``: the outputs and input gradients of the reference's ``FullSort``, ``MaxMin`` and
  ``Identity`` (``resflows.layers.base``) on inputs with ties, NaN and infinities;
- ``toy``: for the activations ``fullsort`` and ``maxmin`` of the reference's ``train_toy.py``, a
  few steps of its training loop on its model (``--arch iresnet``: iResBlocks over pre-activation
  InducedNormLinear MLPs, basic estimator), in float64: the initial state_dict, the training losses,
  and the test loss after ``update_lipschitz(model, 200)`` in eval mode (exact 2-D log-det).

Deviations from the script, each so that the test can replay the run: the data batches are drawn
beforehand from a torch generator (the script draws them from NumPy's global RNG, which the blocks
also draw from) and stored; the optimiser is ``torch.optim.Adam`` with the script's arguments (the
script's ``resflows.optimizers.Adam`` calls ``Tensor.add_(Number, Tensor)``, which current PyTorch
no longer has, and its weight decay is not in place, i.e. has no effect).
"""

import math
import sys

import numpy as np
import torch

sys.path.insert(0, sys.argv[1])

import resflows.layers as layers  # noqa: E402
import resflows.layers.base as base_layers  # noqa: E402

F64 = torch.float64
# The toy script's flags for this run: --dims 16-16 --nblocks 2 --vnorms 222 --coeff 0.9 --n-lipschitz-iters 5
DIMS, N_BLOCKS, COEFF, N_LIP, LR, WD, BATCH, STEPS = (2, 16, 16, 2), 2, 0.9, 5, 1e-3, 1e-5, 64, 4


def special_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g, dtype=F64)
    x[0, 1] = x[0, 0]          # a tie within a MaxMin pair
    x[1, :4] = 0.5             # ties across pairs
    x[2, 3] = float("nan")     # NaN
    x[3, 0], x[3, 5] = float("inf"), float("-inf")
    x[4] = x[4].round()        # several ties
    images = torch.randn(2, 3, 2, 2, generator=g, dtype=F64)
    images[0, 0] = images[0, 2]  # ties along dim 1
    return x, images


def run_activation(module, x, g):
    x = x.clone().requires_grad_(True)
    y = module(x)
    w = torch.randn(y.shape, generator=g, dtype=F64)
    (grad,) = torch.autograd.grad((y * w).sum(), x)
    return {"x": x.detach(), "y": y.detach(), "w": w, "grad": grad}


def activations():
    x, images = special_inputs()
    g = torch.Generator().manual_seed(1)
    return {
        "fullsort": run_activation(base_layers.FullSort(), x, g),
        "fullsort_images": run_activation(base_layers.FullSort(), images, g),
        "maxmin": run_activation(base_layers.MaxMin(), x, g),
        "identity": run_activation(base_layers.Identity(), x, g),
    }


def build_nnet(activation_fn):
    """The script's ``build_nnet`` (--arch iresnet, --mixed, no learnable orders)."""
    nnet = []
    for in_dim, out_dim in zip(DIMS[:-1], DIMS[1:]):
        nnet.append(activation_fn())
        nnet.append(base_layers.get_linear(in_dim, out_dim, coeff=COEFF, n_iterations=N_LIP, atol=None, rtol=None,
                                           domain=2, codomain=2, zero_init=(out_dim == 2)))
    return torch.nn.Sequential(*nnet)


def update_lipschitz(model, n_iterations):
    for m in model.modules():
        if isinstance(m, (base_layers.SpectralNormConv2d, base_layers.SpectralNormLinear,
                          base_layers.InducedNormConv2d, base_layers.InducedNormLinear)):
            m.compute_weight(update=True, n_iterations=n_iterations)


def compute_loss(model, x):
    z, delta_logp = model(x, torch.zeros(x.shape[0], 1, dtype=x.dtype))
    logpz = (-0.5 * math.log(2 * math.pi) - z.pow(2) / 2).sum(1, keepdim=True)
    return -torch.mean(logpz - delta_logp)


def data(seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], dtype=F64)
    batches = []
    for n in [BATCH] * STEPS + [4 * BATCH]:
        pick = torch.randint(0, 3, (n,), generator=g)
        batches.append(centers[pick] + 0.3 * torch.randn(n, 2, generator=g, dtype=F64))
    return batches[:-1], batches[-1]


def toy(activation_fn, seed):
    train, test = data(seed + 100)
    np.random.seed(seed)
    torch.manual_seed(seed)
    blocks = [layers.iResBlock(build_nnet(activation_fn), n_dist="geometric", n_power_series=None, exact_trace=False,
                               brute_force=False, n_samples=1, neumann_grad=False, grad_in_forward=False)
              for _ in range(N_BLOCKS)]
    model = layers.SequentialFlow(blocks).double()
    out = {"seed": seed, "train_x": train, "test_x": test,
           "initial_state": {k: v.clone() for k, v in model.state_dict().items()}}
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WD)
    losses = []
    model.train()
    for x in train:
        optimizer.zero_grad()
        loss = compute_loss(model, x)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        update_lipschitz(model, N_LIP)
    update_lipschitz(model, 200)
    with torch.no_grad():
        model.eval()
        out["test_loss"] = compute_loss(model, test).item()
    out["train_losses"] = losses
    return out


if __name__ == "__main__":
    torch.save({
        "activations": activations(),
        "toy": {"fullsort": toy(base_layers.FullSort, 0), "maxmin": toy(base_layers.MaxMin, 1)},
    }, sys.argv[2])
