"""ImpFlow's multi-scale model (Lu et al., ICLR 2021): the ``ResidualFlow`` layout with implicit
blocks, z + g_z(z) = x + g_x(x), in place of the residual ones (see :mod:`resflow_cuda.models`).

Reference: thu-ml/implicit-normalizing-flows ``lib/implicit_flow.py``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..nn import ImplicitBlock
from .resflow import ResidualFlow
from .stacks import IMPLICIT_ACT_FNS, StackediResBlocks

__all__ = ["ImplicitFlow", "StackedImplicitBlocks"]


class StackedImplicitBlocks(StackediResBlocks):
    """One scale of the :class:`ImplicitFlow`: the module order of
    :class:`~resflow_cuda.models.StackediResBlocks` (keys ``chain.{j}.…``) with an
    :class:`~resflow_cuda.nn.ImplicitBlock` over two branches of the same architecture (``nnet_x``
    built first, then ``nnet_z``) in place of each residual block.

    As ImpFlow's, and unlike the residual-flows scale: ``fc_nblocks`` defaults to 2 and
    ``first_resblock`` to True, which drops the pre-activation of the scale's first branch also in
    the last scale; the activation table is :data:`~resflow_cuda.models.IMPLICIT_ACT_FNS` (with
    ``'sin'`` and ``'zero'``). Parity with the reference: docs/parity.md#implicitflow

    Args:
        initial_size: the input's (C, H, W).
        idim: hidden channels of the branches.
        squeeze: end with a squeeze (every scale but the last); else with the FC end blocks.
        fc_nblocks: number of FC end blocks (with ``fc_end``).
        the others: as :class:`ImplicitFlow`.

    Shapes:
        x: (B, C, H, W); output: (B, 4C, H/2, W/2) with ``squeeze``, else (B, C, H, W); logpx: (B, 1).
    """

    def __init__(self, initial_size, idim, squeeze=True, init_layer=None, n_blocks=1, quadratic=False, actnorm=False,
                 fc_actnorm=False, batchnorm=False, dropout=0, fc=False, coeff=0.9, vnorms="122f",
                 n_lipschitz_iters=None, sn_atol=None, sn_rtol=None, n_power_series=5, n_dist="geometric",
                 n_samples=1, kernels="3-1-3", activation_fn="elu", fc_end=True, fc_nblocks=2, fc_idim=128,
                 n_exact_terms=0, preact=False, neumann_grad=True, grad_in_forward=False, first_resblock=True,
                 learn_p=False) -> None:
        super().__init__(initial_size, idim, squeeze, init_layer, n_blocks, quadratic, actnorm, fc_actnorm, batchnorm,
                         dropout, fc, coeff, vnorms, n_lipschitz_iters, sn_atol, sn_rtol, n_power_series, n_dist,
                         n_samples, kernels, activation_fn, fc_end, fc_nblocks, fc_idim, n_exact_terms, preact,
                         neumann_grad, grad_in_forward, first_resblock, learn_p)

    _act_fns = IMPLICIT_ACT_FNS
    _first_in_last_scale = True

    @staticmethod
    def _block(branch, block_options: dict) -> nn.Module:
        nnet_x = branch()  # ImpFlow's order of construction (and random draws): nnet_x, then nnet_z
        return ImplicitBlock(nnet_x, branch(), **block_options)


class ImplicitFlow(ResidualFlow):
    """ImpFlow's multi-scale implicit flow (its image experiments): the layout of
    :class:`~resflow_cuda.models.ResidualFlow` with :class:`StackedImplicitBlocks` as scales.

    ImpFlow's constructor, defaults, module order and state_dict keys (``transforms.{scale}.chain.{j}
    .nnet_x.…`` / ``.nnet_z.…``; ImpFlow's frozen copies ``nnet_x_copy`` / ``nnet_z_copy`` are
    dropped when loading its checkpoints, see :class:`~resflow_cuda.nn.ImplicitBlock`). The arguments
    are ResidualFlow's with ImpFlow's defaults (``first_resblock=True``) and without ``block_type``;
    ``activation_fn`` may also be ``'sin'`` or ``'zero'`` (:data:`~resflow_cuda.models.IMPLICIT_ACT_FNS`).
    Parity with the reference: docs/parity.md#implicitflow

    Args:
        input_size: the data's (N, C, H, W) (N is not used).
        n_blocks: implicit blocks per scale.
        the others: as :class:`~resflow_cuda.models.ResidualFlow`; the estimator arguments go to every
            :class:`~resflow_cuda.nn.ImplicitBlock` (its solver settings keep their defaults).

    Shapes:
        x: (B, C, H, W) of ``input_size``; z: (B, C·H·W); logpx: (B, 1).

    Returns:
        ``forward(x)``: ``z``; ``forward(x, logpx)``: ``(z, logpx - logdet)``; with ``classify=True``
        also the class logits. ``forward``'s ``restore`` is ImpFlow's calling convention and has no
        effect (there are no frozen copies to initialise). ``inverse(z, logpz=None)`` solves every
        block backwards; :meth:`sample`, :meth:`log_prob` and :meth:`bits_per_dim` as ResidualFlow's.

    Example:
        >>> from resflow_cuda.models import ImplicitFlow
        >>> flow = ImplicitFlow((4, 1, 8, 8), n_blocks=(1, 1), intermediate_dim=4, fc_idim=8, n_lipschitz_iters=2,
        ...                     activation_fn="sin")
        >>> z, logpz = flow(torch.rand(4, 1, 8, 8), torch.zeros(4, 1))
        >>> z.shape, logpz.shape
        (torch.Size([4, 64]), torch.Size([4, 1]))
    """

    def __init__(self, input_size, n_blocks=(16, 16), intermediate_dim=64, factor_out=True, quadratic=False,
                 init_layer=None, actnorm=False, fc_actnorm=False, batchnorm=False, dropout=0, fc=False, coeff=0.9,
                 vnorms="122f", n_lipschitz_iters=None, sn_atol=None, sn_rtol=None, n_power_series=5,
                 n_dist="geometric", n_samples=1, kernels="3-1-3", activation_fn="elu", fc_end=True, fc_idim=128,
                 n_exact_terms=0, preact=False, neumann_grad=True, grad_in_forward=False, first_resblock=True,
                 learn_p=False, classification=False, classification_hdim=64, n_classes=10) -> None:
        super().__init__(input_size, n_blocks, intermediate_dim, factor_out, quadratic, init_layer, actnorm,
                         fc_actnorm, batchnorm, dropout, fc, coeff, vnorms, n_lipschitz_iters, sn_atol, sn_rtol,
                         n_power_series, n_dist, n_samples, kernels, activation_fn, fc_end, fc_idim, n_exact_terms,
                         preact, neumann_grad, grad_in_forward, first_resblock, learn_p, classification,
                         classification_hdim, n_classes, block_type="implicit")

    @staticmethod
    def _scale_class(block_type: str) -> type:
        return StackedImplicitBlocks

    def forward(self, x: Tensor, logpx: Tensor | None = None, inverse: bool = False, classify: bool = False,
                restore: bool = False):
        return super().forward(x, logpx, inverse, classify)
