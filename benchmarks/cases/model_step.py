"""A whole model's training step: the reference toy model and a small multi-scale ResidualFlow."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import resflow_cuda

from .base import (AUTOGRAD, EAGER, RESFLOW, Case, CaseConfig, Target, baseline_targets, digits_flow, model_batch,
                   overhead_targets, training_step)
from .iresblock import BlockConfig, IResBlockCase, mlp_pass


@dataclasses.dataclass(frozen=True)
class ModelConfig(CaseConfig):
    model: str  # "toy" or "digits"
    mode: str = "train step"

    @property
    def label(self) -> str:
        return self.model


def nll(model, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The standard-normal negative log-likelihood of ``x`` under our flow ``model`` (mean over the batch)."""
    from resflow_cuda import models

    def loss_fn():
        z, delta = model(x, x.new_zeros(x.shape[0], 1))
        return -(models.standard_normal_logprob(z).sum(1) - delta.squeeze(1)).mean()

    return loss_fn


def normflows_nll(flows, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The same loss under a stack of normflows flows (each returns its log-det)."""
    from resflow_cuda import models

    def loss_fn():
        z, log_det = x, torch.zeros(x.shape[0], device=x.device)
        for flow in flows:
            z, ld = flow(z)
            log_det = log_det + ld
        return -(models.standard_normal_logprob(z).sum(1) + log_det).mean()

    return loss_fn


def normflows_update(model) -> Callable[[], None]:
    """normflows' own update_lipschitz (5 iterations): resflow_cuda.update_lipschitz skips layers of
    other libraries."""
    import normflows as nf

    def update():
        nf.utils.update_lipschitz(model, 5)

    return update


class ModelStepCase(Case):
    """One training step of a whole model (loss, backward into every parameter, Adam step and
    update_lipschitz), each call from the same state and with the same roulette draws and probes:

    - ``toy``: the reference toy model, 16 iResBlocks over pre-activation LipSwish MLPs 2-128-128-128-128-2
      (basic estimator, as train_toy.py), batch 512; eager = the same stack of normflows' ``Residual``
      flows (normflows 1.7.3, the reference code) with the same weights, updated by normflows'
      ``update_lipschitz``;
    - ``digits``: a ResidualFlow on 1×8×8 images, 2 scales × 4 blocks, idim 128, the CIFAR-10 settings
      of train_img.py (Poisson roulette, Neumann gradient with backward-in-forward), batch 64; eager =
      the same model on autograd VJPs (the reference's algorithm; the reference package is not
      installable, so its role is played by our blocks with ``fast_path=False``)."""

    name = "model_step"
    title = "a whole model's training step (forward, backward, Adam, update_lipschitz)"
    quick_models = ["toy"]
    models = ["toy", "digits"]

    def configs(self, quick: bool) -> list[ModelConfig]:
        return [ModelConfig(m) for m in (self.quick_models if quick else self.models)]

    def providers(self) -> dict[str, str]:
        return {RESFLOW: "fast", AUTOGRAD: "autograd", EAGER: "eager"}

    @staticmethod
    def _toy(fast_path: bool):
        from resflow_cuda import models

        torch.manual_seed(0)
        model = models.toy_model(n_blocks=16, dims=(128, 128, 128, 128), vnorms="222222")
        for m in model.modules():
            if isinstance(m, resflow_cuda.nn.iResBlock):
                m.fast_path = fast_path
        return model

    @staticmethod
    def _digits(fast_path: bool):
        torch.manual_seed(0)
        model = digits_flow(intermediate_dim=128)
        model(torch.rand(64, 1, 8, 8))  # ActNorm's data initialisation and the convolutions' u / v
        for m in model.modules():
            if isinstance(m, resflow_cuda.nn.iResBlock):
                m.fast_path = fast_path
        return model

    def make_inputs(self, config: ModelConfig, device: str, rotate: bool = True) -> dict:
        """The batch and the initial state. Not rotated: a step makes many passes over one batch."""
        x = model_batch(config.model)
        state = (self._toy if config.model == "toy" else self._digits)(True).state_dict()
        return {"x": x.to(device), "state": state}

    def _normflows_toy(self, state: dict):
        import normflows as nf

        flows = []
        for i in range(16):
            net = nf.nets.LipschitzMLP([2, 128, 128, 128, 128, 2], lipschitz_const=0.9, max_lipschitz_iter=5,
                                       init_zeros=True)
            flows.append(nf.flows.Residual(net, reverse=False, reduce_memory=False))
        model = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(2, trainable=False), flows=flows)
        theirs = {}
        for key, value in state.items():  # chain.{i}.nnet.{k}.* -> flows.{i}.iresblock.nnet.net.{k}.*
            _, i, rest = key.split(".", 2)
            rest = rest.replace("nnet.", "nnet.net.", 1) if rest.startswith("nnet.") else rest
            theirs[f"flows.{i}.iresblock.{rest}"] = value
        model.load_state_dict(theirs, strict=False)
        return model

    def runner(self, provider: str, inputs: dict, config: ModelConfig) -> Callable[[], tuple]:
        x, state = inputs["x"], inputs["state"]
        update = None  # resflow_cuda.update_lipschitz
        if provider == "autograd" and config.model == "digits":
            raise RuntimeError("the digits model's eager provider already is our blocks on autograd VJPs")
        if provider == "eager" and config.model == "toy":
            model = self._normflows_toy(state).to(x.device)
            loss_fn, update = normflows_nll(model.flows, x), normflows_update(model)
        else:
            build = self._toy if config.model == "toy" else self._digits
            model = build(provider == "fast").to(x.device)
            model.load_state_dict(state)
            loss_fn = nll(model, x)
        return training_step(model, loss_fn, update)

    def targets(self, rows: list[dict], quick: bool) -> list[Target]:
        """Toy: the whole step (Adam and update_lipschitz included) >= 2.5x normflows, and ops per
        forward + backward (the counted step) at most 1/5 of normflows'; digits: ops per forward +
        backward at most 1/3 of the count recorded in budgets.json's baseline (issue "Small flows are
        bound by overhead, not FLOPs")."""
        toy = [r for r in rows if r["label"] == "toy"]
        return (overhead_targets(toy, EAGER, 2.5, syncs=None, what="ops per forward+backward", shown="normflows")
                + baseline_targets(self.name, rows, ("digits",)))

    def counts(self, config: ModelConfig) -> tuple[float, float]:
        """(FLOPs, bytes) of a step: per block, passes of its branch as in IResBlockCase (forward,
        one per series term, and the backward passes), with the series length of the toy's basic
        estimator (n = the geometric draw after seed 0 plus 2 exact terms: forward, n VJPs made with
        create_graph, two passes each to differentiate them, and g's backward: 3 + 3n), or for the digits
        model the Poisson roulette's mean length (2 + 2 exact terms) and the Neumann gradient's 8 passes
        (1 + 4 + 8)."""
        if config.model == "toy":
            per_pass = mlp_pass([2, 128, 128, 128, 128, 2], 512)
            n = IResBlockCase().terms(BlockConfig("toy", "train"))
            passes = 16 * (3 + 3 * n)
        else:
            pixels = 64 * 8 * 8
            layers = [(1, 128, 3), (128, 128, 1), (128, 1, 3), (4, 128, 3), (128, 128, 1), (128, 4, 3)]
            per_scale = [layers[:3], layers[3:]]
            flops = [2 * (pixels if i == 0 else pixels // 4) * sum(a * b * k * k for a, b, k in ls)
                     for i, ls in enumerate(per_scale)]
            nbytes = [4 * sum(a * b * k * k + (pixels if i == 0 else pixels // 4) * (a + b) for a, b, k in ls)
                      for i, ls in enumerate(per_scale)]
            passes = 4 * (1 + 4 + 8)
            return float(passes * sum(flops)), float(passes * sum(nbytes))
        return float(passes * per_pass[0]), float(passes * per_pass[1])
