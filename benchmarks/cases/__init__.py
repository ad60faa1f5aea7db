"""The registry of benchmark cases: one module per case, the ``Case`` base class and what the cases
share in base.py (benchmarks/README.md, "Adding a case")."""

from __future__ import annotations

from .base import AUTOGRAD, COMPILE, EAGER, RESFLOW, Case, CaseConfig, Config, Target, cache_bytes, rotation
from .family_step import FamilyConfig, FamilyStepCase
from .iresblock import BlockConfig, IResBlockCase
from .lipswish import LipSwishCase
from .model_step import ModelConfig, ModelStepCase
from .small_step import FlowConfig, SmallStepCase, TabularSmallCase
from .update_lipschitz import StackConfig, UpdateLipschitzCase

__all__ = ["AUTOGRAD", "BlockConfig", "CASES", "COMPILE", "Case", "CaseConfig", "Config", "EAGER", "FamilyConfig",
           "FamilyStepCase", "FlowConfig", "IResBlockCase", "LipSwishCase", "ModelConfig", "ModelStepCase", "RESFLOW",
           "SmallStepCase", "StackConfig", "TabularSmallCase", "Target", "UpdateLipschitzCase", "cache_bytes",
           "rotation"]

CASES = {case.name: case for case in (LipSwishCase(), UpdateLipschitzCase(), IResBlockCase(), ModelStepCase(),
                                      SmallStepCase(), TabularSmallCase(), FamilyStepCase())}
