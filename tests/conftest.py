"""Shared fixtures: the devices to test, seeding, and tolerances."""

from __future__ import annotations

import pytest
import torch

import resflow_cuda


def _devices() -> list:
    devices = ["cpu"]
    if resflow_cuda.has_cuda_kernels() and torch.cuda.is_available():
        devices.append(pytest.param("cuda", marks=pytest.mark.cuda))
    return devices


DEVICES = _devices()


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Tolerances of a low-precision result against the float64 truth computed from the same
# (already rounded) inputs: about two units in the last place of the dtype.
TOLERANCES = {
    # float64 vs float64 (kernel vs the twin's formula, sums in another order): a few ulps of intermediates up
    # to ~1e3 (1e-13 < atol), sqrt(n)*2^-53*sum|terms| for n <= 5e4 (< rtol|sum|); rtol is 600x below 2^-24.
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=1e-6, rtol=2e-6),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
