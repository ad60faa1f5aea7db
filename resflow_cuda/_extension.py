"""Loading the compiled extension and reporting what it was built with."""

from __future__ import annotations

import warnings

import torch

from .version import __version__

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "resflow_cuda's compiled extension (resflow_cuda._C) could not be loaded: "
        f"{exc}. Build it against the torch you run (torch {torch.__version__}) with "
        "`pip install --no-build-isolation -e .` from the source tree; a build made with a "
        "CUDA build of torch cannot be imported by a CPU build of torch, or the other way round."
    ) from exc

_BUILT = dict(_C.build_info())
if _BUILT["torch_version"] != torch.__version__:
    warnings.warn(
        f"resflow_cuda was built against torch {_BUILT['torch_version']} but torch "
        f"{torch.__version__} is running; rebuild with `pip install --no-build-isolation -e .` "
        "if ops fail to load or misbehave.",
        RuntimeWarning,
        stacklevel=2,
    )


def build_info() -> dict:
    """What the extension was built with and what it uses now.

    Keys: ``version``; ``torch_version`` (built against) and ``torch_runtime`` (running);
    ``cuda`` (CUDA kernels compiled in), ``cuda_version`` (e.g. ``"13.0"``, None in a CPU-only
    build), ``cuda_arch_list`` (e.g. ``["8.0", "9.0+PTX"]``), ``no_cuda_reason`` (why a build has
    no CUDA kernels); ``cpu_capabilities`` (CPU kernel sets compiled in) and ``cpu_capability``
    (the one in use on this CPU).
    """
    info = dict(_BUILT)
    info["version"] = __version__
    info["torch_runtime"] = torch.__version__
    info["cpu_capability"] = _C.cpu_capability()
    return info


def has_cuda_kernels() -> bool:
    """True when the CUDA kernels were compiled in (a GPU may still be absent)."""
    return bool(_BUILT["cuda"])
