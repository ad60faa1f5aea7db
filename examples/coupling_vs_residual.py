"""The coupling-vs-residual ablation of the Residual Flows paper (Table 4), on scikit-learn's 8×8 digits.

Trains examples/digits.py twice with the same settings, seed and data: the multi-scale
``ResidualFlow`` with iResBlocks, and with ``block_type='coupling'`` (the reference's ablation: affine
coupling blocks with checkerboard masks on the first scale, channel masks after the squeeze, and
coupling FC end blocks; the widths are chosen so that both have nearly the same number of
parameters). Reports held-out bits/dim of both and writes a PNG with the learning curves and
samples of each model:

    python examples/coupling_vs_residual.py
    python examples/coupling_vs_residual.py --epochs 100 --device cuda
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # _common.py beside this script, also under runpy.run_path
    sys.path.insert(0, str(HERE))
import _common  # noqa: E402


def main(argv=None) -> dict:
    parser = _common.parser(__doc__)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--nblocks", default="2-2", help="blocks per scale (both models)")
    parser.add_argument("--idim", type=int, default=32, help="branch width of the residual model")
    parser.add_argument("--coupling-idim", type=int, default=51,
                        help="width of the coupling networks (51: as many parameters as the residual model)")
    _common.add_common(parser, out="docs/examples")
    args = parser.parse_args(argv)
    digits = runpy.run_path(str(HERE / "digits.py"))
    common = ["--epochs", str(args.epochs), "--nblocks", args.nblocks, "--out", args.out, "--device", args.device,
              "--seed", str(args.seed)]
    results = {
        "residual": digits["main"](common + ["--idim", str(args.idim), "--block-type", "resblock"]),
        "coupling": digits["main"](common + ["--idim", str(args.coupling_idim), "--block-type", "coupling"]),
    }
    for name, r in results.items():
        print(f"{name:>9}: {r['parameters']:6d} parameters, held-out {r['test_bpd']:.3f} bits/dim, {r['seconds']:.0f} s")

    plt = _common.pyplot()
    import matplotlib.image as mpimg

    fig = plt.figure(figsize=(12, 4))
    ax = fig.add_subplot(1, 3, 1)
    for name, r in results.items():
        epochs, bpd = zip(*r["history"])
        ax.plot(epochs, bpd, label=f"{name} ({r['parameters']} params): {r['test_bpd']:.3f}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out bits/dim")
    ax.set_ylim(top=max(r["history"][1][1] for r in results.values()) + 0.5)
    ax.legend(fontsize=8)
    for i, (name, r) in enumerate(results.items()):
        panel = fig.add_subplot(1, 3, i + 2)
        panel.imshow(mpimg.imread(r["png"]))
        panel.set_title(f"{name} samples")
        panel.axis("off")
    fig.tight_layout()
    png = _common.save(fig, Path(args.out) / "coupling-vs-residual.png", dpi=100)
    print(f"wrote {png}")
    return dict(results=results, png=png)


if __name__ == "__main__":
    main()
