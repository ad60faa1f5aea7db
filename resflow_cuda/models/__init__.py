"""Whole models: the multi-scale ``ResidualFlow`` of the reference image experiments (with
residual or, as its coupling baseline, coupling blocks), ImpFlow's multi-scale ``ImplicitFlow``
and the stacks of blocks of the 2-D toy and tabular scripts, built from this library's layers with
the references' module order, so that state_dict keys (and a reference checkpoint) carry over.

Reference: residual-flows ``resflows/resflow.py`` and ``train_toy.py``; ImpFlow
``lib/implicit_flow.py``, ``train_toy.py`` and ``train_tabular.py``.
"""

from .implicit_flow import ImplicitFlow, StackedImplicitBlocks
from .resflow import ExponentialMovingAverage, ResidualFlow, standard_normal_logprob
from .stacks import (ACT_FNS, IMPLICIT_ACT_FNS, TOY_ACT_FNS, FCNet, FCWrapper, StackedCouplingBlocks,
                     StackediResBlocks, parse_vnorms, toy_model)

__all__ = ["ACT_FNS", "ExponentialMovingAverage", "FCNet", "FCWrapper", "IMPLICIT_ACT_FNS", "ImplicitFlow",
           "ResidualFlow", "StackedCouplingBlocks", "StackedImplicitBlocks", "StackediResBlocks", "TOY_ACT_FNS",
           "parse_vnorms", "standard_normal_logprob", "toy_model"]
