"""The pieces of the reference's models: the activation table, the fully connected residual
branch, one scale of the multi-scale model (residual or coupling blocks) and the stack of residual
blocks of the 2-D toy script (see :mod:`resflow_cuda.models`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..nn import (ActNorm1d, ActNorm2d, ChannelCouplingBlock, CouplingBlock, FullSort, Identity, ImplicitBlock,
                  InvertibleConv2d, InvertibleLinear, LipSwish, LipschitzCube, MaskedCouplingBlock, MaxMin,
                  MovingBatchNorm1d, MovingBatchNorm2d, SequentialFlow, Sin, SqueezeLayer, Zero, get_conv2d, get_linear,
                  iResBlock)

__all__ = ["ACT_FNS", "IMPLICIT_ACT_FNS", "TOY_ACT_FNS", "FCNet", "FCWrapper", "StackedCouplingBlocks",
           "StackediResBlocks", "parse_vnorms", "toy_model"]

# The reference's activation table: name -> factory(inplace).
ACT_FNS = {
    "softplus": lambda inplace: nn.Softplus(),
    "elu": lambda inplace: nn.ELU(inplace=inplace),
    "swish": lambda inplace: LipSwish(),
    "lcube": lambda inplace: LipschitzCube(),
    "identity": lambda inplace: nn.Identity(),
    "relu": lambda inplace: nn.ReLU(inplace=inplace),
}

# ImpFlow's table (``lib/implicit_flow.py``): the reference's and its Sin and Zero.
IMPLICIT_ACT_FNS = {**ACT_FNS, "sin": lambda inplace: Sin(), "zero": lambda inplace: Zero()}

# The toy and tabular scripts' tables (``train_toy.py`` of both references, ImpFlow's
# ``train_tabular.py``): name -> module class, called without arguments.
TOY_ACT_FNS = {
    "identity": Identity, "relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "selu": nn.SELU, "fullsort": FullSort,
    "maxmin": MaxMin, "swish": LipSwish, "lcube": LipschitzCube, "sin": Sin, "zero": Zero,
}


def parse_vnorms(vnorms: str) -> tuple[list[float], list[float]]:
    """The reference's norm string as (domains, codomains) of the layers between its characters.

    Args:
        vnorms: one norm order per layer boundary, digits or 'f' (infinity), e.g. '2222' or '122f'.

    Returns:
        ``(ps[:-1], ps[1:])``: the input and output norm orders of each layer, as floats.
    """
    if not isinstance(vnorms, str) or not vnorms or any(p != "f" and not p.isdigit() for p in vnorms):
        raise ValueError(f"vnorms: expected a string of digits and 'f' (e.g. '122f'), but got {vnorms!r}")
    ps = [math.inf if p == "f" else float(p) for p in vnorms]
    return ps[:-1], ps[1:]


def _check_activation(name: str, table: dict = ACT_FNS) -> None:
    if name not in table:
        raise ValueError(f"activation_fn: expected one of {sorted(table)}, but got {name!r}")


class FCWrapper(nn.Module):
    """Runs a flow layer for flat inputs on ``(B, C, H, W)`` by flattening and restoring the shape.
    ``forward``'s ``restore`` is ImpFlow's calling convention (no effect, as there).

    Args:
        fc_module: a flow layer on (B, C·H·W) with ``forward(x, logpx=None)`` and ``inverse``.

    Shapes:
        x, y: (B, C, H, W); logpx: (B, 1).
    """

    def __init__(self, fc_module: nn.Module) -> None:
        super().__init__()
        self.fc_module = fc_module

    def forward(self, x: Tensor, logpx: Tensor | None = None, restore: bool = False):
        shape = x.shape
        if logpx is None:
            return self.fc_module(x.reshape(shape[0], -1)).view(shape)
        y, logpy = self.fc_module(x.reshape(shape[0], -1), logpx)
        return y.view(shape), logpy

    def inverse(self, y: Tensor, logpy: Tensor | None = None):
        shape = y.shape
        if logpy is None:
            return self.fc_module.inverse(y.reshape(shape[0], -1)).view(shape)
        x, logpx = self.fc_module.inverse(y.reshape(shape[0], -1), logpy)
        return x.view(shape), logpx


class FCNet(nn.Module):
    """The reference's fully connected residual branch on ``(B, C, H, W)``: flatten, ``[act if preact]``,
    ``nhidden`` × (Lipschitz linear to ``idim``, act), ``[Dropout]``, Lipschitz linear back to
    ``C·H·W``, reshape (the layers are in ``nnet``, as the reference's).
    Parity with the reference: docs/parity.md#fcnet

    Args:
        input_shape: (C, H, W).
        idim: hidden width.
        lipschitz_layer: the linear layer factory, e.g. :func:`~resflow_cuda.nn.get_linear`; ``nn.Linear``
            for plain linear layers (then the Lipschitz arguments are unused).
        nhidden: number of hidden layers.
        coeff: the Lipschitz bound of every layer.
        domains: input norm order of each layer (the last entry is the output layer's).
        codomains: output norm order of each layer.
        n_iterations: power-iteration steps per update.
        activation_fn: a key of :data:`ACT_FNS`.
        preact: start with the activation.
        dropout: dropout probability before the output layer (0: none; not in place).
        sn_atol: absolute tolerance of the power iteration.
        sn_rtol: relative tolerance of the power iteration.
        learn_p: learnable norm orders (starting at 2) in place of domains / codomains.
        div_in: the input is ``C·H·W / div_in`` wide (2: the coupling baseline's conditioner, which
            sees half of the channels).
        act_fns: the activation table (default :data:`ACT_FNS`; ImpFlow's model: :data:`IMPLICIT_ACT_FNS`).

    Shapes:
        x: (B, C·H·W / div_in) or any shape with that many entries per sample; output: (B, C, H, W).

    ``forward``'s ``restore`` is ImpFlow's calling convention (no effect, as there).
    """

    def __init__(self, input_shape, idim: int, lipschitz_layer, nhidden: int, coeff: float, domains, codomains,
                 n_iterations, activation_fn: str, preact: bool, dropout: float, sn_atol, sn_rtol, learn_p: bool = False,
                 div_in: int = 1, *, act_fns: dict | None = None) -> None:
        super().__init__()
        act_fns = ACT_FNS if act_fns is None else act_fns
        _check_activation(activation_fn, act_fns)
        self.input_shape = tuple(input_shape)
        dim = math.prod(self.input_shape)
        layers = []
        last = dim // div_in
        if preact:
            layers.append(act_fns[activation_fn](False))
        if learn_p:
            domains = [nn.Parameter(torch.tensor(0.0)) for _ in range(len(domains))]
            codomains = domains[1:] + [domains[0]]

        def lip(a, b, i):
            if lipschitz_layer is nn.Linear:
                return nn.Linear(a, b)
            return lipschitz_layer(a, b, coeff=coeff, n_iterations=n_iterations, domain=domains[i],
                                   codomain=codomains[i], atol=sn_atol, rtol=sn_rtol)

        for i in range(nhidden):
            layers += [lip(last, idim, i), act_fns[activation_fn](True)]
            last = idim
        if dropout:
            # Not in place (the reference's is): the in-place activation before it (ELU, ReLU) needs its
            # output in backward. Same values and random draws.
            layers.append(nn.Dropout(dropout))
        layers.append(lip(last, dim, -1))
        self.nnet = nn.Sequential(*layers)

    def forward(self, x: Tensor, restore: bool = False) -> Tensor:
        y = self.nnet(x.reshape(x.shape[0], -1))
        return y.view(y.shape[0], *self.input_shape)


def _scale_chain(initial_size, block, squeeze, init_layer, n_blocks, quadratic, actnorm, fc_actnorm, fc, fc_end,
                 fc_nblocks, fc_idim, first_resblock, first_in_last_scale: bool = False) -> list[nn.Module]:
    """The module order of one scale, shared by the residual, coupling and implicit models:
    ``[init_layer]``, ``[ActNorm]`` before the first block, ``n_blocks`` × ([invertible linear map],
    ``block(fc_layer, first=...)``, [ActNorm], [FC ActNorm]), then a squeeze or, for the last scale,
    ``fc_nblocks`` FC end blocks ``block(True, fc_idim)`` each with an optional FC ActNorm. ``first``
    marks the first block with ``first_resblock``, in a scale that squeezes (the residual-flows
    reference) or in any scale (``first_in_last_scale``, ImpFlow)."""
    c, h, w = initial_size

    def actnorm_layer(fc_layer):
        return FCWrapper(ActNorm1d(c * h * w)) if fc_layer else ActNorm2d(c)

    def quadratic_layer(fc_layer):
        return FCWrapper(InvertibleLinear(c * h * w)) if fc_layer else InvertibleConv2d(c)

    chain = []
    if init_layer is not None:
        chain.append(init_layer)
    if first_resblock and actnorm:
        chain.append(actnorm_layer(fc))
    if first_resblock and fc_actnorm:
        chain.append(actnorm_layer(True))
    for i in range(n_blocks):
        if quadratic:
            chain.append(quadratic_layer(fc))
        chain.append(block(fc, first=(squeeze or first_in_last_scale) and first_resblock and i == 0))
        if actnorm:
            chain.append(actnorm_layer(fc))
        if fc_actnorm:
            chain.append(actnorm_layer(True))
    if squeeze:
        chain.append(SqueezeLayer(2))
    elif fc_end:
        for _ in range(fc_nblocks):
            chain.append(block(True, fc_idim))
            if actnorm or fc_actnorm:
                chain.append(actnorm_layer(True))
    return chain


def _branch_options(initial_size, vnorms: str, kernels: str, activation_fn: str, act_fns: dict, **options) -> dict:
    """The keyword arguments of :func:`_lipschitz_branch` for a scale, after checking the activation
    and that vnorms has one norm per layer boundary of the kernels."""
    _check_activation(activation_fn, act_fns)
    domains, codomains = parse_vnorms(vnorms)
    ks = [int(k) for k in kernels.split("-")]
    if len(domains) != len(ks):
        raise ValueError(f"vnorms {vnorms!r} gives {len(domains)} domains but kernels {kernels!r} has "
                         f"{len(ks)} layers: expected len(vnorms) == len(kernels) + 1")
    return dict(initial_size=initial_size, ks=ks, domains=domains, codomains=codomains, activation_fn=activation_fn,
                act_fns=act_fns, **options)


def _lipschitz_branch(fc_layer: bool, width: int, first: bool, *, initial_size, ks, domains, codomains, coeff,
                      n_lipschitz_iters, sn_atol, sn_rtol, activation_fn, preact, batchnorm, dropout, learn_p,
                      act_fns: dict = ACT_FNS) -> nn.Module:
    """One residual branch of a scale, as the reference builds it: an :class:`FCNet` of width ``width``
    (``fc_layer``), else Lipschitz convolutions with the kernels ``ks``: ``[BN, act if preact and not
    first]``, conv c -> width, ``[BN]``, act, (conv width -> width, ``[BN]``, act) per middle kernel,
    ``[Dropout2d]``, conv width -> c, ``[BN]`` (BN: MovingBatchNorm2d with ``batchnorm``)."""
    if fc_layer:
        return FCNet(initial_size, width, get_linear, len(ks) - 1, coeff, domains, codomains, n_lipschitz_iters,
                     activation_fn, preact, dropout, sn_atol, sn_rtol, learn_p, act_fns=act_fns)
    c = initial_size[0]
    if learn_p:
        dom = [nn.Parameter(torch.tensor(0.0)) for _ in ks]
        cod = dom[1:] + [dom[0]]
    else:
        dom, cod = domains, codomains
    layers = []
    if not first and preact:
        if batchnorm:
            layers.append(MovingBatchNorm2d(c))
        layers.append(act_fns[activation_fn](False))
    # first c -> width, middle width -> width, last width -> c (two layers even for one kernel)
    specs = [(c, width, ks[0], 0)] + [(width, width, k, i + 1) for i, k in enumerate(ks[1:-1])] + \
        [(width, c, ks[-1], len(ks) - 1)]
    for j, (a, b, k, norm) in enumerate(specs):
        layers.append(get_conv2d(a, b, k, 1, k // 2, coeff=coeff, n_iterations=n_lipschitz_iters,
                                 domain=dom[norm], codomain=cod[norm], atol=sn_atol, rtol=sn_rtol))
        if batchnorm:
            layers.append(MovingBatchNorm2d(b))
        if j < len(specs) - 1:
            layers.append(act_fns[activation_fn](True))
        if j == len(specs) - 2 and dropout:
            layers.append(nn.Dropout2d(dropout))  # not in place: the in-place activation before it
    return nn.Sequential(*layers)


class StackediResBlocks(SequentialFlow):
    """One scale of the :class:`ResidualFlow`: a SequentialFlow (keys ``chain.{j}.…``) of
    ``[init_layer]``, ``[ActNorm]``, ``n_blocks`` × ([InvertibleConv2d], iResBlock, [ActNorm2d],
    [FC ActNorm1d]), then a squeeze, or for the last scale ``fc_nblocks`` fully connected blocks.

    Args:
        initial_size: the input's (C, H, W).
        idim: hidden channels of the residual branches.
        squeeze: end with a squeeze (every scale but the last); else with the FC end blocks.
        fc_nblocks: number of FC end blocks (with ``fc_end``).
        the others: as :class:`ResidualFlow`.

    Shapes:
        x: (B, C, H, W); output: (B, 4C, H/2, W/2) with ``squeeze``, else (B, C, H, W); logpx: (B, 1).
    """

    def __init__(self, initial_size, idim, squeeze=True, init_layer=None, n_blocks=1, quadratic=False, actnorm=False,
                 fc_actnorm=False, batchnorm=False, dropout=0, fc=False, coeff=0.9, vnorms="122f",
                 n_lipschitz_iters=None, sn_atol=None, sn_rtol=None, n_power_series=5, n_dist="geometric",
                 n_samples=1, kernels="3-1-3", activation_fn="elu", fc_end=True, fc_nblocks=4, fc_idim=128,
                 n_exact_terms=0, preact=False, neumann_grad=True, grad_in_forward=False, first_resblock=False,
                 learn_p=False) -> None:
        branch_options = _branch_options(initial_size, vnorms, kernels, activation_fn, self._act_fns, coeff=coeff,
                                         n_lipschitz_iters=n_lipschitz_iters, sn_atol=sn_atol, sn_rtol=sn_rtol,
                                         preact=preact, batchnorm=batchnorm, dropout=dropout, learn_p=learn_p)
        block_options = dict(n_power_series=n_power_series, n_dist=n_dist, n_samples=n_samples,
                             n_exact_terms=n_exact_terms, neumann_grad=neumann_grad, grad_in_forward=grad_in_forward)

        def resblock(fc_layer, width=idim, first=False):
            return self._block(lambda: _lipschitz_branch(fc_layer, width, first, **branch_options), block_options)

        super().__init__(_scale_chain(initial_size, resblock, squeeze, init_layer, n_blocks, quadratic, actnorm,
                                      fc_actnorm, fc, fc_end, fc_nblocks, fc_idim, first_resblock,
                                      self._first_in_last_scale))

    # What subclasses with other blocks change (StackedImplicitBlocks): the activation table, whether the
    # first block of a scale that does not squeeze is marked, and the block over new branches.
    _act_fns = ACT_FNS
    _first_in_last_scale = False

    @staticmethod
    def _block(branch, block_options: dict) -> nn.Module:
        return iResBlock(branch(), **block_options)


class StackedCouplingBlocks(SequentialFlow):
    """One scale of ``ResidualFlow(block_type='coupling')``, the reference's coupling baseline: the
    module order of :class:`StackediResBlocks` (keys ``chain.{j}.…``) with coupling layers in place
    of the residual blocks:

    - image blocks: :class:`~resflow_cuda.nn.ChannelCouplingBlock` (``mask_type`` ``channel0/1``,
      the network sees half of the ``c`` channels and returns ``c``) when ``init_layer`` is
      ``None``, else :class:`~resflow_cuda.nn.MaskedCouplingBlock` (``checkerboard0/1``, the
      network sees all ``c`` channels and returns ``2c``). The network is plain ``nn.Conv2d``
      layers with the kernels of ``kernels``: ``[BN, act if preact and not the first block]``,
      conv to ``idim``, ``[BN]``, act, (conv ``idim`` → ``idim``, ``[BN]``, act) per middle kernel,
      ``[Dropout2d]``, conv to the output, ``[BN]`` (BN = ``MovingBatchNorm2d`` if ``batchnorm``);
    - FC end blocks (last scale, ``fc_end``) and all blocks with ``fc=True``:
      :class:`~resflow_cuda.nn.CouplingBlock` ``(c, FCNet(..., lipschitz_layer=nn.Linear,
      div_in=2))``, i.e. a channel split with an MLP over the flattened half;
    - the mask alternates ``…0``, ``…1``, ``…0``… over the coupling layers of the scale (image and
      FC ones counted together), starting with ``…0``.

    Args:
        as :class:`StackediResBlocks`; the Lipschitz, series and estimator arguments are accepted and
        ignored, as in the reference. An odd channel count with a channel split raises ``ValueError``.

    Shapes:
        as :class:`StackediResBlocks`.

    Parity with the reference: docs/parity.md#stackedcouplingblocks
    """

    def __init__(self, initial_size, idim, squeeze=True, init_layer=None, n_blocks=1, quadratic=False, actnorm=False,
                 fc_actnorm=False, batchnorm=False, dropout=0, fc=False, coeff=0.9, vnorms="122f",
                 n_lipschitz_iters=None, sn_atol=None, sn_rtol=None, n_power_series=5, n_dist="geometric",
                 n_samples=1, kernels="3-1-3", activation_fn="elu", fc_end=True, fc_nblocks=4, fc_idim=128,
                 n_exact_terms=0, preact=False, neumann_grad=True, grad_in_forward=False, first_resblock=False,
                 learn_p=False) -> None:
        _check_activation(activation_fn)
        ks = [int(k) for k in kernels.split("-")]
        c = initial_size[0]
        n_coupling = 0  # the reference's shared ``swap`` flag: odd-numbered coupling layers use mask ...1

        def next_parity() -> int:
            nonlocal n_coupling
            n_coupling += 1
            return (n_coupling - 1) % 2

        def coupling(fc_layer, width=idim, first=False):
            parity = next_parity()
            if fc_layer:
                net = FCNet(initial_size, width, nn.Linear, len(ks) - 1, None, None, None, None, activation_fn,
                            preact, dropout, None, None, False, div_in=2)
                return CouplingBlock(c, net, swap=bool(parity))
            if init_layer is None:
                block, mask, c_in, c_out = ChannelCouplingBlock, "channel", c // 2, c
            else:
                block, mask, c_in, c_out = MaskedCouplingBlock, "checkerboard", c, 2 * c
            if mask == "channel" and c % 2:
                raise ValueError(f"initial_size {tuple(initial_size)}: channel coupling (used without an init_layer) "
                                 f"expects an even number of channels, but got {c}")
            layers = []
            if not first and preact:
                if batchnorm:
                    layers.append(MovingBatchNorm2d(c_in))
                layers.append(ACT_FNS[activation_fn](False))
            specs = [(c_in, width, ks[0])] + [(width, width, k) for k in ks[1:-1]] + [(width, c_out, ks[-1])]
            for j, (a, b, k) in enumerate(specs):
                layers.append(nn.Conv2d(a, b, k, 1, k // 2))
                if batchnorm:
                    layers.append(MovingBatchNorm2d(b))
                if j < len(specs) - 1:
                    layers.append(ACT_FNS[activation_fn](True))
                if j == len(specs) - 2 and dropout:
                    layers.append(nn.Dropout2d(dropout))  # not in place, as FCNet's
            return block(c, nn.Sequential(*layers), mask_type=f"{mask}{parity}")

        super().__init__(_scale_chain(initial_size, coupling, squeeze, init_layer, n_blocks, quadratic, actnorm,
                                      fc_actnorm, fc, fc_end, fc_nblocks, fc_idim, first_resblock))


def toy_model(n_blocks: int = 100, dims=(128, 128, 128, 128), activation_fn: str = "swish", coeff: float = 0.9,
              vnorms: str = "222222", n_lipschitz_iters: int | None = 5, atol=None, rtol=None, actnorm: bool = False,
              batchnorm: bool = False, n_dist: str = "geometric", n_power_series=None, exact_trace: bool = False,
              brute_force: bool = False, n_samples: int = 1, arch: str = "iresnet", dim: int = 2,
              **block_options) -> SequentialFlow:
    """The 2-D model of the reference's ``train_toy.py`` (``--arch iresnet``), or ImpFlow's (``"implicit"``);
    with ``dim`` the model of ImpFlow's ``train_tabular.py``.

    ``[ActNorm1d(dim)]`` then ``n_blocks`` × (iResBlock over a pre-activation Lipschitz MLP dim→dims→dim,
    ``[ActNorm1d(dim)]``, ``[MovingBatchNorm1d(dim)]``). The MLP is (act, linear) per layer,
    InducedNormLinear with ``zero_init`` on the output layer; the blocks use the basic estimator
    (``neumann_grad=False, grad_in_forward=False``) unless ``block_options`` say otherwise.
    ``arch="implicit"`` puts an :class:`~resflow_cuda.nn.ImplicitBlock` over two MLPs in each block,
    built as ImpFlow builds them (linear, then (act, linear) per further layer: no pre-activation).
    ImpFlow's tabular model is ``toy_model(n_blocks=5, activation_fn=..., arch="implicit", dim=D,
    n_lipschitz_iters=None, atol=sn_tol, rtol=sn_tol, n_exact_terms=2, eps_forward=epsf)``.
    Parity with the reference: docs/parity.md#toy_model

    Args:
        n_blocks: number of blocks.
        dims: hidden widths of each MLP.
        activation_fn: a key of :data:`TOY_ACT_FNS` (the toy scripts' table: also ``'fullsort'``,
            ``'maxmin'``, ``'sin'``, ``'tanh'``, ...) or of :data:`ACT_FNS`.
        coeff: the Lipschitz bound of every linear layer.
        vnorms: norm orders between the MLP's layers (see :func:`parse_vnorms`).
        n_lipschitz_iters: power-iteration steps per update.
        atol: absolute tolerance of the power iteration.
        rtol: relative tolerance of the power iteration.
        actnorm: an ActNorm1d(2) first and after every block.
        batchnorm: a MovingBatchNorm1d(2) after every block.
        n_dist, n_power_series, exact_trace, brute_force, n_samples: the blocks' (see
            :class:`~resflow_cuda.nn.iResBlock`).
        arch: ``"iresnet"`` or ``"implicit"``.
        dim: the data's dimension.
        **block_options: further keyword arguments of the blocks.

    Returns:
        A :class:`~resflow_cuda.nn.SequentialFlow` on (B, dim).
    """
    _check_activation(activation_fn, {**ACT_FNS, **TOY_ACT_FNS})
    if arch not in ("iresnet", "implicit"):
        raise ValueError(f"arch: expected 'iresnet' or 'implicit', but got {arch!r}")

    def activation() -> nn.Module:
        return TOY_ACT_FNS[activation_fn]() if activation_fn in TOY_ACT_FNS else ACT_FNS[activation_fn](False)

    widths = [dim, *dims, dim]
    domains, codomains = parse_vnorms(vnorms)
    if len(domains) < len(widths) - 1:
        raise ValueError(f"vnorms {vnorms!r} has norms for {len(domains)} layers, the MLP has {len(widths) - 1}")
    options = dict(neumann_grad=False, grad_in_forward=False) | block_options
    blocks = [ActNorm1d(dim)] if actnorm else []
    estimator = dict(n_dist=n_dist, n_power_series=n_power_series, exact_trace=exact_trace, brute_force=brute_force,
                     n_samples=n_samples, **options)

    def mlp(preact: bool) -> nn.Sequential:
        layers = []
        for i, (a, b, dom, cod) in enumerate(zip(widths[:-1], widths[1:], domains, codomains)):
            if preact or i > 0:
                layers.append(activation())
            layers.append(get_linear(a, b, coeff=coeff, n_iterations=n_lipschitz_iters, atol=atol, rtol=rtol,
                                     domain=dom, codomain=cod, zero_init=b == dim))
        return nn.Sequential(*layers)

    for _ in range(n_blocks):
        if arch == "implicit":
            blocks.append(ImplicitBlock(mlp(False), mlp(False), **estimator))
        else:
            blocks.append(iResBlock(mlp(True), **estimator))
        if actnorm:
            blocks.append(ActNorm1d(dim))
        if batchnorm:
            blocks.append(MovingBatchNorm1d(dim))
    return SequentialFlow(blocks)
