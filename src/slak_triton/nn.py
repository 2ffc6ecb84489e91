"""PyTorch modules on top of ``lk_conv2d``: SLaK's decomposed large-kernel module and a drop-in depthwise conv.

* ``SparseLKConv`` -- SLaK's large-kernel module: a tall ``K x N`` branch (``LoRA1``), a wide ``N x K`` branch
  (``LoRA2``) and, when ``N < K``, a small ``N x N`` branch (``small_conv``); each a bias-free depthwise conv
  followed by its own BatchNorm2d, outputs summed. The state_dict keys are the official ones, so official
  checkpoints load with ``strict=True``.
* ``ConvBN`` -- one such branch (``.conv`` an ``nn.Conv2d``, ``.bn`` a BatchNorm2d or absent).
* ``LKConv2d`` -- an ``nn.Conv2d`` subclass for one depthwise "same" conv that runs on ``lk_conv2d``; keeps the
  ``weight`` / ``bias`` keys, so a converted model still loads its own checkpoints.
* ``convert_depthwise(model)`` -- swaps every eligible depthwise ``nn.Conv2d`` of a model for an ``LKConv2d``,
  only where that is exact (``convert_depthwise_plan`` says which it converts and why it skips the others).

Masks. Any module with a ``weight`` may hold a float 0/1 buffer ``weight_mask`` shaped like the weight (the
branch convs register it as ``None``, i.e. dense and absent from the state_dict). The modules here compute with
``weight * weight_mask`` and hand the masks to ``lk_conv2d``, whose kernels skip inactive blocks of taps; the
block is ``slak_triton.ops.block_shape(kh, kw)`` (a run of taps along the kernel's long axis), so masks drawn per
block give the speed-up, any other mask is still exact. A state_dict without ``weight_mask`` keys (the official
checkpoints store sparsity as zeros) loads with ``strict=True``: the mask is derived from the loaded weight's zeros
(``None`` when it has none). A state_dict with the key loads it.
"""

import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from slak_triton.ops import lk_conv2d
from slak_triton.ops.lk_conv2d import MAX_KERNEL_SIZE

__all__ = [
    "ConvBN",
    "SparseLKConv",
    "ReparamLKConv",
    "LKConv2d",
    "convert_depthwise",
    "convert_depthwise_plan",
    "is_convertible_depthwise",
    "prepare_mask_for_load",
    "masked_weight",
]

MASK_NAME = "weight_mask"


# --------------------------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------------------------

def masked_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight * module.weight_mask`` (or the weight alone when the module has no mask)."""
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise TypeError(f"module: expected a module with a weight tensor, got {type(module).__name__}")
    mask = getattr(module, MASK_NAME, None)
    if mask is None:
        return module.weight
    return module.weight * mask.to(module.weight.dtype)


def prepare_mask_for_load(module: nn.Module, state_dict: Dict[str, torch.Tensor], prefix: str) -> None:
    """Makes ``module``'s ``weight_mask`` buffer agree with ``state_dict`` before ``module`` is loaded.

    Call it from a parent's (or the module's own) ``_load_from_state_dict``; ``prefix`` is the module's own prefix
    (``"stages.0.0.pwconv1."``). Modules without a registered ``weight_mask`` buffer are left alone.

    * ``prefix + "weight_mask"`` in the state_dict: allocates the buffer if it is ``None`` so that it is loaded.
    * absent, ``prefix + "weight"`` present: the mask becomes ``loaded_weight != 0`` when the loaded weight has
      zeros, else ``None``; a derived mask is put into the (loader's private copy of the) state_dict so that
      ``strict=True`` reports nothing missing.
    * both absent (a partial load): nothing changes.
    """
    if MASK_NAME not in module._buffers:
        return
    mkey, wkey = prefix + MASK_NAME, prefix + "weight"
    weight = module.weight
    if mkey in state_dict:
        if module._buffers[MASK_NAME] is None:
            setattr(module, MASK_NAME, torch.zeros_like(weight))
        return
    loaded = state_dict.get(wkey)
    if not isinstance(loaded, torch.Tensor) or loaded.shape != weight.shape or loaded.is_meta:
        return  # nothing to derive from; a shape mismatch is reported by the loader itself
    nonzero = loaded != 0
    if bool(nonzero.all()):
        setattr(module, MASK_NAME, None)
        return
    mask = nonzero.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else torch.float32)
    setattr(module, MASK_NAME, mask)
    state_dict[mkey] = mask


def _check_int(name: str, value, lo: int, hi: Optional[int] = None, odd: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} ({value!r})")
    if value < lo or (hi is not None and value > hi) or (odd and value % 2 == 0):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}: expected {'an odd' if odd else 'an'} int in {rng}, got {value}")
    return value


def _check_kernel_pair(name: str, value) -> Tuple[int, int]:
    """An odd int, or a pair of odd ints, each in 1..MAX_KERNEL_SIZE -> (kh, kw)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name}: expected an odd int or a pair (kh, kw) of odd ints in 1..{MAX_KERNEL_SIZE}, "
                             f"got {value!r} ({len(value)} values)")
        return (_check_int(f"{name}[0]", value[0], 1, MAX_KERNEL_SIZE, odd=True),
                _check_int(f"{name}[1]", value[1], 1, MAX_KERNEL_SIZE, odd=True))
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an odd int or a pair (kh, kw) of odd ints in 1..{MAX_KERNEL_SIZE}, got "
                        f"{type(value).__name__} ({value!r})")
    k = _check_int(name, value, 1, MAX_KERNEL_SIZE, odd=True)
    return k, k


