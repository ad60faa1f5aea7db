"""Writes tests/data/reference_implicit_small.pt by running ImpFlow's own imBlock.

Usage: python make_reference_implicit.py IMPFLOW_DIR OUT
where IMPFLOW_DIR holds ``lib/`` of thu-ml/implicit-normalizing-flows (commit d8babe4). The code is
from the PyTorch 1.4 era: see impflow_env.py for the stand-ins it needs; nothing of the reference is
changed.
"""

import sys

import impflow_env
import numpy as np
import torch

impflow_env.install(sys.argv[1])

from lib.layers.base.activations import Swish  # noqa: E402
from lib.layers.base.mixed_lipschitz import InducedNormLinear  # noqa: E402
from lib.layers.implicit_block import imBlock  # noqa: E402


def branch(dim, hidden):
    return torch.nn.Sequential(
        InducedNormLinear(dim, hidden, coeff=0.9, domain=2, codomain=2, n_iterations=5),
        Swish(),
        InducedNormLinear(hidden, dim, coeff=0.9, domain=2, codomain=2, n_iterations=5),
    )


def case(dim, seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    block = imBlock(branch(dim, 16), branch(dim, 16)).double()
    x = torch.randn(5, dim, dtype=torch.float64)
    out = {"dim": dim, "x": x.clone()}
    block.train()
    np.random.seed(seed + 1)
    torch.manual_seed(seed + 1)
    x_in = x.clone().requires_grad_(True)
    z, logpz = block(x_in, torch.zeros(5, 1, dtype=torch.float64))
    loss = (0.5 * z.pow(2).sum(1, keepdim=True) - logpz).mean()
    loss.backward()
    out["train_z"], out["train_logpz"] = z.detach(), logpz.detach()
    out["train_grad_x"] = x_in.grad.clone()
    out["train_grads"] = {name: p.grad.clone() for name, p in block.named_parameters() if p.grad is not None}
    block.zero_grad()
    block.eval()
    np.random.seed(seed + 2)
    torch.manual_seed(seed + 2)
    z, logpz = block(x, torch.zeros(5, 1, dtype=torch.float64))
    out["eval_z"], out["eval_logpz"] = z.detach(), logpz.detach()
    with torch.no_grad():
        out["inverse_x"] = block.inverse(z.detach())
    out["state_dict"] = {k: v.clone() for k, v in block.state_dict().items()}
    return out


if __name__ == "__main__":
    torch.save({"d2": case(2, 0), "d12": case(12, 10)}, sys.argv[2])
