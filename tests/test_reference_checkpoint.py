"""A state_dict written by the reference code loads into resflow_cuda.models.ResidualFlow without a
dummy forward and gives the reference's outputs and gradients.

tests/data/reference_resflow_small.pt was made by running rtqichen/residual-flows (commit 8170138c)
itself, on torch 2.13 CPU: ``ResidualFlow((2, 3, 8, 8), n_blocks=[1, 1], intermediate_dim=8,
factor_out=False, actnorm=True, init_layer=LogitTransform(0.05), fc_end=True, fc_idim=8, vnorms="2222",
activation_fn="swish", preact=True, first_resblock=True, coeff=0.98, n_lipschitz_iters=5,
n_power_series=None, n_dist="poisson", n_exact_terms=2, grad_in_forward=True)`` after
``torch.manual_seed(0)``; ``x = torch.rand(4, 3, 8, 8) * 0.9 + 0.05`` drawn next; one training-mode
forward on ``x`` (ActNorm and u / v initialisation); then eval outputs after ``np.random.seed(3);
torch.manual_seed(3)``, and training-mode outputs and the gradients of ``mean(|z|²/2 + delta)`` after
``np.random.seed(5); torch.manual_seed(5)``. It holds the state_dict (taken at the end), x, and those
outputs and gradients.

Its generator is tests/data/make_reference_resflow.py (``checkpoint``). Rerun on another CPU it gives the
stored values to float32 rounding, not bit for bit (``--check`` prints the differences): the committed
file is kept as it was.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from resflow_cuda import models
from resflow_cuda.nn import LogitTransform

FIXTURE = Path(__file__).resolve().parent / "data" / "reference_resflow_small.pt"

pytestmark = [pytest.mark.filterwarnings("ignore:.*did not converge"), pytest.mark.parity]


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE)


def _ours():
    torch.manual_seed(1234)  # other initial weights: everything must come from the state_dict
    return models.ResidualFlow((2, 3, 8, 8), n_blocks=[1, 1], intermediate_dim=8, factor_out=False, actnorm=True,
                               init_layer=LogitTransform(0.05), fc_end=True, fc_idim=8, vnorms="2222",
                               activation_fn="swish", preact=True, first_resblock=True, coeff=0.98,
                               n_lipschitz_iters=5, n_power_series=None, n_dist="poisson", n_exact_terms=2,
                               grad_in_forward=True)


def test_reference_state_dict_loads_strictly_without_a_dummy_forward(reference):
    model = _ours()
    state = reference["state_dict"]
    assert list(model.state_dict()) == list(state)  # same keys in the same order
    resized = [k for k, v in state.items() if model.state_dict()[k].shape != v.shape]
    assert resized and all(k.endswith((".u", ".v")) for k in resized)  # the convolutions' post-forward u / v
    model.load_state_dict(state)  # strict
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0)


def test_outputs_and_gradients_match_the_reference(reference):
    model = _ours()
    model.load_state_dict(reference["state_dict"])
    x = reference["x"]
    model.eval()
    np.random.seed(3)
    torch.manual_seed(3)
    with torch.no_grad():
        z, delta = model(x, torch.zeros(4, 1))
    torch.testing.assert_close(z, reference["z"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta, reference["delta"], atol=1e-4, rtol=1e-6)
    model.train()
    np.random.seed(5)
    torch.manual_seed(5)
    z, delta = model(x, torch.zeros(4, 1))
    torch.testing.assert_close(z.detach(), reference["z_train"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta.detach(), reference["delta_train"], atol=1e-4, rtol=1e-6)
    loss = (0.5 * z.pow(2).sum(1) + delta.squeeze(1)).mean()
    params = dict(model.named_parameters())
    names = sorted(reference["grads"])
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    for name, grad in zip(names, grads):
        torch.testing.assert_close(grad, reference["grads"][name], atol=1e-4, rtol=1e-3, msg=name)
