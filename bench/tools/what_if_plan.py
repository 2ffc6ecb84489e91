"""What-if launch plans for the static model: the project's plan
(``slak_triton.ops.compile_check:launch_plans``) with one assumption changed, to bound a design before building it.
Set by environment variables (unset: the project's plan unchanged):

- ``SLAK_WHATIF_LINES=LT,LW``: dense calls run the kernels of a tall K x LT and a wide LW x K slot instead of SLaK's
  5 + 5 lines: what a sparse call would cost if each channel's active lines were compacted into a dense launch at
  no cost (compile-time shifts, no per-line branches). Run it with ``--density 1.0``.
- ``SLAK_WHATIF_DW_SPLITS=S``: the plane weight-gradient kernels split the batch into S image groups per channel
  (``plane_dw_images_per_program``) instead of about two programs per SM.

Usage (from the checkout, in the triton 3.6 venv; bench/NOTES.md has the numbers):
    SLAK_WHATIF_LINES=3,3 python bench/tools/sass_model_loops.py predict \
        --plan what_if_plan:launch_plans --plan-path bench/tools --plan-path . \
        --kinds fwd,dw --stages 1,2,3 --dtypes bfloat16 --density 1.0
Repository tool only (not installed with the package)."""
import os
import sys

import triton

import slak_triton.ops.compile_check  # noqa: F401  (the modules, not the names the package re-exports)
import slak_triton.ops.lk_conv2d  # noqa: F401

_CC = sys.modules["slak_triton.ops.compile_check"]
_OPS = sys.modules["slak_triton.ops.lk_conv2d"]
_spec_for = _CC.spec_for
_images_per_program = _OPS.plane_dw_images_per_program


def _lines():
    v = os.environ.get("SLAK_WHATIF_LINES")
    if not v:
        return None
    lt, lw = (int(s) for s in v.split(","))
    if not (1 <= lt <= 5 and 1 <= lw <= 5):
        raise ValueError(f"SLAK_WHATIF_LINES: expected two line counts in 1..5, got {v!r}")
    return lt, lw


def spec_for(kind, N, C, H, W, tall, wide, dtype, sparse, bias=True, arch=90):
    lines = _lines()
    if lines is not None and not sparse:
        tall, wide = (tall[0], lines[0]), (lines[1], wide[1])
    return _spec_for(kind, N, C, H, W, tall, wide, dtype, sparse, bias=bias, arch=arch)


def plane_dw_images_per_program(N, C, sms):
    s = os.environ.get("SLAK_WHATIF_DW_SPLITS")
    return triton.cdiv(N, int(s)) if s else _images_per_program(N, C, sms)


_CC.spec_for = spec_for
_OPS.plane_dw_images_per_program = plane_dw_images_per_program


def launch_plans(kind, N, C, H, W, K, dtype, density):
    return _CC.launch_plans(kind, N, C, H, W, K, dtype, density)
