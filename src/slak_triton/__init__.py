"""slak_triton: Triton kernels and PyTorch modules for sparse large-kernel ConvNets (SLaK).

Layering (nothing imports upward): ``slak_triton.kernels`` (device code) <- ``slak_triton.ops`` (launchers,
autograd) <- ``slak_triton.nn`` (modules) <- ``slak_triton.models`` <- ``slak_triton.sparse`` (dynamic sparse
training) <- CLIs (``slak_triton.train``, ``slak_triton.bench``). This file only re-exports the public names.
"""

from . import models
from .nn import LKConv2d, SparseLKConv, convert_depthwise
from .ops import (
    LAUNCH_COUNTS,
    block_shape,
    dense_weight_grad,
    interpreter_active,
    lk_conv2d,
    use_backend,
)
from .reference import lk_conv2d_reference
from .sparse import DynamicSparsity, MaskedEMA, freeze_sparsity, load_masked_state_dict

__version__ = "0.1.0"

__all__ = [
    "lk_conv2d",
    "use_backend",
    "dense_weight_grad",
    "block_shape",
    "lk_conv2d_reference",
    "LAUNCH_COUNTS",
    "interpreter_active",
    "SparseLKConv",
    "LKConv2d",
    "convert_depthwise",
    "models",
    "DynamicSparsity",
    "MaskedEMA",
    "freeze_sparsity",
    "load_masked_state_dict",
    "__version__",
]
