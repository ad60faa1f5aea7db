"""Writes the residual-flows fixtures of tests/data by running rtqichen/residual-flows' own code.

Usage: python make_reference_resflow.py RESFLOWS_DIR OUTDIR [--check] [NAME ...]
where RESFLOWS_DIR holds ``resflows/`` of rtqichen/residual-flows at commit 8170138c850a (e.g.
``git archive 8170138c850a | tar -x -C RESFLOWS_DIR``). The code imports on current PyTorch as it is:
nothing of the reference is changed or patched. NAME picks fixtures (default: all); ``--check`` compares
with the files already in OUTDIR (largest difference per tensor) instead of writing them.

Fixtures (``reference_resflow_<NAME>_small.pt``, except the first), each run on the CPU:

- ``checkpoint`` -> reference_resflow_small.pt (tests/test_reference_checkpoint.py), float32: the
  recipe in that test's docstring. Its x is ``torch.rand(4, 3, 8, 8) * 0.9 + 0.05`` drawn right after
  the model, and the state_dict is the one at the end (its ``last_*`` buffers are those of the seeded
  training forward).
- ``geometric``: iResBlocks with ``n_dist="geometric"`` and the basic estimator (dense and conv
  branches, several samples of n, and the brute-force 2-D determinant in training), float64.
- ``factor_out``: two-scale ``ResidualFlow(factor_out=True)`` models, float64.
- ``lipschitz``: SpectralNormLinear / SpectralNormConv2d (3x3 and 1x1, fixed steps and tolerances)
  and LopLinear / LopConv2d (every closed-form norm pair, local and global), float64.
- ``learnable_ord``: InducedNormConv2d with learnable norm orders (3x3 and 1x1), float64.
- ``power_series``: iResBlocks and a ResidualFlow with ``n_power_series`` set, in training (truncated
  series) and in eval (which ignores it and runs the roulette with 20 exact terms), float64.

The float64 fixtures are made under ``torch.set_default_dtype(torch.float64)``: the reference builds
its normalisation factor from ``torch.ones(1)`` (the default dtype), which would round a float64
layer's factor to float32 (docs/parity.md#lipschitz-layers); ``lipschitz/sn_linear_float32_default``
is made under the float32 default to show that. Every case stores the state_dict the test loads, the
inputs, and the reference's outputs, gradients and buffers after its seeded calls;
tests/test_reference_fixtures.py replays each recipe on resflow_cuda.
"""

import contextlib
import sys

import numpy as np
import torch

ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
sys.path.insert(0, ARGS[0])

import resflows.layers as layers  # noqa: E402
import resflows.layers.base as base  # noqa: E402
from resflows.resflow import ResidualFlow  # noqa: E402

