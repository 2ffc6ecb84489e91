"""Work and traffic counters of the large-kernel op, computed exactly per shape (and per mask).

* **useful taps**: multiply-adds whose input pixel lies inside the image (taps on the zero padding are not
  counted), of active weights only. For a branch kh x kw with "same" padding on an H x W plane, tap (i, j) lands
  inside for ``rows(i) * cols(j)`` outputs, where ``rows(i) = #{h in [0, H): 0 <= h + i - kh//2 < H}``; the
  count per channel is ``sum_ij mask[i, j] * rows(i) * cols(j)``, times the batch.
* **FLOPs**: 2 per useful tap (multiply + add) per pass. A forward is one pass; a backward is two (input gradient
  and weight gradient, each the same taps); forward + backward is three.
* **minimum bytes** (the memory floor): forward reads x once, writes y once and reads the weights; backward reads
  dy, x and the weights and writes dx and dw; forward + backward is their sum.

Nominal counts (every tap, padding included, as published FLOP counts do) are given for comparison.
"""

from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "axis_hits",
    "useful_taps",
    "nominal_taps",
    "passes",
    "flops",
    "min_bytes",
    "MODES",
]

MODES = ("fwd", "bwd", "fwdbwd")
_PASSES = {"fwd": 1, "bwd": 2, "fwdbwd": 3}


def axis_hits(k: int, n: int) -> torch.Tensor:
    """[k] int64: for each tap index i of a length-k "same"-padded kernel on an axis of n pixels, the number of
    output positions whose input ``o + i - k//2`` lies in [0, n)."""
    i = torch.arange(k, dtype=torch.int64)
    off = i - k // 2
    # outputs o with 0 <= o + off < n and 0 <= o < n: o in [max(0, -off), min(n, n - off))
    lo = torch.clamp(-off, min=0)
    hi = torch.clamp(n - off, max=n)
    return torch.clamp(hi - lo, min=0)


def useful_taps(
    batch: int,
    channels: int,
    height: int,
    width: int,
    kernels: Sequence[Tuple[int, int]],
    masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> int:
    """Multiply-adds on taps that land inside the image, over all branches (see the module docstring).

    masks: None or one entry per branch, None (dense) or a tensor of shape [C, 1, kh, kw] / [C, kh, kw]
    (nonzero = active)."""
    total = 0
    for b, (kh, kw) in enumerate(kernels):
        hits = axis_hits(kh, height)[:, None] * axis_hits(kw, width)[None, :]  # [kh, kw]
        m = None if masks is None else masks[b]
        if m is None:
            total += channels * int(hits.sum())
        else:
            mm = (m.detach().reshape(channels, kh, kw) != 0).to("cpu", torch.int64)
            total += int((mm * hits).sum())
    return batch * total


def nominal_taps(batch: int, channels: int, height: int, width: int, kernels: Sequence[Tuple[int, int]]) -> int:
    """Every tap of every output, padding included: N * C * H * W * sum(kh * kw)."""
    return batch * channels * height * width * sum(kh * kw for kh, kw in kernels)


def passes(mode: str) -> int:
    """Passes over the taps: fwd 1, bwd 2 (input and weight gradient), fwdbwd 3."""
    if mode not in _PASSES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return _PASSES[mode]


def flops(useful: int, mode: str) -> int:
    """2 FLOPs per useful tap per pass."""
    return 2 * useful * passes(mode)


def min_bytes(
    batch: int, channels: int, height: int, width: int, kernels: Sequence[Tuple[int, int]], elem_size: int, mode: str
) -> int:
    """Minimum HBM traffic (the memory floor) in bytes, see the module docstring."""
    act = batch * channels * height * width * elem_size
    w = channels * sum(kh * kw for kh, kw in kernels) * elem_size
    fwd = 2 * act + w           # x read, y written, weights read
    bwd = 3 * act + 2 * w       # dy and x read, dx written; weights read, dw written
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    if mode == "fwdbwd":
        return fwd + bwd
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
