"""Activations of Residual Flows."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional
from ..linearize import register_lipswish


class LipSwish(nn.Module):
    """LipSwish ``x * sigmoid(softplus(beta) * x) / 1.1``, a 1-Lipschitz Swish (Chen et al., 2019).

    Drop-in for the reference ``Swish`` (residual-flows ``resflows/layers/base/activations.py``,
    normflows ``nets.lipschitz.Swish``): one parameter ``beta`` of shape [1] initialised to 0.5,
    the same state_dict key, the same values; forward and backward are one fused kernel each.

    Shapes: input any shape; output the same shape and dtype.
    Autograd: first and second order (the Residual Flows log-det gradient needs the second).
    Deviation: see :func:`resflow_cuda.functional.lipswish` for mixed dtypes (no promotion).
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
