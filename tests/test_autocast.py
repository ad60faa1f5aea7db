"""Mixed precision (docs/parity.md#mixed-precision): a training step of every block, model and the
normflows adapter under ``torch.autocast`` against the same step in float32 from the same weights (a
deep copy) and the same draws (NumPy and torch seeded before each step): the loss, every parameter
gradient and the log-det estimate, the output dtypes (y in x's dtype, log-densities in float32), and the
parts that run with autocast off (the power iteration, sigma, the inverse) bit for bit.

Tolerance (``TOL``). A 16-bit float keeps p significant bits (bfloat16 8, float16 11), so one rounding is
off by at most u = 2^-p relative (bfloat16 3.9e-3, float16 4.9e-4). Under autocast a gradient element
collects one rounding per 16-bit operand or result of each matrix product between the loss and the
parameter: three per linear map in forward (input, weight, output), two in backward (upstream gradient,
weight), one for the activations the log-det path caches: six per map, at most 6 x 3 maps x 8 blocks =
144 for the models here. Independent roundings add in quadrature, sqrt(144) u = 12 u; we allow 16 u
(2^-4 for bfloat16, 2^-7 for float16). It is applied relative to each element and, as an absolute floor,
to G, the largest float32 gradient element of the model: the rounding error of a sum scales with its
summands, not with the sum, and gradients such as a bias's or LipSwish's beta's sum the upstream gradient
over the batch and every position with cancellation, so their own size is no scale for their error. The
loss and the per-sample log-det estimate get the same 16 u, relative to |loss| and to the largest |estimate|.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import resflow_cuda
from resflow_cuda import models, ops, update_lipschitz
from resflow_cuda.nn import (ImplicitBlock, InducedNormConv2d, InducedNormLinear, LipSwish, SpectralNormConv2d,
                             SpectralNormLinear, iResBlock)
from resflow_cuda.nn.flows import LogitTransform

pytestmark = pytest.mark.filterwarnings("ignore:.*did not converge")

TOL = {torch.bfloat16: 16 * 2.0**-8, torch.float16: 16 * 2.0**-11}

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and resflow_cuda.has_cuda_kernels()),
                                reason="needs a CUDA device and the CUDA kernels")


# -- the branches, blocks and models --------------------------------------------------------------


def _mlp(dim: int = 2, hidden: int = 64) -> nn.Sequential:
    """The issue's branch: pre-activation LipSwish / InducedNormLinear."""
    lin = dict(coeff=0.9, n_iterations=5)
    return nn.Sequential(LipSwish(), InducedNormLinear(dim, hidden, **lin), LipSwish(),
                         InducedNormLinear(hidden, dim, **lin))


def _conv(channels: int = 3, hidden: int = 8) -> nn.Sequential:
    """The reference's conv branch [act] conv 3x3, act, conv 1x1, act, conv 3x3."""
    conv = dict(coeff=0.9, n_iterations=5)
    return nn.Sequential(LipSwish(), InducedNormConv2d(channels, hidden, 3, 1, 1, **conv), LipSwish(),
                         InducedNormConv2d(hidden, hidden, 1, 1, 0, **conv), LipSwish(),
                         InducedNormConv2d(hidden, channels, 3, 1, 1, **conv))


BRANCHES = {"mlp": (_mlp, (16, 2)), "conv": (_conv, (4, 3, 6, 6))}


def _resflow(block_type: str = "resblock", **options) -> models.ResidualFlow:
    settings = dict(n_blocks=[1, 1], intermediate_dim=8, factor_out=False, actnorm=True,
                    init_layer=LogitTransform(0.05), fc_end=True, fc_idim=8, n_lipschitz_iters=5, block_type=block_type)
    settings.update(options)
    return models.ResidualFlow((2, 3, 8, 8), **settings)


MODELS = {
    "resflow": lambda: _resflow(),
    "resflow-basic-no-bif": lambda: _resflow(neumann_grad=False, grad_in_forward=False),
    "resflow-factor-out-quadratic": lambda: _resflow(factor_out=True, quadratic=True, activation_fn="elu"),
    "resflow-coupling": lambda: _resflow("coupling"),
    "toy-iresnet": lambda: models.toy_model(n_blocks=2, dims=(32, 32), actnorm=True),
    "toy-implicit": lambda: models.toy_model(n_blocks=2, dims=(32, 32), arch="implicit"),
}
MODEL_INPUTS = {"resflow": (2, 3, 8, 8), "toy": (16, 2)}


# -- one training step, and the comparison ---------------------------------------------------------


