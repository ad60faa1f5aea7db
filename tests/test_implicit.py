"""ImplicitBlock (ImpFlow) and the root finders: the equation is solved, log-dets are exact where
they should be, implicit gradients equal autograd through a converged unrolled solve, round trips,
bad input, and the reference's own numbers (tests/data/reference_implicit_small.pt, written by
tests/data/make_reference_implicit.py running ImpFlow's imBlock, commit d8babe4)."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from resflow_cuda import solvers
from resflow_cuda.estimators import batch_jacobian
from resflow_cuda.nn import ImplicitBlock, LipSwish, get_conv2d, get_linear, update_lipschitz

from assertions import assert_none_or_zero, assert_unbiased, shift_roulette_survival
from jacobians import brute_logdet

FIXTURE = Path(__file__).resolve().parent / "data" / "reference_implicit_small.pt"
F64 = torch.float64


def mlp(dim: int, hidden: int = 16, coeff: float = 0.9) -> nn.Sequential:
    lin = dict(coeff=coeff, n_iterations=5, domain=2, codomain=2)
    return nn.Sequential(get_linear(dim, hidden, **lin), LipSwish(), get_linear(hidden, dim, **lin))


def convnet(channels: int, hidden: int = 6, coeff: float = 0.8) -> nn.Sequential:
    conv = dict(coeff=coeff, n_iterations=20, domain=2, codomain=2)
    return nn.Sequential(get_conv2d(channels, hidden, 3, 1, 1, **conv), LipSwish(),
                         get_conv2d(hidden, channels, 3, 1, 1, **conv))


def block(dim: int = 3, coeff: float = 0.9, **options) -> ImplicitBlock:
    b = ImplicitBlock(mlp(dim, coeff=coeff), mlp(dim, coeff=coeff), **options).to(F64)
    update_lipschitz(b, n_iterations=50)
    return b


def unrolled(b: ImplicitBlock, x: torch.Tensor, steps: int = 200):
    """z by fixed-point iteration with the whole graph kept (the truth for gradients)."""
    target = x + b.nnet_x(x)
    z = x
    for _ in range(steps):
        z = target - b.nnet_z(z)
    return z


def jacobian_of(net: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """(B, D, D) Jacobians of net at v (B, D), differentiable."""
    v = v if v.requires_grad else v.requires_grad_(True)
    return batch_jacobian(net(v), v)


# -- solvers ---------------------------------------------------------------------------------


def test_broyden_solves_a_linear_contraction_per_sample():
    torch.manual_seed(1)
    a = 0.4 * torch.randn(4, 6, 6, dtype=F64) / 6 ** 0.5
    c = torch.randn(4, 6, dtype=F64)
    x, report = solvers.find_root(lambda v: c - torch.einsum("bij,bj->bi", a, v), c, 30, 1e-12)
    truth = torch.linalg.solve(torch.eye(6, dtype=F64) + a, c)
    assert report.method == "broyden" and report.converged and report.sample_converged.all()
    # residual < 1e-12 * sqrt(24): |x - truth| <= |(I + a)^-1| * 4.9e-12 <= 2e-11 (|(I + a)^-1| < 4 here)
    torch.testing.assert_close(x, truth, atol=1e-10, rtol=0)
    assert report.sample_residuals.shape == (4,) and report.iterations <= 13  # 2n steps for linear problems


def test_broyden_reports_samples_that_did_not_converge():
    torch.manual_seed(2)
    c = torch.randn(3, 5, dtype=F64)
    scale = torch.tensor([0.1, 0.1, 0.99], dtype=F64).view(3, 1)
    x, report = solvers.broyden(lambda v: c - scale * torch.tanh(v) - v, torch.zeros_like(c), 2, 1e-12)
    assert not report.converged and report.iterations == 2
    assert report.sample_residuals.shape == (3,)
    assert not report.sample_converged.all()


def test_divergence_falls_back_to_fixed_point_iteration():
    calls = {"n": 0}

    def expanding_then_contracting(v):
        calls["n"] += 1
        return 0.5 * v + 1.0 if calls["n"] > 3 else 1e9 * (v + 1.0)

    x0 = torch.zeros(2, 3, dtype=F64)
    x, report = solvers.find_root(expanding_then_contracting, x0, 30, 1e-10)
    assert report.method == "fixed_point" and report.converged
    torch.testing.assert_close(x, torch.full_like(x0, 2.0), atol=1e-5, rtol=0)  # squared-step rule: |dx| < 1e-5


def test_fixed_point_stops_on_non_finite_steps():
    x, report = solvers.fixed_point(lambda v: v * float("nan"), torch.ones(2, 2), 1000, 1e-5)
    assert report.iterations == 0 and report.diverged and not report.converged
    assert torch.isnan(x).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fixed_point_stops_on_one_non_finite_element_among_converged_ones(bad):
    # Every other element is at its fixed point after the first step (ratio 0): one NaN / Inf must still stop
    # the iteration as non-finite, not as converged.
    def map_fn(v):
        out = torch.full_like(v, 2.0)
        out[1, 2] = bad
        return out

    x, report = solvers.fixed_point(map_fn, torch.full((3, 4), 2.0, dtype=F64), 1000, 1e-5)
    assert report.iterations == 0 and report.diverged and not report.converged
    assert report.sample_converged.tolist() == [True, False, True]


@pytest.mark.parametrize("kwargs, match", [(dict(max_steps=-1), "max_steps"), (dict(eps=float("nan")), "eps"),
                                           (dict(eps=-1.0), "eps")])
def test_solvers_refuse_bad_arguments(kwargs, match):
    args = dict(max_steps=3, eps=1e-6) | kwargs
    with pytest.raises(ValueError, match=match):
        solvers.broyden(lambda v: -v, torch.zeros(2, 2), **args)
    with pytest.raises(ValueError, match=match):
        solvers.fixed_point(lambda v: v, torch.zeros(2, 2), **args)


# -- the block -------------------------------------------------------------------------------


def test_forward_solves_the_implicit_equation_and_inverse_round_trips(device):
    b = block(4, eps_forward=1e-12, eps_sample=1e-12).to(device)
    x = torch.randn(6, 4, dtype=F64).to(device)
    z = b(x)
    with torch.no_grad():  # the solve's residual: |G|_2 < 1e-12 * sqrt(24) = 4.9e-12 over the batch
        torch.testing.assert_close(z + b.nnet_z(z), x + b.nnet_x(x), atol=1e-10, rtol=0)
    assert b.last_forward_report.converged and b.last_forward_report.sample_converged.all()
    # z and the inverse each within 4.9e-12 / (1 - L) of their roots (L <= 0.81); z's error reaches x times
    # (1 + L) / (1 - L): <= 2.7e-10 in all
    torch.testing.assert_close(b.inverse(z), x, atol=1e-9, rtol=0)


def test_round_trip_on_images(device):
    torch.manual_seed(3)
    b = ImplicitBlock(convnet(2), convnet(2), eps_forward=1e-11, eps_sample=1e-11).to(F64)
    x = torch.randn(2, 2, 5, 5, dtype=F64)
    b(x)  # records the input size of the convolutions (their lazy initialisation on the CPU)
    b, x = b.to(device), x.to(device)
    update_lipschitz(b, n_iterations=50)
    z = b(x)
    # as above with tolerance 1e-11 * sqrt(100) and L <= 0.64: <= 1e-10 / 0.36 * (1 + 1.64 / 0.36) ~ 1.6e-9
    torch.testing.assert_close(b.inverse(z), x, atol=1e-8, rtol=0)


def test_eval_logdet_is_exact_for_small_inputs():
    b = block(3).eval()
    x = torch.randn(5, 3, dtype=F64)
    b.eps_forward = 1e-13
    # brute force's Jacobian rows come from the backward solve (residual < eps_backward * sqrt(D)): its log-det errs
    # by <= D sqrt(D) eps_backward ((1 + L) / (1 - L))^2 (L <= 0.81), 4.7e-11 here (4.7e-8 at the default 1e-10)
    b.eps_backward = 1e-13
    z, logpz = b(x, torch.zeros(5, 1, dtype=F64))
    truth = brute_logdet(lambda v: b(v), x)  # through the implicit gradient
    torch.testing.assert_close(-logpz, truth, atol=1e-8, rtol=0)


def test_exact_trace_series_matches_the_exact_logdet_beyond_ten_dimensions():
    # as above: D sqrt(D) eps_backward ((1 + L) / (1 - L))^2 with L <= 0.25 is 1.2e-11 (1.2e-8 at the default
    # eps_backward 1e-10, above the asserted 1e-9); the series' tail past 60 terms is < D 0.25^61
    b = block(12, coeff=0.5, exact_trace=True, n_power_series=60, eps_forward=1e-13, eps_backward=1e-13)
    x = torch.randn(3, 12, dtype=F64)
    z, logpz = b(x, torch.zeros(3, 1, dtype=F64))
    torch.testing.assert_close(-logpz.detach(), brute_logdet(lambda v: b(v), x), atol=1e-9, rtol=0)


def _stochastic_logdet_check(grad_in_forward, neumann_grad, calls=300):
    """The Russian-roulette estimate (the reference's decision tree in training for D > 10 inputs) over
    ``calls`` seeded calls, checked against the exact log-det by assert_unbiased. One call draws one set of N
    for its whole batch (20 copies of 2 points), so the independent draws are the per-call means per point.
    No exact terms: every term goes through the roulette's weights (with the default two, the terms left to
    it are too small here for any check to see a wrong weight)."""
    b = block(12, coeff=0.6, grad_in_forward=grad_in_forward, neumann_grad=neumann_grad, n_samples=4,
              eps_forward=1e-12, n_exact_terms=0)
    x = torch.randn(2, 12, dtype=F64)
    np.random.seed(0)
    draws = []
    for _ in range(calls):
        b(x.repeat(20, 1), torch.zeros(40, 1, dtype=F64))
        draws.append(b.last_logdet_estimate.view(20, 2).mean(0))
    truth = brute_logdet(lambda v: b.eval()(v), x).view(-1)
    # 5 standard errors of the mean of the per-call draws, seeded (assertions.py); the brute-force truth errs by
    # ~1e-10 (the solves' tolerances), far inside one standard error
    assert_unbiased(torch.stack(draws), truth, what="implicit log-det")


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("neumann_grad", [False, True])
def test_stochastic_logdet_is_unbiased(grad_in_forward, neumann_grad):
    _stochastic_logdet_check(grad_in_forward, neumann_grad)


def test_stochastic_logdet_check_rejects_a_biased_roulette(monkeypatch):
    """Negative control: the same check with a wrong roulette weight (assertions.py)."""
    shift_roulette_survival(monkeypatch)
    with pytest.raises(AssertionError, match="standard errors"):
        _stochastic_logdet_check(False, False)


def test_gradients_equal_autograd_through_a_converged_unrolled_solve(device):
    b = block(3, coeff=0.6, eps_forward=1e-13, eps_backward=1e-13, brute_force=True).to(device)
    x = torch.randn(4, 3, dtype=F64).to(device).requires_grad_(True)
    weights = torch.randn(4, 3, dtype=F64).to(device)

    def loss_of(z, logpz):
        return (weights * z).sum() + (z ** 2).sum() - logpz.sum()

    z, logpz = b(x, torch.zeros(4, 1, dtype=F64, device=device))
    params = [p for p in b.parameters() if p.requires_grad]
    ours = torch.autograd.grad(loss_of(z, logpz), [x, *params], allow_unused=True)

    x2 = x.detach().requires_grad_(True)
    z2 = unrolled(b, x2)
    eye = torch.eye(3, dtype=F64, device=device)
    jac_x = eye + jacobian_of(b.nnet_x, x2)
    jac_z = eye + jacobian_of(b.nnet_z, z2)
    logpz2 = -(torch.logdet(jac_x) - torch.logdet(jac_z)).view(-1, 1)
    truth = torch.autograd.grad(loss_of(z2, logpz2), [x2, *params], allow_unused=True)
    # Broyden: residual < 1e-13 * sqrt(12), so |z - z*| <= 3.5e-13 / (1 - L) ~ 5e-13 (L <= 0.36); 200 unrolled steps
    # contract to rounding. The backward solve (same tolerance) puts ~5e-13 relative into the gradients.
    torch.testing.assert_close(z, z2, atol=1e-11, rtol=0)
    for name, a, t in zip(["x", *[n for n, p in b.named_parameters() if p.requires_grad]], ours, truth):
        if t is None:
            assert_none_or_zero(a, name)
            continue
        torch.testing.assert_close(a, t, atol=1e-9, rtol=1e-8, msg=name)
    assert b.last_backward_report.converged


def test_inverse_is_differentiable(device):
    b = block(3, coeff=0.6, eps_sample=1e-13, eps_backward=1e-13).to(device)
    z = torch.randn(4, 3, dtype=F64).to(device).requires_grad_(True)
    x = b.inverse(z)
    (grad_z,) = torch.autograd.grad(x.sum(), z)
    eye = torch.eye(3, dtype=F64, device=device)
    jac_x = eye + jacobian_of(b.nnet_x, x.detach())
    jac_z = eye + jacobian_of(b.nnet_z, z.detach())
    truth = torch.linalg.solve(jac_x, jac_z).sum(1)  # 1^T dx/dz with dx/dz = (I + J_x)^-1 (I + J_z)
    # both solves stop at residuals < 1e-13 * sqrt(12): ~1e-12 with the (1 + L) / (1 - L) factors (L <= 0.36)
    torch.testing.assert_close(grad_z, truth, atol=1e-9, rtol=0)


def _cpu(*tensors):
    return [None if t is None else t.detach().cpu() for t in tensors]


# (D, options, training): the exact log-det through the implicit gradient (brute force, eval), and for D > 10
# the Neumann gradient, the basic estimator with backward-in-forward and the exact-trace series.
CROSS_DEVICE = [(3, dict(brute_force=True), True), (3, dict(), False), (12, dict(n_samples=2), True),
                (12, dict(neumann_grad=False, grad_in_forward=True, n_dist="poisson"), True),
                (12, dict(exact_trace=True, n_power_series=8), True), (12, dict(), False)]


@pytest.mark.parametrize("dim,options,training", CROSS_DEVICE,
                         ids=["brute-force", "eval-d3", "neumann", "basic-in-forward", "exact-trace", "eval-d12"])
def test_cuda_matches_cpu(dim, options, training, cuda):
    """Forward, log-det, gradients and inverse on CUDA against the same block on the CPU. The draws are the
    same on both: N from NumPy, and the reference's Rademacher probes are drawn on the CPU on every device."""
    b = block(dim, coeff=0.6, eps_forward=1e-13, eps_backward=1e-13, eps_sample=1e-13, **options).train(training)
    moved = copy.deepcopy(b).to(cuda)
    x = torch.randn(5, dim, dtype=F64)
    results = []
    for blk in (b, moved):
        device = next(blk.parameters()).device
        np.random.seed(4)
        torch.manual_seed(4)
        xi = x.to(device).requires_grad_(True)
        z, logpz = blk(xi, torch.zeros(5, 1, dtype=F64, device=device))
        params = [p for p in blk.parameters() if p.requires_grad]
        grads = torch.autograd.grad((z ** 2).sum() - logpz.sum(), [xi, *params], allow_unused=True)
        results.append(_cpu(z, logpz, blk.inverse(z.detach()), *grads))
        assert blk.last_forward_report.converged and blk.last_inverse_report.converged
    # every solve stops at a residual < 1e-13 sqrt(5 D) on each device, so z, the inverse and the gradients
    # (through backward solves of the same tolerance) agree to ~1e-12 with L <= 0.36: the tolerances of
    # test_gradients_equal_autograd_through_a_converged_unrolled_solve
    for i, (ours, theirs) in enumerate(zip(results[1], results[0])):
        if theirs is None:
            assert_none_or_zero(ours, str(i))
        else:
            torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-8, msg=lambda m: f"output {i}: {m}")


