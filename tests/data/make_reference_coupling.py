"""Writes tests/data/reference_coupling_small.pt by running the coupling code of rtqichen/residual-flows.

Usage: python make_reference_coupling.py REFERENCE_DIR OUT
where REFERENCE_DIR holds the reference's ``resflows/`` package (commit 8170138c), e.g. extracted with
``git archive HEAD resflows | tar -x -C REFERENCE_DIR``. Nothing of the reference is changed; everything
runs in float64 on the CPU. The recipe is repeated in tests/test_coupling.py, which replays it on
resflow_cuda's modules.
"""

import sys

import torch

sys.path.insert(0, sys.argv[1])

import resflows.layers as layers  # noqa: E402
from resflows.resflow import ResidualFlow  # noqa: E402

# (name, constructor kwargs, input shape, input kind); the same table is in tests/test_coupling.py.
MODELS = [
    ("channel", dict(n_blocks=[2, 1], intermediate_dim=4, factor_out=True, quadratic=True, actnorm=True,
                     batchnorm=True, fc_end=True, fc_idim=4, activation_fn="swish", kernels="3-1-3"),
     (2, 2, 8, 8), "randn"),
    ("checkerboard", dict(n_blocks=[2, 1], intermediate_dim=4, factor_out=True, init_layer="logit", preact=True,
                          first_resblock=True, actnorm=True, fc_actnorm=True, fc_end=True, fc_idim=4, kernels="3-3",
                          activation_fn="softplus",
                          dropout=0.2), (2, 1, 8, 8), "rand"),
]


def make_input(shape, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "rand":
        return (torch.rand(shape, generator=g, dtype=torch.float64) * 0.9 + 0.05)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def grads_of(module, x, loss):
    named = dict(module.named_parameters())
    names = sorted(named)
    grads = torch.autograd.grad(loss, [named[n] for n in names] + [x])
    return {n: g for n, g in zip(names, grads[:-1])}, grads[-1]


def model_case(kwargs, shape, kind):
    kwargs = dict(kwargs)
    if kwargs.get("init_layer") == "logit":
        kwargs["init_layer"] = layers.LogitTransform(0.05)
    torch.manual_seed(0)
    model = ResidualFlow(shape, block_type="coupling", **kwargs).double()
    x = make_input(shape, kind, 1)
    zeros = torch.zeros(shape[0], 1, dtype=torch.float64)
    torch.manual_seed(2)
    with torch.no_grad():
        model(x, zeros)  # training mode: ActNorm's data initialisation, MovingBatchNorm's running mean
    out = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}, "x": x}
    model.eval()
    with torch.no_grad():
        z, delta = model(x, zeros)
        x_inv, logp_inv = model.inverse(z, delta)
    out.update(z=z, delta=delta, x_inv=x_inv, logp_inv=logp_inv)
    model.train()
    torch.manual_seed(5)
    xr = x.clone().requires_grad_(True)
    z, delta = model(xr, zeros)
    loss = (0.5 * z.pow(2).sum(1) + delta.squeeze(1)).mean()
    out["grads"], out["x_grad"] = grads_of(model, xr, loss)
    out.update(z_train=z.detach(), delta_train=delta.detach())
    return out


# (name, layer class, dim, mask / swap, net layers (in, out), input shape)
LAYERS = [
    ("coupling_swap0", "CouplingBlock", 6, False, (3, 6), (5, 6)),
    ("coupling_swap1", "CouplingBlock", 6, True, (3, 6), (5, 6)),
    ("channel0", "ChannelCouplingBlock", 4, "channel0", (2, 4), (2, 4, 3, 3)),
    ("channel1", "ChannelCouplingBlock", 4, "channel1", (2, 4), (2, 4, 3, 3)),
    ("checkerboard0", "MaskedCouplingBlock", 3, "checkerboard0", (3, 6), (2, 3, 3, 5)),
    ("checkerboard1", "MaskedCouplingBlock", 3, "checkerboard1", (3, 6), (2, 3, 3, 5)),
    ("masked_channel1", "MaskedCouplingBlock", 4, "channel1", (4, 8), (2, 4, 3, 4)),
]


def layer_net(n_in, n_out, flat):
    if flat:
        return torch.nn.Sequential(torch.nn.Linear(n_in, 4), torch.nn.ELU(), torch.nn.Linear(4, n_out))
    return torch.nn.Sequential(torch.nn.Conv2d(n_in, 4, 3, 1, 1), torch.nn.ELU(), torch.nn.Conv2d(4, n_out, 1))


def layer_case(cls_name, dim, option, net_io, shape, seed):
    torch.manual_seed(seed)
    net = layer_net(*net_io, flat=len(shape) == 2)
    cls = getattr(layers, cls_name)
    layer = (cls(dim, net, swap=option) if cls_name == "CouplingBlock" else cls(dim, net, mask_type=option)).double()
    x = make_input(shape, "randn", seed + 100) * 2
    logpx = make_input((shape[0], 1), "randn", seed + 200)
    xr = x.clone().requires_grad_(True)
    y, logpy = layer(xr, logpx)
    x_inv, logpx_inv = layer.inverse(y.detach(), logpy.detach())
    loss = (y.pow(2).sum() + y.sin().sum()) / 2 + logpy.sum()
    grads, x_grad = grads_of(layer, xr, loss)
    return {"state_dict": {k: v.clone() for k, v in layer.state_dict().items()}, "x": x, "logpx": logpx,
            "y": y.detach(), "logpy": logpy.detach(), "x_inv": x_inv.detach(), "logpx_inv": logpx_inv.detach(),
            "grads": grads, "x_grad": x_grad}


def pack(obj, buffers):
    """The same nested dict with every tensor a view into one flat buffer per dtype, so that
    torch.save writes a single storage per dtype (a few hundred small tensors otherwise cost more
    in zip records than in data)."""
    if isinstance(obj, dict):
        return {k: pack(v, buffers) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        buffers.setdefault(obj.dtype, []).append(obj)
    return obj


def share_storage(data):
    buffers = {}
    pack(data, buffers)
    views = {}
    for dtype, tensors in buffers.items():
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        offset = 0
        for t in tensors:
            views[id(t)] = flat[offset:offset + t.numel()].view(t.shape)
            offset += t.numel()

    def swap(obj):
        if isinstance(obj, dict):
            return {k: swap(v) for k, v in obj.items()}
        return views[id(obj)] if isinstance(obj, torch.Tensor) else obj

    return swap(data)


def main():
    data = {"models": {}, "layers": {}}
    for name, kwargs, shape, kind in MODELS:
        data["models"][name] = model_case(kwargs, shape, kind)
    for i, (name, cls_name, dim, option, net_io, shape) in enumerate(LAYERS):
        data["layers"][name] = layer_case(cls_name, dim, option, net_io, shape, 10 + i)
    torch.save(share_storage(data), sys.argv[2])


if __name__ == "__main__":
    main()