def _flow_loss(flow, x):
    """(loss, y, log-density, estimate): the negative log-likelihood per dimension under a standard normal
    base, for blocks and models with the ``(y, logp)`` convention."""
    y, logp = flow(x, torch.zeros(x.shape[0], 1, device=x.device))
    loss = (0.5 * y.pow(2).flatten(1).sum(1, keepdim=True) - logp).mean() / x[0].numel()
    return loss, y, logp, getattr(flow, "last_logdet_estimate", None)


def _step(flow, x, loss_fn=_flow_loss, dtype=None, scaler=None, seed=0):
    """One step's loss, unscaled parameter gradients and outputs; under autocast with ``dtype``."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    flow.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss, *outputs = loss_fn(flow, x)
    (loss if scaler is None else scaler.scale(loss)).backward()
    scale = 1.0 if scaler is None else scaler.get_scale()
    grads = {name: p.grad / scale for name, p in flow.named_parameters() if p.grad is not None}
    return loss.detach(), grads, outputs


def _assert_steps_close(loss, grads, loss32, grads32, tol):
    """Finite, and within ``tol`` of the float32 step: the loss relative to itself, every gradient element
    relative to itself and to the largest float32 gradient element (module docstring)."""
    assert torch.isfinite(loss) and abs(float(loss - loss32)) <= tol * abs(float(loss32)), (float(loss), float(loss32))
    assert grads.keys() == grads32.keys()
    scale = max(float(g.abs().max()) for g in grads32.values())
    for name, g32 in grads32.items():
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name], g32, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def _compare(make, x, dtype, loss_fn=_flow_loss, scaler=None, seed=0):
    """The float32 step and the autocast step of twins: the dtypes, finiteness and TOL (module docstring)."""
    torch.manual_seed(1)
    np.random.seed(1)
    flow = make().to(x.device)
    twin = copy.deepcopy(flow)
    loss32, grads32, out32 = _step(flow, x, loss_fn, seed=seed)
    loss, grads, out = _step(twin, x, loss_fn, dtype, scaler, seed=seed)
    tol = TOL[dtype]
    y, logp = out[0], out[1]
    assert y.dtype == x.dtype and logp.dtype == torch.float32, (y.dtype, logp.dtype)
    assert torch.isfinite(y).all() and torch.isfinite(logp).all()
    _assert_steps_close(loss, grads, loss32, grads32, tol)
    if out[2] is not None:
        estimate, estimate32 = out[2], out32[2]
        assert estimate.dtype == torch.float32
        torch.testing.assert_close(estimate, estimate32, rtol=tol, atol=tol * float(estimate32.abs().max()))


# -- CPU, bfloat16 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["bif", "no-bif"])
@pytest.mark.parametrize("neumann_grad", [True, False], ids=["neumann", "basic"])
@pytest.mark.parametrize("branch", list(BRANCHES))
def test_iresblock_step_under_bfloat16_autocast_matches_float32(branch, neumann_grad, grad_in_forward):
    # mlp on (B, 2): the Neumann estimator on the linearized fast path, the basic one from the
    # forward-mode Jacobians; conv: the fast path, and autograd VJPs for the basic estimator.
    make, shape = BRANCHES[branch]
    x = torch.randn(*shape)
    _compare(lambda: iResBlock(make(), neumann_grad=neumann_grad, grad_in_forward=grad_in_forward), x,
             torch.bfloat16)


def test_iresblock_step_under_float16_autocast_with_grad_scaler_matches_float32():
    # The float16 + GradScaler path of the CUDA tests, on the CPU (autocast takes float16 there too). A
    # scale of 2^8 keeps the scaled gradients (|g| < 10 here) far below float16's largest value 65504.
    x = torch.randn(16, 2)
    _compare(lambda: iResBlock(_mlp(), grad_in_forward=True), x, torch.float16,
             scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))


@pytest.mark.parametrize("branch", list(BRANCHES))
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["bif", "no-bif"])
def test_implicit_block_step_under_bfloat16_autocast_matches_float32(branch, grad_in_forward):
    make, shape = BRANCHES[branch]
    x = torch.randn(*shape)
    _compare(lambda: ImplicitBlock(make(), make(), grad_in_forward=grad_in_forward), x, torch.bfloat16)


@pytest.mark.parametrize("name", list(MODELS))
def test_model_step_under_bfloat16_autocast_matches_float32(name):
    shape = MODEL_INPUTS[name.split("-")[0]]
    x = torch.rand(*shape) if name.startswith("resflow") else torch.randn(*shape)
    _compare(MODELS[name], x, torch.bfloat16)


def _normflows():
    nf = pytest.importorskip("normflows")
    from resflow_cuda.integrations import normflows as rnf
    return nf, rnf


def _normflows_loss(flow, x):
    z, log_det = flow(x)
    assert log_det.shape == (x.shape[0],)
    return (0.5 * z.pow(2).flatten(1).sum(1) - log_det).mean() / x[0].numel(), z, log_det.view(-1, 1), None


@pytest.mark.parametrize("reduce_memory", [True, False])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_normflows_adapter_step_under_bfloat16_autocast_matches_float32(net, reduce_memory):
    _, rnf = _normflows()
    if net == "mlp":
        make, x = lambda: rnf.LipschitzMLP([2, 32, 32, 2], lipschitz_const=0.9, init_zeros=False), torch.randn(16, 2)
    else:
        make, x = lambda: rnf.LipschitzCNN([3, 8, 3], [3, 3], lipschitz_const=0.9, init_zeros=False), \
            torch.randn(4, 3, 6, 6)
    _compare(lambda: rnf.Residual(make(), reduce_memory=reduce_memory), x, torch.bfloat16, _normflows_loss)


@pytest.mark.parity
@pytest.mark.parametrize("reduce_memory", [True, False])
def test_adapter_and_normflows_agree_under_the_same_bfloat16_autocast(reduce_memory):
    # normflows' Residual over its LipschitzMLP trains under CPU autocast (its conv layers do not:
    # their sigma takes a dot product of the float32 u and the bfloat16 convolution). Same weights and
    # draws: both round the branch the same way, and differ where normflows' VJPs run in bfloat16 and
    # ours in float32, within the module's TOL.
    nf, rnf = _normflows()
    torch.manual_seed(0)
    theirs = nf.flows.Residual(nf.nets.LipschitzMLP([3, 16, 16, 3], lipschitz_const=0.9, init_zeros=False),
                               reduce_memory=reduce_memory)
    ours_net = rnf.LipschitzMLP([3, 16, 16, 3], lipschitz_const=0.9, init_zeros=False)
    ours_net.load_state_dict(theirs.iresblock.nnet.state_dict())
    ours = rnf.Residual(ours_net, reduce_memory=reduce_memory)
    x = torch.randn(16, 3)
    theirs_step = _step(theirs, x, _normflows_loss, torch.bfloat16, seed=3)[:2]
    ours_step = _step(ours, x, _normflows_loss, torch.bfloat16, seed=3)[:2]
    _assert_steps_close(*ours_step, *theirs_step, TOL[torch.bfloat16])


def _layers():
    return {
        "induced-linear": (lambda: InducedNormLinear(8, 16, coeff=0.9, n_iterations=5), (4, 8)),
        "induced-linear-1-inf": (lambda: InducedNormLinear(8, 16, coeff=0.9, domain=1, codomain=float("inf"),
                                                           n_iterations=5), (4, 8)),
        "induced-learnable": (lambda: InducedNormLinear(8, 16, coeff=0.9, domain=torch.tensor(0.0),
                                                        codomain=torch.tensor(0.0), n_iterations=5), (4, 8)),
        "spectral-linear": (lambda: SpectralNormLinear(8, 16, coeff=0.9, n_iterations=5), (4, 8)),
        "induced-conv": (lambda: InducedNormConv2d(3, 8, 3, 1, 1, coeff=0.9, n_iterations=5), (2, 3, 6, 6)),
        "induced-conv-1x1": (lambda: InducedNormConv2d(3, 8, 1, 1, 0, coeff=0.9, n_iterations=5), (2, 3, 6, 6)),
        "spectral-conv": (lambda: SpectralNormConv2d(3, 8, 3, 1, 1, coeff=0.9, n_iterations=5), (2, 3, 6, 6)),
    }


@pytest.mark.parametrize("name", list(_layers()))
def test_power_iteration_and_sigma_run_in_the_weight_dtype_under_autocast(name):
    # Autocast is off inside the power-iteration ops and around sigma = u^T W v: the same kernels on the
    # same float32 inputs, so the same bits (the first forward initialises the convolutions' u and v;
    # SpectralNorm* iterate in every training forward; then update_lipschitz).
    make, shape = _layers()[name]
    torch.manual_seed(0)
    layer = make()
    twin = copy.deepcopy(layer)
    x = torch.randn(*shape)
    results = []
    for module, enabled in ((layer, False), (twin, True)):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = module(x)
            weight = module.compute_weight(update=True)
            update_lipschitz(module)
        assert out.dtype == (torch.bfloat16 if enabled else torch.float32)
        results.append((weight, *module.buffers()))
    for ours, reference in zip(*results):
        assert ours.dtype == reference.dtype and torch.equal(ours, reference)


def test_composite_ops_are_opaque_to_autocast_and_still_refuse_mixed_dtypes():
    torch.manual_seed(0)
    eps, w1, w2 = torch.randn(5, 3), torch.randn(7, 3) / 4, torch.randn(3, 7) / 4
    slope = torch.rand(5, 7)
    args = ([w1, w2], [1, 1, 1, 1], [0, 0, 0, 0])
    coeffs = ([1.0, -0.5, 1 / 3], [-1.0, 1.0, -1.0])
    plain = ops.linearized_logdet_series(eps, *args, [None, slope], *coeffs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = ops.linearized_logdet_series(eps, *args, [None, slope], *coeffs)
    for a, b in zip(under, plain):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled), \
                pytest.raises(RuntimeError, match=r"derivs\[1\].*dtype"):
            ops.linearized_logdet_series(eps, *args, [None, slope.bfloat16()], *coeffs)


@pytest.mark.parametrize("kind", ["iresblock-mlp", "iresblock-conv", "implicit-mlp"])
def test_eval_log_det_and_inverse_under_bfloat16_autocast(kind):
    # Eval: the exact 2-D determinant (mlp, from forward-mode Jacobians in float32), the 20-term roulette
    # on the fast path (conv), ImplicitBlock's full-Jacobian log-det. The inverses run their fixed-point
    # iteration / root solve with autocast off.
    block_type, branch = kind.split("-")
    make, shape = BRANCHES[branch]
    torch.manual_seed(0)
    block = (iResBlock(make()) if block_type == "iresblock" else ImplicitBlock(make(), make())).eval()
    x = torch.randn(*shape)
    results = []
    for enabled in (False, True):
        np.random.seed(0)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*did not converge")  # also under autocast
            y, logp = block(x, 0.0)
            results.append((y, logp, block.inverse(y)))
    (y32, logp32, _), (y, logp, x_back) = [[t.detach() for t in step] for step in results]
    tol = TOL[torch.bfloat16]
    assert y.dtype == logp.dtype == x_back.dtype == torch.float32
    torch.testing.assert_close(logp, logp32, rtol=tol, atol=tol * float(logp32.abs().max()))
    torch.testing.assert_close(y, y32, rtol=tol, atol=tol * float(y32.abs().max()))
    if block_type == "iresblock":  # the inverse under autocast is the float32 inverse of the same y
        with torch.no_grad():
            assert torch.equal(x_back, block.inverse(y))


# -- CUDA: float16 with a GradScaler, and bfloat16 -----------------------------------------------


CUDA_DTYPES = [pytest.param(torch.float16, id="f16-scaler"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.fixture
def float32_without_tf32():
    """The float32 step in float32: cuDNN convolutions default to TF32, which rounds to 11 bits like float16."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _cuda_scaler(dtype):
    # float16 needs loss scaling; 2^8 keeps the scaled gradients (|g| < 10 with the per-dimension losses
    # here) far below float16's largest value 65504. bfloat16 has float32's range and needs none.
    return torch.amp.GradScaler("cuda", init_scale=2.0**8) if dtype == torch.float16 else None