F64 = torch.float64
INF = float("inf")


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def grads_of(module, loss, *inputs):
    """Gradients of loss by parameter name (those that get one), then those of the inputs."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    out = torch.autograd.grad(loss, [p for _, p in named] + list(inputs), allow_unused=True)
    grads = {n: g for (n, _), g in zip(named, out) if g is not None}
    return grads, out[len(named):]


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def randn(shape, seed, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- checkpoint

def checkpoint():
    torch.manual_seed(0)
    model = ResidualFlow((2, 3, 8, 8), n_blocks=[1, 1], intermediate_dim=8, factor_out=False, actnorm=True,
                         init_layer=layers.LogitTransform(0.05), fc_end=True, fc_idim=8, vnorms="2222",
                         activation_fn="swish", preact=True, first_resblock=True, coeff=0.98, n_lipschitz_iters=5,
                         n_power_series=None, n_dist="poisson", n_exact_terms=2, grad_in_forward=True)
    x = torch.rand(4, 3, 8, 8) * 0.9 + 0.05
    zeros = torch.zeros(4, 1)
    with torch.no_grad():
        model(x)  # training mode: ActNorm's data initialisation and the convolutions' u / v
    model.eval()
    np.random.seed(3)
    torch.manual_seed(3)
    with torch.no_grad():
        z, delta = model(x, zeros)
    model.train()
    np.random.seed(5)
    torch.manual_seed(5)
    z_train, delta_train = model(x, zeros)
    loss = (0.5 * z_train.pow(2).sum(1) + delta_train.squeeze(1)).mean()
    grads, _ = grads_of(model, loss)
    return {"state_dict": snapshot(model), "x": x, "z": z, "delta": delta, "z_train": z_train.detach(),
            "delta_train": delta_train.detach(), "grads": grads}


# ---------------------------------------------------------------- iResBlock cases

def dense_branch(dim, hidden):
    return torch.nn.Sequential(
        base.InducedNormLinear(dim, hidden, coeff=0.9, n_iterations=5), base.Swish(),
        base.InducedNormLinear(hidden, dim, coeff=0.9, n_iterations=5))


def conv_branch(channels, hidden):
    return torch.nn.Sequential(
        base.InducedNormConv2d(channels, hidden, 3, 1, 1, coeff=0.9, n_iterations=5), base.Swish(),
        base.InducedNormConv2d(hidden, channels, 1, 1, 0, coeff=0.9, n_iterations=5))


def block_case(seed, branch, x_shape, **block_kwargs):
    """An iResBlock in float64: state after an initialising call, then a seeded training forward with
    its gradients (parameters and x) and buffers, then a seeded eval forward."""
    torch.manual_seed(seed)
    block = layers.iResBlock(branch(), **block_kwargs).double()
    x = randn(x_shape, seed + 100)
    logpx = randn((x_shape[0], 1), seed + 200)
    with torch.no_grad():
        block(x)  # the convolutions' lazy u / v; no draws of the estimator
    out = {"seed": seed, "kwargs": dict(block_kwargs), "x": x, "logpx": logpx, "state_dict": snapshot(block)}
    block.train()
    np.random.seed(seed + 1)
    torch.manual_seed(seed + 1)
    xr = x.clone().requires_grad_(True)
    y, logpy = block(xr, logpx)
    loss = (0.5 * y.pow(2).flatten(1).sum(1) - logpy.squeeze(1)).mean()
    out["train_grads"], (out["train_grad_x"],) = grads_of(block, loss, xr)
    out.update(train_y=y.detach(), train_logpy=logpy.detach(),
               train_buffers={k: v.clone() for k, v in block.named_buffers() if k.startswith("last_")})
    block.eval()
    np.random.seed(seed + 2)
    torch.manual_seed(seed + 2)
    y, logpy = block(x.clone(), logpx)
    out.update(eval_y=y.detach(), eval_logpy=logpy.detach())
    return out


def geometric():
    geo = dict(n_dist="geometric", neumann_grad=False, grad_in_forward=False)
    return {
        "dense": block_case(0, lambda: dense_branch(4, 16), (6, 4), geom_p=0.6, n_exact_terms=2, **geo),
        "dense_samples": block_case(10, lambda: dense_branch(3, 8), (5, 3), geom_p=0.3, n_samples=3,
                                    n_exact_terms=1, **geo),
        "brute_2d": block_case(20, lambda: dense_branch(2, 8), (5, 2), brute_force=True, **geo),
        "conv": block_case(30, lambda: conv_branch(2, 4), (2, 2, 4, 4), geom_p=0.5, n_exact_terms=2, **geo),
    }


def power_series():
    return {
        "neumann": block_case(40, lambda: dense_branch(4, 16), (6, 4), n_power_series=4, n_dist="poisson",
                              neumann_grad=True, grad_in_forward=True),
        "basic": block_case(50, lambda: dense_branch(4, 8), (5, 4), n_power_series=3, n_dist="geometric",
                            neumann_grad=False, grad_in_forward=False),
        "exact_trace": block_case(60, lambda: dense_branch(3, 8), (5, 3), n_power_series=5, exact_trace=True,
                                  n_dist="geometric"),
        "conv": block_case(70, lambda: conv_branch(2, 4), (2, 2, 4, 4), n_power_series=2, n_dist="poisson",
                           neumann_grad=True, grad_in_forward=False),
        "model": model_case(80, (2, 1, 8, 8), n_power_series=3, n_dist="poisson", n_exact_terms=0, fc_end=False),
    }


# ---------------------------------------------------------------- ResidualFlow cases

MODEL_KWARGS = dict(n_blocks=[1, 1], intermediate_dim=4, factor_out=True, actnorm=True, fc_end=True, fc_idim=4,
                    vnorms="2222", activation_fn="swish", preact=True, first_resblock=True, coeff=0.9,
                    n_lipschitz_iters=3, neumann_grad=True, grad_in_forward=False)


def model_case(seed, input_size, **kwargs):
    """A ResidualFlow in float64 with LogitTransform(0.05): state after an initialising training call,
    seeded eval and training forwards (z, delta, every gradient), the eval inverse of z."""
    kwargs = {**MODEL_KWARGS, **kwargs}
    torch.manual_seed(seed)
    model = ResidualFlow(input_size, init_layer=layers.LogitTransform(0.05), **kwargs).double()
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.rand(input_size, generator=g, dtype=F64) * 0.9 + 0.05
    zeros = torch.zeros(input_size[0], 1, dtype=F64)
    with torch.no_grad():
        model(x)  # training mode: ActNorm's data initialisation and the convolutions' u / v
    out = {"seed": seed, "kwargs": kwargs, "input_size": input_size, "x": x, "state_dict": snapshot(model)}
    model.eval()
    np.random.seed(seed + 1)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        z, delta = model(x, zeros)
        x_inv = model.inverse(z)
    out.update(z=z, delta=delta, x_inv=x_inv)
    model.train()
    np.random.seed(seed + 2)
    torch.manual_seed(seed + 2)
    xr = x.clone().requires_grad_(True)
    z, delta = model(xr, zeros)
    loss = (0.5 * z.pow(2).sum(1) + delta.squeeze(1)).mean()
    out["grads"], (out["grad_x"],) = grads_of(model, loss, xr)
    out.update(z_train=z.detach(), delta_train=delta.detach(),
               buffers={k: v.clone() for k, v in model.named_buffers() if k.rsplit(".", 1)[-1].startswith("last_")})
    return out


def factor_out():
    return {
        "roulette": model_case(0, (2, 1, 8, 8), n_power_series=None, n_dist="geometric", n_exact_terms=1),
        "poisson_grad_in_forward": model_case(10, (2, 2, 4, 4), n_power_series=None, n_dist="poisson",
                                              n_exact_terms=2, grad_in_forward=True, fc_end=False),
    }


# ---------------------------------------------------------------- Lipschitz layers

def layer_case(seed, make, x_shape, train=True):
    """A layer in float64, its weight scaled up (the normalisation is active) and moved off the u / v
    of its construction (so that the iteration count shows): the state before its first forward, then
    (after torch.manual_seed(seed + 1)) a forward in training or eval mode with the output, the
    gradients of sum(y * w) and the buffers, then an eval forward."""
    torch.manual_seed(seed)
    layer = make().double()
    with torch.no_grad():
        layer.weight.mul_(3.0).add_(randn(layer.weight.shape, seed + 300))
    x = randn(x_shape, seed + 100)
    out = {"seed": seed, "x": x, "state_dict": snapshot(layer), "train": train}
    layer.train(train)
    torch.manual_seed(seed + 1)
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    w = randn(y.shape, seed + 200)
    out["grads"], (out["grad_x"],) = grads_of(layer, (y * w).sum(), xr)
    out.update(y=y.detach(), w=w, buffers={k: v.clone() for k, v in layer.named_buffers()})
    layer.eval()
    with torch.no_grad():
        out["eval_y"] = layer(x)
    return out


def lipschitz():
    cases = {
        "sn_linear": layer_case(0, lambda: base.SpectralNormLinear(5, 7, coeff=0.8, n_iterations=3), (4, 5)),
        "sn_linear_tol": layer_case(1, lambda: base.SpectralNormLinear(6, 4, coeff=0.9, atol=1e-3, rtol=1e-3),
                                    (3, 6)),
        "sn_conv": layer_case(2, lambda: base.SpectralNormConv2d(2, 3, 3, 1, 1, coeff=0.8, n_iterations=2),
                              (2, 2, 4, 4)),
        "sn_conv_stride": layer_case(3, lambda: base.SpectralNormConv2d(2, 3, 3, 2, 1, coeff=0.8, n_iterations=4),
                                     (1, 2, 5, 5)),
        "sn_conv_tol": layer_case(4, lambda: base.SpectralNormConv2d(2, 2, 3, 1, 1, coeff=0.9, atol=1e-3,
                                                                     rtol=1e-3), (1, 2, 4, 4)),
        "sn_conv_1x1": layer_case(5, lambda: base.SpectralNormConv2d(3, 4, 1, 1, 0, coeff=0.8, n_iterations=2),
                                  (1, 3, 3, 3)),
        "sn_conv_eval": layer_case(6, lambda: base.SpectralNormConv2d(2, 2, 3, 1, 1, coeff=0.8, n_iterations=2),
                                   (1, 2, 3, 3), train=False),
    }
    with default_dtype(torch.float32):  # the reference's float32 torch.ones(1) in the factor
        cases["sn_linear_float32_default"] = layer_case(
            0, lambda: base.SpectralNormLinear(5, 7, coeff=0.8, n_iterations=3), (4, 5))
    # every closed-form pair, local and global, for LopLinear; LopConv2d shares its code (local for all
    # pairs, global for one)
    pairs = [(1, 1), (1, 2), (1, INF), (2, INF), (INF, INF)]
    for i, (p, q) in enumerate(pairs):
        tag = f"{p}_{q}".replace("inf", "i")
        for local in (True, False):
            cases[f"lop_linear_{tag}_{'local' if local else 'global'}"] = layer_case(
                10 + i, lambda: base.LopLinear(4, 5, coeff=0.7, domain=p, codomain=q, local_constraint=local), (2, 4))
        cases[f"lop_conv_{tag}_local"] = layer_case(
            20 + i, lambda: base.LopConv2d(2, 2, 3, 1, 1, coeff=0.7, domain=p, codomain=q), (1, 2, 3, 3))
    cases["lop_conv_1_2_global"] = layer_case(
        30, lambda: base.LopConv2d(2, 3, 3, 1, 1, coeff=0.7, domain=1, codomain=2, local_constraint=False),
        (1, 2, 3, 3))
    return cases


# ---------------------------------------------------------------- learnable norm orders

def learnable_case(seed, kernel, padding, x_shape, domain0, codomain0):
    """InducedNormConv2d with learnable orders in float64: the state before the first forward, then after
    torch.manual_seed(seed + 1) a training forward (lazy u / v: 200 steps and the 10 restarts) with the
    output and the gradients of sum(y * w) (weight, bias, orders, x); then the weight perturbed,
    compute_weight(update=True) (the power iteration with the orders) and compute_one_iter() with its
    gradients with respect to the orders."""
    torch.manual_seed(seed)
    domain = torch.nn.Parameter(torch.tensor(domain0, dtype=F64))
    codomain = torch.nn.Parameter(torch.tensor(codomain0, dtype=F64))
    layer = base.InducedNormConv2d(2, 3, kernel, 1, padding, coeff=0.8, domain=domain, codomain=codomain,
                                   n_iterations=3).double()
    with torch.no_grad():
        layer.weight.mul_(3.0)
    x = randn(x_shape, seed + 100)
    out = {"seed": seed, "x": x, "kernel": kernel, "padding": padding, "state_dict": snapshot(layer)}
    for key in ("u", "v"):  # allocated uninitialised (new_empty) until the first forward: store zeros
        out["state_dict"][key].zero_()
    torch.manual_seed(seed + 1)
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    w = randn(y.shape, seed + 200)
    out["grads"], (out["grad_x"],) = grads_of(layer, (y * w).sum(), xr)
    out.update(y=y.detach(), w=w, state_after_forward=snapshot(layer))
    noise = randn(layer.weight.shape, seed + 300) * 0.5
    with torch.no_grad():
        layer.weight.add_(noise)
        layer.compute_weight(update=True)
    out.update(noise=noise, state_after_update=snapshot(layer))
    sigma = layer.compute_one_iter()
    out["one_iter"] = sigma.detach()
    out["one_iter_grads"] = dict(zip(("domain", "codomain"), torch.autograd.grad(sigma, [domain, codomain])))
    return out


def learnable_ord():
    return {
        "conv3x3": learnable_case(0, 3, 1, (2, 2, 4, 4), 0.3, -0.4),
        "conv1x1": learnable_case(1, 1, 0, (2, 2, 3, 3), -0.2, 0.5),
    }


# ---------------------------------------------------------------- writing

FIXTURES = {
    "checkpoint": ("reference_resflow_small.pt", checkpoint),
    "geometric": ("reference_resflow_geometric_small.pt", geometric),
    "factor_out": ("reference_resflow_factor_out_small.pt", factor_out),
    "lipschitz": ("reference_resflow_lipschitz_small.pt", lipschitz),
    "learnable_ord": ("reference_resflow_learnable_ord_small.pt", learnable_ord),
    "power_series": ("reference_resflow_power_series_small.pt", power_series),
}


def tensors(obj, prefix=""):
    """(path, tensor) for every tensor of a nested dict / tuple."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")
    elif isinstance(obj, torch.Tensor):
        yield prefix, obj


