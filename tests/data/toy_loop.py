"""The reference toy scripts' training loop (residual-flows' and ImpFlow's ``train_toy.py``), shared
by the fixture generators (make_reference_toy.py, make_reference_implicit_flow.py, which run it with
the references' classes) and tests/test_dropin_training.py (which runs it with this library's), so
that both sides run the same procedure. Written for these tests; it imports nothing of either side.

The scripts' loop: loss ``-mean(log N(z) - delta_logp)``, Adam with weight decay, ``update_lipschitz``
after every step, the test loss in eval mode after ``update_lipschitz(model, 200)``. Two deviations,
so that the test can replay a run: the data are drawn beforehand from a torch generator (the scripts
draw them from NumPy's global RNG, which the blocks also draw from); the optimiser is
``torch.optim.Adam`` with the scripts' arguments (their ``optimizers.Adam`` calls
``Tensor.add_(Number, Tensor)``, gone from current PyTorch, and its weight decay is not in place,
i.e. has no effect).
"""

import math

import torch

F64 = torch.float64
# The runs' script flags: --dims 16-16 --nblocks 2 --coeff 0.9 --n-lipschitz-iters 5 --lr 1e-3 --weight-decay 1e-5
DIMS, N_BLOCKS, COEFF, N_LIP, LR, WD, BATCH, STEPS = (2, 16, 16, 2), 2, 0.9, 5, 1e-3, 1e-5, 64, 4


def batches(seed, extra=0):
    """``extra`` + STEPS training batches of BATCH points and a test batch of 4 BATCH: three Gaussian blobs."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], dtype=F64)
    out = []
    for n in [BATCH] * (extra + STEPS) + [4 * BATCH]:
        pick = torch.randint(0, 3, (n,), generator=g)
        out.append(centers[pick] + 0.3 * torch.randn(n, 2, generator=g, dtype=F64))
    return out[:-1], out[-1]


def update_lipschitz_by_isinstance(kinds):
    """The scripts' update_lipschitz over the given Lipschitz layer classes."""

    def update_lipschitz(model, n_iterations):
        for m in model.modules():
            if isinstance(m, kinds):
                m.compute_weight(update=True, n_iterations=n_iterations)

    return update_lipschitz


def compute_loss(model, x):
    z, delta_logp = model(x, torch.zeros(x.shape[0], 1, dtype=x.dtype))
    logpz = (-0.5 * math.log(2 * math.pi) - z.pow(2) / 2).sum(1, keepdim=True)
    return -torch.mean(logpz - delta_logp)


def train(model, update_lipschitz, train_batches, test_batch):
    """(training losses, test loss) of the scripts' loop over the batches."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WD)
    losses = []
    model.train()
    for x in train_batches:
        optimizer.zero_grad()
        loss = compute_loss(model, x)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        update_lipschitz(model, N_LIP)
    update_lipschitz(model, 200)
    with torch.no_grad():
        model.eval()
        return losses, compute_loss(model, test_batch).item()