@pytest.mark.cuda
@needs_cuda
@pytest.mark.usefixtures("float32_without_tf32")
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["bif", "no-bif"])
@pytest.mark.parametrize("neumann_grad", [True, False], ids=["neumann", "basic"])
@pytest.mark.parametrize("branch", list(BRANCHES))
def test_cuda_iresblock_step_under_autocast_matches_float32(branch, neumann_grad, grad_in_forward, dtype):
    make, shape = BRANCHES[branch]
    x = torch.randn(*shape, device="cuda")
    _compare(lambda: iResBlock(make(), neumann_grad=neumann_grad, grad_in_forward=grad_in_forward), x, dtype,
             scaler=_cuda_scaler(dtype))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.usefixtures("float32_without_tf32")
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("branch", list(BRANCHES))
def test_cuda_implicit_block_step_under_autocast_matches_float32(branch, dtype):
    make, shape = BRANCHES[branch]
    x = torch.randn(*shape, device="cuda")
    _compare(lambda: ImplicitBlock(make(), make()), x, dtype, scaler=_cuda_scaler(dtype))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.usefixtures("float32_without_tf32")
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("name", ["resflow", "resflow-coupling", "toy-iresnet"])
def test_cuda_model_step_under_autocast_matches_float32(name, dtype):
    shape = MODEL_INPUTS[name.split("-")[0]]
    x = torch.rand(*shape, device="cuda") if name.startswith("resflow") else torch.randn(*shape, device="cuda")
    _compare(MODELS[name], x, dtype, scaler=_cuda_scaler(dtype))
