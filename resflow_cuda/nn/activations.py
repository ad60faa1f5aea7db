"""Activations of Residual Flows."""

from __future__ import annotations

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
