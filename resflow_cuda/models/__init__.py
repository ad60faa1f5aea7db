"""Whole models: the multi-scale ``ResidualFlow`` of the reference image experiments (with
residual or, as its coupling baseline, coupling blocks) and the stack of residual blocks of its
2-D toy script, built from this library's layers with the reference's module order, so that
state_dict keys (and a reference checkpoint) carry over.

Reference: residual-flows ``resflows/resflow.py`` and ``train_toy.py``.
"""

from .resflow import ExponentialMovingAverage, ResidualFlow, standard_normal_logprob
from .stacks import ACT_FNS, FCNet, FCWrapper, StackedCouplingBlocks, StackediResBlocks, parse_vnorms, toy_model

__all__ = ["ACT_FNS", "ExponentialMovingAverage", "FCNet", "FCWrapper", "ResidualFlow", "StackedCouplingBlocks",
           "StackediResBlocks", "parse_vnorms", "standard_normal_logprob", "toy_model"]
