"""Name by name: every public class and function that the references export from their layer modules
(and their model modules) has a counterpart here with a compatible signature, or is listed as
deliberately absent with the reason.

The names and signatures below are the references' own, written down from ``inspect.signature`` on
their modules (``self`` dropped; a class without its own ``__init__`` is ``()``):

- residual-flows (rtqichen/residual-flows, commit 8170138c850a3574319491d97093bc860ce4922d):
  ``resflows.layers`` and ``resflows.layers.base`` (public classes and functions defined in the
  package that ``from .x import *`` exports: modules with ``__all__`` export only those names) and
  ``resflows.resflow``;
- ImpFlow (thu-ml/implicit-normalizing-flows, commit d8babe48bdea7b1ba98be698bef2e954ac3817ee):
  ``lib.layers`` and ``lib.layers.base`` export residual-flows' names with the changes listed in
  ``IMPFLOW_LAYERS`` (``restore`` keywords, ``imBlock``, ``Sin``, ``Zero``); ``lib.implicit_flow``.

Compatible means: constructors and functions take the reference's parameters under the same names,
in the same positions, with the same defaults (ours may add parameters with defaults, usually
keyword-only, and take ``**kwargs`` where the reference does); ``forward`` / ``inverse`` take the
reference's positional arguments in the same positions with the same defaults, and its keywords
that the references' code passes by name (``restore``).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import resflow_cuda.models as our_models
import resflow_cuda.nn as our_nn

FLOW = "(x, logpx=None)", "(y, logpy=None)"
LIP = "bias=True, coeff=0.97"
STACK = ("initial_size, idim, squeeze=True, init_layer=None, n_blocks=1, quadratic=False, actnorm=False, "
         "fc_actnorm=False, batchnorm=False, dropout=0, fc=False, coeff=0.9, vnorms='122f', n_lipschitz_iters=None, "
         "sn_atol=None, sn_rtol=None, n_power_series=5, n_dist='geometric', n_samples=1, kernels='3-1-3', "
         "activation_fn='elu', fc_end=True, fc_nblocks={fc_nblocks}, fc_idim=128, n_exact_terms=0, preact=False, "
         "neumann_grad=True, grad_in_forward=False, first_resblock={first}, learn_p=False")
MODEL = ("input_size, n_blocks=[16, 16], intermediate_dim=64, factor_out=True, quadratic=False, init_layer=None, "
         "actnorm=False, fc_actnorm=False, batchnorm=False, dropout=0, fc=False, coeff=0.9, vnorms='122f', "
         "n_lipschitz_iters=None, sn_atol=None, sn_rtol=None, n_power_series=5, n_dist='geometric', n_samples=1, "
         "kernels='3-1-3', activation_fn='elu', fc_end=True, fc_idim=128, n_exact_terms=0, preact=False, "
         "neumann_grad=True, grad_in_forward=False, first_resblock={first}, learn_p=False, classification=False, "
         "classification_hdim=64, n_classes=10")
FCNET = ("(input_shape, idim, lipschitz_layer, nhidden, coeff, domains, codomains, n_iterations, activation_fn, "
         "preact, dropout, sn_atol, sn_rtol, learn_p, div_in=1)")

# name: (constructor or function signature, forward, inverse); None where the reference has no such method.
RESIDUAL_FLOWS_LAYERS = {
    "ActNorm1d": ("(num_features, eps=1e-12)", *FLOW),
    "ActNorm2d": ("(num_features, eps=1e-12)", *FLOW),
    "ChannelCouplingBlock": ("(dim, nnet, mask_type='channel0')", *FLOW),
    "CouplingBlock": ("(dim, nnet, swap=False)", *FLOW),
    "Inverse": ("(flow)", *FLOW),
    "InvertibleConv2d": ("(dim)", *FLOW),
    "InvertibleLinear": ("(dim)", *FLOW),
    "LogitTransform": ("(alpha=1e-06)", *FLOW),
    "MaskedCouplingBlock": ("(dim, nnet, mask_type='checkerboard0')", *FLOW),
    "MovingBatchNorm1d": ("(num_features, eps=0.0001, decay=0.1, bn_lag=0.0, affine=True)", *FLOW),
    "MovingBatchNorm2d": ("(num_features, eps=0.0001, decay=0.1, bn_lag=0.0, affine=True)", *FLOW),
    "Normalize": ("(mean, std)", *FLOW),
    "SequentialFlow": ("(layersList)", *FLOW),
    "SqueezeLayer": ("(downscale_factor)", *FLOW),
    "ZeroMeanTransform": ("()", *FLOW),
    "iResBlock": ("(nnet, geom_p=0.5, lamb=2.0, n_power_series=None, exact_trace=False, brute_force=False, n_samples=1, "
                  "n_exact_terms=2, n_dist='geometric', neumann_grad=True, grad_in_forward=False)", *FLOW),
}
RESIDUAL_FLOWS_BASE = {
    "FullSort": ("()", "(x)", None),
    "Identity": ("()", "(x)", None),
    "InducedNormConv2d": (f"(in_channels, out_channels, kernel_size, stride, padding, {LIP}, domain=2, codomain=2, "
                          "n_iterations=None, atol=None, rtol=None, **unused_kwargs)", "(input)", None),
    "InducedNormLinear": (f"(in_features, out_features, {LIP}, domain=2, codomain=2, n_iterations=None, atol=None, "
                          "rtol=None, zero_init=False, **unused_kwargs)", "(input)", None),
    "LipschitzCube": ("()", "(x)", None),
    "LopConv2d": (f"(in_channels, out_channels, kernel_size, stride, padding, {LIP}, domain=inf, codomain=inf, "
                  "local_constraint=True, **unused_kwargs)", "(input)", None),
    "LopLinear": (f"(in_features, out_features, {LIP}, domain=inf, codomain=inf, local_constraint=True, "
                  "**unused_kwargs)", "(input)", None),
    "MaxMin": ("()", "(x)", None),
    "SpectralNormConv2d": (f"(in_channels, out_channels, kernel_size, stride, padding, {LIP}, n_iterations=None, "
                           "atol=None, rtol=None, **unused_kwargs)", "(input)", None),
    "SpectralNormLinear": (f"(in_features, out_features, {LIP}, n_iterations=None, atol=None, rtol=None, "
                           "**unused_kwargs)", "(input)", None),
    "Swish": ("()", "(x)", None),
    "SwishFn": None,
    "get_conv2d": (f"(in_channels, out_channels, kernel_size, stride, padding, {LIP}, domain=None, codomain=None, "
                   "**kwargs)", None, None),
    "get_linear": (f"(in_features, out_features, {LIP}, domain=None, codomain=None, **kwargs)", None, None),
}
# ImpFlow's lib.layers / lib.layers.base: residual-flows' names, these changed or added.
IMPFLOW_LAYERS = {
    "ActNorm1d": ("(num_features, eps=1e-12)", "(x, logpx=None, restore=None)", FLOW[1]),
    "ActNorm2d": ("(num_features, eps=1e-12)", "(x, logpx=None, restore=None)", FLOW[1]),
    "LogitTransform": ("(alpha=1e-06)", "(x, logpx=None, restore=False)", FLOW[1]),
    "SequentialFlow": ("(layersList)", "(x, logpx=None, restore=False)", FLOW[1]),
    "SqueezeLayer": ("(downscale_factor)", "(x, logpx=None, restore=False)", FLOW[1]),
    "imBlock": ("(nnet_x, nnet_z, geom_p=0.5, lamb=2.0, n_power_series=None, exact_trace=False, brute_force=False, "
                "n_samples=1, n_exact_terms=2, n_exact_terms_test=20, n_dist='geometric', neumann_grad=True, "
                "grad_in_forward=True, eps_forward=1e-06, eps_backward=1e-10, eps_sample=1e-05, threshold=30)",
                "(x, logpx=None, restore=False)", "(z, logpy=None)"),
    "Sin": ("()", "(x)", None),
    "Zero": ("()", "(x)", None),
}
RESIDUAL_FLOWS_MODELS = {
    "FCNet": (FCNET, "(x)", None),
    "FCWrapper": ("(fc_module)", *FLOW),
    "ResidualFlow": ("(" + MODEL.format(first=False) + ", block_type='resblock')",
                     "(x, logpx=None, inverse=False, classify=False)", "(z, logpz=None)"),
    "StackedCouplingBlocks": ("(" + STACK.format(fc_nblocks=4, first=False) + ")", *FLOW),
    "StackediResBlocks": ("(" + STACK.format(fc_nblocks=4, first=False) + ")", *FLOW),
}
IMPFLOW_MODELS = {
    "FCNet": (FCNET, "(x, restore=False)", None),
    "FCWrapper": ("(fc_module)", "(x, logpx=None, restore=False)", FLOW[1]),
    "ImplicitFlow": ("(" + MODEL.format(first=True) + ")", "(x, logpx=None, inverse=False, classify=False, restore=False)",
                     "(z, logpz=None)"),
    "StackedImplicitBlocks": ("(" + STACK.format(fc_nblocks=2, first=True) + ")", "(x, logpx=None, restore=False)",
                              FLOW[1]),
}
# The activation tables, by name.
ACT_TABLES = {"ACT_FNS": ["elu", "identity", "lcube", "relu", "softplus", "swish"],
              "IMPLICIT_ACT_FNS": ["elu", "identity", "lcube", "relu", "sin", "softplus", "swish", "zero"]}

COUNTERPARTS = {"imBlock": "ImplicitBlock"}
ABSENT = {
    "SwishFn": "an autograd.Function for Swish with a raw beta (no softplus), used by nothing in the reference; "
               "the fused LipSwish op (resflow_cuda.functional.lipswish, under Swish / LipSwish) replaces it",
}

CASES = ([("residual-flows layers", our_nn, n, s) for n, s in RESIDUAL_FLOWS_LAYERS.items()]
         + [("residual-flows layers.base", our_nn, n, s) for n, s in RESIDUAL_FLOWS_BASE.items()]
         + [("ImpFlow layers", our_nn, n, s) for n, s in IMPFLOW_LAYERS.items()]
         + [("residual-flows resflow", our_models, n, s) for n, s in RESIDUAL_FLOWS_MODELS.items()]
         + [("ImpFlow implicit_flow", our_models, n, s) for n, s in IMPFLOW_MODELS.items()])
KEYWORD_CALLS = {"restore"}  # forward keywords the references' own code passes by name


def _parse(signature: str) -> inspect.Signature:
    namespace = {"inf": math.inf}
    exec(f"def f{signature}: pass", namespace)  # noqa: S102 (our own literal strings)
    return inspect.signature(namespace["f"])


def _same_default(ours, theirs) -> bool:
    if isinstance(theirs, (list, tuple)) and isinstance(ours, (list, tuple)):
        return list(ours) == list(theirs)
    return type(ours) is type(theirs) and ours == theirs or (ours is theirs)


def _params(sig: inspect.Signature, drop_self: bool) -> list[inspect.Parameter]:
    params = list(sig.parameters.values())
    return params[1:] if drop_self and params and params[0].name in ("self", "ctx") else params


def _problems_by_name(theirs: inspect.Signature, ours: inspect.Signature) -> list[str]:
    """Constructors and functions: the reference's parameters by name, position and default."""
    problems, mine = [], _params(ours, False)
    by_name = {p.name: p for p in mine}
    positional = [p.name for p in mine if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has = {kind: any(p.kind is kind for p in mine) for kind in (inspect.Parameter.VAR_KEYWORD,
                                                                inspect.Parameter.VAR_POSITIONAL)}
    if not theirs.parameters:  # nn.Module's own __init__: constructible without arguments
        required = [p.name for p in mine if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        return [f"needs arguments {required}"] if required else []
    for i, p in enumerate(theirs.parameters.values()):
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            if not has[p.kind]:
                problems.append(f"no {'**' if p.kind is p.VAR_KEYWORD else '*'}{p.name}")
            continue
        if p.name not in by_name:
            problems.append(f"no parameter {p.name!r}")
            continue
        if i >= len(positional) or positional[i] != p.name:
            problems.append(f"{p.name!r} is not positional argument {i}")
        if p.default is not p.empty and not _same_default(by_name[p.name].default, p.default):
            problems.append(f"{p.name}: default {by_name[p.name].default!r}, the reference's {p.default!r}")
    extra = [p.name for p in mine if p.name not in theirs.parameters and p.default is p.empty
             and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return problems + [f"extra required parameters {extra}"] if extra else problems


def _problems_positional(theirs: inspect.Signature, ours: inspect.Signature) -> list[str]:
    """forward / inverse: the reference's positional arguments and defaults, and its keyword calls by name."""
    problems, mine = [], _params(ours, True)
    positional = [p for p in mine if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for i, p in enumerate(_params(theirs, True)):
        if p.name in KEYWORD_CALLS:
            q = ours.parameters.get(p.name)
            if q is None or not _same_default(q.default, p.default) and not (q.default in (None, False)
                                                                          and p.default in (None, False)):
                problems.append(f"no keyword {p.name}={p.default!r}")
            continue
        if i >= len(positional):
            problems.append(f"takes no positional argument {i} ({p.name})")
        elif p.default is not p.empty and not _same_default(positional[i].default, p.default):
            problems.append(f"argument {i} ({p.name}): default {positional[i].default!r}, the reference's {p.default!r}")
    n_theirs = len(_params(theirs, True))
    extra = [p.name for p in positional[n_theirs:] if p.default is p.empty]
    return problems + [f"extra required arguments {extra}"] if extra else problems


@pytest.mark.parametrize("source, module, name, signatures", CASES, ids=[f"{c[0]}:{c[2]}" for c in CASES])
def test_every_reference_name_has_a_compatible_counterpart(source, module, name, signatures):
    if name in ABSENT:
        assert signatures is None and not hasattr(module, name)
        return
    ours = getattr(module, COUNTERPARTS.get(name, name), None)
    assert ours is not None, f"{source}.{name} has no counterpart in {module.__name__} and is not listed in ABSENT"
    assert module.__all__.count(COUNTERPARTS.get(name, name)) == 1  # exported
    init, forward, inverse = signatures
    problems = _problems_by_name(_parse(init), inspect.signature(ours))
    for method, theirs in (("forward", forward), ("inverse", inverse)):
        if theirs is not None:
            assert hasattr(ours, method), f"{name}: no {method}"
            problems += [f"{method}: {p}" for p in _problems_positional(_parse(theirs),
                                                                         inspect.signature(getattr(ours, method)))]
    assert not problems, f"{source}.{name}: " + "; ".join(problems)


def test_activation_tables_have_the_references_names():
    for table, names in ACT_TABLES.items():
        assert sorted(getattr(our_models, table)) == names
    # the toy scripts' tables (built at import from layers.base): every name resolves
    assert set(our_models.TOY_ACT_FNS) == {"identity", "relu", "tanh", "elu", "selu", "fullsort", "maxmin", "swish",
                                           "lcube", "sin", "zero"}


def test_absent_names_have_reasons_and_the_tables_are_complete():
    listed = set(RESIDUAL_FLOWS_LAYERS) | set(RESIDUAL_FLOWS_BASE) | set(IMPFLOW_LAYERS)
    assert set(ABSENT) <= listed and all(len(reason) > 20 for reason in ABSENT.values())
    # the counterpart of every listed class is an nn.Module (functions aside), constructible as the reference's
    for name in listed - set(ABSENT):
        ours = getattr(our_nn, COUNTERPARTS.get(name, name))
        assert inspect.isfunction(ours) or issubclass(ours, torch.nn.Module), name