def one_storage_per_dtype(data):
    """The same nested data with every tensor a view into one flat tensor per dtype: torch.save then
    writes one record per dtype instead of one per tensor (most of a small file otherwise)."""
    found = list(tensors(data))
    flats, views = {}, {}
    for dtype in {t.dtype for _, t in found}:
        group = [t for _, t in found if t.dtype == dtype]
        flats[dtype] = torch.cat([t.detach().reshape(-1) for t in group])
    offsets = dict.fromkeys(flats, 0)
    for _, t in found:
        start = offsets[t.dtype]
        views[id(t)] = flats[t.dtype][start:start + t.numel()].view(t.shape)
        offsets[t.dtype] = start + t.numel()

    def rebuild(obj):
        if isinstance(obj, dict):
            return {k: rebuild(v) for k, v in obj.items()}
        if isinstance(obj, tuple):
            return tuple(rebuild(v) for v in obj)
        if isinstance(obj, list):
            return [rebuild(v) for v in obj]
        return views[id(obj)] if isinstance(obj, torch.Tensor) else obj

    return rebuild(data)


def check(name, new, path):
    old = dict(tensors(torch.load(path)))
    new = dict(tensors(new))
    if sorted(old) != sorted(new):
        print(f"{name}: different entries: {sorted(set(old) ^ set(new))}")
    equal, worst_abs, worst_rel = 0, (0.0, "-"), (0.0, "-")
    for key in sorted(set(old) & set(new)):
        a, b = old[key], new[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            print(f"{name}{key}: {tuple(a.shape)} {a.dtype} stored, {tuple(b.shape)} {b.dtype} now")
            continue
        if torch.equal(a, b):
            equal += 1
            continue
        diff = (a.double() - b.double()).abs().max().item()
        scale = a.double().abs().max().item()
        print(f"{name}{key}: max |diff| {diff:.3g}, largest |entry| {scale:.3g}")
        worst_abs = max(worst_abs, (diff, key))
        if scale > 1e-3:  # rounding-level zeros (cancelled gradients) have no meaningful relative error
            worst_rel = max(worst_rel, (diff / scale, key))
    print(f"{name}: {equal} of {len(old)} tensors bit-identical; largest |diff| {worst_abs[0]:.3g} ({worst_abs[1]}); "
          f"largest relative difference of a tensor with entries above 1e-3: {worst_rel[0]:.3g} ({worst_rel[1]})")


def main():
    outdir, names = ARGS[1], ARGS[2:] or list(FIXTURES)
    for name in names:
        filename, make = FIXTURES[name]
        if name == "checkpoint":
            data = make()
        else:
            with default_dtype(torch.float64):
                data = make()
        if "--check" in sys.argv:
            check(name, data, f"{outdir}/{filename}")
        else:
            torch.save(one_storage_per_dtype(data), f"{outdir}/{filename}")


if __name__ == "__main__":
    main()
