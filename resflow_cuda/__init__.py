"""resflow_cuda: fused C++/CUDA kernels and drop-in layers for Residual Flows.

``import resflow_cuda`` loads the compiled extension, which registers the ops under
``torch.ops.resflow_cuda``; ``resflow_cuda.ops`` adds their fake kernels and autograd.
"""

import torch  # noqa: F401  (loads libtorch and, in CUDA builds, the CUDA runtime before _C)

from ._extension import __version__, build_info, has_cuda_kernels
from . import ops, functional, solvers, estimators, linearize, logdet, nn, models
from .functional import lipswish
from .logdet import logdet_exact
from .nn import lipschitz_report, update_lipschitz

# normflows' layers take the fast log-det path once the user has imported normflows.
linearize.register_on_import("normflows", "resflow_cuda.integrations.normflows")

# The pure-PyTorch oracle of tests and benchmarks: an attribute for users, imported by no module above.
from . import reference  # noqa: E402

__all__ = [
    "__version__",
    "build_info",
    "estimators",
    "has_cuda_kernels",
    "functional",
    "lipschitz_report",
    "lipswish",
    "logdet_exact",
    "models",
    "nn",
    "ops",
    "reference",
    "solvers",
    "update_lipschitz",
]
