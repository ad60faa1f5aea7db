"""resflow_cuda.integrations.normflows: normflows' own flow test harness (normflows.flows.flow_test)
on our Residual / LipschitzMLP / LipschitzCNN, parity with normflows' classes on shared weights and
seeds, and training inside a normflows NormalizingFlow."""

from __future__ import annotations

import contextlib

import normflows as nf
import numpy as np
import pytest
import torch
from normflows.flows.flow_test import FlowTest

import resflow_cuda
from jacobians import brute_logdet
from resflow_cuda.integrations import normflows as rnf

pytestmark = pytest.mark.filterwarnings("ignore:.*did not converge")


class TestResidualWithNormflowsHarness(FlowTest):
    """The cases of normflows' residual_test.py, on the adapter."""

    def test_residual_mlp(self):
        for latent, reduce_memory, exact_trace, n_dist, brute_force in [(2, False, True, "geometric", True),
                                                                        (2, True, True, "poisson", False),
                                                                        (4, True, False, "geometric", False),
                                                                        (5, False, False, "poisson", False)]:
            with self.subTest(latent=latent, reduce_memory=reduce_memory, exact_trace=exact_trace):
                net = rnf.LipschitzMLP([latent, 32, 32, latent], init_zeros=exact_trace, lipschitz_const=0.9)
                flow = rnf.Residual(net, reduce_memory=reduce_memory, n_dist=n_dist, exact_trace=exact_trace,
                                    brute_force=brute_force)
                inputs = torch.randn(3, latent)
                if exact_trace:
                    self.checkForwardInverse(flow, inputs, atol=1e-4, rtol=1e-4)
                else:
                    outputs, log_det = self.checkForward(flow, inputs)
                    assert log_det.shape == (3,)
                    inputs_, _ = self.checkInverse(flow, outputs)
                    self.assertClose(inputs, inputs_, atol=1e-4, rtol=1e-4)
                resflow_cuda.update_lipschitz(flow, 1)
                net.net[1].compute_one_iter()

    def test_residual_cnn(self):
        for kernel, latent, reduce_memory in [(1, 3, False), (3, 4, True)]:
            with self.subTest(kernel=kernel, latent=latent):
                net = rnf.LipschitzCNN([latent, 16, latent], 2 * [kernel])
                flow = rnf.Residual(net, reduce_memory=reduce_memory)
                inputs = torch.randn(1, latent, 4, 4)
                outputs, log_det = self.checkForward(flow, inputs)
                inputs_, _ = self.checkInverse(flow, outputs)
                self.assertClose(inputs, inputs_, atol=1e-4, rtol=1e-4)
                torch.mean(log_det).backward()
                resflow_cuda.update_lipschitz(flow, 1)


@contextlib.contextmanager
def _float64_default():
    """normflows' InducedNorm layers (like residual-flows') normalise by
    ``torch.max(torch.ones(1), sigma / coeff)``: the float32 ``ones(1)`` wins type promotion over the 0-dim
    float64 ``sigma``, so a float64 model's factor is rounded to float32 (relative error up to 2**-24),
    while ours stays in float64 (a deliberate difference, docs/guide.md "Lipschitz layers"). Under a float64
    default dtype ``ones(1)`` is float64 and that rounding is gone; normflows' forward creates no other
    tensor from the default dtype (its draws are ``randn_like`` and NumPy's), so nothing else changes."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parity
@pytest.mark.parametrize("reverse", [True, False])
@pytest.mark.parametrize("reduce_memory", [True, False])
def test_adapter_equals_normflows_on_shared_weights_and_seeds(reverse, reduce_memory):
    torch.manual_seed(0)
    theirs_net = nf.nets.LipschitzMLP([3, 16, 16, 3], lipschitz_const=0.9, init_zeros=False)
    ours_net = rnf.LipschitzMLP([3, 16, 16, 3], lipschitz_const=0.9, init_zeros=False)
    assert list(ours_net.state_dict()) == list(theirs_net.state_dict())
    ours_net.load_state_dict(theirs_net.state_dict())
    theirs = nf.flows.Residual(theirs_net, reverse=reverse, reduce_memory=reduce_memory).double()
    ours = rnf.Residual(ours_net, reverse=reverse, reduce_memory=reduce_memory).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    results = []
    for flow in (theirs, ours):
        np.random.seed(1)
        torch.manual_seed(1)
        with _float64_default():
            z, log_det = flow(x)
            grads = torch.autograd.grad((z.square().sum(1) - log_det).mean(), list(flow.parameters()),
                                        allow_unused=True)
        results.append((z, log_det, grads))
    (z0, l0, g0), (z1, l1, g1) = results
    # With normflows' factor in float64 (see _float64_default) the two sides differ only in summation
    # order: float64 dot products of at most 16 terms, chained through < 30 products per step, err by
    # < 30 * 16 * 2**-53 * |operands| ~ 5e-14 on these O(1) values; 1e-12 keeps a 20x margin and is
    # 5e4 times below the float32 rounding of the factor (2**-24 ~ 6e-8) that this test must not hide.
    tol = dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(z1, z0, **tol)
    torch.testing.assert_close(l1, l0, **tol)
    assert len(g1) == len(g0)  # zip would stop at the shorter list
    for a, b in zip(g1, g0):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **tol)


def test_adapter_trains_inside_a_normflows_model():
    torch.manual_seed(0)
    flows = [rnf.Residual(rnf.LipschitzMLP([2, 16, 16, 2], init_zeros=True)) for _ in range(2)]
    model = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(2), flows=flows)
    x = torch.randn(64, 2) * 0.5 + 1.0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        loss = model.forward_kld(x)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        resflow_cuda.update_lipschitz(model)
    assert loss.item() < first
    model = model.double().eval()  # 2-D inputs in eval mode: every block's log-det is exact
    for flow in flows:
        flow.iresblock.inverse_atol = flow.iresblock.inverse_rtol = 1e-24  # the sampling direction solves
    samples, log_q = model.sample(8)
    assert samples.shape == (8, 2)

    def to_base(v):  # the density direction: each Residual's inverse is its block's x + g(x), differentiable
        for flow in reversed(flows):
            v = flow.inverse(v)[0]
        return v

    # log q(x) by hand: the DiagGaussian base at the point the samples map back to, plus autograd's 2 x 2
    # log-det of that map. float64; the samples come from fixed-point solves stopped at steps ~1e-12
    # (tolerance 1e-24 on the squared step), which move log q by ~1e-11 at Lip(g) < 1
    z = to_base(samples)
    scale = model.q0.log_scale.detach().view(-1)
    base = -np.log(2 * np.pi) - (scale + 0.5 * ((z - model.q0.loc.detach().view(-1)) / scale.exp()).square()).sum(1)
    by_hand = base + brute_logdet(to_base, samples).view(-1)
    torch.testing.assert_close(log_q.detach(), by_hand.detach(), atol=1e-8, rtol=0)
