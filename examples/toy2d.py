"""Learn a 2-D density with a Residual Flow, in a few minutes on a laptop CPU.

The model is the reference toy script's (residual-flows ``train_toy.py``): a stack of iResBlocks over
pre-activation LipSwish MLPs with InducedNormLinear layers (coefficient 0.9, 5 power iterations after
every Adam step), with ActNorm between blocks. It is smaller than the reference's (10 blocks of width
64 instead of 100 of width 128) and trains with a larger step for fewer steps (5e-3 and 2500 instead
of 1e-3 and 50000), so that it finishes in minutes. Training uses the unbiased Russian-roulette
log-det; the test NLL uses the exact 2-D determinant (eval mode). ``--arch implicit`` trains ImpFlow's toy
model instead (an ImplicitBlock over two MLPs per block, ImpFlow's ``train_toy.py --arch implicit``). Writes a
PNG with the data, the learned density and samples:

    python examples/toy2d.py --data pinwheel
    python examples/toy2d.py --data pinwheel --arch implicit --nblocks 5
    python examples/toy2d.py --data checkerboard --niters 5000 --device cuda
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import resflow_cuda
from resflow_cuda import models

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # _common.py beside this script, also under runpy.run_path
    sys.path.insert(0, str(HERE))
import _common  # noqa: E402

DATASETS = ("8gaussians", "pinwheel", "checkerboard", "moons", "2spirals")


def sample_data(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points of a 2-D toy density, roughly within [-4, 4]²."""
    if name == "8gaussians":
        angles = rng.integers(0, 8, n) * (2 * math.pi / 8)
        centers = 4 * np.stack([np.cos(angles), np.sin(angles)], 1)
        return ((centers + 0.5 * rng.standard_normal((n, 2))) / math.sqrt(2)).astype(np.float32)
    if name == "pinwheel":
        arms, radial, tangential, rate = 5, 0.3, 0.1, 0.25
        arm = rng.integers(0, arms, n)
        r = rng.standard_normal(n) * radial + 1
        t = rng.standard_normal(n) * tangential
        angle = arm * (2 * math.pi / arms) + rate * np.exp(r)
        x, y = r * np.cos(angle) - t * np.sin(angle), r * np.sin(angle) + t * np.cos(angle)
        return (2 * np.stack([x, y], 1)).astype(np.float32)
    if name == "checkerboard":
        x = rng.uniform(-2, 2, n)
        y = rng.uniform(0, 1, n) - 2 * rng.integers(0, 2, n) + (np.floor(x) % 2)
        return (2 * np.stack([x, y], 1)).astype(np.float32)
    if name == "moons":
        t = rng.uniform(0, math.pi, n)
        upper = rng.integers(0, 2, n).astype(bool)
        x = np.where(upper, np.cos(t), 1 - np.cos(t))
        y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
        pts = np.stack([x, y], 1) + 0.08 * rng.standard_normal((n, 2))
        return (2 * (pts - [0.5, 0.25])).astype(np.float32)
    if name == "2spirals":
        t = np.sqrt(rng.uniform(0, 1, n)) * 3 * math.pi
        sign = np.where(rng.integers(0, 2, n) == 1, 1.0, -1.0)[:, None]
        pts = sign * np.stack([-np.cos(t) * t, np.sin(t) * t], 1) + 0.4 * rng.standard_normal((n, 2))
        return (pts / 2.5).astype(np.float32)
    raise ValueError(f"--data: expected one of {DATASETS}, but got {name!r}")


