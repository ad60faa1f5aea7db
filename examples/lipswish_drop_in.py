"""Swap the reference LipSwish for the fused one in an existing normflows model.

Builds normflows' LipschitzMLP (pre-activation LipSwish + InducedNormLinear layers), replaces every
reference `Swish` by `resflow_cuda.nn.LipSwish` with the same state, checks that outputs and all
gradients agree, and times a forward+backward of each. Runs in seconds on a CPU:

    python examples/lipswish_drop_in.py
"""

from __future__ import annotations

import copy
import time

import torch
from normflows.nets.lipschitz import LipschitzMLP, Swish

import resflow_cuda


def swap_lipswish(module: torch.nn.Module) -> int:
    """Replaces every reference Swish below `module` by the fused LipSwish, keeping beta."""
    swapped = 0
    for name, child in module.named_children():
        if isinstance(child, Swish):
            fused = resflow_cuda.nn.LipSwish().to(child.beta.device, child.beta.dtype)
            fused.load_state_dict(child.state_dict())
            setattr(module, name, fused)
            swapped += 1
        else:
            swapped += swap_lipswish(child)
    return swapped


def step_time(model: torch.nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    model(x).square().sum().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    torch.manual_seed(0)
    reference = LipschitzMLP([64, 512, 512, 64], init_zeros=False)
    fused = copy.deepcopy(reference)
    print(f"swapped {swap_lipswish(fused)} Swish modules for resflow_cuda.nn.LipSwish")

    x = torch.randn(1024, 64)
    for model in (reference, fused):
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
    torch.testing.assert_close(fused(x), reference(x))
    for (name, p_ref), p_fused in zip(reference.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")
    print("outputs and every parameter gradient agree")

    t_ref, t_fused = step_time(reference, x), step_time(fused, x)
    print(f"forward+backward, batch 1024: reference {t_ref * 1e3:.2f} ms, fused {t_fused * 1e3:.2f} ms "
          f"({torch.get_num_threads()} threads; the matmuls are shared, LipSwish is the difference)")


if __name__ == "__main__":
    main()
