"""Triton device code of slak_triton (shipped as ``slak_triton.kernels``).

Only ``@triton.jit`` functions and their autotune-config factories live here; host-side launchers, validation and
autograd are in ``slak_triton.ops``. One module per op stem (``lk_conv2d``).
"""

from .lk_conv2d import lk_conv2d_default_config, lk_conv2d_fwd_configs, lk_conv2d_fwd_kernel

__all__ = ["lk_conv2d_fwd_kernel", "lk_conv2d_fwd_configs", "lk_conv2d_default_config"]
