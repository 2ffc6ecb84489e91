"""Host side of ``lk_conv2d``: input validation, branch-to-slot folding, dispatch and the Triton launchers.

Device code: ``slak_triton.kernels.lk_conv2d``. Reference: ``slak_triton.reference.lk_conv2d_reference``.

Branches are folded into at most two *slots* before the launch: every branch whose kernel is at least as tall as
it is wide goes to the tall slot, the others to the wide slot, and the branches of one slot are zero-padded to the
slot's (max kh, max kw) and summed (SLaK's 5x5 branch lands in the 51x5 tall slot). Folding touches only the
weights (C * 255 elements for SLaK): the input is read once and the output written once, by one kernel launch.
Folding is exact because every branch is centred ("same" padding of kh//2, kw//2), and it is made of autograd
ops, so each branch's weight gradient is the matching slice of its slot's gradient.
"""

import collections
import contextlib
import dataclasses
import functools
import operator
import os
import types
from typing import List, Optional, Sequence, Tuple, Union

import torch
import triton
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled
from torch.library import register_autograd, triton_op, wrap_triton
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from slak_triton.kernels.lk_conv2d import (
    lk_conv2d_bwd_dw_configs,
    lk_conv2d_bwd_dw_default_config,
    lk_conv2d_bwd_dw_derived,
    lk_conv2d_bwd_dw_kernel,
    lk_conv2d_default_config,
    lk_conv2d_fwd_configs,
    lk_conv2d_fwd_kernel,
    lk_conv2d_matrix_bwd_configs,
    lk_conv2d_matrix_bwd_default_config,
    lk_conv2d_matrix_bwd_kernel,
    lk_conv2d_matrix_configs,
    lk_conv2d_matrix_default_config,
    lk_conv2d_matrix_fwd_kernel,
    lk_conv2d_plane_configs,
    lk_conv2d_plane_default_config,
    lk_conv2d_plane_dw_configs,
    lk_conv2d_plane_dw_default_config,
    lk_conv2d_plane_dw_kernel,
    lk_conv2d_plane_dw_split_configs,
    lk_conv2d_plane_dw_stack_configs,
    lk_conv2d_plane_dw_stack_default_config,
    lk_conv2d_plane_dw_stack_kernel,
    lk_conv2d_plane_fwd_kernel,
    matrix_grid,
    plane_pad,
)
from slak_triton.reference import apply_mask, lk_conv2d_reference

__all__ = [
    "lk_conv2d",
    "use_backend",
    "dense_weight_grad",
    "block_shape",
    "BACKENDS",
    "MAX_KERNEL_SIZE",
    "LAUNCH_COUNTS",
    "interpreter_active",
    "fold_branches",
    "launch_lk_conv2d_fwd",
    "launch_lk_conv2d_bwd_dw",
    "launch_lk_conv2d_bwd",
    "lk_conv2d_fwd_op",
    "lk_conv2d_bwd_dw_op",
    "lk_conv2d_bwd_op",
    "line_metadata",
    "slot_metadata",
    "use_plane_kernels",
    "use_matrix_kernels",
    "use_fused_backward",
]

BACKENDS = ("auto", "triton", "reference")
MAX_KERNEL_SIZE = 63
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP32_PRECISIONS = ("bf16x6", "tf32x3", "ieee", "tf32")

#: Kernel launches, counted on every Triton launch (compiled or interpreted), per kernel name and per op stage:
#: "fwd" (a forward or input-gradient kernel), "dw" (a weight-gradient kernel) and "bwd" (a fused backward: input
#: and weight gradients in one kernel). Tests read it to prove that the
#: Triton path ran and not the reference.
LAUNCH_COUNTS: "collections.Counter[str]" = collections.Counter()

WeightArg = Union[torch.Tensor, Sequence[torch.Tensor]]
MaskArg = Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]]]


_DEFAULT_BACKEND = ["auto"]


@contextlib.contextmanager
def use_backend(backend: str):
    """Context manager: ``backend="auto"`` calls inside it use ``backend`` instead (e.g. "reference" to run a whole
    model through F.conv2d under TRITON_INTERPRET=1, or "triton" to insist on the kernels). Not thread-local."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    old = _DEFAULT_BACKEND[0]
    _DEFAULT_BACKEND[0] = backend
    try:
        yield
    finally:
        _DEFAULT_BACKEND[0] = old


_DENSE_WEIGHT_GRAD = [False]


@contextlib.contextmanager
def dense_weight_grad(enabled: bool = True):
    """Context manager: ``lk_conv2d`` calls made (forward) inside it return the gradient of *every* tap of each
    weight, inactive ones included, instead of the masked gradient.

    By default a masked weight's gradient is ``mask * dL/d(weight * mask)``: zero on inactive taps, and the
    kernels skip inactive blocks. Gradient-based regrowth in dynamic sparse training (RigL, SLaK's "gradient"
    growth) needs the unmasked ``dL/d(weight * mask)`` on topology-update steps only: forward those steps inside
    this context. Only the weight gradient of those calls runs densely (the forward and the input gradient still
    skip inactive blocks). The choice is recorded at forward time; ``backward`` may run outside the context.
    Equivalent to ``lk_conv2d(..., dense_weight_grad=True)``. Not thread-local."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    old = _DENSE_WEIGHT_GRAD[0]
    _DENSE_WEIGHT_GRAD[0] = enabled
    try:
        yield
    finally:
        _DENSE_WEIGHT_GRAD[0] = old


def interpreter_active() -> bool:
    """True when the kernels were defined under ``TRITON_INTERPRET=1`` and so run on CPU tensors.

    Triton chooses interpreter or compiler when a ``@triton.jit`` function is defined, so the variable must be set
    before ``slak_triton`` is imported."""
    return type(lk_conv2d_fwd_kernel).__name__ == "InterpretedFunction"


def _tracing_only(t: torch.Tensor) -> bool:
    """True for fake/meta tensors under the interpreter: torch.compile and opcheck trace the op's body with such
    tensors, and an interpreted kernel cannot run on them (a compiled one is recorded by ``wrap_triton`` instead).
    The outputs' shapes and strides are already right, so the launch is skipped."""
    if not interpreter_active():
        return False
    if isinstance(t, FunctionalTensor):
        # the body is being traced into a graph (torch.compile / AOT): an interpreted launch cannot be recorded,
        # and skipping it would compile a graph that returns garbage
        raise RuntimeError("lk_conv2d: torch.compile cannot trace kernels running under TRITON_INTERPRET=1; compile "
                           "with slak_triton.use_backend('reference') on CPU, or run on a CUDA device")
    return t.device.type == "meta" or isinstance(t, FakeTensor) or detect_fake_mode((t,)) is not None


def _autotune_enabled() -> bool:
    return os.environ.get("SLAK_TRITON_AUTOTUNE", "1") != "0" and not interpreter_active()


def fp32_precision() -> str:
    """How fp32 operands use tensor cores: ``SLAK_TRITON_FP32_PRECISION`` = bf16x6 (default: on the plane kernels,
    planes padded to at most ``FP32_SPLIT_MAX``, and on the matrix kernels, both operands split into three bf16
    parts each and the six products that matter summed in fp32, each product within 2**-23 relative (the dropped
    cross terms; fp32 itself rounds a product to 2**-24); elsewhere as tf32x3), tf32x3 (three TF32 products, about
    fp32 accuracy; on the tiled kernels), ieee (FMA units, exact fp32; tiled), tf32 (fastest, ~1e-3 relative error;
    tiled). The matrix kernels (small planes, ``use_matrix_kernels``)
    take every precision: the three others as fp32 dots of that precision."""
    p = os.environ.get("SLAK_TRITON_FP32_PRECISION", "bf16x6")
    if p not in FP32_PRECISIONS:
        raise ValueError(f"SLAK_TRITON_FP32_PRECISION: expected one of {FP32_PRECISIONS}, got {p!r}")
    return p


def _dot_precision() -> str:
    """``input_precision`` of the kernels' fp32 tl.dots: under bf16x6 the split plane kernels' dots are bf16 (the
    value is unused there) and the tiled kernels take three TF32 products."""
    p = fp32_precision()
    return "tf32x3" if p == "bf16x6" else p


def block_shape(kh: int, kw: int) -> Tuple[int, int]:
    """The unit of block sparsity the kernels skip, for a [kh, kw] depthwise kernel of one channel: one *line*,
    all taps of the kernel's long axis at one position of its short axis: (kh, 1) when kh >= kw (a column of a
    tall kernel), else (1, kw) (a row of a wide kernel).

    Why whole lines: the kernels compute a line as Toeplitz matrix products along the long axis over whole planes
    (or tall tiles), so a line's cost does not shrink with fewer active taps, and skipping a whole line saves its
    input loads and its matrix products (time about proportional to the active lines). A mask whose lines are
    all-ones or all-zeros makes the kernels do work in proportion to the active lines; any other mask is still
    exact, at the cost of its lines' union."""
    for name, k in (("kh", kh), ("kw", kw)):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0 or k > MAX_KERNEL_SIZE:
            raise ValueError(f"{name}: expected an odd int in 1..{MAX_KERNEL_SIZE}, got {k!r}")
    if kh >= kw:
        return (kh, 1)
    return (1, kw)


# --------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------

def _as_list(arg, name: str) -> List:
    if isinstance(arg, torch.Tensor):
        return [arg]
    if isinstance(arg, (list, tuple)):
        if len(arg) == 0:
            raise ValueError(f"{name}: expected a tensor or a non-empty sequence of tensors, got an empty {type(arg).__name__}")
        return list(arg)
    raise TypeError(f"{name}: expected a tensor or a sequence of tensors, got {type(arg).__name__}")


