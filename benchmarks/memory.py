"""Peak memory of one step of a registered case, each measurement in a fresh interpreter
(how it is measured: peak.py)."""

from __future__ import annotations

from . import peak
from .cases import CASES
from .peak import peak_mib

__all__ = ["in_subprocess", "peak_mib", "step_peak"]


def in_subprocess(function: str, *args) -> float:
    """Runs ``function(*args)`` of this module in a fresh interpreter and returns its number;
    raises RuntimeError with the child's last error line when it fails."""
    return peak.in_subprocess(__name__, function, *args)


def step_peak(case_name: str, quick: bool, index: int, provider: str, device: str) -> float:
    """Peak of one step of a provider on configuration ``index`` of a case, after one warm-up step
    (lazy initialisation and torch.compile's compilation are not part of a step)."""
    case = CASES[case_name]
    config = case.configs(quick)[index]
    inputs = case.make_inputs(config, device, rotate=False)
    step = case.runner(case.providers()[provider], inputs, config)
    step()
    return peak_mib(step, device)
