"""Host syncs per training and evaluation step, counted with the profiler (deterministic, unlike
timings): none for iResBlock stacks and ResidualFlow; for ImplicitBlock only inside its root solves,
whose convergence tests read the device once per step (the log-det path reads nothing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from resflow_cuda import models, solvers
from resflow_cuda.estimators import HostCopies, series_plan
from resflow_cuda.nn import ImplicitBlock, InducedNormConv2d, InducedNormLinear, iResBlock, LipSwish
from resflow_cuda.solvers import SOLVE_EVENT

SYNC = "aten::_local_scalar_dense"


def _syncs(step) -> list[list[str]]:
    """The ancestor names of every host sync of one call of ``step`` (after a warm-up call)."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    chains = []
    for event in prof.events():
        if event.name == SYNC:
            chain, parent = [], event.cpu_parent
            while parent is not None:
                chain.append(parent.name)
                parent = parent.cpu_parent
            chains.append(chain)
    return chains


def _mlp(dims):
    layers = []
    for i, o in zip(dims[:-1], dims[1:]):
        layers += [LipSwish(), InducedNormLinear(i, o, coeff=0.97, n_iterations=5)]
    return torch.nn.Sequential(*layers)


def _train_step(blocks, x):
    def step():
        z, logp = x, torch.zeros(x.shape[0], 1)
        for block in blocks:
            z, logp = block(z, logp)
        (0.5 * z.pow(2).flatten(1).sum(1, keepdim=True) - logp).mean().backward()
    return step


@pytest.mark.parametrize("n_dist", ["geometric", "poisson"])
@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_an_iresblock_stack_trains_and_evaluates_without_host_syncs(n_dist, grad_in_forward):
    torch.manual_seed(0)
    np.random.seed(0)
    blocks = torch.nn.ModuleList(iResBlock(_mlp([2, 64, 64, 2]), n_dist=n_dist, grad_in_forward=grad_in_forward)
                                 for _ in range(3))
    x = torch.randn(64, 2)
    assert _syncs(_train_step(blocks, x)) == []
    blocks.eval()
    with torch.no_grad():
        assert _syncs(lambda: [b(x, torch.zeros(64, 1)) for b in blocks]) == []


def test_a_conv_iresblock_trains_without_host_syncs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(LipSwish(), InducedNormConv2d(3, 8, 3, 1, 1, coeff=0.9, n_iterations=2), LipSwish(),
                              InducedNormConv2d(8, 3, 3, 1, 1, coeff=0.9, n_iterations=2))
    assert _syncs(_train_step([iResBlock(net, grad_in_forward=True)], torch.randn(4, 3, 6, 6))) == []


def test_residual_flow_trains_and_evaluates_without_host_syncs():
    torch.manual_seed(0)
    model = models.ResidualFlow((4, 3, 8, 8), n_blocks=[1, 1], intermediate_dim=16, factor_out=False,
                                actnorm=True, fc=False, n_lipschitz_iters=None, sn_atol=1e-3, sn_rtol=1e-3,
                                n_dist="poisson", grad_in_forward=True)
    x = torch.rand(4, 3, 8, 8)
    model(x, torch.zeros(4, 1))  # the data-dependent ActNorm initialisation (one read, at the first call)

    def step():
        z, delta = model(x, torch.zeros(4, 1))
        (0.5 * z.pow(2).flatten(1).sum(1) + delta.view(-1)).mean().backward()
    assert _syncs(step) == []
    model.eval()
    with torch.no_grad():
        assert _syncs(lambda: model(x, torch.zeros(4, 1))) == []


def test_implicit_block_reads_the_device_only_in_its_root_solves():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(InducedNormLinear(2, 32, coeff=0.9, n_iterations=5), LipSwish(),
                                InducedNormLinear(32, 2, coeff=0.9, n_iterations=5)) for _ in range(2)]
    block = ImplicitBlock(*nets)
    chains = _syncs(_train_step([block], torch.randn(32, 2)))
    assert chains, "the solves test convergence on the host"
    assert all(SOLVE_EVENT in chain for chain in chains), [c[:3] for c in chains if SOLVE_EVENT not in c]
    # One read per Broyden step and one of the start per solve (forward and the backward's adjoint), and the
    # forward's NaN / Inf check of its input; nothing else: a converged solve leaves its report's residual on
    # the device until it is read.
    forward, backward = block.last_forward_report, block.last_backward_report
    assert forward.converged and backward.converged and forward.method == backward.method == "broyden"
    assert len(chains) == 1 + (forward.iterations + 1) + (backward.iterations + 1) > 3
    # exact: the report's residual is this same norm of the same tensor, only read later
    assert forward.residual == forward.sample_residuals.norm().item() < forward.tolerance


def test_the_fixed_point_iteration_reads_the_device_once_per_step():
    def solve():
        solve.result = solvers.fixed_point(lambda v: 0.5 * v + 1.0, torch.zeros(4, 3, dtype=torch.float64), 1000,
                                           1e-12)
    chains = _syncs(solve)
    report = solve.result[1]
    assert report.converged and report.iterations > 5
    assert len(chains) == report.iterations + 1  # the first map's step, then one per further step
    assert report.residual == report.sample_residuals.norm().item()  # the same norm, read later: exact


def test_host_copies_follow_the_parameters_they_copy():
    block = iResBlock(_mlp([2, 8, 2]), geom_p=0.5)
    host = HostCopies()
    assert host.read("geom_p", block.geom_p, torch.sigmoid) == 0.5
    # An optimiser-style in-place update, load_state_dict and a new tensor are all seen.
    with torch.no_grad():
        block.geom_p.add_(1.0)
    assert host.read("geom_p", block.geom_p, torch.sigmoid) == torch.sigmoid(block.geom_p).item()
    state = block.state_dict()
    state["geom_p"] = torch.tensor(-2.0, dtype=torch.float64)
    block.load_state_dict(state)
    assert host.read("geom_p", block.geom_p, torch.sigmoid) == torch.sigmoid(torch.tensor(-2.0, dtype=torch.float64)).item()
    block.geom_p = torch.nn.Parameter(torch.tensor(0.25, dtype=torch.float64))
    assert host.read("geom_p", block.geom_p, torch.sigmoid) == torch.sigmoid(torch.tensor(0.25, dtype=torch.float64)).item()


def test_a_block_draws_with_its_current_parameters():
    # After load_state_dict the block's draws use the new geom_p: the same plan as one read fresh.
    block = iResBlock(_mlp([2, 8, 2]), geom_p=0.5)
    block(torch.randn(4, 2), torch.zeros(4, 1))  # fills the host copy
    state = block.state_dict()
    state["geom_p"] = torch.tensor(np.log(0.2) - np.log(0.8), dtype=torch.float64)
    block.load_state_dict(state)
    np.random.seed(3)
    ours = block._plan(torch.randn(4, 2))
    np.random.seed(3)
    fresh = series_plan(True, None, block.n_exact_terms, "geometric", block.geom_p, block.lamb, 1, "numpy",
                        torch.device("cpu"))
    assert ours == fresh
