"""Host-side ops: validation, dispatch, launchers and autograd around the device code in ``slak_triton.kernels``."""

from .lk_conv2d import (
    LAUNCH_COUNTS,
    block_shape,
    dense_weight_grad,
    fp32_precision,
    interpreter_active,
    lk_conv2d,
    use_backend,
)

__all__ = ["lk_conv2d", "use_backend", "dense_weight_grad", "block_shape", "LAUNCH_COUNTS", "interpreter_active",
           "fp32_precision"]
