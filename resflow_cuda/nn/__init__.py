"""Drop-in ``nn.Module`` layers with the reference implementations' names, parameters and buffers."""

from ..logdet import logdet_exact
from .activations import FullSort, Identity, LipschitzCube, LipSwish, MaxMin, Sin, Swish, Zero
from .coupling import (AdditiveCoupling, AffineCoupling, ChannelCouplingBlock, CouplingBlock, InvertibleConv2dLU,
                       MaskedCouplingBlock, coupling_mask)
from .flows import (ActNorm1d, ActNorm2d, Inverse, InvertibleConv2d, InvertibleLinear, LogitTransform, MovingBatchNorm1d,
                    MovingBatchNorm2d, Normalize, SequentialFlow, SqueezeLayer, ZeroMeanTransform)
from .implicit import ImplicitBlock
from .iresblock import InverseReport, iResBlock
from .lipschitz import InducedNormConv2d, InducedNormLinear, SpectralNormConv2d, SpectralNormLinear
from .lipschitz_utils import lipschitz_report, update_lipschitz
from .lop import LopConv2d, LopLinear, get_conv2d, get_linear

__all__ = [
    "AdditiveCoupling", "AffineCoupling", "ChannelCouplingBlock", "CouplingBlock", "InvertibleConv2dLU",
    "MaskedCouplingBlock", "coupling_mask",
    "ActNorm1d", "ActNorm2d", "Inverse", "InvertibleConv2d", "InvertibleLinear", "LipschitzCube", "LogitTransform",
    "MovingBatchNorm1d", "MovingBatchNorm2d", "Normalize", "SequentialFlow", "SqueezeLayer", "ZeroMeanTransform",
    "FullSort", "Identity", "MaxMin", "Sin", "Zero",
    "ImplicitBlock", "InducedNormConv2d", "InducedNormLinear", "InverseReport", "iResBlock", "logdet_exact", "LipSwish", "LopConv2d", "LopLinear", "SpectralNormConv2d",
    "SpectralNormLinear", "Swish", "get_conv2d", "get_linear", "lipschitz_report", "update_lipschitz",
]
