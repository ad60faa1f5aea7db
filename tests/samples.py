"""Sample inputs for the op tests: one list per op family, each sample with a readable id.

Covers 0-dim, empty, odd and prime sizes, several chunks with a ragged tail, non-contiguous
views (transposed, sliced, expanded), channels_last, large magnitudes, and every float dtype.
"""

from __future__ import annotations

import dataclasses

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_SHORT = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}

# The CPU ops work in chunks of 2**14 elements; this size spans three chunks with a ragged tail.
MULTI_CHUNK = 2 * 2**14 + 4099


@dataclasses.dataclass
class LipSwishSample:
    id: str
    x: torch.Tensor
    beta: torch.Tensor

    def to(self, device: str) -> "LipSwishSample":
        return LipSwishSample(self.id, self.x.to(device), self.beta.to(device))


def _layouts(dtype: torch.dtype):
    """(name, tensor) pairs of values ~ N(0, 3²) in several layouts, all in dtype."""
    g = torch.Generator().manual_seed(1234)

    def randn(*shape):
        return (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    yield "scalar", randn(())
    yield "empty", randn(0)
    yield "empty2d", randn(3, 0)
    yield "one", randn(1)
    yield "prime", randn(31, 37)
    yield "4d", randn(2, 3, 5, 7)
    yield "multichunk", randn(MULTI_CHUNK)
    yield "transposed", randn(33, 17).t()
    yield "sliced", randn(16, 40)[:, 1::3]
    yield "offset", randn(1001)[1:]
    yield "expanded", randn(5, 1).expand(5, 9)
    yield "channels_last", randn(2, 6, 5, 3).contiguous(memory_format=torch.channels_last)


def lipswish_samples(dtypes=FLOAT_DTYPES) -> list[LipSwishSample]:
    samples = []
    for dtype in dtypes:
        for name, x in _layouts(dtype):
            samples.append(LipSwishSample(f"{name}-{_SHORT[dtype]}", x, torch.tensor([0.5], dtype=dtype)))
        big = 1e30 if dtype in (torch.float32, torch.float64) else (6e4 if dtype == torch.float16 else 1e30)
        x = torch.tensor([-big, -1e4, -90.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 90.0, 1e4, big], dtype=dtype)
        samples.append(LipSwishSample(f"large-{_SHORT[dtype]}", x, torch.tensor([0.5], dtype=dtype)))
        # beta above softplus's threshold (β = b), strongly negative (β ≈ 0), and 0-dim.
        x = torch.linspace(-6, 6, 97, dtype=torch.float64).to(dtype)
        samples.append(LipSwishSample(f"beta25-{_SHORT[dtype]}", x, torch.tensor([25.0], dtype=dtype)))
        samples.append(LipSwishSample(f"betaneg-{_SHORT[dtype]}", x, torch.tensor([-4.0], dtype=dtype)))
        samples.append(LipSwishSample(f"beta0d-{_SHORT[dtype]}", x, torch.tensor(1.5, dtype=dtype)))
    return samples


def sample_ids(samples) -> list[str]:
    return [s.id for s in samples]
