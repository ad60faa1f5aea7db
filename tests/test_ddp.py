"""DistributedDataParallel on CPU (gloo, 2 processes): the toy model trained for a few steps on
halves of a global batch ends with the same parameters and Lipschitz buffers on both ranks, equal to
one process trained on the whole batch. The blocks take the exact 2-D log-det (brute_force) so the
runs are deterministic; update_lipschitz runs on every rank after every step, as in training."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 3
GLOBAL_BATCH = 16


def _model():
    from resflow_cuda import models

    torch.manual_seed(0)
    return models.toy_model(n_blocks=2, dims=(16, 16), brute_force=True, vnorms="2222").double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, GLOBAL_BATCH, 2, generator=g, dtype=torch.float64) * 0.7 + 0.3


def _nll(model, x):
    from resflow_cuda import models

    z, delta = model(x, x.new_zeros(x.shape[0], 1))
    return -(models.standard_normal_logprob(z).sum(1) - delta.squeeze(1)).mean()


def _train(model, batches, step_model):
    import resflow_cuda

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for x in batches:
        optimizer.zero_grad()
        _nll(model, x).backward()
        optimizer.step()
        resflow_cuda.update_lipschitz(step_model, n_iterations=5)


def _worker(rank: int, world: int, port: int, out_dir: str, package: str) -> None:
    import resflow_cuda

    # a spawned process builds its sys.path from the parent's: it must import the same package
    assert resflow_cuda.__file__ == package, (resflow_cuda.__file__, package)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        # geom_p and lamb are parameters that no loss uses (as in the reference): find_unused_parameters
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        half = GLOBAL_BATCH // world
        _train(ddp, [x[rank * half:(rank + 1) * half] for x in _data()], model)
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process_on_the_global_batch(tmp_path):
    import resflow_cuda

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), resflow_cuda.__file__), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _model()
    _train(single, list(_data()), single)
    expected = single.state_dict()
    assert list(ranks[0]) == list(expected)
    moved = [k for k in expected if not torch.equal(expected[k], _model().state_dict()[k])]
    assert any(k.endswith("weight") for k in moved) and any(k.endswith((".u", ".v")) for k in moved)
    for key, value in expected.items():
        # both ranks apply the same all-reduced gradient (a + b = b + a for 2 ranks) and the same updates: bit-exact
        torch.testing.assert_close(ranks[1][key], ranks[0][key], atol=0, rtol=0, msg=f"ranks differ in {key}")
        # float64, only summation orders differ (2 halves of 8 vs 16 samples, thread counts): ~16*2^-53 relative per
        # step over 3 steps and 5 power iterations, << 1e-10 / 1e-8; a wrong gradient average moves weights by ~lr|g|.
        torch.testing.assert_close(ranks[0][key], value, atol=1e-10, rtol=1e-8, msg=f"DDP != one process in {key}")
