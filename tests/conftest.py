"""Shared fixtures: the devices to test, seeding, and tolerances."""

from __future__ import annotations

import contextlib

import pytest
import torch

import resflow_cuda


def _cuda_unusable() -> str | None:
    """Why the CUDA tests cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not resflow_cuda.has_cuda_kernels():
        return ("resflow_cuda was built without CUDA kernels (build_info()['no_cuda_reason']: "
                f"{resflow_cuda.build_info()['no_cuda_reason']})")
    return None


CUDA_UNUSABLE = _cuda_unusable()
CUDA = pytest.param("cuda", marks=pytest.mark.cuda)


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="I/N",
                     help="run only every N-th collected test, starting at the I-th (0 <= I < N): CI runs the "
                          "N shards of a long step as N processes side by side")


def _shard(value: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard: expected I/N with integers I and N, got {value!r}") from None
    if not 0 <= index < count:
        raise pytest.UsageError(f"--shard: expected 0 <= I < N, got I={index}, N={count}")
    return index, count


def pytest_collection_modifyitems(config, items):
    value = config.getoption("--shard")
    if value is None:
        return
    index, count = _shard(value)
    # Tests marked same_process all go to shard 0 (they rely on one another's effects within a process); the
    # others by position in the collection order (stable across processes): neighbouring parametrizations of
    # a test go to different shards, so the shards' lengths stay close.
    pinned = [item for item in items if item.get_closest_marker("same_process") is not None]
    free = [item for item in items if item.get_closest_marker("same_process") is None]
    mine = {id(item) for i, item in enumerate(free) if i % count == index}
    if index == 0:
        mine.update(id(item) for item in pinned)
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in mine])
    items[:] = [item for item in items if id(item) in mine]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Skipped here, before any fixture, rather than in the device fixtures: pytest reports a skip raised
    # in a fixture at each test's own line, whereas these all come from this line and -ra folds them
    # into one summary line.
    if CUDA_UNUSABLE and item.get_closest_marker("cuda") is not None:
        pytest.skip(CUDA_UNUSABLE)


@contextlib.contextmanager
def _without_tf32(device: str):
    """On CUDA, TF32 off: it rounds float32 products to a 10-bit mantissa (~5e-4 relative), far beyond
    the float32 tolerances of the tests, which are of float32 rounding."""
    if device != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(params=["cpu", CUDA])
def device(request):
    """Each test on the CPU and on CUDA (marked cuda: a visible skip where CUDA cannot be used)."""
    with _without_tf32(request.param):
        yield request.param


@pytest.fixture(params=[CUDA])
def cuda(request):
    """The device of a CUDA-only test (marked cuda: a visible skip where CUDA cannot be used)."""
    with _without_tf32(request.param):
        yield request.param


@contextlib.contextmanager
def cudnn_deterministic():
    """cuDNN's deterministic algorithms, so that two equal convolution calls sum in the same order."""
    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic = saved


@pytest.fixture
def probes_drawn_on_cpu(monkeypatch):
    """``torch.randn_like`` draws on the CPU (from the generator ``torch.manual_seed`` seeds) and moves
    the draw to the tensor's device: the log-det estimators' Gaussian probes are then the same on
    every device, and on the CPU they are the draws of the unpatched call."""
    randn_like = torch.randn_like

    def on_cpu(t, *args, **kwargs):
        device = kwargs.pop("device", None) or t.device
        return randn_like(t, *args, device="cpu", **kwargs).to(device)

    monkeypatch.setattr(torch, "randn_like", on_cpu)


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
