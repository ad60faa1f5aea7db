"""Pure-PyTorch twins of every resflow_cuda op: the oracle for tests and the baseline for benchmarks.

Each follows the semantics of the reference implementations (rtqichen/residual-flows,
normflows) with plain eager ops and no resflow_cuda code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LIPSWISH_DIVISOR = 1.1


def lipswish(x: Tensor, beta: Tensor) -> Tensor:
    """The reference ``Swish.forward``: ``x * sigmoid(x * softplus(beta)) / 1.1``."""
    return x * torch.sigmoid(x * F.softplus(beta)) / LIPSWISH_DIVISOR


def lipswish_with_derivative(x: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """``(y, dy/dx)`` with ``dy/dx = (s + βx·s(1 − s)) / 1.1``, s = sigmoid(βx), in eager ops."""
    b = F.softplus(beta)
    s = torch.sigmoid(x * b)
    y = x * s / LIPSWISH_DIVISOR
    dydx = (s + b * x * s * (1 - s)) / LIPSWISH_DIVISOR
    return y, dydx
