"""Drop-in ``nn.Module`` layers with the reference implementations' names, parameters and buffers."""

from .activations import LipSwish, Swish

__all__ = ["LipSwish", "Swish"]