def _validate(x, weights, bias, masks, backend) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D tensor [N, C, H, W], got {x.dim()}-D with shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating dtype (float16, bfloat16, float32), got {x.dtype}")
    N, C, H, W = x.shape
    if C < 1 or H < 1 or W < 1:
        raise ValueError(f"x: expected C, H, W >= 1, got shape {tuple(x.shape)}")
    ws = _as_list(weight := weights, "weight")
    for i, w in enumerate(ws):
        nm = "weight" if isinstance(weight, torch.Tensor) else f"weight[{i}]"
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{nm}: expected a torch.Tensor, got {type(w).__name__}")
        if w.dim() != 4 or w.shape[1] != 1:
            raise ValueError(f"{nm}: expected shape [C, 1, kh, kw] (depthwise), got {tuple(w.shape)}")
        if w.shape[0] != C:
            raise ValueError(f"{nm}: expected {C} output channels to match x.shape[1], got {w.shape[0]}")
        kh, kw = w.shape[-2:]
        for axis, k in (("kh", kh), ("kw", kw)):
            if k % 2 == 0:
                raise ValueError(f"{nm}: expected odd kernel sizes ('same' padding), got {axis}={k} in shape {tuple(w.shape)}")
            if k > MAX_KERNEL_SIZE:
                raise ValueError(f"{nm}: expected kernel sizes <= {MAX_KERNEL_SIZE}, got {axis}={k}")
        if w.dtype != x.dtype:
            raise TypeError(f"{nm}: expected dtype {x.dtype} (same as x), got {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"{nm}: expected device {x.device} (same as x), got {w.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (C,):
            raise ValueError(f"bias: expected shape ({C},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias: expected dtype {x.dtype} (same as x), got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias: expected device {x.device} (same as x), got {bias.device}")
    if masks is None:
        ms = [None] * len(ws)
    elif isinstance(masks, torch.Tensor):
        if len(ws) != 1:
            raise ValueError(f"mask: expected a sequence of {len(ws)} masks (one per weight) or None, got one tensor")
        ms = [masks]
    elif isinstance(masks, (list, tuple)):
        if len(masks) != len(ws):
            raise ValueError(f"mask: expected {len(ws)} entries (one per weight), got {len(masks)}")
        ms = list(masks)
    else:
        raise TypeError(f"mask: expected None, a tensor or a sequence, got {type(masks).__name__}")
    for i, (w, m) in enumerate(zip(ws, ms)):
        if m is None:
            continue
        nm = "mask" if isinstance(masks, torch.Tensor) else f"mask[{i}]"
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{nm}: expected a torch.Tensor or None, got {type(m).__name__}")
        if m.shape != w.shape:
            raise ValueError(f"{nm}: expected shape {tuple(w.shape)} (same as its weight), got {tuple(m.shape)}")
        if m.device != x.device:
            raise ValueError(f"{nm}: expected device {x.device} (same as x), got {m.device}")
        if not (m.dtype == torch.bool or m.is_floating_point()):
            raise TypeError(f"{nm}: expected a bool or floating dtype, got {m.dtype}")
    return ws, ms


def _resolve_backend(x: torch.Tensor, backend: str) -> str:
    """Returns "cuda" (compiled Triton), "interpret" (Triton interpreter on CPU) or "reference"."""
    if backend == "reference":
        return "reference"
    triton_ok = x.dtype in SUPPORTED_DTYPES
    if x.is_cuda:
        where = "cuda"
    elif x.device.type == "cpu" and interpreter_active():
        where = "interpret"
    else:
        where = None
    if backend == "triton":
        if not triton_ok:
            raise TypeError(f"x: backend='triton' supports dtypes {SUPPORTED_DTYPES}, got {x.dtype} (use backend='reference')")
        if where is None:
            raise RuntimeError(
                f"backend='triton': expected a CUDA tensor, or a CPU tensor with TRITON_INTERPRET=1 set before "
                f"importing slak_triton; got a tensor on {x.device} with the interpreter "
                f"{'on' if interpreter_active() else 'off'}")
        return where
    # auto
    if where is None or not triton_ok:
        return "reference"
    return where


# --------------------------------------------------------------------------------------------------------------
# branch folding
# --------------------------------------------------------------------------------------------------------------

def _is_tall(w: torch.Tensor) -> bool:
    """Slot of a [C, 1, kh, kw] branch: tall (long axis H) when kh >= kw, else wide."""
    return w.shape[2] >= w.shape[3]


def _slot_branches(weights, masks, tall: bool) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    return [(w, m) for w, m in zip(weights, masks) if _is_tall(w) == tall]


def _centre_combine(parts: List[torch.Tensor], combine) -> torch.Tensor:
    """Zero-pads each [C, kh, kw] part, centred, to the parts' (max kh, max kw) and folds them with ``combine``
    (a sum for weights, a union for masks). Exact for 'same'-padded branches."""
    KH = max(t.shape[1] for t in parts)
    KW = max(t.shape[2] for t in parts)
    out = None
    for t in parts:
        ph, pw = (KH - t.shape[1]) // 2, (KW - t.shape[2]) // 2
        tp = torch.nn.functional.pad(t, (pw, pw, ph, ph)) if ph or pw else t
        out = tp if out is None else combine(out, tp)
    return out


def fold_branches(
    weights: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]], dense_weight_grad: bool = False
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Applies masks and folds the branches into (tall, wide) slot weights of shape [C, kh, kw] (or None).

    A branch with kh >= kw goes to the tall slot, else to the wide slot. A slot with a single unmasked branch is a
    view of that weight (no copy); otherwise it is the centred zero-padded sum. Differentiable; with
    ``dense_weight_grad`` the masks do not zero the weights' gradients (``apply_mask``)."""
    out = []
    for tall in (True, False):
        parts = [apply_mask(w, m, dense_weight_grad)[:, 0] for w, m in _slot_branches(weights, masks, tall)]
        out.append(_centre_combine(parts, torch.add) if parts else None)
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------------

#: Planes with H and W up to this size run on the plane kernels (a whole plane per tile); larger ones are tiled.
PLANE_MAX = 64
#: Shared memory a plane-kernel program may spend on its channel's Toeplitz operands (one [B, B] matrix per line).
PLANE_TOEPLITZ_BYTES = 96 * 1024


def use_plane_kernels(H: int, W: int, lines_t: int, lines_w: int, elem_bytes: int) -> bool:
    """Whether a call runs on the plane kernels: planes up to ``PLANE_MAX`` x ``PLANE_MAX``, 16-bit operands (fp32
    data count as bf16 splits, ``elem_bytes`` 2), and the channel's Toeplitz operands (``lines_t`` tall and
    ``lines_w`` wide lines) within ``PLANE_TOEPLITZ_BYTES``."""
    if max(H, W) > PLANE_MAX or elem_bytes > 2:
        return False
    bh, bw = plane_pad(H), plane_pad(W)
    return (lines_t * bh * bh + lines_w * bw * bw) * elem_bytes <= PLANE_TOEPLITZ_BYTES


#: bf16 parts of an fp32 value in the split kernels: three hold its 24-bit significand exactly.
FP32_SPLITS = 3
#: fp32 runs split on the plane kernels for planes up to this padded size (forward and input gradient; weight
#: gradient: ``FP32_SPLIT_DW_MAX``): on 64-padded planes the split kernels spill for sm_80 under triton 3.6 to
#: 3.8 even a slot per launch (bench/NOTES.md), so those stay tiled there.
FP32_SPLIT_MAX = 32
FP32_SPLIT_DW_MAX = 32
#: The limits on Hopper (sm_90): there 64-padded planes split too, one slot per launch (``fp32_split_passes``,
#: ``fp32_split_dw_passes``), which compiles spill-free for sm_90 but not for sm_80 (A100 keeps the tiled kernels).
FP32_SPLIT_MAX_SM90 = 64
FP32_SPLIT_DW_MAX_SM90 = 64
#: The fp32 split weight gradient computes both slots in one launch on planes padded up to this size; on larger
#: ones a slot per launch (the registers: three parts of dy and of x next to the lines' fp32 accumulators).
FP32_SPLIT_DW_ONE_LAUNCH = 16
#: Weight splits per launch of one slot where the fp32 split forward runs a slot per launch (64-padded planes):
#: the tall slot's x parts are B operands (shared memory), the wide slot's A operands held in registers.
FP32_SPLITS_PER_LAUNCH = {"tall": 2, "wide": 1}


def use_fp32_split(H: int, W: int, dtype, weight_grad: bool = False, arch: int = 0) -> bool:
    """Whether an fp32 call runs on the plane kernels as bf16 splits (precision bf16x6, planes padded to at most
    ``FP32_SPLIT_MAX`` (``FP32_SPLIT_MAX_SM90`` on ``arch`` 90, the GPU's compute capability as 10 * major +
    minor; 0 off a GPU), or ``FP32_SPLIT_DW_MAX`` (``FP32_SPLIT_DW_MAX_SM90``) for the weight gradient); every
    other fp32 call takes the tiled kernels with ``fp32_precision()``'s dots."""
    if weight_grad:
        limit = max(FP32_SPLIT_DW_MAX, FP32_SPLIT_DW_MAX_SM90) if arch == 90 else FP32_SPLIT_DW_MAX
    else:
        limit = max(FP32_SPLIT_MAX, FP32_SPLIT_MAX_SM90) if arch == 90 else FP32_SPLIT_MAX
    limit = min(limit, PLANE_MAX)
    return dtype == torch.float32 and fp32_precision() == "bf16x6" and max(plane_pad(H), plane_pad(W)) <= limit


def fp32_split_passes(H: int, W: int, lines_t: int, lines_w: int) -> Tuple[dict, ...]:
    """The launches of an fp32 forward on the plane kernels (precision bf16x6), each as its overrides of the
    launch's arguments: all three weight splits of both slots in one launch on planes padded to 32 and less (their
    Toeplitz operands fit in ``PLANE_TOEPLITZ_BYTES``); on larger ones one slot per launch, with at most
    ``FP32_SPLITS_PER_LAUNCH`` weight splits each (the registers bound them: with more, the 64-padded split kernels
    spill), every launch after the first adding to y (ADD_Y)."""
    bh, bw = plane_pad(H), plane_pad(W)
    per_set = (lines_t * bh * bh + lines_w * bw * bw) * 2
    if max(bh, bw) <= 32 and FP32_SPLITS * per_set <= PLANE_TOEPLITZ_BYTES:
        return (dict(SPLIT_LO=0, SPLIT_HI=FP32_SPLITS),)
    passes = []
    for slot, lines, b in (("tall", lines_t, bh), ("wide", lines_w, bw)):
        if lines == 0:
            continue
        k = max(1, min(FP32_SPLITS_PER_LAUNCH[slot], PLANE_TOEPLITZ_BYTES // (lines * b * b * 2)))
        off = dict(KH_W=0, KW_W=0, SPARSE_W=False) if slot == "tall" else dict(KH_T=0, KW_T=0, SPARSE_T=False)
        for lo in range(0, FP32_SPLITS, k):
            passes.append(dict(off, SPLIT_LO=lo, SPLIT_HI=min(lo + k, FP32_SPLITS), ADD_Y=bool(passes)))
    return tuple(passes)


def fp32_split_dw_passes(H: int, W: int, lines_t: int, lines_w: int) -> Tuple[dict, ...]:
    """The launches of an fp32 weight gradient on the plane kernels (precision bf16x6), each as its overrides of
    the launch's arguments: both slots in one launch on planes padded to ``FP32_SPLIT_DW_ONE_LAUNCH`` and less;
    on larger ones the tall slot's lines (and the bias gradient), then the wide slot's, each launch writing its
    own slot's partials (nothing is summed across launches)."""
    if max(plane_pad(H), plane_pad(W)) <= FP32_SPLIT_DW_ONE_LAUNCH or not lines_t or not lines_w:
        return ({},)
    return (dict(KH_W=0, KW_W=0, SPARSE_W=False), dict(KH_T=0, KW_T=0, SPARSE_T=False, HAS_BIAS=False))


def bf16_splits(w: torch.Tensor) -> torch.Tensor:
    """[FP32_SPLITS, *w.shape] bf16 parts of fp32 ``w`` (contiguous): part s is the bf16 rounding of what parts
    0..s-1 leave, so the parts sum to w exactly (the kernel splits x the same way in registers)."""
    parts, r = [], w
    for _ in range(FP32_SPLITS):
        p = r.to(torch.bfloat16)
        parts.append(p)
        r = r - p.float()
    return torch.stack(parts)


def _plane_align(W: int, elem_bytes: int, *strides: Sequence[int]) -> int:
    """ALIGN of the plane kernels: the largest power of two (up to a 16-byte vector) of elements dividing W and
    the image, channel and row strides of every tensor, when each has unit column stride (else 1). Base pointers
    need no check: Triton's JIT specialises on their 16-byte alignment itself."""
    if any(st[3] != 1 for st in strides):
        return 1
    vals = [W] + [st[d] for st in strides for d in range(3)]
    a = 16 // elem_bytes
    while a > 1 and any(v % a for v in vals):
        a //= 2
    return a


def _wide_idx(plane: Tuple[int, int], strides: Sequence[int]) -> bool:
    """In-plane offsets (including the halo a masked load may point at) reach 2**31."""
    pad = 2 * MAX_KERNEL_SIZE + 256
    return (plane[0] + pad) * abs(strides[2]) + (plane[1] + pad) * abs(strides[3]) >= 2**31


def _plane_wide_idx(plane: Tuple[int, int], *strides: Sequence[int]) -> bool:
    """The plane kernels' offsets inside a group of images reach 2**31: up to 8 (their largest NB) padded planes
    per dot, or as many planes as the weight gradient packs into them (``plane_dw_pack``)."""
    imgs = 8 * max(plane_pad(plane[0]) // max(plane[0], 1), plane_pad(plane[1]) // max(plane[1], 1))
    return any(imgs * abs(st[0]) + _PLANE_MARGIN * (abs(st[2]) + abs(st[3])) >= 2**31 for st in strides) or \
        any(_wide_idx(plane, st) for st in strides)


#: The dense 16-bit weight gradient stacks a slot's lines (``lk_conv2d_plane_dw_stack_kernel``) on planes padded
#: to this size and less: on 64-padded ones its stacked operands spill (the per-line kernel runs there).
PLANE_DW_STACK_MAX = 32
#: The same for fp32 as bf16 splits (three parts of every operand): on 32-padded planes it spills for sm_80
#: (16-48 bytes, 4 or 8 warps), not for sm_90.
PLANE_DW_STACK_SPLIT_MAX = 16
PLANE_DW_STACK_SPLIT_MAX_SM90 = 32


def use_plane_dw_stack(H: int, W: int, lines_t: int, lines_w: int, split: bool = False, arch: int = 0) -> bool:
    """Whether a dense weight gradient on the plane kernels (16-bit, or fp32 as bf16 splits) takes
    ``lk_conv2d_plane_dw_stack_kernel`` (a slot's lines stacked along M of one product per image group): planes
    padded to ``PLANE_DW_STACK_MAX`` and less (SLaK-T stages 2 and 3), a padding column for the lagged dy where the
    tall slot has lines of odd offset (W < BW), odd line counts (centred kernels), and no image packing
    (``plane_dw_pack``: 7x7 planes, where the per-line kernel packs 9 images per dot). ``split``: fp32 as bf16
    splits, up to ``PLANE_DW_STACK_SPLIT_MAX`` (``PLANE_DW_STACK_SPLIT_MAX_SM90`` on ``arch`` 90)."""
    bh, bw = plane_pad(H), plane_pad(W)
    odd = all(n == 0 or n % 2 == 1 for n in (lines_t, lines_w))
    packed = plane_dw_pack(W) or plane_dw_pack(H)
    limit = PLANE_DW_STACK_MAX
    if split:
        limit = min(limit, max(PLANE_DW_STACK_SPLIT_MAX, PLANE_DW_STACK_SPLIT_MAX_SM90 if arch == 90 else 0))
    return max(bh, bw) <= limit and (lines_t <= 1 or W < bw) and odd and not packed


def plane_dw_stack_slots(lines_t: int, lines_w: int, bw: int) -> dict:
    """The stacked weight-gradient kernel's slots: TS tall slots (the even column shifts -lines_t // 2, ..., padded
    to a power of two), WL0 wide lines in its first stack (the largest power of two <= lines_w) and WL1 slots in
    its second (the rest, padded to a power of two; 0 when none). On planes padded to ``bw`` >= 32 the second stack
    is padded to 64 rows, wgmma's M (model, stage 2: 0.046 ms against 0.049 with one 32-row slot on mma.sync); on
    16-padded planes it is not (stage 3: 0.029 against 0.031 padded to 2 slots)."""
    ts = triton.next_power_of_2(lines_t // 2 + 1) if lines_t else 1
    wl0 = 1 << (lines_w.bit_length() - 1) if lines_w else 1
    rest = lines_w - wl0 if lines_w else 0
    wl1 = max(triton.next_power_of_2(rest), 64 // bw if bw >= 32 else 1) if rest else 0
    return dict(TS=ts, WL0=wl0, WL1=wl1)


def plane_dw_pack(n: int) -> bool:
    """Whether the plane weight-gradient kernel packs images at the plane's own size n (W for its tall passes, H for
    its wide passes) along the K dimension of its dots instead of at the padded size: where that fits more images
    per dot (at 4 padded planes per dot: n <= 12 of 16, n <= 25 of 32, ...). Packing gives up vector loads
    (image boundaries fall anywhere), so it is left out where it gains nothing."""
    b = plane_pad(n)
    return n < b and (4 * b) // n > 4


#: Planes whose rows and columns, padded to powers of two (``matrix_grid``), hold at most this many pixels run on
#: the matrix kernels (``lk_conv2d_matrix_*``: a channel's convolution as one matrix over the flattened plane;
#: SLaK's stage 4 at 7 x 7, an 8 x 8 grid), at every batch (model, SLaK-T stage 4, bench/NOTES.md: forward bf16
#: 0.009 ms at batch 1 as on the plane kernels, 0.011 at batch 64 against 0.095).
MATRIX_MAX_PIXELS = 64


def use_matrix_kernels(H: int, W: int) -> bool:
    """Whether a call on H x W planes runs on the matrix kernels (forward, input and weight gradients): rows and
    columns padded to powers of two (``matrix_grid``) make at most ``MATRIX_MAX_PIXELS`` pixels. Any dtype (fp32
    as bf16 splits under ``fp32_precision()`` bf16x6, else as fp32 dots of that precision)."""
    hp, wp = matrix_grid(H, W)
    return hp * wp <= MATRIX_MAX_PIXELS


def use_fused_backward(H: int, W: int, dtype: torch.dtype) -> bool:
    """Whether the backward of a call on H x W planes, when it needs the input and every weight gradient, is one
    fused launch (``lk_conv2d_matrix_bwd_kernel``): on the matrix kernels' planes in 16-bit dtypes. fp32 keeps
    the two launches: with its three bf16 parts the fused program needs 255 registers and spills, and the static
    model puts it above the two (SLaK-T stage 4: 0.040 against 0.014 + 0.019 ms)."""
    return use_matrix_kernels(H, W) and dtype != torch.float32


def matrix_wide_idx(mb: int, *strides: Sequence[int]) -> bool:
    """The matrix kernels' offsets inside a group of ``mb`` images (their largest MB) reach 2**31 (rows and
    columns up to 64: the weight gradient's padded grid)."""
    return any(mb * abs(st[0]) + 64 * (abs(st[2]) + abs(st[3])) >= 2**31 for st in strides)


#: The largest MB of the matrix kernels' configs (their in-group offsets span MB images).
_MATRIX_MB_MAX = max(c.kwargs["MB"] for c in lk_conv2d_matrix_configs() + lk_conv2d_matrix_bwd_configs(False)
                     + lk_conv2d_matrix_bwd_configs(True))


#: Rows / columns past a plane that the plane kernels' masked loads may point at (padding and line shifts).
_PLANE_MARGIN = 2 * PLANE_MAX + 2 * MAX_KERNEL_SIZE


def _slot_shapes(wt: Optional[torch.Tensor], ww: Optional[torch.Tensor]):
    KH_T, KW_T = (wt.shape[1], wt.shape[2]) if wt is not None else (0, 0)
    KH_W, KW_W = (ww.shape[1], ww.shape[2]) if ww is not None else (0, 0)
    return KH_T, KW_T, KH_W, KW_W


@dataclasses.dataclass
class LaunchSpec:
    """One kernel launch as the launchers make it, without tensors: the single description used by the launchers,
    the static model's launch plan and the compile-only check (``slak_triton.ops.compile_check``).

    kernel: the @triton.jit function; tuned: its autotuner (None: not autotuned); args: every non-pointer
    argument (sizes, strides, constexprs); pointers: {argument: role}, the role naming the tensor the launcher
    passes ("x", "y", "dy", "wt", "ww", "bias", "t_act", ... or "dummy" for an operand that is never read);
    configs: the autotune candidates (triton.Config); default: the config used without autotuning;
    grid: meta -> grid tuple; kind: "fwd" (forward or input gradient), "dw" or "bwd" (both gradients); passes: the launches of one call,
    in order, each as its arguments' overrides of ``args`` (several for the fp32 split forward)."""
    name: str
    kind: str
    kernel: object
    tuned: object
    args: dict
    pointers: dict
    configs: list
    default: dict
    grid: object
    passes: tuple = ({},)


def _elem_bytes(dtype) -> int:
    return {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}[dtype]


# --------------------------------------------------------------------------------------------------------------
# launch specs, cached per call signature
# --------------------------------------------------------------------------------------------------------------
# Building a spec costs 40-75 us of Python per call (its config lists, autotuner lookup, layout checks; measured on
# the development CPU, bench/NOTES.md "Host time per call"), more than a stage-4 kernel runs. A spec depends only
# on its arguments and on module settings, so it is built once per signature. The settings in the key are found,
# not listed: every global of this module that a builder reads, directly or through this module's functions (a
# limit such as FP32_SPLIT_MAX, a helper such as _wide_idx; tests patch both), plus the fp32 precision variable.

#: Globals the builders read that are caches, not settings (they grow as specs are built).
_NOT_SETTINGS = frozenset({"_TUNERS"})
#: Specs kept per builder; its cache is cleared when it reaches this many signatures.
_SPEC_CACHE_MAX = 4096


def _code_names(code) -> set:
    """Names a code object looks up, its nested code (lambdas, comprehensions) included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _code_names(const)
    return names


@functools.lru_cache(maxsize=None)
def _spec_reads(builder) -> Tuple[str, ...]:
    """The names of this module's globals that ``builder`` reads, following the functions this module defines."""
    g = globals()
    seen, todo = set(), [builder]
    while todo:
        fn = todo.pop()
        fn = getattr(fn, "__wrapped__", fn)
        for name in _code_names(fn.__code__):
            if name in seen or name not in g or name in _NOT_SETTINGS:
                continue
            seen.add(name)
            v = g[name]
            if getattr(v, "__module__", None) == __name__ and hasattr(v, "__code__"):
                todo.append(v)
    return tuple(sorted(seen))


@functools.lru_cache(maxsize=None)
def _spec_getter(builder):
    """(a getter of ``_spec_reads``'s globals, the positions of those that are dicts or lists)."""
    names = _spec_reads(builder)
    g = globals()
    return operator.itemgetter(*names), tuple(i for i, n in enumerate(names) if isinstance(g[n], (dict, list)))


def _spec_settings(builder) -> tuple:
    """What ``builder`` reads besides its arguments: the fp32 precision variable and the globals of
    ``_spec_reads``, with copies of the dicts and lists among them (so that a change made in place shows). Compared,
    never hashed."""
    getter, mutable = _spec_getter(builder)
    vals = getter(globals())
    return os.environ.get("SLAK_TRITON_FP32_PRECISION"), vals, tuple(vals[i].copy() for i in mutable)


def _cached_spec(builder):
    """``builder`` memoised on its arguments while the settings it reads (``_spec_settings``) stay as they were
    (any change clears its cache). The spec returned is shared between calls: read it, do not change it."""
    cache: dict = {}
    seen = [None]

    @functools.wraps(builder)
    def cached(*args, **kwargs):
        settings = _spec_settings(builder)
        if settings != seen[0] or len(cache) >= _SPEC_CACHE_MAX:
            cache.clear()
            seen[0] = settings
        key = (args, tuple(kwargs.items()))
        spec = cache.get(key)
        if spec is None:
            spec = cache[key] = builder(*args, **kwargs)
        return spec

    cached.cache_clear = cache.clear
    return cached


@_cached_spec
def fwd_launch_spec(N, C, H, W, dtype, x_strides, y_strides, wt_shape, wt_strides, ww_shape, ww_strides, *,
                    has_bias, flip, sparse_t, sparse_w, items_strides=(0, 0), interpreter=False,
                    arch=0) -> LaunchSpec:
    """The forward / input-gradient launch for x [N, C, H, W] of ``dtype`` with the given strides, slot weights
    [C, KH, KW] (shape None: slot absent) and whether each slot is sparse (line metadata given), on a GPU of
    compute capability ``arch`` (10 * major + minor; 0: not a GPU)."""
    eb = _elem_bytes(dtype)
    KH_T, KW_T = wt_shape if wt_shape is not None else (0, 0)
    KH_W, KW_W = ww_shape if ww_shape is not None else (0, 0)
    wts, wws = wt_strides or (0, 0, 0), ww_strides or (0, 0, 0)
    args = dict(
        N=N, C=C, H=H, W=W,
        sxn=x_strides[0], sxc=x_strides[1], sxh=x_strides[2], sxw=x_strides[3],
        syn=y_strides[0], syc=y_strides[1], syh=y_strides[2], syw=y_strides[3],
        swt_c=wts[0], swt_h=wts[1], swt_w=wts[2], sww_c=wws[0], sww_h=wws[1], sww_w=wws[2],
        KH_T=KH_T, KW_T=KW_T, KH_W=KH_W, KW_W=KW_W, SPARSE_T=sparse_t, SPARSE_W=sparse_w,
        HAS_BIAS=has_bias, FLIP=flip,
        WIDE_IDX=_wide_idx((H, W), x_strides) or _wide_idx((H, W), y_strides),
        DOT_PREC=_dot_precision(), DOT_UPCAST=interpreter and dtype == torch.bfloat16,
    )
    pointers = dict(x_ptr="x", wt_ptr="wt" if wt_shape else "dummy", ww_ptr="ww" if ww_shape else "dummy",
                    b_ptr="bias" if has_bias else "dummy", y_ptr="y")
    if use_matrix_kernels(H, W):
        split = dtype == torch.float32 and fp32_precision() == "bf16x6"
        hp, wp = matrix_grid(H, W)
        args.update(WIDE_IDX=matrix_wide_idx(_MATRIX_MB_MAX, x_strides, y_strides), SPLIT=split,
                    DOT_UPCAST=interpreter, HP=hp, WP=wp)
        pointers.update(t_act_ptr="t_act" if sparse_t else "dummy", w_act_ptr="w_act" if sparse_w else "dummy")
        return LaunchSpec("lk_conv2d_matrix_fwd_kernel", "fwd", lk_conv2d_matrix_fwd_kernel,
                          _tuner(lk_conv2d_matrix_fwd_kernel, lk_conv2d_matrix_configs(), _MATRIX_FWD_KEY), args,
                          pointers, lk_conv2d_matrix_configs(), lk_conv2d_matrix_default_config(N),
                          lambda meta: (C * triton.cdiv(N, meta["IMG"]),))
    # fp32 on the plane kernels: bf16 parts of x (split in the kernel) and of the weights (``bf16_splits``)
    split = use_fp32_split(H, W, dtype, arch=arch)
    if use_plane_kernels(H, W, KW_T, KH_W, 2 if split else eb):
        args.update(ALIGN=_plane_align(W, eb, x_strides, y_strides), BH=plane_pad(H), BW=plane_pad(W),
                    WIDE_IDX=_plane_wide_idx((H, W), x_strides, y_strides))
        pointers.update(t_act_ptr="t_act" if sparse_t else "dummy", w_act_ptr="w_act" if sparse_w else "dummy")
        passes = ({},)
        if split:
            # the splits are contiguous [3, C, KH, KW]: weight split s of channel c is channel s * C + c
            args.update(swt_c=KH_T * KW_T, swt_h=KW_T, swt_w=1, sww_c=KH_W * KW_W, sww_h=KW_W, sww_w=1,
                        DOT_UPCAST=interpreter)
            pointers.update(wt_ptr="wt_split" if wt_shape else "dummy", ww_ptr="ww_split" if ww_shape else "dummy")
            passes = fp32_split_passes(H, W, KW_T, KH_W)
        return LaunchSpec("lk_conv2d_plane_fwd_kernel", "fwd", lk_conv2d_plane_fwd_kernel, _plane_fwd_autotuned, args,
                          pointers, lk_conv2d_plane_configs(), lk_conv2d_plane_default_config(H, W, eb),
                          lambda meta: (C * triton.cdiv(N, meta["IMG"]),), passes)
    # tiled kernel: one block per line (its item lists), TB = the slot's long axis
    args.update(st_items=items_strides[0], sw_items=items_strides[1],
                TB_T=KH_T if sparse_t else 1, TB_W=KW_W if sparse_w else 1)
    pointers.update(t_items_ptr="t_items" if sparse_t else "dummy", t_count_ptr="t_count" if sparse_t else "dummy",
                    w_items_ptr="w_items" if sparse_w else "dummy", w_count_ptr="w_count" if sparse_w else "dummy")
    return LaunchSpec("lk_conv2d_fwd_kernel", "fwd", lk_conv2d_fwd_kernel, _fwd_autotuned, args, pointers,
                      lk_conv2d_fwd_configs(), lk_conv2d_default_config(H, W, eb),
                      lambda meta: (triton.cdiv(N, meta.get("NB", 1)) * C * triton.cdiv(H, meta["BH"])
                                    * triton.cdiv(W, meta["BW"]),))


@_cached_spec
def dw_launch_spec(N, C, H, W, dtype, x_strides, dy_strides, tall_shape, wide_shape, *, need_bias, sparse_t,
                   sparse_w, items_strides=(0, 0), sms=132, interpreter=False, arch=0) -> Tuple[LaunchSpec, int]:
    """The weight-gradient launch and its number of partial slices S (the launcher sums them in a fixed order), on
    a GPU of compute capability ``arch`` (0: not a GPU)."""
    eb = _elem_bytes(dtype)
    KH_T, KW_T = tall_shape if tall_shape is not None else (0, 0)
    KH_W, KW_W = wide_shape if wide_shape is not None else (0, 0)
    sparse_t, sparse_w = sparse_t and KH_T > 0, sparse_w and KH_W > 0
    args = dict(
        N=N, C=C, H=H, W=W,
        sxn=x_strides[0], sxc=x_strides[1], sxh=x_strides[2], sxw=x_strides[3],
        sdn=dy_strides[0], sdc=dy_strides[1], sdh=dy_strides[2], sdw=dy_strides[3],
        KH_T=KH_T, KW_T=KW_T, KH_W=KH_W, KW_W=KW_W, SPARSE_T=sparse_t, SPARSE_W=sparse_w, HAS_BIAS=need_bias,
        WIDE_IDX=_wide_idx((H, W), x_strides) or _wide_idx((H, W), dy_strides),
        DOT_PREC=_dot_precision(), DOT_UPCAST=interpreter and dtype == torch.bfloat16,
    )
    pointers = dict(x_ptr="x", dy_ptr="dy", dwt_ptr="dwt" if KH_T else "dummy", dww_ptr="dww" if KH_W else "dummy",
                    db_ptr="db" if need_bias else "dummy")
    if use_matrix_kernels(H, W):
        return _matrix_bwd_spec(N, C, H, W, dtype, x_strides, dy_strides, None, tall_shape, None, wide_shape, None,
                                need_bias=need_bias, sparse_t=sparse_t, sparse_w=sparse_w, dense_dw=False, sms=sms,
                                interpreter=interpreter)
    # fp32 on the plane kernels: x and dy split into bf16 parts in the kernel (as in the forward)
    split = use_fp32_split(H, W, dtype, weight_grad=True, arch=arch)
    if use_plane_kernels(H, W, KW_T, KH_W, 2 if split else eb):
        img = plane_dw_images_per_program(N, C, sms)
        splits = triton.cdiv(N, img)
        # the arguments both plane weight-gradient kernels take
        args.update(imgs_per_prog=img, WIDE_IDX=_plane_wide_idx((H, W), x_strides, dy_strides),
                    ALIGN=_plane_align(W, eb, x_strides, dy_strides), BH=plane_pad(H), BW=plane_pad(W),
                    KPT=triton.next_power_of_2(KH_T) if KH_T else 1, KPW=triton.next_power_of_2(KW_W) if KW_W else 1,
                    SPLIT=split, DOT_UPCAST=interpreter and (split or dtype == torch.bfloat16))
        if not (sparse_t or sparse_w) and use_plane_dw_stack(H, W, KW_T, KH_W, split, arch):
            args = {k: v for k, v in args.items() if k not in ("SPARSE_T", "SPARSE_W")}   # (dense only)
            args.update(plane_dw_stack_slots(KW_T, KH_W, plane_pad(W)))
            configs = lk_conv2d_plane_dw_stack_configs(H, W, split)
            return LaunchSpec("lk_conv2d_plane_dw_stack_kernel", "dw", lk_conv2d_plane_dw_stack_kernel,
                              _tuner(lk_conv2d_plane_dw_stack_kernel, configs, _PLANE_DW_STACK_KEY), args, pointers,
                              configs, lk_conv2d_plane_dw_stack_default_config(H, W, eb),
                              lambda meta: (C * splits,)), splits
        args.update(H_PADDED=H < plane_pad(H), W_PADDED=W < plane_pad(W), PACK_T=plane_dw_pack(W),
                    PACK_W=plane_dw_pack(H))
        pointers.update(t_act_ptr="t_act" if sparse_t else "dummy", w_act_ptr="w_act" if sparse_w else "dummy")
        configs = lk_conv2d_plane_dw_split_configs(H, W) if split else lk_conv2d_plane_dw_configs()
        tuned = _tuner(lk_conv2d_plane_dw_kernel, configs, _PLANE_DW_KEY) if split else _plane_dw_autotuned
        return LaunchSpec("lk_conv2d_plane_dw_kernel", "dw", lk_conv2d_plane_dw_kernel, tuned, args, pointers, configs,
                          lk_conv2d_plane_dw_default_config(H, W, eb, sparse_t or sparse_w), lambda meta: (C * splits,),
                          fp32_split_dw_passes(H, W, KW_T, KH_W) if split else ({},)), splits
    # tiled: enough programs to fill the GPU (about 4 per SM), never more than the work items of the smallest tile
    splits = max(1, min(N * triton.cdiv(H, 16) * triton.cdiv(W, 16), triton.cdiv(4 * sms, C)))
    tb_t, tb_w = (KH_T if sparse_t else 1), (KW_W if sparse_w else 1)
    args.update(n_splits=splits, st_items=items_strides[0], sw_items=items_strides[1], TB_T=tb_t, TB_W=tb_w)
    pointers.update(t_items_ptr="t_items" if sparse_t else "dummy", t_count_ptr="t_count" if sparse_t else "dummy",
                    w_items_ptr="w_items" if sparse_w else "dummy", w_count_ptr="w_count" if sparse_w else "dummy")
    slots = dict(KH_T=KH_T, KW_T=KW_T, KH_W=KH_W, KW_W=KW_W, TB_T=tb_t, TB_W=tb_w)
    # the window sizes derived from the tile and kernel sizes are baked into each config
    configs = [triton.Config(dict(c.kwargs, **_dw_derived(c.kwargs, slots)), num_warps=c.num_warps,
                             num_stages=c.num_stages) for c in lk_conv2d_bwd_dw_configs()]
    default = lk_conv2d_bwd_dw_default_config(H, W, eb)
    default = dict(default, **_dw_derived({k: default[k] for k in ("BH", "BW")}, slots))
    return LaunchSpec("lk_conv2d_bwd_dw_kernel", "dw", lk_conv2d_bwd_dw_kernel,
                      _tuner(lk_conv2d_bwd_dw_kernel, configs, _TILED_DW_KEY), args, pointers,
                      configs, default, lambda meta: (C, splits)), splits


@_cached_spec
def bwd_launch_spec(N, C, H, W, dtype, x_strides, dy_strides, dx_strides, wt_shape, wt_strides, ww_shape,
                    ww_strides, *, need_bias, sparse_t, sparse_w, dense_dw, sms=132,
                    interpreter=False) -> Optional[Tuple[LaunchSpec, int]]:
    """The fused backward launch (input, weight and bias gradients in one kernel) and its number of partial slices
    S, or None where there is none (planes off the matrix kernels: the backward is ``fwd_launch_spec`` with flip
    and ``dw_launch_spec``). sparse_t / sparse_w: the slot's inactive lines are read as 0 (dx) and get a zero
    gradient unless ``dense_dw``."""
    if not use_fused_backward(H, W, dtype):
        return None
    return _matrix_bwd_spec(N, C, H, W, dtype, x_strides, dy_strides, dx_strides, wt_shape, wt_strides, ww_shape,
                            ww_strides, need_bias=need_bias, sparse_t=sparse_t, sparse_w=sparse_w, dense_dw=dense_dw,
                            sms=sms, interpreter=interpreter)


def _matrix_bwd_spec(N, C, H, W, dtype, x_strides, dy_strides, dx_strides, wt_shape, wt_strides, ww_shape,
                     ww_strides, *, need_bias, sparse_t, sparse_w, dense_dw, sms,
                     interpreter) -> Tuple[LaunchSpec, int]:
    """``lk_conv2d_matrix_bwd_kernel``'s launch: the weight (and bias) gradients, and with ``dx_strides`` (not None)
    the input gradient in the same pass (kind "bwd"; else "dw", the slots' weights and strides unused)."""
    dx = dx_strides is not None
    KH_T, KW_T = wt_shape if wt_shape is not None else (0, 0)
    KH_W, KW_W = ww_shape if ww_shape is not None else (0, 0)
    wts, wws, gs = wt_strides or (0, 0, 0), ww_strides or (0, 0, 0), dx_strides or (0, 0, 0, 0)
    img = plane_dw_images_per_program(N, C, sms)
    splits = triton.cdiv(N, img)
    hp, wp = matrix_grid(H, W)
    args = dict(
        N=N, C=C, H=H, W=W, imgs_per_prog=img,
        sxn=x_strides[0], sxc=x_strides[1], sxh=x_strides[2], sxw=x_strides[3],
        sdn=dy_strides[0], sdc=dy_strides[1], sdh=dy_strides[2], sdw=dy_strides[3],
        sgn=gs[0], sgc=gs[1], sgh=gs[2], sgw=gs[3],
        swt_c=wts[0], swt_h=wts[1], swt_w=wts[2], sww_c=wws[0], sww_h=wws[1], sww_w=wws[2],
        KH_T=KH_T, KW_T=KW_T, KH_W=KH_W, KW_W=KW_W, SPARSE_T=sparse_t, SPARSE_W=sparse_w, DENSE_DW=dense_dw,
        HAS_BIAS=need_bias, DX=dx, WIDE_IDX=matrix_wide_idx(_MATRIX_MB_MAX, x_strides, dy_strides, gs),
        SPLIT=dtype == torch.float32 and fp32_precision() == "bf16x6", DOT_PREC=_dot_precision(),
        DOT_UPCAST=interpreter, HP=hp, WP=wp,
    )
    pointers = dict(x_ptr="x", dy_ptr="dy", wt_ptr="wt" if dx and wt_shape else "dummy",
                    ww_ptr="ww" if dx and ww_shape else "dummy", dx_ptr="dx" if dx else "dummy",
                    dwt_ptr="dwt" if wt_shape else "dummy", dww_ptr="dww" if ww_shape else "dummy",
                    db_ptr="db" if need_bias else "dummy", t_act_ptr="t_act" if sparse_t else "dummy",
                    w_act_ptr="w_act" if sparse_w else "dummy")
    configs = lk_conv2d_matrix_bwd_configs(dx)
    return LaunchSpec("lk_conv2d_matrix_bwd_kernel", "bwd" if dx else "dw", lk_conv2d_matrix_bwd_kernel,
                      _tuner(lk_conv2d_matrix_bwd_kernel, configs, _MATRIX_BWD_KEY), args, pointers, configs,
                      lk_conv2d_matrix_bwd_default_config(), lambda meta: (C * splits,)), splits

def _run(spec: LaunchSpec, tensors: dict, config: Optional[dict]) -> None:
    """Launches ``spec`` with its pointer arguments taken from ``tensors`` by role (autotuned unless a config is
    given or autotuning is off)."""
    ptrs = {name: tensors[role] for name, role in spec.pointers.items()}
    # (wrapped only where a graph is being traced: torch.compile records the launch; eager calls, through the op or
    # _LkConv2dEager, run the kernel itself, without wrap_triton's 12 us per call)
    wrap = wrap_triton if is_wrap_triton_enabled() else (lambda kernel: kernel)
    for extra in spec.passes:
        args = dict(spec.args, **extra)
        if config is None and _autotune_enabled():
            wrap(spec.tuned)[spec.grid](**ptrs, **args)
        else:
            cfg = dict(config) if config is not None else dict(spec.default)
            wrap(spec.kernel)[spec.grid(cfg)](**ptrs, **args, **cfg)
        LAUNCH_COUNTS[spec.name] += 1
        LAUNCH_COUNTS[spec.kind] += 1


_fwd_autotuned = triton.autotune(
    configs=lk_conv2d_fwd_configs(),
    key=["N", "C", "H", "W", "KH_T", "KW_T", "KH_W", "KW_W", "SPARSE_T", "SPARSE_W", "HAS_BIAS", "FLIP"],
)(lk_conv2d_fwd_kernel)

_plane_fwd_autotuned = triton.autotune(
    configs=lk_conv2d_plane_configs(),
    key=["N", "C", "H", "W", "KH_T", "KW_T", "KH_W", "KW_W", "SPARSE_T", "SPARSE_W", "HAS_BIAS", "FLIP", "ALIGN",
         "SPLIT_LO", "SPLIT_HI", "ADD_Y"],
    restore_value=["y_ptr"],   # the later fp32 split launches add to y: each timed run starts from the same y
)(lk_conv2d_plane_fwd_kernel)

_MATRIX_FWD_KEY = ["N", "C", "H", "W", "KH_T", "KW_T", "KH_W", "KW_W", "SPARSE_T", "SPARSE_W", "HAS_BIAS", "FLIP",
                   "SPLIT"]
_MATRIX_BWD_KEY = ["N", "C", "H", "W", "KH_T", "KW_T", "KH_W", "KW_W", "SPARSE_T", "SPARSE_W", "DENSE_DW", "HAS_BIAS",
                   "DX", "SPLIT"]
_PLANE_DW_KEY = ["N", "C", "H", "W", "KH_T", "KW_T", "KH_W", "KW_W", "SPARSE_T", "SPARSE_W", "HAS_BIAS", "ALIGN"]
_TILED_DW_KEY = ["N", "C", "H", "W", "HAS_BIAS", "SPARSE_T", "SPARSE_W"]
_PLANE_DW_STACK_KEY = ["N", "C", "H", "W", "KH_T", "KW_T", "KH_W", "KW_W", "HAS_BIAS", "ALIGN"]
_plane_dw_autotuned = triton.autotune(configs=lk_conv2d_plane_dw_configs(),
                                      key=_PLANE_DW_KEY)(lk_conv2d_plane_dw_kernel)
_TUNERS: dict = {}


def _tuner(kernel, configs: list, key: List[str]):
    """One autotuner of ``kernel`` per candidate list, made on first use: the tiled weight-gradient kernel bakes
    its derived meta-parameters (window sizes, from the tile and the kernel sizes) into each config, as
    torch.compile traces autotuners, not heuristics; the fp32 split plane weight gradient takes its own list
    (``lk_conv2d_plane_dw_split_configs``, by plane size)."""
    k = (kernel, tuple((tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in configs))
    if k not in _TUNERS:
        _TUNERS[k] = triton.autotune(configs=configs, key=key)(kernel)
    return _TUNERS[k]


def _dw_derived(cfg: dict, slots: dict) -> dict:
    both = dict(cfg, **slots)
    return {k: f(both) for k, f in lk_conv2d_bwd_dw_derived.items()}


def launch_lk_conv2d_fwd(
    x: torch.Tensor,
    wt: Optional[torch.Tensor],
    ww: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    out: torch.Tensor,
    *,
    flip: bool = False,
    sparse_t: "Optional[SlotMeta]" = None,
    sparse_w: "Optional[SlotMeta]" = None,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """``out = conv(x, tall) + conv(x, wide) (+ bias)``: the plane kernel where ``use_plane_kernels`` says so,
    else the tiled kernel (``fwd_launch_spec``).

    x, out: [N, C, H, W] of one dtype, any strides; wt: [C, KH_T, KW_T] or None; ww: [C, KH_W, KW_W] or None;
    bias: [C] or None. ``flip`` correlates with the kernels rotated by 180 degrees (the input gradient).
    sparse_t / sparse_w: None (dense) or the slot's ``line_metadata``: only active lines are computed.
    config: explicit meta-parameters (tests, tuning; plane: {NB, IMG, num_warps, num_stages}, tiled: {BH, BW,
    CK, NB, num_warps, num_stages}); default: autotuned on CUDA, the default config elsewhere.
    """
    N, C, H, W = x.shape
    if N == 0 or _tracing_only(x):
        return out
    spec = fwd_launch_spec(
        N, C, H, W, x.dtype, x.stride(), out.stride(), wt.shape[1:] if wt is not None else None,
        wt.stride() if wt is not None else None, ww.shape[1:] if ww is not None else None,
        ww.stride() if ww is not None else None, has_bias=bias is not None, flip=flip,
        sparse_t=sparse_t is not None, sparse_w=sparse_w is not None,
        items_strides=(sparse_t[1].stride(0) if sparse_t is not None else 0,
                       sparse_w[1].stride(0) if sparse_w is not None else 0),
        interpreter=interpreter_active(), arch=device_arch(x.device))
    tensors = dict(x=x, y=out, wt=wt, ww=ww, bias=bias, dummy=x)
    if "wt_split" in spec.pointers.values():
        tensors["wt_split"] = bf16_splits(wt)
    if "ww_split" in spec.pointers.values():
        tensors["ww_split"] = bf16_splits(ww)
    for tag, meta in (("t", sparse_t), ("w", sparse_w)):
        if meta is not None:
            tensors.update({f"{tag}_act": meta[0], f"{tag}_items": meta[1], f"{tag}_count": meta[2]})
    _run(spec, tensors, config)
    return out


def _empty_like_layout(x: torch.Tensor) -> torch.Tensor:
    """Output in x's memory format: a dense x keeps its strides (NCHW or channels_last), a strided view gets the
    format torch suggests for it. Never copies x. (Tests patch this to hand out NaN-filled buffers.)"""
    return torch.empty_like(x, memory_format=torch.preserve_format)


def _new_empty(*shape: int, device: torch.device) -> torch.Tensor:
    """fp32 scratch for the weight-gradient partials (tests patch this to hand out NaN-filled buffers)."""
    return torch.empty(*shape, device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def device_arch(device: torch.device) -> int:
    """The compute capability of ``device`` as 10 * major + minor (90: Hopper); 0 off a GPU."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 0


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def plane_dw_images_per_program(N: int, C: int, sms: int) -> int:
    """Images per program of the plane weight-gradient kernel: as many as leave about two programs per SM (fewer
    fp32 partials to sum, one diagonal reduction per line and program)."""
    splits = max(1, min(N, round(2 * sms / C)))
    return triton.cdiv(N, splits)


def _sum_partials(parts: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The weight-gradient partials [S, ...] summed over S in a fixed order (deterministic, no atomics). One slice
    (S = 1: stages 3-4 of SLaK, where a program takes every image of its channel) is returned as it is: a sum would
    cost a launch, a few microseconds of host and GPU time, next to kernels of 0.01-0.03 ms."""
    if parts is None:
        return None
    return parts[0] if parts.shape[0] == 1 else parts.sum(0)


def launch_lk_conv2d_bwd_dw(
    x: torch.Tensor,
    dy: torch.Tensor,
    tall_shape: Optional[Tuple[int, int]],
    wide_shape: Optional[Tuple[int, int]],
    need_bias: bool,
    *,
    sparse_t: "Optional[SlotMeta]" = None,
    sparse_w: "Optional[SlotMeta]" = None,
    config: Optional[dict] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Weight (and bias) gradients (``dw_launch_spec``: the plane kernel where ``use_plane_kernels`` says so, else
    the tiled one); each program writes an fp32 partial, summed here in a fixed order (deterministic, no atomics).

    sparse_t / sparse_w: None or the slot's ``line_metadata``: only active lines are computed, inactive ones get a
    zero gradient (the mask zeroes them anyway). config: explicit meta-parameters (tests). Returns fp32 (d_tall
    [C, KH_T, KW_T] or None, d_wide [C, KH_W, KW_W] or None, d_bias [C] or None)."""
    N, C, H, W = x.shape
    KH_T, KW_T = tall_shape if tall_shape is not None else (0, 0)
    KH_W, KW_W = wide_shape if wide_shape is not None else (0, 0)
    dev = x.device
    if N == 0:
        z = lambda *s: torch.zeros(*s, device=dev, dtype=torch.float32)  # noqa: E731
        return (z(C, KH_T, KW_T) if KH_T else None, z(C, KH_W, KW_W) if KH_W else None, z(C) if need_bias else None)
    sparse_t = sparse_t if KH_T else None
    sparse_w = sparse_w if KH_W else None
    spec, n_splits = dw_launch_spec(
        N, C, H, W, x.dtype, x.stride(), dy.stride(), tall_shape, wide_shape, need_bias=need_bias,
        sparse_t=sparse_t is not None, sparse_w=sparse_w is not None,
        items_strides=(sparse_t[1].stride(0) if sparse_t is not None else 0,
                       sparse_w[1].stride(0) if sparse_w is not None else 0),
        sms=_num_sms(dev), interpreter=interpreter_active(), arch=device_arch(dev))
    dwt = _new_empty(n_splits, C, KH_T, KW_T, device=dev) if KH_T else None
    dww = _new_empty(n_splits, C, KH_W, KW_W, device=dev) if KH_W else None
    db = _new_empty(n_splits, C, device=dev) if need_bias else None
    if not _tracing_only(x):
        tensors = dict(x=x, dy=dy, dwt=dwt, dww=dww, db=db, dummy=x)
        for tag, meta in (("t", sparse_t), ("w", sparse_w)):
            if meta is not None:
                tensors.update({f"{tag}_act": meta[0], f"{tag}_items": meta[1], f"{tag}_count": meta[2]})
        _run(spec, tensors, config)
    return _sum_partials(dwt), _sum_partials(dww), _sum_partials(db)


def launch_lk_conv2d_bwd(
    x: torch.Tensor,
    dy: torch.Tensor,
    wt: Optional[torch.Tensor],
    ww: Optional[torch.Tensor],
    dx: torch.Tensor,
    need_bias: bool,
    *,
    sparse_t: "Optional[SlotMeta]" = None,
    sparse_w: "Optional[SlotMeta]" = None,
    dense_dw: bool = False,
    config: Optional[dict] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The whole backward of ``launch_lk_conv2d_fwd`` in one launch where ``bwd_launch_spec`` has a fused kernel
    (``use_fused_backward``: small planes, 16-bit): the input gradient into ``dx`` (as the forward with ``flip``) and the
    weight (and bias) gradients as ``launch_lk_conv2d_bwd_dw`` returns them (fp32 partials summed here in a fixed
    order). Elsewhere the two launchers, one after the other. sparse_t / sparse_w: None or the slot's
    ``line_metadata`` (inactive lines: weights read as 0; gradient 0 unless ``dense_dw``). config: explicit
    meta-parameters of the fused kernel (tests, tuning). Returns (dx, d_tall or None, d_wide or None, d_bias or
    None), the weight and bias gradients fp32."""
    N, C, H, W = x.shape
    dev = x.device
    tall_shape = tuple(wt.shape[1:]) if wt is not None else None
    wide_shape = tuple(ww.shape[1:]) if ww is not None else None
    spec = None if N == 0 else bwd_launch_spec(
        N, C, H, W, x.dtype, x.stride(), dy.stride(), dx.stride(), tall_shape, wt.stride() if wt is not None else None,
        wide_shape, ww.stride() if ww is not None else None, need_bias=need_bias, sparse_t=sparse_t is not None,
        sparse_w=sparse_w is not None, dense_dw=dense_dw, sms=_num_sms(dev), interpreter=interpreter_active())
    if spec is None:   # (no fused kernel for these planes or dtype, or no image)
        launch_lk_conv2d_fwd(dy, wt, ww, None, dx, flip=True, sparse_t=sparse_t, sparse_w=sparse_w)
        gt, gw, gb = launch_lk_conv2d_bwd_dw(x, dy, tall_shape, wide_shape, need_bias,
                                             sparse_t=None if dense_dw else sparse_t,
                                             sparse_w=None if dense_dw else sparse_w)
        return dx, gt, gw, gb
    spec, n_splits = spec
    dwt = _new_empty(n_splits, C, *tall_shape, device=dev) if wt is not None else None
    dww = _new_empty(n_splits, C, *wide_shape, device=dev) if ww is not None else None
    db = _new_empty(n_splits, C, device=dev) if need_bias else None
    if not _tracing_only(x):
        tensors = dict(x=x, dy=dy, wt=wt, ww=ww, dx=dx, dwt=dwt, dww=dww, db=db, dummy=x)
        for tag, meta in (("t", sparse_t), ("w", sparse_w)):
            if meta is not None:
                tensors[f"{tag}_act"] = meta[0]
        _run(spec, tensors, config)
    return dx, _sum_partials(dwt), _sum_partials(dww), _sum_partials(db)


# --------------------------------------------------------------------------------------------------------------
# block-sparse metadata
# --------------------------------------------------------------------------------------------------------------

#: One slot's active lines in the kernels' formats: (flags [C, L] int32 0/1 (plane kernels), items [C, L] int32:
#: the active line ids first in increasing order, then the others (tiled kernels), counts [C] int32).
SlotMeta = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def line_metadata(slot_mask: torch.Tensor, tall: bool) -> SlotMeta:
    """The active lines of one slot's mask ([C, KH, KW], nonzero = active): a line is one short-axis position (a
    column of the tall slot, a row of the wide slot) and is active when any of its taps is. No host sync."""
    m = slot_mask if tall else slot_mask.transpose(1, 2)     # [C, long, short]
    act = (m != 0).any(dim=1)                                 # [C, short]
    items = torch.argsort((~act).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return act.to(torch.int32), items, act.sum(dim=1, dtype=torch.int32)


def _fold_masks(sel) -> torch.Tensor:
    """Union of one slot's branch masks (``sel``: that slot's (weight, mask) pairs, at least one mask), laid out
    like the folded slot weight; an unmasked branch counts as all active."""
    parts = [(m[:, 0] != 0) if m is not None else torch.ones_like(w[:, 0], dtype=torch.bool) for w, m in sel]
    return _centre_combine(parts, torch.logical_or)


def slot_metadata(weights, masks) -> Tuple[Optional[SlotMeta], Optional[SlotMeta]]:
    """Active lines of the (tall, wide) slots (None for a slot without masks), recomputed from the masks on every
    call: a few small tensor ops without host synchronisation, so that every change of a mask is honoured, also
    one made through ``mask.data`` (which no version counter sees)."""
    out = []
    for tall in (True, False):
        sel = _slot_branches(weights, masks, tall)
        out.append(None if not sel or all(m is None for _, m in sel) else line_metadata(_fold_masks(sel), tall))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------------------
# torch.library ops and autograd
# --------------------------------------------------------------------------------------------------------------

def _meta(lines, items, count) -> Optional[SlotMeta]:
    return None if lines is None else (lines, items, count)


def _lk_conv2d_fwd(
    x: torch.Tensor,
    wt: Optional[torch.Tensor],
    ww: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    t_lines: Optional[torch.Tensor],
    t_items: Optional[torch.Tensor],
    t_count: Optional[torch.Tensor],
    w_lines: Optional[torch.Tensor],
    w_items: Optional[torch.Tensor],
    w_count: Optional[torch.Tensor],
    flip: bool,
    dense_dw: bool = False,
) -> torch.Tensor:
    """``torch.ops.slak_triton.lk_conv2d_fwd``: the slot-level forward (or, with ``flip``, the input gradient).

    x: [N, C, H, W]; wt: [C, KH_T, KW_T] or None; ww: [C, KH_W, KW_W] or None; bias: [C] or None;
    t_lines/t_items/t_count, w_lines/w_items/w_count: ``line_metadata`` of each slot or None (dense). dense_dw:
    the backward computes the weight gradient of every tap, not only of the active lines. Returns [N, C, H, W] in
    x's dtype and memory format. Differentiable (``register_autograd``) once."""
    out = _empty_like_layout(x)
    launch_lk_conv2d_fwd(x, wt, ww, bias, out, flip=flip, sparse_t=_meta(t_lines, t_items, t_count),
                         sparse_w=_meta(w_lines, w_items, w_count))
    return out


lk_conv2d_fwd_op = triton_op("slak_triton::lk_conv2d_fwd", mutates_args={})(_lk_conv2d_fwd)


def _absent_as_empty(x: torch.Tensor, gt, gw, gb) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ops' (tall, wide, bias) gradients, each that was not computed (None) as an fp32 tensor with zero
    elements ([C, 0, 0], [C, 0, 0], [0]): an op's schema returns tensors, not None."""
    C = x.shape[1]
    empty = lambda *s: x.new_empty(s, dtype=torch.float32)  # noqa: E731
    return (gt if gt is not None else empty(C, 0, 0), gw if gw is not None else empty(C, 0, 0),
            gb if gb is not None else empty(0))


def _lk_conv2d_bwd_dw(
    x: torch.Tensor,
    dy: torch.Tensor,
    kh_t: int,
    kw_t: int,
    kh_w: int,
    kw_w: int,
    need_bias: bool,
    t_lines: Optional[torch.Tensor] = None,
    t_items: Optional[torch.Tensor] = None,
    t_count: Optional[torch.Tensor] = None,
    w_lines: Optional[torch.Tensor] = None,
    w_items: Optional[torch.Tensor] = None,
    w_count: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.slak_triton.lk_conv2d_bwd_dw``: fp32 gradients (tall [C, kh_t, kw_t], wide [C, kh_w, kw_w],
    bias [C]) of ``lk_conv2d_fwd`` for forward input ``x`` and output gradient ``dy``; a slot or bias that is not
    asked for (size 0) comes back with zero elements. With line metadata, only active lines are computed (inactive
    taps get 0). Deterministic."""
    gt, gw, gb = launch_lk_conv2d_bwd_dw(x, dy, (kh_t, kw_t) if kh_t else None, (kh_w, kw_w) if kh_w else None,
                                         need_bias, sparse_t=_meta(t_lines, t_items, t_count),
                                         sparse_w=_meta(w_lines, w_items, w_count))
    return _absent_as_empty(x, gt, gw, gb)


lk_conv2d_bwd_dw_op = triton_op("slak_triton::lk_conv2d_bwd_dw", mutates_args={})(_lk_conv2d_bwd_dw)


def _lk_conv2d_bwd(
    x: torch.Tensor,
    dy: torch.Tensor,
    wt: Optional[torch.Tensor],
    ww: Optional[torch.Tensor],
    need_bias: bool,
    t_lines: Optional[torch.Tensor] = None,
    t_items: Optional[torch.Tensor] = None,
    t_count: Optional[torch.Tensor] = None,
    w_lines: Optional[torch.Tensor] = None,
    w_items: Optional[torch.Tensor] = None,
    w_count: Optional[torch.Tensor] = None,
    dense_dw: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.slak_triton.lk_conv2d_bwd``: the whole backward of ``lk_conv2d_fwd`` for forward input ``x``
    and output gradient ``dy``: (dx in x's dtype and memory format, fp32 tall [C, KH_T, KW_T], wide [C, KH_W, KW_W]
    and bias [C] gradients; an absent slot or a bias not asked for comes back with zero elements). One fused
    launch on small planes in 16-bit dtypes (``launch_lk_conv2d_bwd``). With line metadata, inactive lines' weights count 0 and
    their taps get 0 unless ``dense_dw``. Deterministic."""
    dx = _empty_like_layout(dy)
    _, gt, gw, gb = launch_lk_conv2d_bwd(x, dy, wt, ww, dx, need_bias, sparse_t=_meta(t_lines, t_items, t_count),
                                         sparse_w=_meta(w_lines, w_items, w_count), dense_dw=dense_dw)
    return (dx, *_absent_as_empty(x, gt, gw, gb))


lk_conv2d_bwd_op = triton_op("slak_triton::lk_conv2d_bwd", mutates_args={})(_lk_conv2d_bwd)


def _fwd_setup_context(ctx, inputs, output):
    x, wt, ww, bias, t_lines, t_items, t_count, w_lines, w_items, w_count, flip, dense_dw = inputs
    if flip:
        ctx.flip = True
        return
    ctx.flip = False
    ctx.save_for_backward(x, wt, ww, t_lines, t_items, t_count, w_lines, w_items, w_count)
    ctx.has_bias = bias is not None
    ctx.dense_dw = dense_dw


def _backward(ctx, dy, ops):
    """The gradients of ``lk_conv2d_fwd`` (its 12 inputs) for output gradient ``dy``, through ``ops``: the
    registered ops (``torch.ops.slak_triton``, traceable) or the functions behind them (``_EAGER_OPS``)."""
    if ctx.flip:
        raise RuntimeError("lk_conv2d: the input-gradient launch (flip=True) is not differentiable")
    if torch.is_grad_enabled():
        raise RuntimeError("lk_conv2d: double backward is not supported (create_graph=True); use backend='reference' "
                           "for higher-order gradients")
    x, wt, ww, t_lines, t_items, t_count, w_lines, w_items, w_count = ctx.saved_tensors
    need_x, need_t, need_w, need_b = ctx.needs_input_grad[:4]
    dx = dwt = dww = db = None
    need_b = need_b and ctx.has_bias
    if need_x and (wt is None or need_t) and (ww is None or need_w) and use_fused_backward(*x.shape[2:], x.dtype):
        # every gradient at once: one fused launch (reads dy once)
        # (dense_dw: every tap's gradient, while the inactive lines' weights still count 0 in dx)
        dx, gt, gw, gb = ops.lk_conv2d_bwd(x, dy, wt, ww, need_b, t_lines, t_items, t_count, w_lines, w_items,
                                           w_count, ctx.dense_dw)
        return (dx, gt.to(wt.dtype) if wt is not None else None, gw.to(ww.dtype) if ww is not None else None,
                gb.to(x.dtype) if need_b else None, None, None, None, None, None, None, None, None)
    if need_x:
        dx = ops.lk_conv2d_fwd(dy, wt, ww, None, t_lines, t_items, t_count, w_lines, w_items, w_count, True)
    if need_t or need_w or need_b:
        kt = tuple(wt.shape[1:]) if (wt is not None and need_t) else (0, 0)
        kw = tuple(ww.shape[1:]) if (ww is not None and need_w) else (0, 0)
        if ctx.dense_dw:   # every tap's gradient: no line lists
            t_lines = t_items = t_count = w_lines = w_items = w_count = None
        gt, gw, gb = ops.lk_conv2d_bwd_dw(x, dy, kt[0], kt[1], kw[0], kw[1], need_b, t_lines, t_items, t_count,
                                          w_lines, w_items, w_count)
        dwt = gt.to(wt.dtype) if kt[0] else None
        dww = gw.to(ww.dtype) if kw[0] else None
        db = gb.to(x.dtype) if need_b else None
    return dx, dwt, dww, db, None, None, None, None, None, None, None, None


def _fwd_backward(ctx, dy):
    return _backward(ctx, dy, torch.ops.slak_triton)


register_autograd("slak_triton::lk_conv2d_fwd", _fwd_backward, setup_context=_fwd_setup_context)

#: The functions behind the ops, by op name, for the eager path's backward.
_EAGER_OPS = types.SimpleNamespace(lk_conv2d_fwd=_lk_conv2d_fwd, lk_conv2d_bwd=_lk_conv2d_bwd,
                                   lk_conv2d_bwd_dw=_lk_conv2d_bwd_dw)


class _LkConv2dEager(torch.autograd.Function):
    """``torch.ops.slak_triton.lk_conv2d_fwd`` with its registered backward, for eager calls on plain tensors:
    the same functions and launches without torch.library's dispatch, which costs more than the op's own Python
    (measured on the development CPU, launch stubbed, a forward with autograd: 160 us through the op, 50-70 through
    this Function, 30 for the function alone; bench/NOTES.md). Traced calls take the op (``_eager_ok``). Written
    with ``ctx`` in ``forward``: a separate ``setup_context`` makes ``apply`` bind its arguments by signature,
    another 50 us (functorch transforms, which would need it, take the op)."""

    @staticmethod
    def forward(ctx, *inputs):
        with set_wrap_triton_enabled(False):   # (nothing is traced here: launch the kernels themselves)
            out = _lk_conv2d_fwd(*inputs)
        _fwd_setup_context(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, dy):
        with set_wrap_triton_enabled(False):
            return _backward(ctx, dy, _EAGER_OPS)


def _eager_ok(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call can skip the op's dispatch (``_LkConv2dEager``): nothing traces it (torch.compile, a
    dispatch mode such as make_fx or FakeTensorMode, functorch transforms) and every tensor is a plain one
    (subclasses such as DTensor dispatch through the op)."""
    return (not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode()
            and not torch._C._are_functorch_transforms_active()
            and all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors))


# --------------------------------------------------------------------------------------------------------------
# public op
# --------------------------------------------------------------------------------------------------------------

def lk_conv2d(
    x: torch.Tensor,
    weight: WeightArg,
    bias: Optional[torch.Tensor] = None,
    *,
    mask: MaskArg = None,
    backend: str = "auto",
    dense_weight_grad: Optional[bool] = None,
) -> torch.Tensor:
    """Depthwise large-kernel convolution, summed over branches, in one pass. Differentiable w.r.t. x, every
    weight and bias.

    Args:
        x: [N, C, H, W] float16 / bfloat16 / float32 (float64 on the reference path), NCHW, channels_last or any
            strided view; the output has x's memory format.
        weight: one [C, 1, kh, kw] weight or a sequence of them (e.g. SLaK's 51x5, 5x51 and 5x5 branches); odd
            kh, kw in 1..63, rectangular allowed. Each branch uses zero "same" padding (kh//2, kw//2).
        bias: [C] or None, added once.
        mask: None, a tensor shaped like ``weight``, or a sequence aligned with ``weight`` (entries may be None):
            the op computes with ``weight * mask``. The kernels skip blocks (``block_shape``: whole lines of a
            branch) that are zero in the mask; the active lines are read from the masks on every call, so masks
            edited in place (``mask.data``, ``mask[...] = 0``) take effect on the next call.
        backend: "auto" (CUDA -> compiled Triton; CPU -> Triton's interpreter when TRITON_INTERPRET=1 was set
            before import, else the reference), "triton" (error if it cannot run) or "reference" (F.conv2d).
        dense_weight_grad: True: the weights' gradients cover every tap, inactive ones included (the gradient of
            ``weight * mask``, not multiplied by the mask; for gradient-based regrowth), at the cost of a dense
            weight-gradient launch. None (default): as set by the ``dense_weight_grad()`` context, else False.

    Returns:
        [N, C, H, W] in x's dtype: ``sum_b F.conv2d(x, w_b * m_b, padding=(kh_b//2, kw_b//2), groups=C) + bias``.

    Non-finite inputs: the kernels multiply banded (Toeplitz) weight matrices whose zeros also meet a NaN or Inf
    input, so a non-finite x[n, c, r, q] reaches more outputs than in ``F.conv2d``, always in image n and channel
    c only. With dense weights the non-finite outputs are ``F.conv2d``'s plus, for the tall slot (branches with
    kh >= kw, folded), the columns q - KW_T//2 .. q + KW_T//2 of every row of the output tile, and for the wide
    slot the rows r - KH_W//2 .. r + KH_W//2 of every column of the tile (a tile is the whole plane for 16-bit
    planes up to 64 x 64, else a tile of the tiled kernels whose window holds x[r, q]). On small planes (rows and
    columns padded to powers of two hold at most ``MATRIX_MAX_PIXELS`` pixels, e.g. 7 x 7: the matrix kernels, one
    matrix per channel over the whole plane) every output of image n and channel c may be non-finite. A line of a
    slot whose mask is all zero is skipped (except on those small planes): it spreads nothing, where ``F.conv2d``
    multiplies the non-finite value by the masked zero weights. Every other output is finite and exact. Matching
    ``F.conv2d``'s pattern would cost a pass over
    x on every call; ``backend="reference"`` has it.
    """
    weights, masks = _validate(x, weight, bias, mask, backend)
    if dense_weight_grad is None:
        dense_weight_grad = _DENSE_WEIGHT_GRAD[0]
    elif not isinstance(dense_weight_grad, bool):
        raise TypeError(f"dense_weight_grad: expected a bool or None, got {type(dense_weight_grad).__name__}")
    if backend == "auto":
        backend = _DEFAULT_BACKEND[0]
    where = _resolve_backend(x, backend)
    if where == "reference":
        return lk_conv2d_reference(x, weights, bias, masks, dense_weight_grad)
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x = x.to(dt)
        weights = [w.to(dt) for w in weights]
        bias = bias.to(dt) if bias is not None else None
    meta_t, meta_w = slot_metadata(weights, masks)
    wt, ww = fold_branches(weights, masks, dense_weight_grad)
    none3 = (None, None, None)
    args = (x, wt, ww, bias, *(meta_t or none3), *(meta_w or none3), False, dense_weight_grad)
    with torch.autocast(x.device.type, enabled=False):
        if not _eager_ok(x, wt, ww, bias):
            return torch.ops.slak_triton.lk_conv2d_fwd(*args)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, wt, ww, bias)):
            return _LkConv2dEager.apply(*args)
        with set_wrap_triton_enabled(False):   # (no gradient: the function alone)
            return _lk_conv2d_fwd(*args)
