"""The ops of a block's training step outside its log-det series (``torch.ops.resflow_cuda``): typed
wrappers and fake kernels, as :mod:`resflow_cuda.ops` has them for the other ops (kept apart for its length).

Each replaces a handful of ATen calls per block and step with one (one kernel on CUDA): the block's training
statistics (:func:`moments_`) and the sum of a backward-in-forward block's two shares of its parameter gradients
(:func:`foreach_add_scaled`). Not differentiable: with grad mode on, a tensor that requires grad is refused in C++
(csrc/registration.cpp).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import _OPS, _check_float, _check_matches

__all__ = ["foreach_add_scaled", "moments_"]


def moments_(x: Tensor, mean: Tensor, mean_square: Tensor) -> None:
    """``mean[0] = x.mean()`` and ``mean_square[0] = (x ** 2).mean()`` over every element of x, in one
    pass (one kernel): a block's training statistics of its log-det estimate.

    Shapes: x any shape, float dtype; mean, mean_square one element each, of one float dtype, on x's
    device. Each square is rounded to x's dtype (as ``x ** 2``); the sums are taken in float64 in a
    fixed order (independent of the thread count) and each mean is rounded to x's dtype, then stored
    in the buffers' dtype. An empty x gives NaN, as ``torch.mean``.
    """
    _OPS.moments_(x, mean, mean_square)


_MOMENTS = "resflow_cuda.moments_"


@torch.library.register_fake("resflow_cuda::moments_")
def _moments_fake(x, mean, mean_square):
    for name, t in (("x", x), ("mean", mean), ("mean_square", mean_square)):
        _check_float(_MOMENTS, name, t)
    for name, t in (("mean", mean), ("mean_square", mean_square)):
        torch._check(t.numel() == 1, lambda: f"{_MOMENTS}: expected {name} to have one element, but got shape "
                     f"{list(t.shape)}")
        torch._check(t.device == x.device, lambda: f"{_MOMENTS}: expected {name} to be on the device of x "
                     f"({x.device}), but got {t.device}")
    torch._check(mean_square.dtype == mean.dtype, lambda: f"{_MOMENTS}: expected mean_square to have the dtype of "
                 f"mean ({mean.dtype}), but got {mean_square.dtype}")


def foreach_add_scaled(a: list[Tensor], b: list[Tensor], scale: Tensor) -> list[Tensor]:
    """``[a[i] + b[i] * scale for every i]`` in one call (one CUDA launch per 24 pairs), each element a
    multiply and an add in float32 / float64 (fused into one rounding where the compiler fuses them: CUDA, FMA
    targets), rounded to the pair's dtype.

    Shapes: a[i], b[i] of one shape, float dtype and device each pair; scale one element of every pair's dtype,
    on their device (read there: no host sync). Returns new contiguous tensors.
    """
    return _OPS.foreach_add_scaled(a, b, scale)


_ADD_SCALED = "resflow_cuda.foreach_add_scaled"


@torch.library.register_fake("resflow_cuda::foreach_add_scaled")
def _foreach_add_scaled_fake(a, b, scale):
    torch._check(len(a) == len(b), lambda: f"{_ADD_SCALED}: expected a and b to have the same number of tensors, "
                 f"but got {len(a)} and {len(b)}")
    _check_float(_ADD_SCALED, "scale", scale)
    torch._check(scale.numel() == 1, lambda: f"{_ADD_SCALED}: expected scale to have one element, but got shape "
                 f"{list(scale.shape)}")
    for i, (ai, bi) in enumerate(zip(a, b)):
        _check_float(_ADD_SCALED, f"a[{i}]", ai)
        _check_matches(_ADD_SCALED, f"b[{i}]", bi, f"a[{i}]", ai)
        torch._check(scale.dtype == ai.dtype, lambda: f"{_ADD_SCALED}: expected scale to have the dtype of a[{i}] "
                     f"({ai.dtype}), but got {scale.dtype}")
    return [torch.empty(ai.shape, dtype=ai.dtype, device=ai.device) for ai in a]
