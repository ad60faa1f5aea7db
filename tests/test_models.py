"""resflow_cuda.models: the ResidualFlow and the toy model against the reference's structure
(reference.md §1.6, §1.8), exact log-dets, inverses, sampling, bits/dim and errors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from assertions import assert_none_or_zero
from jacobians import brute_logdet

import resflow_cuda
from resflow_cuda import models
from resflow_cuda.nn import ImplicitBlock, InducedNormConv2d, InducedNormLinear, LipSwish, iResBlock
from resflow_cuda.nn.flows import ActNorm1d, ActNorm2d, LogitTransform, SqueezeLayer

pytestmark = pytest.mark.filterwarnings("ignore:.*did not converge")


def _cifar_like(**kwargs):
    """The shape of the reference CIFAR-10 model (train_img.py defaults), at a toy size."""
    torch.manual_seed(0)
    options = dict(n_blocks=[2, 2], intermediate_dim=8, factor_out=False, actnorm=True, preact=True,
                   first_resblock=True, init_layer=LogitTransform(0.05), fc_end=True, fc_idim=8, kernels="3-1-3",
                   vnorms="2222", activation_fn="swish", coeff=0.98, n_lipschitz_iters=5, n_exact_terms=2,
                   n_dist="poisson", grad_in_forward=True)
    options.update(kwargs)
    return models.ResidualFlow((2, 3, 8, 8), **options)


def test_resflow_module_order_and_state_dict_keys_follow_the_reference():
    model = _cifar_like()
    assert model.n_scale == 2 and model.dims == [(12, 4, 4)]
    scale0, scale1 = (list(s.chain) for s in model.transforms)
    assert [type(m) for m in scale0] == [LogitTransform, ActNorm2d, iResBlock, ActNorm2d, iResBlock, ActNorm2d,
                                        SqueezeLayer]
    assert [type(m).__name__ for m in scale1] == ["iResBlock", "ActNorm2d", "iResBlock", "ActNorm2d"] + \
        ["iResBlock", "FCWrapper"] * 4
    # first block of scale 0: no pre-activation on raw data; the others: act before every conv
    assert [type(m) for m in scale0[2].nnet] == [InducedNormConv2d, LipSwish, InducedNormConv2d, LipSwish,
                                                 InducedNormConv2d]
    assert [type(m) for m in scale0[4].nnet] == [LipSwish, InducedNormConv2d, LipSwish, InducedNormConv2d,
                                                 LipSwish, InducedNormConv2d]
    convs = [m for m in scale1[0].nnet if isinstance(m, InducedNormConv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(12, 8, (3, 3)), (8, 8, (1, 1)),
                                                                              (8, 12, (3, 3))]
    keys = set(model.state_dict())
    # reference key layout: transforms.{scale}.chain.{j}.nnet.{k}..., FC blocks nnet.nnet.{k}, FCWrapper fc_module
    assert {"transforms.0.chain.1.weight", "transforms.0.chain.1.initialized", "transforms.0.chain.2.nnet.0.weight",
            "transforms.0.chain.4.nnet.0.beta", "transforms.1.chain.4.nnet.nnet.0.beta",
            "transforms.1.chain.4.nnet.nnet.1.weight", "transforms.1.chain.5.fc_module.weight"} <= keys
    fc = scale1[4].nnet
    assert [type(m) for m in fc.nnet] == [LipSwish, InducedNormLinear, LipSwish, InducedNormLinear, LipSwish,
                                          InducedNormLinear]
    assert [(m.in_features, m.out_features) for m in fc.nnet if isinstance(m, InducedNormLinear)] == \
        [(192, 8), (8, 8), (8, 192)]
    assert scale0[2].n_exact_terms == 2 and scale0[2].n_dist == "poisson" and scale0[2].grad_in_forward


@pytest.mark.parametrize("factor_out", [True, False])
def test_resflow_log_det_is_unbiased_for_the_exact_one_and_inverse_round_trips(factor_out):
    torch.manual_seed(0)
    model = models.ResidualFlow((2, 1, 8, 8), n_blocks=[1, 1], intermediate_dim=6, factor_out=factor_out,
                                actnorm=True, fc_end=True, fc_idim=6, coeff=0.5, n_lipschitz_iters=20,
                                n_power_series=None, activation_fn="elu").double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    model(x)  # ActNorm data initialisation (training mode)
    model.eval()
    zero = torch.zeros(3, 1, dtype=torch.float64)
    z, delta = model(x, zero)
    assert z.shape == (3, 64)
    # eval: 20 exact terms plus the roulette's with one Hutchinson probe per block, so each call is
    # an unbiased estimate: the mean of independent calls is within 4 standard errors of the exact value
    draws = torch.stack([-model(x, zero)[1] for _ in range(200)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    exact = brute_logdet(model, x)
    assert ((mean - exact).abs() <= 4 * se + 1e-9).all(), (mean, exact, se)  # 1e-9: float64 rounding where se = 0
    # The inverse stops once every squared step (dx)^2 < tol (1 + |y|): tol = 1e-12 bounds steps only by ~1e-6, and
    # the error (~step * L / (1 - L) per block, 6 blocks) could pass 1e-7; 1e-24: steps ~1e-12, error < 1e-9 at L = 0.5.
    for block in model.modules():
        if isinstance(block, iResBlock):
            block.inverse_atol = block.inverse_rtol = 1e-24
    x2, logp = model.inverse(z, zero)
    torch.testing.assert_close(x2, x, atol=1e-7, rtol=0)
    # The inverse returns log p(x) = log p(z) + log|det dz/dx|: one fresh draw of the same estimator, so within
    # 5 of its standard deviations (the spread of one draw, from the 200 above) of the exact log-det. A wrong
    # sign (~146 off) or a block's term lost (~12 off, each block adds ~1/6 of the total) fails by far.
    assert logp.shape == (3, 1)
    assert ((logp - exact).abs() <= 5 * draws.std(0)).all(), (logp, exact, draws.std(0))
    torch.testing.assert_close(model(z, inverse=True), x2)  # the same inverse through the other entry point: equal


def test_sampling_log_prob_and_bits_per_dim(device):
    torch.manual_seed(0)
    model = models.ResidualFlow((2, 1, 8, 8), n_blocks=[1, 1], intermediate_dim=6, init_layer=LogitTransform(1e-6),
                                fc_end=False, n_lipschitz_iters=5).to(device)
    x = (torch.randint(0, 256, (4, 1, 8, 8)).float() / 255).to(device)
    model.eval()
    model(x)  # the convolutions' lazy u / v initialisation draws from the RNG: not inside the pair below
    np.random.seed(0)  # the same roulette draws and probes for both calls
    torch.manual_seed(0)
    lp = model.log_prob(x)
    np.random.seed(0)  # log p(x) = sum of the standard normal log-densities of z minus the log-det, from the
    torch.manual_seed(0)  # same draws: written out here, not through models.standard_normal_logprob
    z, delta = model(x, torch.zeros(4, 1, device=device))
    by_hand = (-0.5 * z.square() - 0.5 * math.log(2 * math.pi)).sum(1) - delta.squeeze(1)
    assert lp.shape == (4,)
    torch.testing.assert_close(lp, by_hand)  # the same float32 terms summed in another order; default tolerances
    np.random.seed(0)
    torch.manual_seed(0)
    bpd = model.bits_per_dim(x, dequantize=False)
    torch.testing.assert_close(bpd, -(lp - 64 * math.log(256)) / 64 / math.log(2))
    noisy = model.bits_per_dim(x)
    assert noisy.shape == (4,) and not torch.equal(noisy, bpd)
    for block in model.modules():  # the default inverse tolerance (1e-5) would dominate the round trip below
        if isinstance(block, iResBlock):
            block.inverse_atol = block.inverse_rtol = 1e-12
    samples = model.sample(5, temperature=0.5, generator=torch.Generator(device).manual_seed(1))
    assert samples.shape == (5, 1, 8, 8)
    assert ((samples > 0) & (samples < 1)).all()  # through the inverse of the logit transform
    # the samples are the inverse of z ~ N(0, 0.5^2) drawn from that generator: the forward maps them back to
    # it; float32 rounding through 4 blocks, 2 ActNorms and the logit transform with |z| <= 2: ~1e-6
    drawn = torch.randn(5, 64, generator=torch.Generator(device).manual_seed(1), device=device) * 0.5
    torch.testing.assert_close(model(samples), drawn, atol=1e-5, rtol=0)


def test_training_step_with_lipschitz_update_and_classifier_head(device):
    model = _cifar_like(classification=True, n_classes=4, factor_out=True, fc_end=False).to(device)
    x = torch.rand(2, 3, 8, 8).to(device)
    (z, delta), logits = model(x, torch.zeros(2, 1, device=device), classify=True)
    assert z.shape == (2, 192) and logits.shape == (2, 4)
    loss = -(models.standard_normal_logprob(z).sum(1) - delta.squeeze(1)).mean() + logits.logsumexp(1).mean()
    loss.backward()
    # every parameter but the blocks' geom_p / lamb (parameters in the reference too, never in a loss)
    grads = {n: p.grad for n, p in model.named_parameters() if not n.endswith(("geom_p", "lamb"))}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # closed form: only the logsumexp term reaches the logit layer, so the gradient of its bias is the batch
    # mean of softmax(logits) (float32 softmax of 4 logits: a few ulps; default tolerances)
    torch.testing.assert_close(model.logit_layer.bias.grad, torch.softmax(logits.detach(), 1).mean(0))
    resflow_cuda.update_lipschitz(model)
    assert {"classification_heads.0.0.weight", "logit_layer.weight"} <= set(model.state_dict())


def _train_and_eval_steps(model, x):
    """z, the log-det and the gradients of a loss of both (x and every parameter) in training, then z and
    the log-det in eval mode, each after seeding NumPy's N and torch's probes; all on the CPU."""
    out = []
    for training in (True, False):
        model.train(training)
        np.random.seed(3)
        torch.manual_seed(3)
        xi = x.clone().requires_grad_(training)
        z, delta = model(xi, torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device))
        out += [z, delta]
        if training:
            params = [p for p in model.parameters() if p.requires_grad]
            loss = -(models.standard_normal_logprob(z).sum(1) - delta.squeeze(1)).mean()
            out += torch.autograd.grad(loss, [xi, *params], allow_unused=True)
    return [None if t is None else t.detach().cpu() for t in out]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_resflow_on_cuda_matches_the_cpu(dtype, cuda, probes_drawn_on_cpu):
    """The reference CIFAR-10 model at a toy size, training step (Neumann gradient with backward-in-forward)
    and evaluation on CUDA against the CPU: the same state (ActNorm and the convolutions' u, v initialised
    on the CPU), N from NumPy and the probes drawn on the CPU for both (probes_drawn_on_cpu)."""
    model = _cifar_like(n_blocks=[1, 1]).to(dtype)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64).to(dtype)
    model(x)
    moved = copy.deepcopy(model).to(cuda)
    expected = _train_and_eval_steps(model, x)
    got = _train_and_eval_steps(moved, x.to(cuda))
    # float64: the same products summed in other orders through every block, ~1e-13 relative; float32: each
    # side errs against the float64 result by float32 rounding amplified through ~30 layers and the series,
    # several times below this tolerance (largest in the smallest gradients)
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    for i, (a, b) in enumerate(zip(got, expected)):
        if b is None:
            assert_none_or_zero(a, f"output {i}")
        else:
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"output {i}: {m}")


def test_toy_model_is_the_reference_toy_stack():
    torch.manual_seed(0)
    model = models.toy_model(n_blocks=3, dims=(16, 16), actnorm=True, vnorms="2222")
    assert [type(m) for m in model.chain] == [ActNorm1d] + [iResBlock, ActNorm1d] * 3
    block = model.chain[1]
    assert [type(m) for m in block.nnet] == [LipSwish, InducedNormLinear] * 3
    assert not block.neumann_grad and not block.grad_in_forward
    first = block.nnet[1].weight.detach().abs().max()
    assert block.nnet[-1].weight.detach().abs().max() < first / 100  # zero_init (W / 1000) on the 2-D output
    model = model.double()
    x = torch.randn(10, 2, dtype=torch.float64)
    model(x)  # ActNorm's data initialisation (training mode)
    model.eval()  # 2-D inputs: the blocks' log-dets are exact in eval mode
    z, delta = model(x, torch.zeros(10, 1, dtype=torch.float64))
    h = x
    for m in model.chain:  # the stack is the chain of its modules, in order
        h = m(h)
    torch.testing.assert_close(z, h, atol=0, rtol=0)  # the same modules on the same input: equal
    assert delta.abs().min() > 0.1  # a log-det away from 0 (ActNorm's scales), so the check below means something
    # float64 2 x 2 determinants, autograd's Jacobian of the whole stack against the blocks' own: ~1e-15
    torch.testing.assert_close(-delta, brute_logdet(lambda v: model(v), x), atol=1e-10, rtol=0)



def test_toy_model_implicit_arch_is_impflows_toy_stack():
    torch.manual_seed(0)
    model = models.toy_model(n_blocks=2, dims=(16, 16), actnorm=True, vnorms="2222", arch="implicit").double()
    assert [type(m) for m in model.chain] == [ActNorm1d] + [ImplicitBlock, ActNorm1d] * 2
    block = model.chain[1]
    for net in (block.nnet_x, block.nnet_z):  # ImpFlow's build_nnet: no pre-activation
        assert [type(m) for m in net] == [InducedNormLinear, LipSwish, InducedNormLinear, LipSwish, InducedNormLinear]
    assert not block.neumann_grad and not block.grad_in_forward
    x = torch.randn(6, 2, dtype=torch.float64)
    model(x)  # ActNorm's data initialisation
    with torch.no_grad():  # away from the zero-initialised output layers: a log-det far from 0
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    resflow_cuda.update_lipschitz(model, n_iterations=50)
    model.eval()
    z, logpz = model(x, torch.zeros(6, 1, dtype=torch.float64))
    assert logpz.abs().min() > 0.05
    torch.testing.assert_close(-logpz, brute_logdet(lambda v: model(v), x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="arch"):
        models.toy_model(n_blocks=1, arch="realnvp")

def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="vnorms"):
        models.ResidualFlow((1, 3, 8, 8), vnorms="22", kernels="3-1-3")
    with pytest.raises(ValueError, match="activation_fn"):
        models.ResidualFlow((1, 3, 8, 8), activation_fn="tanh")
    with pytest.raises(ValueError, match="at least 4"):
        models.ResidualFlow((1, 3, 2, 2))
    with pytest.raises(ValueError, match="input_size"):
        models.ResidualFlow((3, 8, 8))
    model = models.ResidualFlow((1, 1, 4, 4), n_blocks=[1], intermediate_dim=4, fc_end=False, n_lipschitz_iters=2)
    with pytest.raises(ValueError, match=r"shape \(B, 1, 4, 4\)"):
        model(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="classification=True"):
        model(torch.zeros(1, 1, 4, 4), classify=True)
    assert isinstance(model.transforms[0].chain[0].nnet[1], nn.ELU)


def test_ema_follows_the_reference_update_rule():
    layer = nn.Linear(3, 2)
    ema = models.ExponentialMovingAverage(layer, decay=0.9)
    assert ema.nparams == 8 and ema.shadow_params == {}
    ema.apply()  # the first apply copies
    start = {k: v.clone() for k, v in ema.shadow_params.items()}
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.apply()
    torch.testing.assert_close(ema.shadow_params["weight"], start["weight"] + 0.1)
    current = layer.weight.detach().clone()
    ema.swap()
    torch.testing.assert_close(layer.weight.detach(), start["weight"] + 0.1)
    torch.testing.assert_close(ema.shadow_params["weight"], current)
    other = models.ExponentialMovingAverage(layer)
    other.set(ema)
    torch.testing.assert_close(other.shadow_params["weight"], current)
    other.replace_with_ema()
    torch.testing.assert_close(layer.weight.detach(), current)
    with pytest.raises(ValueError, match="decay"):
        models.ExponentialMovingAverage(layer, decay=1.5)


def test_checkpoint_round_trip_needs_no_dummy_forward(tmp_path):
    """A state_dict saved after training (convolutions' u / v sized at the first forward) loads into a
    freshly built model, which has never seen an input, and gives the same outputs."""
    trained = _cifar_like(n_blocks=[1, 1])
    x = torch.rand(2, 3, 8, 8)
    trained(x, torch.zeros(2, 1))[1].mean().backward()
    resflow_cuda.update_lipschitz(trained)
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    fresh = _cifar_like(n_blocks=[1, 1])
    conv = fresh.transforms[0].chain[2].nnet[0]
    assert conv.u.shape != trained.transforms[0].chain[2].nnet[0].u.shape  # not initialised yet
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"))
    for model in (trained, fresh):
        model.eval()
    outs = []
    for model in (trained, fresh):
        np.random.seed(3)
        torch.manual_seed(3)
        outs.append(model(x, torch.zeros(2, 1)))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1])


def test_dropout_after_an_in_place_activation_backpropagates():
    """The reference puts an in-place Dropout2d after an in-place ELU, which breaks backward; ours is
    not in place, so a model with dropout trains."""
    model = models.ResidualFlow((4, 3, 8, 8), n_blocks=[1, 1], intermediate_dim=8, dropout=0.3, activation_fn="elu",
                                fc_end=False, n_lipschitz_iters=2)
    z, logpz = model(torch.rand(4, 3, 8, 8), torch.zeros(4, 1))
    (z.square().sum() - logpz.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
