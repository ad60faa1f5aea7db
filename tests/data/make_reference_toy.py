"""Writes tests/data/reference_toy_small.pt by running residual-flows' own layers.

Usage: python make_reference_toy.py RESFLOWS_DIR OUT
where RESFLOWS_DIR holds ``resflows/`` of rtqichen/residual-flows (commit 8170138c850a, e.g.
``git archive 8170138c850a | tar x -C RESFLOWS_DIR``). Nothing of the reference is changed.

It records
- ``activations``: the outputs and input gradients of the reference's ``FullSort``, ``MaxMin`` and
  ``Identity`` (``resflows.layers.base``) on inputs with ties, NaN and infinities;
- ``toy``: for the activations ``fullsort`` and ``maxmin`` of the reference's ``train_toy.py``, a
  few steps of its training loop (tests/data/toy_loop.py, which says how it deviates from the
  script) on its model (``--arch iresnet``: iResBlocks over pre-activation InducedNormLinear MLPs,
  basic estimator), in float64: the initial state_dict, the training losses, and the test loss after
  ``update_lipschitz(model, 200)`` in eval mode (exact 2-D log-det).
"""

import sys

import numpy as np
import torch
from toy_loop import COEFF, DIMS, F64, N_BLOCKS, N_LIP, batches, train, update_lipschitz_by_isinstance

sys.path.insert(0, sys.argv[1])

import resflows.layers as layers  # noqa: E402
import resflows.layers.base as base_layers  # noqa: E402


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


def toy(activation_fn, seed):
    train_x, test_x = batches(seed + 100)
    np.random.seed(seed)
    torch.manual_seed(seed)
    blocks = [layers.iResBlock(build_nnet(activation_fn), n_dist="geometric", n_power_series=None, exact_trace=False,
                               brute_force=False, n_samples=1, neumann_grad=False, grad_in_forward=False)
              for _ in range(N_BLOCKS)]
    model = layers.SequentialFlow(blocks).double()
    out = {"seed": seed, "train_x": train_x, "test_x": test_x,
           "initial_state": {k: v.clone() for k, v in model.state_dict().items()}}
    update_lipschitz = update_lipschitz_by_isinstance((base_layers.SpectralNormConv2d, base_layers.SpectralNormLinear,
                                                       base_layers.InducedNormConv2d, base_layers.InducedNormLinear))
    out["train_losses"], out["test_loss"] = train(model, update_lipschitz, train_x, test_x)
    return out


if __name__ == "__main__":
    torch.save({
        "activations": activations(),
        "toy": {"fullsort": toy(base_layers.FullSort, 0), "maxmin": toy(base_layers.MaxMin, 1)},
    }, sys.argv[2])
