"""Brute-force log-determinants for the flow and model tests."""

from __future__ import annotations

import torch
from torch.autograd.functional import jacobian


def brute_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det d fn(x)/dx| per sample, shape (B, 1), from autograd's Jacobian of one sample at a time."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        j = jacobian(lambda v: fn(v.view_as(xi)).reshape(-1), xi.reshape(-1))
        out.append(torch.linalg.slogdet(j)[1])
    return torch.stack(out).unsqueeze(1)