def _uses_batch_stats(bn: nn.Module) -> bool:
    return bn.training or bn.running_mean is None or bn.running_var is None


def _fold_bn(weight: torch.Tensor, bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(w * gamma / std, beta - mean * gamma / std) for a [C, 1, kh, kw] weight and its BatchNorm (eval stats)."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    return weight * scale.to(weight.dtype).view(-1, 1, 1, 1), beta - bn.running_mean * scale


# --------------------------------------------------------------------------------------------------------------
# SLaK's large-kernel module
# --------------------------------------------------------------------------------------------------------------

class ConvBN(nn.Module):
    """One branch of ``SparseLKConv``: bias-free depthwise ``nn.Conv2d`` (``.conv``) + ``BatchNorm2d`` (``.bn``).

    Args:
        channels: C.
        kernel_size: (kh, kw), odd, "same" zero padding (kh // 2, kw // 2).
        bn: build ``.bn``; with ``bn=False`` the branch has no BN and no bias.

    Shapes: x [N, C, H, W] -> [N, C, H, W]. ``.conv.weight_mask`` (buffer, default None) masks the weight.
    """

    def __init__(self, channels: int, kernel_size: Tuple[int, int], bn: bool = True):
        super().__init__()
        _check_int("channels", channels, 1)
        kh, kw = _check_kernel_pair("kernel_size", kernel_size)
        if not isinstance(bn, bool):
            raise TypeError(f"bn: expected a bool, got {type(bn).__name__} ({bn!r})")
        self.conv = nn.Conv2d(channels, channels, (kh, kw), padding=(kh // 2, kw // 2), groups=channels, bias=False)
        self.conv.register_buffer(MASK_NAME, None)
        if bn:
            self.bn = nn.BatchNorm2d(channels)

    @property
    def has_bn(self) -> bool:
        return "bn" in self._modules and self._modules["bn"] is not None

    @property
    def mask(self) -> Optional[torch.Tensor]:
        return getattr(self.conv, MASK_NAME, None)

    def folded(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight [C, 1, kh, kw], bias [C] or None) with the BN (running statistics) folded in. Differentiable;
        the mask is not applied (pass ``self.mask`` alongside)."""
        if not self.has_bn:
            return self.conv.weight, None
        return _fold_bn(self.conv.weight, self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = lk_conv2d(x, self.conv.weight.to(x.dtype), mask=self.mask)
        return self.bn(y) if self.has_bn else y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        prepare_mask_for_load(self.conv, state_dict, prefix + "conv.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class SparseLKConv(nn.Module):
    """SLaK's sparse decomposed large-kernel depthwise module, running on ``lk_conv2d``.

    ``y = BN1(conv_{K x N}(x)) + BN2(conv_{N x K}(x)) + BN3(conv_{N x N}(x))`` (third term only when N < K),
    every conv depthwise, stride 1, "same" zero padding.

    Args:
        channels: C (in = out = groups).
        kernel_size: K, odd, at most ``MAX_KERNEL_SIZE`` (63).
        small_kernel: N, odd, at most K.
        bn: per-branch BatchNorm2d (official default); ``bn=False`` gives bias-free convs only.

    Submodules (official state_dict keys): ``LoRA1`` (K x N), ``LoRA2`` (N x K), ``small_conv`` (N x N, only when
    N < K), each a ``ConvBN`` with ``.conv.weight`` [C, 1, kh, kw] and ``.bn``. After ``fuse()`` the BNs are gone,
    the weights hold the folded values and a ``bias`` [C] parameter appears.

    Execution: in training mode with BN, one ``lk_conv2d`` call per branch (each BN needs its branch's own batch
    statistics); otherwise (eval, ``bn=False`` or fused) one ``lk_conv2d`` call over all branches, with the BNs
    folded into weights and bias on the fly in eval. Masks (``LoRA1.conv.weight_mask`` ...) are passed to the op.

    Shapes: x [N, C, H, W] (any memory format, dtype float16 / bfloat16 / float32; float64 runs the reference)
    -> [N, C, H, W] in x's memory format. Weights are cast to x's dtype (autocast).
    """

    BRANCHES = ("LoRA1", "LoRA2", "small_conv")

    def __init__(self, channels: int, kernel_size: int = 51, small_kernel: int = 5, *, bn: bool = True):
        super().__init__()
        _check_int("channels", channels, 1)
        _check_int("kernel_size", kernel_size, 1, MAX_KERNEL_SIZE, odd=True)
        _check_int("small_kernel", small_kernel, 1, kernel_size, odd=True)
        if not isinstance(bn, bool):
            raise TypeError(f"bn: expected a bool, got {type(bn).__name__} ({bn!r})")
        self.channels = channels
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.LoRA1 = ConvBN(channels, (kernel_size, small_kernel), bn)
        self.LoRA2 = ConvBN(channels, (small_kernel, kernel_size), bn)
        if small_kernel < kernel_size:
            self.small_conv = ConvBN(channels, (small_kernel, small_kernel), bn)
        self.register_parameter("bias", None)
        self.fused = False

    # -- helpers ---------------------------------------------------------------------------------------------
    def branches(self) -> List[ConvBN]:
        """The branch modules in order (LoRA1, LoRA2[, small_conv])."""
        return [self._modules[n] for n in self.BRANCHES if n in self._modules]

    def masks(self) -> List[Optional[torch.Tensor]]:
        return [b.mask for b in self.branches()]

    def density(self) -> float:
        """Fraction of active taps over all branches (mask-aware non-zeros of the weights)."""
        with torch.no_grad():
            nnz = sum(int(torch.count_nonzero(masked_weight(b.conv))) for b in self.branches())
            total = sum(b.conv.weight.numel() for b in self.branches())
        return nnz / total

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = self.branches()
        masks = [b.mask for b in branches]
        mask_arg = None if all(m is None for m in masks) else masks
        has_bn = [b.has_bn for b in branches]
        if any(has_bn) and any(_uses_batch_stats(b.bn) for b in branches if b.has_bn):
            y = None
            for b in branches:
                out = b(x)
                y = out if y is None else y + out
            if self.bias is not None:
                y = y + self.bias.to(y.dtype).view(1, -1, 1, 1)
            return y
        weights, bias = [], self.bias
        for b in branches:
            w, bb = b.folded()
            weights.append(w.to(x.dtype))
            if bb is not None:
                bias = bb if bias is None else bias + bb
        if bias is not None:
            bias = bias.to(x.dtype)
        return lk_conv2d(x, weights, bias, mask=mask_arg)

    @torch.no_grad()
    def fuse(self) -> "SparseLKConv":
        """Folds each BN (running statistics) into its branch weight and the summed BN shifts into ``self.bias``,
        then drops the BNs: forward becomes one ``lk_conv2d`` call with a bias. Masks are kept. Idempotent.
        Equal to the unfused module in eval mode (fp32: ~1e-6 relative)."""
        if self.fused:
            return self
        bias = None
        for b in self.branches():
            if not b.has_bn:
                continue
            w, bb = b.folded()
            b.conv.weight = nn.Parameter(w.detach().clone(), requires_grad=b.conv.weight.requires_grad)
            bias = bb.detach().clone() if bias is None else bias + bb
            del b.bn
        if bias is not None:
            self.bias = nn.Parameter(bias.to(self.LoRA1.conv.weight.dtype))
        self.fused = True
        return self

    def extra_repr(self) -> str:
        s = f"{self.channels}, kernel_size={self.kernel_size}, small_kernel={self.small_kernel}"
        if not self.LoRA1.conv.weight.is_meta:
            s += f", density={self.density():.3f}"
        return s + f", fused={self.fused}"

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> "LKConv2d":
        """The drop-in replacement of one depthwise ``nn.Conv2d``: an ``LKConv2d`` (same ``weight`` / ``bias``
        keys and values, output equal, running on ``lk_conv2d``). A dense K x K kernel has no exact
        tall + wide + small decomposition, so the result is not a three-branch ``SparseLKConv``; see
        ``LKConv2d.from_conv2d`` for the accepted convs."""
        return LKConv2d.from_conv2d(conv)


class ReparamLKConv(SparseLKConv):
    """RepLKNet's non-decomposed large-kernel module, as the official SLaK code builds it with ``Decom=False``:
    one K x K depthwise branch plus, when N < K, a small N x N branch, each conv + BatchNorm2d, outputs summed.

    ``y = BN1(conv_{K x K}(x)) + BN2(conv_{N x N}(x))`` (second term only when ``small_kernel`` is not None and
    N < K; ConvNeXt mode is K = 7 with no small branch, the official ``--kernel_size 7 7 7 7 100``).

    Args:
        channels: C.
        kernel_size: K, odd, at most ``MAX_KERNEL_SIZE`` (63).
        small_kernel: N, odd int, or None for no small branch (an N >= K also builds none, as the official code).
        bn: per-branch BatchNorm2d.

    Submodules (official keys): ``lkb_origin`` (K x K) and ``small_conv`` (N x N), ``ConvBN`` each. ``fuse()``
    merges them as the official ``merge_kernel`` does: BNs folded, the small kernel added to the centre of the large
    one, one ``lkb_reparam`` depthwise conv with bias (keys ``lkb_reparam.weight`` / ``.bias``); forward is then
    one ``lk_conv2d`` call on one K x K kernel. Masks (``lkb_origin.conv.weight_mask`` ...) carry over: the merged
    mask is the large kernel's mask with the small kernel's active taps added at the centre.

    Execution, shapes and dtypes as ``SparseLKConv``.
    """

    BRANCHES = ("lkb_origin", "small_conv")

    def __init__(self, channels: int, kernel_size: int = 31, small_kernel: Optional[int] = 5, *, bn: bool = True):
        nn.Module.__init__(self)
        _check_int("channels", channels, 1)
        _check_int("kernel_size", kernel_size, 1, MAX_KERNEL_SIZE, odd=True)
        if small_kernel is not None:
            _check_int("small_kernel", small_kernel, 1, odd=True)
        if not isinstance(bn, bool):
            raise TypeError(f"bn: expected a bool, got {type(bn).__name__} ({bn!r})")
        self.channels = channels
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.lkb_origin = ConvBN(channels, (kernel_size, kernel_size), bn)
        if small_kernel is not None and small_kernel < kernel_size:
            self.small_conv = ConvBN(channels, (small_kernel, small_kernel), bn)
        self.register_parameter("bias", None)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            conv = self.lkb_reparam
            bias = conv.bias.to(x.dtype) if conv.bias is not None else None
            return lk_conv2d(x, conv.weight.to(x.dtype), bias, mask=getattr(conv, MASK_NAME, None))
        return super().forward(x)

    def density(self) -> float:
        if self.fused:
            with torch.no_grad():
                conv = self.lkb_reparam
                return int(torch.count_nonzero(masked_weight(conv))) / conv.weight.numel()
        return super().density()

    @torch.no_grad()
    def fuse(self) -> "ReparamLKConv":
        """Merges the branches into ``lkb_reparam`` (BNs folded with their running statistics, the small kernel
        added to the centre). Equal to the unfused module in eval mode (fp32: ~1e-6 relative). Idempotent."""
        if self.fused:
            return self
        k = self.kernel_size
        big = self.lkb_origin
        w, b = big.folded()
        mask = big.mask.detach().clone() if big.mask is not None else None
        # masked taps become exact zeros: the small kernel's taps are added on top and the merged mask marks them
        w = (w * mask.to(w.dtype) if mask is not None else w).detach().clone()
        bias = b.detach().clone() if b is not None else None
        if "small_conv" in self._modules:
            small = self.small_conv
            ws, bs = small.folded()
            if small.mask is not None:
                ws = ws * small.mask.to(ws.dtype)
            p = (k - self.small_kernel) // 2
            w[:, :, p:p + self.small_kernel, p:p + self.small_kernel] += ws
            if bs is not None:
                bias = bs.detach().clone() if bias is None else bias + bs
            if mask is not None:
                sm = small.mask if small.mask is not None else torch.ones_like(ws)
                centre = mask[:, :, p:p + self.small_kernel, p:p + self.small_kernel]
                mask[:, :, p:p + self.small_kernel, p:p + self.small_kernel] = torch.maximum(centre, sm.to(mask.dtype))
            del self.small_conv
        conv = nn.Conv2d(self.channels, self.channels, (k, k), padding=(k // 2, k // 2), groups=self.channels,
                         bias=bias is not None, device=w.device, dtype=w.dtype)
        conv.weight.copy_(w)
        conv.weight.requires_grad_(big.conv.weight.requires_grad)
        if bias is not None:
            conv.bias.copy_(bias.to(w.dtype))
        conv.register_buffer(MASK_NAME, mask)
        del self.lkb_origin
        self.lkb_reparam = conv
        self.fused = True
        return self

    def extra_repr(self) -> str:
        w = self.lkb_reparam.weight if self.fused else self.lkb_origin.conv.weight
        s = f"{self.channels}, kernel_size={self.kernel_size}, small_kernel={self.small_kernel}"
        if not w.is_meta:
            s += f", density={self.density():.3f}"
        return s + f", fused={self.fused}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.fused:
            prepare_mask_for_load(self.lkb_reparam, state_dict, prefix + "lkb_reparam.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


# --------------------------------------------------------------------------------------------------------------
# drop-in depthwise conv
# --------------------------------------------------------------------------------------------------------------

class LKConv2d(nn.Conv2d):
    """Depthwise, stride-1, "same"-padded ``nn.Conv2d`` computed by ``lk_conv2d``.

    Args:
        channels: C (in = out = groups).
        kernel_size: an odd int or a pair (kh, kw) of odd ints, at most 63 (else TypeError / ValueError).
        bias: learnable per-channel bias.
        device, dtype: factory kwargs.

    State: ``weight`` [C, 1, kh, kw], ``bias`` [C] or None, buffer ``weight_mask`` (default None).
    Shapes: [N, C, H, W] -> [N, C, H, W] in x's memory format.
    """

    def __init__(self, channels: int, kernel_size, bias: bool = True, device=None, dtype=None):
        _check_int("channels", channels, 1)
        kh, kw = _check_kernel_pair("kernel_size", kernel_size)
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {type(bias).__name__} ({bias!r})")
        super().__init__(channels, channels, (kh, kw), stride=1, padding=(kh // 2, kw // 2), groups=channels,
                         bias=bias, device=device, dtype=dtype)
        self.register_buffer(MASK_NAME, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return lk_conv2d(x, self.weight.to(x.dtype), bias, mask=self.weight_mask)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        prepare_mask_for_load(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> "LKConv2d":
        """A copy of ``conv`` (weights, bias, mask, requires_grad, training mode, device, dtype) as an
        ``LKConv2d``. ``conv`` must pass ``is_convertible_depthwise(conv)`` (else ValueError with the reason).
        Only those are copied: hooks, parametrizations or a subclass's own ``forward`` are not carried over, and
        the mask, which ``nn.Conv2d`` ignores, is applied; ``convert_depthwise`` skips such convs."""
        why = _not_convertible_reason(conv)
        if why is not None:
            raise ValueError(f"conv: expected a depthwise, stride-1, 'same'-padded nn.Conv2d with odd kernel sizes "
                             f"<= {MAX_KERNEL_SIZE}, got {conv!r} ({why})")
        w = conv.weight
        new = cls(conv.in_channels, conv.kernel_size, bias=conv.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w)
            new.weight.requires_grad_(w.requires_grad)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
                new.bias.requires_grad_(conv.bias.requires_grad)
        mask = getattr(conv, MASK_NAME, None)
        if isinstance(mask, torch.Tensor):
            new.weight_mask = mask.detach().clone()
        new.train(conv.training)
        return new


def _not_convertible_reason(conv) -> Optional[str]:
    if not isinstance(conv, nn.Conv2d):
        return f"not an nn.Conv2d but {type(conv).__name__}"
    c = conv.in_channels
    if not (conv.groups == c == conv.out_channels):
        return f"groups={conv.groups}, in_channels={c}, out_channels={conv.out_channels} are not all equal"
    kh, kw = conv.kernel_size
    if kh % 2 == 0 or kw % 2 == 0 or max(kh, kw) > MAX_KERNEL_SIZE:
        return f"kernel_size={conv.kernel_size}"
    if tuple(conv.stride) != (1, 1):
        return f"stride={conv.stride}"
    if tuple(conv.dilation) != (1, 1):
        return f"dilation={conv.dilation}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if conv.padding != "same" and tuple(conv.padding) != (kh // 2, kw // 2):
        return f"padding={conv.padding} is not 'same' ({kh // 2}, {kw // 2})"
    if conv.weight.is_complex() or not conv.weight.is_floating_point():
        return f"dtype={conv.weight.dtype}"
    return None


def is_convertible_depthwise(conv: nn.Module, min_kernel_size: int = 1) -> bool:
    """True for an ``nn.Conv2d`` (not already an ``LKConv2d``) with groups == in == out channels, stride 1,
    dilation 1, zero "same" padding, odd kernel sizes <= 63 and ``max(kh, kw) >= min_kernel_size``."""
    _check_int("min_kernel_size", min_kernel_size, 1)
    if isinstance(conv, LKConv2d) or _not_convertible_reason(conv) is not None:
        return False
    return max(conv.kernel_size) >= min_kernel_size


def _inexact_reason(conv: nn.Conv2d) -> Optional[str]:
    """Why an ``LKConv2d`` in place of this (depthwise-shaped) ``conv`` would not compute what it computes, or
    None when the swap is exact: plain ``nn.Conv2d`` behaviour, its own parameters, no hooks, no extra state."""
    if parametrize.is_parametrized(conv):
        return "its weight is parametrized (torch.nn.utils.parametrize, e.g. weight_norm)"
    cls = type(conv)
    for attr in ("forward", "_conv_forward", "__call__"):
        if getattr(cls, attr) is not getattr(nn.Conv2d, attr):
            return f"its class {cls.__qualname__} overrides {attr}"
        if attr in vars(conv):
            return f"{attr} is replaced on the instance"
    kinds = (("forward", "_forward_hooks"), ("forward pre", "_forward_pre_hooks"), ("backward", "_backward_hooks"),
             ("backward pre", "_backward_pre_hooks"), ("state_dict", "_state_dict_hooks"),
             ("state_dict pre", "_state_dict_pre_hooks"), ("load_state_dict pre", "_load_state_dict_pre_hooks"),
             ("load_state_dict post", "_load_state_dict_post_hooks"))
    hooks = [kind for kind, attr in kinds if getattr(conv, attr, None)]
    if hooks:
        return f"it has {', '.join(hooks)} hooks (user hooks, spectral_norm, the old weight_norm ...)"
    if not isinstance(conv.weight, nn.Parameter) or not (conv.bias is None or isinstance(conv.bias, nn.Parameter)):
        return "its weight or bias is not an nn.Parameter"
    extra = (sorted(set(conv._parameters) - {"weight", "bias"}) + sorted(set(conv._buffers) - {MASK_NAME})
             + sorted(conv._modules))
    if extra:
        return f"it holds other state ({', '.join(extra)})"
    if getattr(conv, MASK_NAME, None) is not None:
        return (f"it has a {MASK_NAME}, which nn.Conv2d ignores and LKConv2d applies (convert before creating "
                f"DynamicSparsity)")
    return None


def _walk_depthwise(module: nn.Module, min_kernel_size: int, prefix: str, seen: set):
    """Yields (qualified name, parent or None, attribute name, conv, reason or None) for every conv that
    ``is_convertible_depthwise`` accepts, once per module object; does not enter ``SparseLKConv``."""
    for name, child in list(module.named_children()):
        if id(child) in seen:
            continue
        seen.add(id(child))
        qual = f"{prefix}.{name}" if prefix else name
        if is_convertible_depthwise(child, min_kernel_size):
            yield qual, module, name, child, _inexact_reason(child)
        elif not isinstance(child, SparseLKConv):
            yield from _walk_depthwise(child, min_kernel_size, qual, seen)


def convert_depthwise_plan(model: nn.Module, min_kernel_size: int = 7) -> Dict[str, Optional[str]]:
    """What ``convert_depthwise(model, min_kernel_size)`` would do, without changing anything: for every
    depthwise conv it considers (qualified name, ``""`` for ``model`` itself), None when it converts it, else the
    reason it leaves it alone (the swap would not compute the same)."""
    _check_int("min_kernel_size", min_kernel_size, 1)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if is_convertible_depthwise(model, min_kernel_size):
        return {"": _inexact_reason(model)}
    return {qual: why for qual, _, _, _, why in _walk_depthwise(model, min_kernel_size, "", set())}


def _moved_to_lkconv(conv: nn.Conv2d) -> "LKConv2d":
    """An ``LKConv2d`` that takes over ``conv``'s very ``weight`` / ``bias`` Parameter objects (no copy), so
    tied weights stay tied and an optimizer built before the conversion still trains the model."""
    new = LKConv2d(conv.in_channels, tuple(conv.kernel_size), bias=conv.bias is not None, device="meta",
                   dtype=conv.weight.dtype)
    new.weight = conv.weight
    if conv.bias is not None:
        new.bias = conv.bias
    new.train(conv.training)
    return new


def convert_depthwise(model: nn.Module, min_kernel_size: int = 7) -> nn.Module:
    """Replaces, in place, every depthwise ``nn.Conv2d`` of ``model`` that ``is_convertible_depthwise`` accepts
    by an ``LKConv2d`` holding the same ``weight`` / ``bias`` Parameter objects (outputs and gradients equal,
    state_dict keys unchanged, an existing optimizer keeps training them; a conv used at several places becomes
    one ``LKConv2d`` used at the same places). The branch convs of a ``SparseLKConv`` already run on
    ``lk_conv2d`` and are left alone.

    Exact only: a conv whose replacement would compute something else is left as it is -- a subclass with its own
    ``forward``, a conv with hooks, a parametrized (e.g. weight-normed) conv, one with a ``weight_mask`` or other
    extra state -- and a ``UserWarning`` names each with the reason (``convert_depthwise_plan`` returns the same
    information without converting). Returns ``model`` (or the replacement, holding the same Parameters, when
    ``model`` itself is such a conv)."""
    plan_only = convert_depthwise_plan(model, min_kernel_size)  # validates the arguments
    if "" in plan_only:
        if plan_only[""] is None:
            return _moved_to_lkconv(model)
        _warn_skipped(plan_only)
        return model
    skipped = {}
    replaced: Dict[int, LKConv2d] = {}
    for qual, parent, name, conv, why in _walk_depthwise(model, min_kernel_size, "", set()):
        if why is not None:
            skipped[qual] = why
            continue
        replaced[id(conv)] = _moved_to_lkconv(conv)
    if replaced:
        _replace_everywhere(model, replaced)
    if skipped:
        _warn_skipped(skipped)
    return model


def _replace_everywhere(module: nn.Module, replaced: Dict[int, "LKConv2d"]) -> None:
    """Puts the replacement of every occurrence of a converted conv (a shared conv has several parents)."""
    seen = set()
    stack = [module]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        for name, child in list(m._modules.items()):
            if child is not None and id(child) in replaced:
                m._modules[name] = replaced[id(child)]
            elif child is not None and not isinstance(child, SparseLKConv):
                stack.append(child)


def _warn_skipped(skipped: Dict[str, str]) -> None:
    items = "; ".join(f"{q or '(the model itself)'}: {why}" for q, why in skipped.items())
    warnings.warn(f"convert_depthwise: left {len(skipped)} depthwise conv(s) as nn.Conv2d, because an LKConv2d "
                  f"would not compute the same: {items}", UserWarning, stacklevel=3)