def nll(model, x: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per sample under a standard normal base."""
    z, delta = model(x, x.new_zeros(x.shape[0], 1))
    return -(models.standard_normal_logprob(z).sum(1) - delta.squeeze(1))


@torch.no_grad()
def exact_test_nll(model, x: torch.Tensor, batch: int = 2000) -> float:
    model.eval()
    value = torch.cat([nll(model, chunk) for chunk in x.split(batch)]).mean().item()
    model.train()
    return value


@torch.no_grad()
def plot(model, data: np.ndarray, path: Path, title: str, device: torch.device) -> None:
    plt = _common.pyplot()
    model.eval()
    lim, n = 4.5, 200
    axis = torch.linspace(-lim, lim, n)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2).to(device)
    density = torch.cat([(-nll(model, g)).exp() for g in grid.split(4000)]).reshape(n, n).cpu()
    samples = model.inverse(torch.randn(5000, 2, device=device)).cpu().numpy()
    model.train()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (name, draw) in zip(axes, [
        ("data", lambda ax: ax.hist2d(data[:, 0], data[:, 1], bins=n // 2, range=[[-lim, lim]] * 2, cmap="viridis")),
        ("learned density (exact)", lambda ax: ax.imshow(density, extent=[-lim, lim, -lim, lim], origin="lower",
                                                         cmap="viridis")),
        ("samples (inverse of z ~ N(0, I))",
         lambda ax: ax.hist2d(samples[:, 0], samples[:, 1], bins=n // 2, range=[[-lim, lim]] * 2, cmap="viridis")),
    ]):
        draw(ax)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    _common.save(fig, path, dpi=90)


def main(argv=None) -> dict:
    parser = _common.parser(__doc__)
    parser.add_argument("--data", choices=DATASETS, default="pinwheel")
    parser.add_argument("--niters", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--nblocks", type=int, default=10)
    parser.add_argument("--arch", choices=["iresnet", "implicit"], default="iresnet",
                        help="iResBlocks (Residual Flows) or ImplicitBlocks (ImpFlow)")
    parser.add_argument("--dims", default="64-64-64", help="hidden widths of each block's MLP")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam step (the reference: 1e-3 for 50k steps)")
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--test-size", type=int, default=10000)
    _common.add_common(parser, out="examples/out")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    device = torch.device(args.device)
    _common.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    dims = tuple(int(d) for d in args.dims.split("-"))
    model = models.toy_model(n_blocks=args.nblocks, dims=dims, actnorm=True, vnorms="2" * (len(dims) + 2),
                             arch=args.arch).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-5)
    test = torch.from_numpy(sample_data(args.data, args.test_size, rng)).to(device)
    model(torch.from_numpy(sample_data(args.data, args.batch_size, rng)).to(device))  # ActNorm's data init
    start, history = time.time(), [(0, exact_test_nll(model, test))]
    print(f"before training: exact test NLL {history[0][1]:.3f} nats")
    bar = tqdm(range(1, args.niters + 1), desc=f"toy2d {args.data}", mininterval=1.0)
    for itr in bar:
        x = torch.from_numpy(sample_data(args.data, args.batch_size, rng)).to(device)
        loss = nll(model, x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        resflow_cuda.update_lipschitz(model, n_iterations=5)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if itr % args.log_every == 0 or itr == args.niters:
            test_nll = exact_test_nll(model, test)
            history.append((itr, test_nll))
            tqdm.write(f"iter {itr:5d}  train loss {loss.item():.3f}  exact test NLL {test_nll:.3f} nats  "
                       f"({time.time() - start:.0f} s)")
    resflow_cuda.update_lipschitz(model, n_iterations=200)  # as the reference before evaluation
    final = exact_test_nll(model, test)
    suffix = "" if args.arch == "iresnet" else f"-{args.arch}"
    path = Path(args.out) / f"toy2d-{args.data}{suffix}.png"
    plot(model, test.cpu().numpy(), path, f"{args.data}{suffix}: exact test NLL {final:.3f} nats after {args.niters} "
         f"steps", device)
    print(f"{args.data}: exact test NLL {final:.3f} nats after {args.niters} steps ({time.time() - start:.0f} s); "
          f"wrote {path}")
    return {"test_nll": final, "history": history, "png": path}


if __name__ == "__main__":
    main()
