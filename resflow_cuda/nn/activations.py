"""Activations of Residual Flows, i-ResNet (the reference toy script's FullSort, MaxMin) and ImpFlow (Sin, Zero)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional
from ..linearize import register_lipswish


class LipSwish(nn.Module):
    """LipSwish ``x * sigmoid(softplus(beta) * x) / 1.1``, a 1-Lipschitz Swish (Chen et al., 2019).

    One learnable parameter ``beta`` of shape [1], initialised to 0.5; forward and backward are one
    fused kernel each. Drop-in for the reference ``Swish``. Parity with the reference: docs/parity.md#lipswish

    Shapes:
        input: any shape; output: the same shape and dtype.

    Autograd: first and second order (the Residual Flows log-det gradient needs the second).

    Example:
        >>> from resflow_cuda.nn import LipSwish
        >>> act = LipSwish()
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> torch.allclose(act(x), x * torch.sigmoid(nn.functional.softplus(act.beta) * x) / 1.1)
        True
    """

    def __init__(self) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor([0.5]))

    def forward(self, x: Tensor) -> Tensor:
        return functional.lipswish(x, self.beta)

    def extra_repr(self) -> str:
        if self.beta.device.type == "meta":
            return "beta=<meta>"
        return f"beta={float(self.beta.detach().reshape(-1)[0]):.4g}"


register_lipswish(LipSwish)

# The reference's name for the same module.
Swish = LipSwish


class LipschitzCube(nn.Module):
    """The reference's 1-Lipschitz "cube" activation: ``x³/3`` on (-1, 1), ``x ∓ 2/3`` outside."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x >= 1, x - 2 / 3, torch.where(x <= -1, x + 2 / 3, x**3 / 3))


# The reference's ``Identity`` (residual-flows ``layers.base``): torch's module, so that the fast path
# (which skips ``nn.Identity`` steps) recognises it.
Identity = nn.Identity


class FullSort(nn.Module):
    """Sorts its input along dim 1 in ascending order: the reference's ``FullSort`` (Anil et al.,
    2019), a 1-Lipschitz activation whose Jacobian is a permutation.

    Parity with the reference: docs/parity.md#fullsort-maxmin-identity

    Shapes:
        input: (B, D, ...), at least 2 dims; output: the same shape and dtype.

    Returns:
        ``torch.sort(x, 1).values``: NaN sorts last, and the gradient goes back through the sort's
        permutation (``torch.sort``'s choice among equal values).

    Example:
        >>> from resflow_cuda.nn import FullSort
        >>> FullSort()(torch.tensor([[3.0, 1.0, 2.0]]))
        tensor([[1., 2., 3.]])
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"FullSort: expected an input of shape (B, D, ...) with at least 2 dimensions, "
                             f"but got {list(x.shape)}")
        return torch.sort(x, 1)[0]


class MaxMin(nn.Module):
    """Pairwise max and min: the reference's ``MaxMin`` (Anil et al., 2019). The input's columns
    are taken in pairs (0, 1), (2, 3), ...; the output is the pairs' maxima followed by their minima.
    1-Lipschitz; its Jacobian is a permutation.

    Parity with the reference: docs/parity.md#fullsort-maxmin-identity

    Shapes:
        input: (B, D) with D even; output: (B, D): ``[max of each pair (D/2), min of each pair (D/2)]``.

    Returns:
        The maxima and minima (a pair with a NaN gives NaN for both, as ``torch.max`` / ``torch.min``
        along a dim); the gradient of each goes to the element ``torch.max`` / ``torch.min`` chose.

    Example:
        >>> from resflow_cuda.nn import MaxMin
        >>> MaxMin()(torch.tensor([[1.0, 4.0, 3.0, -2.0]]))
        tensor([[ 4.,  3.,  1., -2.]])
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] % 2:
            raise ValueError(f"MaxMin: expected an input of shape (B, D) with D even (the columns are taken in "
                             f"pairs), but got {list(x.shape)}")
        pairs = x.reshape(x.shape[0], x.shape[1] // 2, 2)
        return torch.cat([torch.max(pairs, 2)[0], torch.min(pairs, 2)[0]], 1)


class Sin(nn.Module):
    """ImpFlow's ``Sin`` activation ``sin(2 pi x) / (2 pi)``, 1-Lipschitz (slope ``cos(2 pi x)``).

    Parity with the reference: docs/parity.md#sin-zero

    Shapes:
        input: any shape; output: the same shape and dtype.

    Example:
        >>> from resflow_cuda.nn import Sin
        >>> Sin()(torch.tensor([0.25]))
        tensor([0.1592])
    """

    def forward(self, x: Tensor) -> Tensor:
        # The reference's order of operations, for the same rounding.
        return torch.sin(2. * math.pi * x) / math.pi * 0.5


class Zero(nn.Module):
    """ImpFlow's ``Zero`` activation: zeros of the input's shape, dtype and device (also for NaN or
    infinite inputs). Used as a whole branch (``ImplicitBlock(nnet_x, Zero())`` is a residual block)
    or inside one.

    Unlike the reference's, the output stays in the input's autograd graph with zero gradients (of
    every order), so that the log-det estimators, which differentiate a branch with respect to its
    input, see a zero Jacobian instead of failing. Parity with the reference: docs/parity.md#sin-zero

    Shapes:
        input: any shape; output: the same shape and dtype.

    Example:
        >>> from resflow_cuda.nn import Zero
        >>> Zero()(torch.tensor([1.0, float("nan")]))
        tensor([0., 0.])
    """

    def forward(self, x: Tensor) -> Tensor:
        if not x.requires_grad:
            return torch.zeros_like(x)
        # where() with an all-False mask: exactly zero values, a graph to x, zero gradients.
        return torch.where(torch.zeros_like(x, dtype=torch.bool), x, x.new_zeros(()))
