"""The multi-scale ``ResidualFlow`` of the reference image experiments (residual or coupling
blocks), its base density and the training script's EMA of the parameters (see
:mod:`resflow_cuda.models`)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from ..nn import ActNorm2d
from .stacks import StackedCouplingBlocks, StackediResBlocks

__all__ = ["ExponentialMovingAverage", "ResidualFlow", "standard_normal_logprob"]


def standard_normal_logprob(z: Tensor) -> Tensor:
    """Elementwise log N(z; 0, 1)."""
    return -0.5 * math.log(2 * math.pi) - z.pow(2) / 2


class ResidualFlow(nn.Module):
    """The multi-scale Residual Flow (Chen et al., 2019) of the reference's image experiments.

    Each scale is a :class:`StackediResBlocks` (``block_type='resblock'``) or a
    :class:`StackedCouplingBlocks` (``'coupling'``, the reference's coupling baseline, exact log-det);
    scales but the last end with a squeeze and factor out half of the channels. The reference's
    constructor, defaults, module order and state_dict keys. Parity with the reference:
    docs/parity.md#residualflow

    Args:
        input_size: the data's (N, C, H, W) (N is not used).
        n_blocks: blocks per scale; there are min(len(n_blocks), halvings of H, W while >= 4) scales.
        intermediate_dim: hidden channels of the residual branches.
        factor_out: factor out half of the channels after every scale but the last.
        quadratic: an invertible 1x1 convolution (Glow) before every block.
        init_layer: a flow layer run first (e.g. :class:`~resflow_cuda.nn.LogitTransform`).
        actnorm: ActNorm after every block.
        fc_actnorm: an ActNorm over the flattened input after every block.
        batchnorm: a MovingBatchNorm2d after every convolution of the convolutional branches.
        dropout: dropout probability before a branch's last layer (0: none).
        fc: fully connected branches (:class:`FCNet`) instead of convolutional ones.
        coeff: the Lipschitz bound of every layer of the branches.
        vnorms: norm orders between the branch's layers, one character each ('f': inf), e.g. '122f'.
        n_lipschitz_iters: power-iteration steps per update; None: to sn_atol / sn_rtol.
        sn_atol: absolute tolerance of the power iteration.
        sn_rtol: relative tolerance of the power iteration.
        n_power_series: in training, that many series terms (biased); None: Russian roulette.
        n_dist: ``"geometric"`` or ``"poisson"``, the distribution of the roulette's number of terms.
        n_samples: draws of the number of terms per estimate.
        n_exact_terms: terms always computed in training.
        kernels: kernel sizes of the branch's convolutions, e.g. '3-1-3'.
        activation_fn: the branches' activation, a key of :data:`ACT_FNS` ('swish' is LipSwish).
        fc_end: end the last scale with 4 fully connected blocks.
        fc_idim: hidden width of those blocks.
        preact: start every branch with its activation (after a MovingBatchNorm2d with ``batchnorm``).
        neumann_grad: the Neumann-series gradient of the log-det (see :class:`~resflow_cuda.nn.iResBlock`).
        grad_in_forward: backward-in-forward (see :class:`~resflow_cuda.nn.iResBlock`).
        first_resblock: in the first scale, ActNorm before the first block (with ``actnorm`` or
            ``fc_actnorm``) and no pre-activation in the first branch.
        learn_p: learnable norm orders (starting at 2) in place of vnorms'.
        classification: add classification heads on every scale (``forward(..., classify=True)``).
        classification_hdim: channels of each classification head.
        n_classes: number of classes.
        block_type: ``'resblock'`` or ``'coupling'``.

    Shapes:
        x: (B, C, H, W) of ``input_size``; z: (B, C·H·W), the factored-out parts of every scale,
        flattened, then the last scale; logpx: (B, 1).

    Returns:
        ``forward(x)``: ``z``; ``forward(x, logpx)``: ``(z, logpx - logdet)``; with ``classify=True``
        also the class logits (B, n_classes). ``inverse(z, logpz=None)`` runs the scales backwards.
        Extras: :meth:`sample`, :meth:`log_prob` and :meth:`bits_per_dim`.

    Example:
        >>> from resflow_cuda.models import ResidualFlow
        >>> flow = ResidualFlow((16, 1, 8, 8), n_blocks=(1, 1), intermediate_dim=8, fc_idim=16, n_lipschitz_iters=2)
        >>> z, logpz = flow(torch.rand(4, 1, 8, 8), torch.zeros(4, 1))
        >>> z.shape, flow.log_prob(torch.rand(4, 1, 8, 8)).shape
        (torch.Size([4, 64]), torch.Size([4]))
    """

    def __init__(self, input_size, n_blocks=(16, 16), intermediate_dim=64, factor_out=True, quadratic=False,
                 init_layer=None, actnorm=False, fc_actnorm=False, batchnorm=False, dropout=0, fc=False, coeff=0.9,
                 vnorms="122f", n_lipschitz_iters=None, sn_atol=None, sn_rtol=None, n_power_series=5,
                 n_dist="geometric", n_samples=1, kernels="3-1-3", activation_fn="elu", fc_end=True, fc_idim=128,
                 n_exact_terms=0, preact=False, neumann_grad=True, grad_in_forward=False, first_resblock=False,
                 learn_p=False, classification=False, classification_hdim=64, n_classes=10,
                 block_type="resblock") -> None:
        super().__init__()
        if len(input_size) != 4:
            raise ValueError(f"input_size: expected (N, C, H, W), but got {tuple(input_size)!r}")
        stack = self._scale_class(block_type)
        n_blocks = list(n_blocks)
        self.n_scale = min(len(n_blocks), self._calc_n_scale(input_size))
        if self.n_scale <= 0:
            raise ValueError(f"input_size {tuple(input_size)}: H and W must be at least 4 for one scale")
        self.n_blocks = n_blocks
        self.factor_out = factor_out
        self.classification = classification
        self.classification_hdim = classification_hdim
        self.n_classes = n_classes
        self.block_type = block_type
        self.input_size = tuple(input_size)
        _, c, h, w = input_size
        scales = []
        for i in range(self.n_scale):
            scales.append(stack(
                (c, h, w), intermediate_dim, squeeze=i < self.n_scale - 1, init_layer=init_layer if i == 0 else None,
                n_blocks=n_blocks[i], quadratic=quadratic, actnorm=actnorm, fc_actnorm=fc_actnorm,
                batchnorm=batchnorm, dropout=dropout, fc=fc, coeff=coeff, vnorms=vnorms,
                n_lipschitz_iters=n_lipschitz_iters, sn_atol=sn_atol, sn_rtol=sn_rtol, n_power_series=n_power_series,
                n_dist=n_dist, n_samples=n_samples, kernels=kernels, activation_fn=activation_fn, fc_end=fc_end,
                fc_idim=fc_idim, n_exact_terms=n_exact_terms, preact=preact, neumann_grad=neumann_grad,
                grad_in_forward=grad_in_forward, first_resblock=first_resblock and i == 0, learn_p=learn_p))
            c, h, w = (c * 2 if factor_out else c * 4), h // 2, w // 2
        self.transforms = nn.ModuleList(scales)
        self.dims = [tuple(o[1:]) for o in self.calc_output_size(input_size)]
        if classification:
            self._build_classifier(input_size)

    @staticmethod
    def _scale_class(block_type: str) -> type:
        """The class of one scale for ``block_type``."""
        if block_type not in ("resblock", "coupling"):
            raise ValueError(f"block_type: expected 'resblock' or 'coupling', but got {block_type!r}")
        return StackediResBlocks if block_type == "resblock" else StackedCouplingBlocks

    @staticmethod
    def _calc_n_scale(input_size) -> int:
        _, _, h, w = input_size
        n = 0
        while h >= 4 and w >= 4:
            n, h, w = n + 1, h // 2, w // 2
        return n

    def calc_output_size(self, input_size):
        n, c, h, w = input_size
        if not self.factor_out:
            k = self.n_scale - 1
            return [[n, c * 4**k, h // 2**k, w // 2**k]]
        sizes = []
        for i in range(self.n_scale):
            if i < self.n_scale - 1:
                c, h, w = c * 2, h // 2, w // 2
            sizes.append((n, c, h, w))
        return tuple(sizes)

    def _build_classifier(self, input_size) -> None:
        n, c, h, w = input_size
        heads = []
        for i in range(self.n_scale):
            if i < self.n_scale - 1:
                c, h, w = c * (2 if self.factor_out else 4), h // 2, w // 2
            heads.append(nn.Sequential(nn.Conv2d(c, self.classification_hdim, 3, 1, 1),
                                       ActNorm2d(self.classification_hdim), nn.ReLU(inplace=True),
                                       nn.AdaptiveAvgPool2d((1, 1))))
        self.classification_heads = nn.ModuleList(heads)
        self.logit_layer = nn.Linear(self.classification_hdim * len(heads), self.n_classes)

    def forward(self, x: Tensor, logpx: Tensor | None = None, inverse: bool = False, classify: bool = False):
        if inverse:
            return self.inverse(x, logpx)
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_size[1:]:
            raise ValueError(f"ResidualFlow: expected input of shape (B, {', '.join(map(str, self.input_size[1:]))}), "
                             f"but got {tuple(x.shape)}")
        if classify and not self.classification:
            raise ValueError("classify=True needs a model built with classification=True")
        out, class_outs, f = [], [], None
        for idx, scale in enumerate(self.transforms):
            if logpx is None:
                x = scale(x)
            else:
                x, logpx = scale(x, logpx)
            if self.factor_out and idx < len(self.transforms) - 1:
                d = x.shape[1] // 2
                x, f = x[:, :d], x[:, d:]
                out.append(f)
            if classify:
                # As the reference: with factor_out every head sees the last factored-out part, so the
                # last scale's head sees the previous scale's (same shape), or x with a single scale.
                class_outs.append(self.classification_heads[idx](f if self.factor_out and f is not None else x))
        out.append(x)
        z = torch.cat([o.flatten(1) for o in out], 1)  # flatten(1) also takes an empty batch
        output = z if logpx is None else (z, logpx)
        if classify:
            return output, self.logit_layer(torch.cat(class_outs, dim=1).flatten(1))
        return output

    def inverse(self, z: Tensor, logpz: Tensor | None = None):
        z = z.flatten(1)
        if not self.factor_out:
            x = z.view(z.shape[0], *self.dims[-1])
            for scale in reversed(self.transforms):
                if logpz is None:
                    x = scale.inverse(x)
                else:
                    x, logpz = scale.inverse(x, logpz)
            return x if logpz is None else (x, logpz)
        sizes = [int(np.prod(d)) for d in self.dims]
        parts = [p.reshape(z.shape[0], *d) for p, d in zip(torch.split(z, sizes, dim=1), self.dims)]
        x = parts[-1]
        for idx in range(len(self.transforms) - 1, -1, -1):
            if idx < len(self.transforms) - 1:
                x = torch.cat((x, parts[idx]), dim=1)
            if logpz is None:
                x = self.transforms[idx].inverse(x)
            else:
                x, logpz = self.transforms[idx].inverse(x, logpz)
        return x if logpz is None else (x, logpz)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) per sample, shape (B,), under a standard normal base (with residual blocks the
        log-det is the model's estimate in training mode, exact terms plus the roulette's tail in
        eval mode; with coupling blocks it is exact)."""
        z, delta = self(x, x.new_zeros(x.shape[0], 1))
        return (standard_normal_logprob(z).sum(1, keepdim=True) - delta).squeeze(1)

    def bits_per_dim(self, x: Tensor, nbits: int = 8, dequantize: bool = True) -> Tensor:
        """Bits per dimension of a batch of images in [0, 1] with ``2**nbits`` levels, per sample
        (B,): ``-(log p(x) - D log 2**nbits) / (D log 2)`` with uniform dequantisation
        ``x = (x (2**nbits - 1) + u) / 2**nbits`` as the reference's training script (and, if the
        model has one, its init layer such as LogitTransform inside log p)."""
        nvals = 2**nbits
        if dequantize:
            x = (x * (nvals - 1) + torch.rand_like(x)) / nvals
        dims = x[0].numel()
        return -(self.log_prob(x) - dims * math.log(nvals)) / dims / math.log(2)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """n samples through the inverse from z ~ N(0, temperature²), on the device and in the dtype of
        the model's weights (not of the blocks' scalar float64 ``geom_p``)."""
        param = next(p for p in self.parameters() if p.dim() > 0)
        dims = math.prod(self.input_size[1:])
        z = torch.randn(n, dims, generator=generator, device=param.device, dtype=param.dtype) * temperature
        return self.inverse(z)


class ExponentialMovingAverage:
    """The reference training script's exponential moving average of a module's parameters.

    ``shadow_params`` holds the average, keyed by parameter name. Call :meth:`apply` after each
    optimiser step (the first call copies the parameters, so that data-dependent initialisation is
    included), :meth:`swap` (twice) or :meth:`replace_with_ema` to evaluate with the average, and
    :meth:`set` to copy another EMA's shadow (also one unpickled from a reference checkpoint).
    Parity with the reference: docs/parity.md#exponentialmovingaverage

    Args:
        module: the module whose parameters to average.
        decay: weight of the old average in each update, in [0, 1].

    Example:
        >>> from resflow_cuda.models import ExponentialMovingAverage
        >>> model = nn.Linear(2, 2)
        >>> ema = ExponentialMovingAverage(model, decay=0.99)
        >>> ema.apply()  # after every optimiser step
        >>> ema.swap(); ema.swap()  # evaluate with the average in between
    """

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ExponentialMovingAverage: expected 0 <= decay <= 1, but got {decay}")
        self.module = module
        self.decay = decay
        self.shadow_params: dict[str, Tensor] = {}
        self.nparams = sum(p.numel() for p in module.parameters())

    def init(self) -> None:
        self.shadow_params = {name: p.detach().clone() for name, p in self.module.named_parameters()}

    @torch.no_grad()
    def apply(self) -> None:
        if not self.shadow_params:
            self.init()
            return
        for name, p in self.module.named_parameters():
            self.shadow_params[name] -= (1 - self.decay) * (self.shadow_params[name] - p)

    @torch.no_grad()
    def set(self, other) -> None:
        self.init()
        for name, value in other.shadow_params.items():
            self.shadow_params[name].copy_(value)

    @torch.no_grad()
    def replace_with_ema(self) -> None:
        for name, p in self.module.named_parameters():
            p.copy_(self.shadow_params[name])

    @torch.no_grad()
    def swap(self) -> None:
        for name, p in self.module.named_parameters():
            saved = self.shadow_params[name].clone()
            self.shadow_params[name].copy_(p)
            p.copy_(saved)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(decay={self.decay}, module={type(self.module).__name__}, nparams={self.nparams})"
