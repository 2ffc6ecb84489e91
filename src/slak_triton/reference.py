"""PyTorch reference path of every op (``F.conv2d``-based), imported by the ops' ``backend="reference"``, the tests
and the benchmarks. Naive on purpose: it is the definition the Triton kernels are checked against."""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def apply_mask(w: torch.Tensor, m: Optional[torch.Tensor], dense_grad: bool = False) -> torch.Tensor:
    """``w * m`` (``w`` itself when ``m`` is None). Its gradient w.r.t. ``w`` is ``m * g`` by default; with
    ``dense_grad`` it is ``g`` itself (the gradient of the masked weight at every tap, inactive ones included), while
    the value stays exactly ``w * m``."""
    if m is None:
        return w
    wm = w * m.to(w.dtype)
    if dense_grad:
        return wm.detach() + (w - w.detach())
    return wm


def lk_conv2d_reference(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    bias: Optional[torch.Tensor] = None,
    masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    dense_weight_grad: bool = False,
) -> torch.Tensor:
    """Sum over branches of ``F.conv2d(x, w * m, padding=(kh//2, kw//2), groups=C)``, plus ``bias``.

    x: [N, C, H, W]; weights: sequence of [C, 1, kh, kw] (odd kh, kw); bias: [C] or None;
    masks: None or a sequence aligned with ``weights`` whose entries are None or shaped like the weight.
    dense_weight_grad: the weights' gradients are not multiplied by the masks (``apply_mask``).
    Differentiable through autograd. Runs in whatever dtype and device the inputs have (float64 for references).
    """
    C = x.shape[1]
    if masks is None:
        masks = [None] * len(weights)
    y = None
    for w, m in zip(weights, masks):
        w = apply_mask(w, m, dense_weight_grad)
        kh, kw = w.shape[-2:]
        out = F.conv2d(x, w, None, padding=(kh // 2, kw // 2), groups=C)
        y = out if y is None else y + out
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


def slak_branch_conv_reference(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list:
    """The official code's PyTorch execution: one ``F.conv2d`` per branch, outputs returned separately (the
    benchmark's ``torch`` provider sums them)."""
    C = x.shape[1]
    return [F.conv2d(x, w, None, padding=(w.shape[-2] // 2, w.shape[-1] // 2), groups=C) for w in weights]