def test_memory_does_not_grow_with_solver_steps():
    """No graph is kept through the solver: the saved tensors of one training step do not depend on
    the number of Broyden steps."""
    sizes, steps = [], []
    for threshold in (2, 30):
        b = block(8, threshold=threshold, eps_forward=1e-14)
        x = torch.randn(64, 8, dtype=F64, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            with pytest.warns(RuntimeWarning) if threshold == 2 else contextlib.nullcontext():
                b(x, torch.zeros(64, 1, dtype=F64))
        sizes.append(sum(saved))
        steps.append(b.last_forward_report.iterations)
    assert steps[0] == 2 and steps[1] > 4
    assert sizes[0] == sizes[1] > 0


def test_non_convergence_warns_and_reports_per_sample():
    b = block(4, threshold=1, eps_forward=1e-14)
    with pytest.warns(RuntimeWarning, match="forward solve did not converge"):
        b(torch.randn(3, 4, dtype=F64))
    report = b.last_forward_report
    assert not report.converged and report.sample_residuals.shape == (3,)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_a_non_finite_input_is_refused_before_any_branch_sees_it(direction):
    # A branch with state that its forward changes in training (a BatchNorm's running statistics): a refused
    # input must leave it as it was, not filled with NaN.
    nets = [torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)).double() for _ in range(2)]
    b = ImplicitBlock(*nets).train()
    before = {k: v.clone() for k, v in b.state_dict().items()}
    bad = torch.randn(4, 3, dtype=F64)
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        getattr(b, direction)(bad)
    changed = [k for k, v in b.state_dict().items() if not torch.equal(before[k], v)]
    assert changed == []


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="nnet_z"):
        ImplicitBlock(mlp(2), "not a module")
    with pytest.raises(ValueError, match="same module"):
        net = mlp(2)
        ImplicitBlock(net, net)
    for kwargs, match in ((dict(threshold=-1), "threshold"), (dict(eps_forward=0.0), "eps_forward"),
                          (dict(n_dist="uniform"), "n_dist"), (dict(geom_p=1.0), "geom_p"),
                          (dict(n_exact_terms_test=-2), "n_exact_terms_test")):
        with pytest.raises(ValueError, match=match):
            ImplicitBlock(mlp(2), mlp(2), **kwargs)
    b = block(2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        b(torch.tensor([[float("nan"), 0.0]], dtype=F64))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        b(torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="D <= 10"):
        block(12, brute_force=True)(torch.zeros(2, 12, dtype=F64), torch.zeros(2, 1, dtype=F64))


# -- the reference's numbers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE)


@pytest.mark.parity
@pytest.mark.parametrize("case", ["d2", "d12"])
def test_matches_the_reference_implementation(reference, case, device):
    # on CUDA too: the reference's draws (NumPy's N, Rademacher probes drawn on the CPU) are the same there
    ref = reference[case]
    dim = ref["dim"]
    torch.manual_seed(99)  # other initial weights: everything must come from the state_dict
    b = ImplicitBlock(mlp(dim), mlp(dim)).to(F64)
    b.load_state_dict(ref["state_dict"])  # strict: only the reference's frozen copies are dropped
    assert set(b.state_dict()) == {k for k in ref["state_dict"] if "_copy." not in k}
    b = b.to(device)
    zero = torch.zeros(5, 1, dtype=F64, device=device)
    seed = 0 if dim == 2 else 10
    b.train()
    np.random.seed(seed + 1)
    torch.manual_seed(seed + 1)
    x = ref["x"].clone().to(device).requires_grad_(True)
    z, logpz = b(x, zero)
    loss = (0.5 * z.pow(2).sum(1, keepdim=True) - logpz).mean()
    loss.backward()
    torch.testing.assert_close(z.detach().cpu(), ref["train_z"], atol=2e-6, rtol=0)
    torch.testing.assert_close(logpz.detach().cpu(), ref["train_logpz"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.cpu(), ref["train_grad_x"], atol=1e-5, rtol=1e-4)
    grads = {name: p.grad for name, p in b.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref["train_grads"])
    for name, g in grads.items():
        torch.testing.assert_close(g.cpu(), ref["train_grads"][name], atol=1e-5, rtol=1e-4, msg=name)
    b.eval()
    np.random.seed(seed + 2)
    torch.manual_seed(seed + 2)
    z, logpz = b(ref["x"].to(device), zero)
    torch.testing.assert_close(z.detach().cpu(), ref["eval_z"], atol=2e-6, rtol=0)
    torch.testing.assert_close(logpz.detach().cpu(), ref["eval_logpz"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.inverse(z.detach()).cpu(), ref["inverse_x"], atol=2e-5, rtol=0)
