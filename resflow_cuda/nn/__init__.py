"""Drop-in ``nn.Module`` layers with the reference implementations' names, parameters and buffers."""

from .activations import LipSwish, Swish
from .iresblock import InverseReport, iResBlock, logdet_exact
from .lipschitz import (
    InducedNormConv2d,
    InducedNormLinear,
    LopConv2d,
    LopLinear,
    SpectralNormConv2d,
    SpectralNormLinear,
    get_conv2d,
    get_linear,
    lipschitz_report,
    update_lipschitz,
)

__all__ = [
    "InducedNormConv2d", "InducedNormLinear", "InverseReport", "iResBlock", "logdet_exact", "LipSwish", "LopConv2d", "LopLinear", "SpectralNormConv2d",
    "SpectralNormLinear", "Swish", "get_conv2d", "get_linear", "lipschitz_report", "update_lipschitz",
]
