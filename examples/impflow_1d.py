"""A function one ImplicitBlock fits and two residual blocks cannot (ImpFlow, Lu et al. 2021, Sec. 3).

In 1-D a residual block y = x + g(x) with Lip(g) <= L has slope in [1 - L, 1 + L], so a stack of two
has slope at most (1 + L)^2, while an implicit block z + g_z(z) = x + g_x(x) has slope
(1 + g_x') / (1 + g_z') anywhere in [(1 - L) / (1 + L), (1 + L) / (1 - L)]. The branches here are
LipSwish MLPs with one hidden layer and coefficient 0.97 per linear layer (L = 0.94, 5 power
iterations after every Adam step): at most 3.77 for two residual blocks against 32 for one implicit
block. The target f(x) = 4 tanh(1.5 x) on [-2, 2] has slope 6 at the origin. Both models train by
least squares on the same points; the script reports the error and the steepest slope each reaches
and writes a PNG of both fits and their slopes:

    python examples/impflow_1d.py
    python examples/impflow_1d.py --device cuda
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import resflow_cuda
from resflow_cuda.nn import ImplicitBlock, LipSwish, SequentialFlow, get_linear, iResBlock

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # _common.py beside this script, also under runpy.run_path
    sys.path.insert(0, str(HERE))
import _common  # noqa: E402

COEFF = 0.97
LIP = COEFF ** 2  # two normalized linear layers and a 1-Lipschitz activation


def target(x: torch.Tensor) -> torch.Tensor:
    """f(x) = 4 tanh(1.5 x): slope 6 at the origin, 0.06 at |x| = 2."""
    return 4 * torch.tanh(1.5 * x)


def target_slope(x: torch.Tensor) -> torch.Tensor:
    return 6 / torch.cosh(1.5 * x) ** 2


def branch(width: int) -> nn.Sequential:
    lin = dict(coeff=COEFF, n_iterations=5, domain=2, codomain=2)
    return nn.Sequential(get_linear(1, width, **lin), LipSwish(), get_linear(width, 1, **lin))


def build(kind: str, width: int) -> nn.Module:
    if kind == "implicit":
        return ImplicitBlock(branch(width), branch(width), threshold=40)
    return SequentialFlow([iResBlock(branch(width)), iResBlock(branch(width))])


def slopes(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    y = model(x)
    return torch.autograd.grad(y.sum(), x)[0]


def train(kind: str, args, x: torch.Tensor, y: torch.Tensor, log) -> dict:
    torch.manual_seed(args.seed)
    model = build(kind, args.width).to(x.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    history = []
    for step in range(args.niters + 1):
        if step % args.log_every == 0 or step == args.niters:
            with torch.no_grad():
                mse = float(((model(x) - y) ** 2).mean())
            history.append((step, mse))
            log(f"{kind:>9}  step {step:5d}  mse {mse:.4f}")
        if step == args.niters:
            break
        idx = torch.randint(0, x.shape[0], (args.batch_size,), device=x.device)
        loss = ((model(x[idx]) - y[idx]) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        resflow_cuda.update_lipschitz(model)
    model.eval()
    with torch.no_grad():
        fit = model(x)
    return dict(model=model, fit=fit, slope=slopes(model, x), history=history)


def main(argv=None) -> dict:
    parser = _common.parser(__doc__)
    parser.add_argument("--niters", type=int, default=3000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--log-every", type=int, default=500)
    _common.add_common(parser, out="docs/examples")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    x = torch.linspace(-2, 2, 1024, device=device).view(-1, 1)
    y = target(x)
    start = time.time()
    results = {kind: train(kind, args, x, y, print) for kind in ("implicit", "residual")}
    elapsed = time.time() - start
    true_slope = target_slope(x)
    summary = {}
    for kind, r in results.items():
        mse = r["history"][-1][1]
        summary[kind] = dict(mse=mse, max_slope=float(r["slope"].max()), min_slope=float(r["slope"].min()))
        print(f"{kind:>9}: final mse {mse:.4f}, slopes {summary[kind]['min_slope']:.2f} .. "
              f"{summary[kind]['max_slope']:.2f} (target {float(true_slope.min()):.2f} .. "
              f"{float(true_slope.max()):.2f})")
    print(f"both trained in {elapsed:.0f} s")

    plt = _common.pyplot()
    fig, (ax_f, ax_s) = plt.subplots(1, 2, figsize=(10, 4))
    xs = x.view(-1).cpu().numpy()
    ax_f.plot(xs, y.view(-1).cpu().numpy(), "k", lw=3, alpha=0.35, label="target")
    ax_s.plot(xs, true_slope.view(-1).cpu().numpy(), "k", lw=3, alpha=0.35, label="target")
    labels = {"implicit": "1 ImplicitBlock", "residual": "2 iResBlocks"}
    for kind, r in results.items():
        ax_f.plot(xs, r["fit"].view(-1).cpu().numpy(), label=f"{labels[kind]} (mse {summary[kind]['mse']:.3f})")
        ax_s.plot(xs, r["slope"].view(-1).cpu().numpy(), label=labels[kind])
    ax_s.axhline((1 + LIP) ** 2, color="gray", ls="--", lw=1, label="(1 + L)² bound of 2 residual blocks")
    ax_f.set_title("f(x)")
    ax_s.set_title("f'(x)")
    ax_s.set_yscale("log")
    for ax in (ax_f, ax_s):
        ax.legend(fontsize=8)
        ax.set_xlabel("x")
    fig.tight_layout()
    png = _common.save(fig, Path(args.out) / "impflow-1d.png", dpi=110)
    print(f"wrote {png}")
    return dict(summary=summary, png=png, seconds=elapsed,
                history={kind: r["history"] for kind, r in results.items()})


if __name__ == "__main__":
    main()
