"""The SLaK network (ConvNeXt macro design with ``SparseLKConv`` large-kernel modules), checkpoint-compatible with
the official code (arXiv 2207.03620), with timm's model API.

Composition (timm ``convnext.py`` style): ``Block`` (large-kernel module -> LayerNorm -> MLP -> layer scale ->
residual), ``SLaKStage`` (a ``nn.Sequential`` of blocks), ``SLaK`` (stem / downsample layers, four stages, head).
The module tree reproduces the official state_dict keys exactly: ``downsample_layers.{i}.{j}.*``,
``stages.{s}.{b}.{large_kernel,norm,pwconv1,pwconv2,gamma}``, ``norm.*``, ``head.*`` (``features_only``: ``norm{i}``
per output instead of ``norm`` / ``head``, as the official detection / segmentation backbone).

Large-kernel modules: ``decompose=True`` (SLaK: K x N + N x K + N x N, ``SparseLKConv``, keys ``LoRA1`` /
``LoRA2`` / ``small_conv``) or ``decompose=False`` (RepLKNet's module: K x K + N x N, ``ReparamLKConv``, keys
``lkb_origin`` / ``small_conv``, merged into ``lkb_reparam`` by ``fuse()``).

Variants (official width factor 1.3 applied as ``int(d * 1.3)``): ``slak_tiny`` (50,703,838 parameters with 1000
classes), ``slak_small`` (91,131,820), ``slak_base`` (157,950,792), ``slak_large``, ``slak_convnext_tiny``
(the official ConvNeXt-T comparator: 7 x 7 depthwise + BN, no small branch, width 1.0), and ``slak_test`` (tiny,
for tests). ``load_official_checkpoint`` loads an official training checkpoint (``.pth``) or a ``.safetensors``
file; ``count_parameters`` and ``count_macs`` give dense / sparse sizes and multiply-adds.

timm: the module functions (``slak_tiny(...)``) build a ``SLaK`` directly and need no timm. With timm installed,
importing this module registers entry points of the same names that build through timm's
``build_model_with_cfg`` (``pretrained_cfg`` per variant, ``features_only`` through timm's feature wrapper,
weights from ``pretrained_cfg_overlay=dict(file=PATH)``), so ``timm.create_model("slak_tiny")`` works.
"""

import contextlib
import math
import os
import pickle
import zipfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from slak_triton.nn import LKConv2d, ReparamLKConv, SparseLKConv, masked_weight, prepare_mask_for_load

try:
    import timm
    from timm.models import build_model_with_cfg as _timm_build_model_with_cfg
    from timm.models import generate_default_cfgs as _timm_generate_default_cfgs
    from timm.models import register_model as _timm_register_model
except ImportError:  # timm is an optional extra: pip install slak_triton[timm]
    timm = None
    _timm_build_model_with_cfg = None
    _timm_generate_default_cfgs = None
    _timm_register_model = None

try:  # optional: .safetensors checkpoints (timm depends on it)
    from safetensors.torch import load_file as _safetensors_load_file
except ImportError:
    _safetensors_load_file = None

__all__ = [
    "SLaK",
    "Block",
    "SLaKStage",
    "LayerNorm2d",
    "DropPath",
    "slak_tiny",
    "slak_small",
    "slak_base",
    "slak_large",
    "slak_convnext_tiny",
    "slak_test",
    "MODEL_ENTRYPOINTS",
    "TIMM_ENTRYPOINTS",
    "PRETRAINED_CFGS",
    "checkpoint_filter_fn",
    "load_official_checkpoint",
    "export_official_state_dict",
    "count_parameters",
    "count_macs",
    "register_timm_models",
]

#: Official stage configurations: (depths, base dims before the width factor).
_VARIANTS = {
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}
OFFICIAL_KERNEL_SIZES = (51, 49, 47, 13)
OFFICIAL_WIDTH_FACTOR = 1.3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GLOBAL_POOLS = ("avg", "max", "")
NUM_STAGES = 4


# --------------------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_real(name: str, value, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number in the interval (bounds may be +-inf); ValueError naming ``name`` otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name}: expected a finite number in {interval}, got {value!r}")
    return float(value)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} ({value!r})")
    return value


def _seq4(name: str, value, allow_scalar: bool = False) -> Tuple[int, ...]:
    if allow_scalar and _is_int(value):
        return (value,) * NUM_STAGES
    if not isinstance(value, (list, tuple)) or len(value) != NUM_STAGES:
        raise ValueError(f"{name}: expected a sequence of {NUM_STAGES} ints (one per stage), got {value!r}")
    for v in value:
        if not _is_int(v):
            raise TypeError(f"{name}: expected int entries, got {type(v).__name__} in {value!r}")
    return tuple(value)


def _take_indices(num: int, indices, name: str = "indices") -> Tuple[List[int], int]:
    """timm's index semantics over ``num`` stages: None -> all, int n -> the last n, a sequence -> those stages
    (negative counts from the end). Returns (sorted distinct absolute indices, the largest): outputs always come in
    stage order, whatever the order asked for."""
    if indices is None:
        indices = num
    if _is_int(indices):
        if not 0 < indices <= num:
            raise ValueError(f"{name}: expected the number of last stages to take, 1..{num}, got {indices}")
        take = list(range(num - indices, num))
    else:
        if not isinstance(indices, (list, tuple)) or not indices:
            raise ValueError(f"{name}: expected None, an int or a non-empty sequence of stage indices, "
                             f"got {indices!r}")
        take = []
        for i in indices:
            if not _is_int(i) or not -num <= i < num:
                raise ValueError(f"{name}: expected stage indices in {-num}..{num - 1}, got {indices!r}")
            take.append(i + num if i < 0 else i)
        if len(set(take)) != len(take):
            raise ValueError(f"{name}: expected distinct stages, got {indices!r} (stages {take})")
        take = sorted(take)
    return take, take[-1]


# --------------------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first tensor: [N, C, H, W] -> [N, C, H, W] (keys weight, bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth per sample: in training, zeroes a sample's residual branch with probability ``drop_prob``
    and scales the kept ones by 1 / (1 - drop_prob). Identity in eval or at 0."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = _check_real("drop_prob", drop_prob, 0.0, 1.0, hi_open=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def _layer_scale(value) -> Optional[float]:
    """None or a finite number (<= 0: no layer scale, as the official code); NaN / inf / non-numbers raise."""
    if value is None:
        return None
    return _check_real("layer_scale_init_value", value, -math.inf, math.inf)


class Block(nn.Module):
    """SLaK block: ``x + DropPath(gamma * pwconv2(GELU(pwconv1(LN(LK(x))))))`` with LN / Linear channels-last.

    Args:
        dim: channels C.
        kernel_size, small_kernel, bn: of the large-kernel module (``large_kernel``).
        drop_path: stochastic depth rate.
        layer_scale_init_value: initial ``gamma`` (None / <= 0: no layer scale, no ``gamma`` key; must be finite).
        decompose: ``SparseLKConv`` (K x N + N x K + N x N) when True, ``ReparamLKConv`` (K x K + N x N) when False.

    Shapes: [N, C, H, W] -> [N, C, H, W].
    """

    def __init__(self, dim: int, kernel_size: int, small_kernel: Optional[int], drop_path: float = 0.0,
                 layer_scale_init_value: Optional[float] = 1e-6, bn: bool = True, decompose: bool = True):
        super().__init__()
        ls = _layer_scale(layer_scale_init_value)
        if _check_bool("decompose", decompose):
            if small_kernel is None:
                raise ValueError("small_kernel: expected an odd int (the N of the K x N / N x K branches) with "
                                 "decompose=True, got None")
            self.large_kernel = SparseLKConv(dim, kernel_size, small_kernel, bn=bn)
        else:
            self.large_kernel = ReparamLKConv(dim, kernel_size, small_kernel, bn=bn)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        if ls is not None and ls > 0:
            self.gamma = nn.Parameter(ls * torch.ones(dim))
        else:
            self.register_parameter("gamma", None)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.large_kernel(x)
        x = x.permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


class _KeepBatchNormStats:
    """Context for the recomputation of a checkpointed block: restores the running statistics of its training-mode
    BatchNorms on exit, so that activation checkpointing updates them once per step, not twice."""

    def __init__(self, module: nn.Module):
        self.bns = [m for m in module.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
        self.saved = []

    def __enter__(self):
        self.saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                      for m in self.bns]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for m, (mean, var, n) in zip(self.bns, self.saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(n)
        return False


def _checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return checkpoint(block, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _KeepBatchNormStats(block)))


class SLaKStage(nn.Sequential):
    """The blocks of one stage (keys ``stages.{s}.{b}.*``). The stage's downsampling layer lives in
    ``SLaK.downsample_layers`` to keep the official key layout. Shapes: [N, C, H, W] -> same.

    ``grad_checkpointing = True`` (``SLaK.set_grad_checkpointing``) recomputes each block in the backward pass
    instead of keeping its activations (non-reentrant ``torch.utils.checkpoint``; works with ``lk_conv2d``; the
    drop-path draw is replayed and BatchNorm running statistics are updated once)."""

    def __init__(self, dim: int, depth: int, kernel_size: int, small_kernel: Optional[int],
                 drop_path_rates: Sequence[float], layer_scale_init_value: Optional[float], bn: bool,
                 decompose: bool = True):
        super().__init__(*[
            Block(dim, kernel_size, small_kernel, drop_path_rates[i], layer_scale_init_value, bn, decompose)
            for i in range(depth)
        ])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self:
                x = _checkpointed(block, x)
            return x
        return super().forward(x)


# --------------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------------

class SLaK(nn.Module):
    """SLaK: ConvNeXt with sparse decomposed large kernels (official architecture and init), timm's model API.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs (0: no head, ``forward`` returns pooled features).
        depths: blocks per stage (4 ints).
        dims: channels per stage (4 ints, the actual counts, i.e. width factor already applied).
        kernel_size: large kernel K per stage (4 odd ints, or one int for all stages).
        small_kernel: N of every large-kernel module (None: no small branch, ``decompose=False`` only).
        drop_path_rate: stochastic depth, linear from 0 to this over all blocks.
        drop_rate: dropout before the classifier (timm's ``drop_rate``).
        layer_scale_init_value: initial layer scale ``gamma`` (None or <= 0: none; must be finite).
        head_init_scale: multiplies the initial head weight and bias.
        global_pool: "avg" (official), "max", or "" (no pooling: norm and head per position, [N, classes, h, w]).
        bn: per-branch BatchNorm in the large-kernel modules.
        decompose: SLaK's K x N + N x K + N x N module (True) or RepLKNet's K x K + N x N module (False).
        features_only: backbone mode: ``forward`` returns a list of feature maps at ``out_indices``, each through
            its own channels-first LayerNorm ``norm{i}``; no final ``norm`` / ``head``.
        out_indices: stages to return with ``features_only`` (timm's semantics: negative counts from the end, an
            int n means the last n); outputs and ``feature_info`` are in stage order.
        device, dtype: where and in which dtype to create the parameters (timm passes them).

    Shapes: x [N, in_chans, H, W] with H, W >= ``min_input_size`` (32 for four stages; multiples of 32 keep every
    pixel) -> logits [N, num_classes]; ``features_only``: list of [N, dims[i], H / 2**(i+2), W / 2**(i+2)].
    """

    def __init__(self, *, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int], dims: Sequence[int],
                 kernel_size: Union[int, Sequence[int]] = OFFICIAL_KERNEL_SIZES, small_kernel: Optional[int] = 5,
                 drop_path_rate: float = 0.0, drop_rate: float = 0.0, layer_scale_init_value: Optional[float] = 1e-6,
                 head_init_scale: float = 1.0, global_pool: str = "avg", bn: bool = True, decompose: bool = True,
                 features_only: bool = False, out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
                 device=None, dtype=None):
        super().__init__()
        depths = _seq4("depths", depths)
        dims = _seq4("dims", dims)
        kernel_size = _seq4("kernel_size", kernel_size, allow_scalar=True)
        if any(d < 0 for d in depths):
            raise ValueError(f"depths: expected non-negative ints, got {depths}")
        if any(d < 1 for d in dims):
            raise ValueError(f"dims: expected positive ints, got {dims}")
        if any(k < 1 or k % 2 == 0 for k in kernel_size):
            raise ValueError(f"kernel_size: expected odd positive ints, got {kernel_size}")
        if small_kernel is not None and (not _is_int(small_kernel) or small_kernel < 1 or small_kernel % 2 == 0):
            raise ValueError(f"small_kernel: expected an odd positive int or None, got {small_kernel!r}")
        if not _is_int(in_chans) or in_chans < 1:
            raise ValueError(f"in_chans: expected a positive int, got {in_chans!r}")
        if not _is_int(num_classes) or num_classes < 0:
            raise ValueError(f"num_classes: expected an int >= 0, got {num_classes!r}")
        _check_real("drop_path_rate", drop_path_rate, 0.0, 1.0, hi_open=True)
        self.drop_rate = _check_real("drop_rate", drop_rate, 0.0, 1.0, hi_open=True)
        _layer_scale(layer_scale_init_value)
        head_init_scale = _check_real("head_init_scale", head_init_scale, -math.inf, math.inf)
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool: expected one of {GLOBAL_POOLS}, got {global_pool!r}")
        _check_bool("bn", bn)
        _check_bool("decompose", decompose)
        _check_bool("features_only", features_only)
        take, _ = _take_indices(NUM_STAGES, out_indices if not isinstance(out_indices, list) else tuple(out_indices),
                                "out_indices")
        factory = torch.device(device) if device is not None else contextlib.nullcontext()
        with factory:
            self._build(in_chans, num_classes, depths, dims, kernel_size, small_kernel, float(drop_path_rate),
                        layer_scale_init_value, head_init_scale, global_pool, bn, decompose, features_only,
                        tuple(take))
        if dtype is not None:
            self.to(dtype=dtype)

    def _build(self, in_chans, num_classes, depths, dims, kernel_size, small_kernel, drop_path_rate,
               layer_scale_init_value, head_init_scale, global_pool, bn, decompose, features_only, out_indices):
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.dims = dims
        self.depths = depths
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.decompose = decompose
        self.global_pool = global_pool
        self.features_only = features_only
        self.out_indices = out_indices
        self.num_features = self.head_hidden_size = dims[-1]

        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6)))
        for i in range(1, NUM_STAGES):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2)))

        total = sum(depths)
        rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.stages = nn.ModuleList()
        start = 0
        for i in range(NUM_STAGES):
            self.stages.append(SLaKStage(dims[i], depths[i], kernel_size[i], small_kernel,
                                         rates[start:start + depths[i]], layer_scale_init_value, bn, decompose))
            start += depths[i]

        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stages.{i}")
                             for i in range(NUM_STAGES)]
        if self.features_only:
            self.feature_info = [self.feature_info[i] for i in out_indices]
            for i in out_indices:
                self.add_module(f"norm{i}", LayerNorm2d(dims[i], eps=1e-6))
        else:
            self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
            self.head_drop = nn.Dropout(self.drop_rate)
            self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        if not self.features_only and num_classes > 0:
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def min_input_size(self) -> int:
        """Smallest H and W the network accepts: the stem divides by 4, each further stage by 2."""
        return 4 * 2 ** (len(self.stages) - 1)

    def _check_input(self, x: torch.Tensor, num_stages: int) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x: expected a 4-D tensor [N, {self.in_chans}, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"x: expected {self.in_chans} channels ([N, {self.in_chans}, H, W]), got shape "
                             f"{tuple(x.shape)}")
        m = 4 * 2 ** (num_stages - 1)
        if x.shape[-2] < m or x.shape[-1] < m:
            raise ValueError(f"x: expected an input of at least {m} x {m} pixels (the stem divides by 4 and each "
                             f"of the {num_stages - 1} further stages by 2), got {x.shape[-2]} x {x.shape[-1]}")

    # -- timm-style API --------------------------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        if self.features_only:
            raise ValueError("get_classifier: a features_only model has no head")
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replaces the head by a freshly initialised ``Linear(num_features, num_classes)`` (0: Identity);
        ``global_pool`` ("avg", "max", "") replaces the pooling when given."""
        if self.features_only:
            raise ValueError("reset_classifier: a features_only model has no head")
        if not _is_int(num_classes) or num_classes < 0:
            raise ValueError(f"num_classes: expected an int >= 0, got {num_classes!r}")
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool: expected one of {GLOBAL_POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        p = next(self.parameters())
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=p.device, dtype=p.dtype)
            self._init_weights(self.head)
        else:
            self.head = nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block in every stage (see ``SLaKStage``)."""
        _check_bool("enable", enable)
        for s in self.stages:
            s.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups in depth order for timm's layer-wise learning-rate decay: the stem, then per stage its
        downsampling layer with the first block and each further block (coarse: one group per stage), then the
        final norm; the head comes last."""
        return dict(
            stem=r"^downsample_layers\.0\.",
            blocks=r"^(?:downsample_layers|stages)\.(\d+)" if coarse else [
                (r"^downsample_layers\.(\d+)\.", (0,)),
                (r"^stages\.(\d+)\.(\d+)\.", None),
                (r"^norm(\d+)\.", (99999,)),
                (r"^norm\.", (99999,)),
            ],
        )

    def no_weight_decay(self) -> set:
        """Names of the parameters that take no weight decay: every 1-D parameter (biases, LayerNorm and
        BatchNorm affine parameters, layer scales ``gamma``)."""
        return {n for n, p in self.named_parameters() if p.dim() <= 1}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in_chans, H, W] -> last stage map [N, dims[-1], H/32, W/32] (no final norm)."""
        self._check_input(x, len(self.stages))
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """[N, C, h, w] -> global pool -> LayerNorm -> dropout -> [N, C] (pre_logits) -> head [N, num_classes].
        With ``global_pool=""`` the norm and head act per position: [N, C or num_classes, h, w]."""
        if self.features_only:
            raise ValueError("forward_head: a features_only model has no head")
        if self.global_pool == "":
            x = self.head_drop(self.norm(x.permute(0, 2, 3, 1)))
            return (x if pre_logits else self.head(x)).permute(0, 3, 1, 2)
        x = x.mean(dim=(-2, -1)) if self.global_pool == "avg" else x.amax(dim=(-2, -1))
        x = self.head_drop(self.norm(x))
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Union[None, int, Sequence[int]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's intermediate-features API.

        Args:
            indices: stages to return (None: all, or ``out_indices`` with ``features_only``; int n: the last n;
                negative indices count from the end). Outputs come in stage order.
            norm: accepted for timm; SLaK has no norm that applies to stage maps (the final LayerNorm acts on the
                pooled vector), so it changes nothing. A ``features_only`` backbone always applies its ``norm{i}``.
            stop_early: stop after the last stage asked for (always so with ``intermediates_only``).
            output_fmt: "NCHW" only.
            intermediates_only: return only the list.

        Returns: the list of [N, dims[i], H / 2**(i+2), W / 2**(i+2)] maps, or (last stage map, that list).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt: expected 'NCHW', got {output_fmt!r}")
        _check_bool("norm", norm)
        if indices is None and self.features_only:
            indices = self.out_indices
        take, last = _take_indices(len(self.stages), tuple(indices) if isinstance(indices, list) else indices)
        early = stop_early or intermediates_only
        self._check_input(x, last + 1 if early else len(self.stages))
        outs = []
        for i, (down, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            x = stage(down(x))
            if i in take:
                n = getattr(self, f"norm{i}", None) if self.features_only else None
                outs.append(n(x) if n is not None else x)
            if early and i == last:
                break
        return outs if intermediates_only else (x, outs)

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drops the stages after the last one in ``indices`` (timm's feature extraction calls this). The head
        becomes Identity with no pooling when ``prune_head`` or when stages were dropped; the final norm goes with
        ``prune_norm`` or dropped stages. Returns the kept indices, absolute and in stage order (the order of
        ``forward_intermediates``' outputs)."""
        take, last = _take_indices(len(self.stages), tuple(indices) if isinstance(indices, list) else indices)
        prune_end = last < len(self.stages) - 1
        self.stages = self.stages[:last + 1]
        self.downsample_layers = self.downsample_layers[:last + 1]
        self.feature_info = [f for f in self.feature_info if int(f["module"].split(".")[1]) <= last]
        self.num_features = self.head_hidden_size = self.dims[last]
        if self.features_only:
            for i in range(last + 1, NUM_STAGES):
                if hasattr(self, f"norm{i}"):
                    delattr(self, f"norm{i}")
            self.out_indices = tuple(i for i in self.out_indices if i <= last)
            return take
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, intermediates_only=True)
        return self.forward_head(self.forward_features(x))

    # -- re-parameterisation and loading ---------------------------------------------------------------------
    def fuse(self) -> "SLaK":
        """Folds every large-kernel module's BNs into its weights (``SparseLKConv.fuse``; ``ReparamLKConv.fuse``
        also merges the small kernel into the large one); for inference. Load checkpoints before fusing (fused
        modules have other keys). Returns self."""
        for m in self.modules():
            if isinstance(m, SparseLKConv):
                m.fuse()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Masks the sparse trainer registered on stem / downsample / Linear weights: derive them from the
        # checkpoint's zeros like the branch masks, so strict loading of mask-free checkpoints works.
        for name, m in self.named_modules():
            if m is not self and "weight_mask" in m._buffers:
                prepare_mask_for_load(m, state_dict, prefix + name + ".")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


# --------------------------------------------------------------------------------------------------------------
# variants
# --------------------------------------------------------------------------------------------------------------

#: Keyword arguments timm passes to entry points that mean nothing to the module path.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _arch(name: str, width_factor: Optional[float]) -> Dict[str, Any]:
    """The ``SLaK`` keyword arguments of a named variant."""
    if name == "slak_test":
        if width_factor is not None:
            raise ValueError("width_factor: slak_test has fixed dims (8, 16, 16, 16)")
        return dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), kernel_size=(13, 11, 9, 7), small_kernel=5,
                    num_classes=10)
    if name == "slak_convnext_tiny":
        wf = 1.0 if width_factor is None else _check_real("width_factor", width_factor, 0.0, math.inf,
                                                           lo_open=True)
        depths, base = _VARIANTS["tiny"]
        return dict(depths=depths, dims=tuple(int(d * wf) for d in base), kernel_size=7, small_kernel=None,
                    decompose=False)
    wf = OFFICIAL_WIDTH_FACTOR if width_factor is None else _check_real("width_factor", width_factor, 0.0,
                                                                        math.inf, lo_open=True)
    depths, base = _VARIANTS[name[len("slak_"):]]
    return dict(depths=depths, dims=tuple(int(d * wf) for d in base), kernel_size=OFFICIAL_KERNEL_SIZES,
                small_kernel=5)


def _create(name: str, pretrained: bool, width_factor: Optional[float], kwargs: Dict[str, Any]) -> SLaK:
    """The module path: a ``SLaK`` built directly (no timm needed)."""
    if pretrained:
        raise ValueError("pretrained: no hosted weights; build with pretrained=False and call "
                         "slak_triton.models.load_official_checkpoint(model, path) (or, through timm, "
                         "timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path)))")
    for k in _TIMM_ONLY_KWARGS:
        kwargs.pop(k, None)
    cfg = _arch(name, width_factor)
    cfg.update(kwargs)
    return SLaK(**cfg)


def slak_tiny(pretrained: bool = False, *, width_factor: Optional[float] = None, **kwargs) -> SLaK:
    """SLaK-T: depths (3, 3, 9, 3), dims (124, 249, 499, 998), kernels (51, 49, 47, 13), N = 5.
    Keyword arguments override ``SLaK``'s (e.g. ``num_classes``, ``drop_path_rate=0.1`` as trained)."""
    return _create("slak_tiny", pretrained, width_factor, kwargs)


def slak_small(pretrained: bool = False, *, width_factor: Optional[float] = None, **kwargs) -> SLaK:
    """SLaK-S: depths (3, 3, 27, 3), dims (124, 249, 499, 998) (trained with drop_path_rate=0.4)."""
    return _create("slak_small", pretrained, width_factor, kwargs)


def slak_base(pretrained: bool = False, *, width_factor: Optional[float] = None, **kwargs) -> SLaK:
    """SLaK-B: depths (3, 3, 27, 3), dims (166, 332, 665, 1331) (trained with drop_path_rate=0.5)."""
    return _create("slak_base", pretrained, width_factor, kwargs)


def slak_large(pretrained: bool = False, *, width_factor: Optional[float] = None, **kwargs) -> SLaK:
    """SLaK-L: depths (3, 3, 27, 3), base dims (192, 384, 768, 1536) times the width factor (not released)."""
    return _create("slak_large", pretrained, width_factor, kwargs)


def slak_convnext_tiny(pretrained: bool = False, *, width_factor: Optional[float] = None, **kwargs) -> SLaK:
    """ConvNeXt-T as the official SLaK code runs it (``--kernel_size 7 7 7 7 100``, ``Decom=False``): depths
    (3, 3, 9, 3), dims (96, 192, 384, 768), one 7 x 7 depthwise conv + BN per block (``lkb_origin``), no small
    branch; the SLaK key layout (not timm's ``convnext_tiny``)."""
    return _create("slak_convnext_tiny", pretrained, width_factor, kwargs)


def slak_test(pretrained: bool = False, **kwargs) -> SLaK:
    """A tiny SLaK for tests: depths (1, 1, 1, 1), dims (8, 16, 16, 16), kernels (13, 11, 9, 7), N = 5,
    10 classes. Inputs of 32 x 32 give stage maps of 8, 4, 2, 1 pixels."""
    return _create("slak_test", pretrained, None, kwargs)


MODEL_ENTRYPOINTS: Dict[str, Callable[..., SLaK]] = {
    f.__name__: f for f in (slak_tiny, slak_small, slak_base, slak_large, slak_convnext_tiny, slak_test)
}


def _pretrained_cfg(**overrides) -> Dict[str, Any]:
    cfg = dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=224 / 256,
               interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="downsample_layers.0.0",
               classifier="head", license="mit", paper_ids="arXiv:2207.03620",
               notes=("no hosted weights: timm.create_model(name, pretrained=True, "
                      "pretrained_cfg_overlay=dict(file=PATH)) loads an official checkpoint",))
    cfg.update(overrides)
    return cfg


#: timm ``pretrained_cfg`` per variant (the official ImageNet-1K evaluation: 224 px, crop 224/256, bicubic).
PRETRAINED_CFGS: Dict[str, Dict[str, Any]] = {name: _pretrained_cfg() for name in MODEL_ENTRYPOINTS}
PRETRAINED_CFGS["slak_test"] = _pretrained_cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(1, 1),
                                               crop_pct=1.0)

# timm's register_model looks up ``default_cfgs`` in the entry point's module
default_cfgs = _timm_generate_default_cfgs(dict(PRETRAINED_CFGS)) if _timm_generate_default_cfgs is not None else {}


def _weights_source(kwargs: Mapping[str, Any]) -> bool:
    for key in ("pretrained_cfg_overlay", "pretrained_cfg"):
        cfg = kwargs.get(key)
        if isinstance(cfg, Mapping) and any(cfg.get(k) for k in ("file", "url", "hf_hub_id", "state_dict")):
            return True
        if cfg is not None and not isinstance(cfg, (Mapping, str)) and any(
                getattr(cfg, k, None) for k in ("file", "url", "hf_hub_id", "state_dict")):
            return True
    return False


def _create_timm(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """The timm path: timm's ``build_model_with_cfg`` (pretrained_cfg, features_only wrapper, weight loading with
    ``checkpoint_filter_fn``). Keyword arguments timm adds to entry points are handled by its own builder."""
    if _timm_build_model_with_cfg is None:
        return MODEL_ENTRYPOINTS[name](pretrained, **kwargs)
    if pretrained and not _weights_source(kwargs):
        raise ValueError(f"pretrained: {name} has no hosted weights; pass pretrained_cfg_overlay=dict(file=PATH) "
                         f"with an official checkpoint (.pth or .safetensors), or build with pretrained=False")
    cfg = _arch(name, kwargs.pop("width_factor", None))
    cfg.update(kwargs)
    return _timm_build_model_with_cfg(SLaK, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                      feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **cfg)


def _timm_entry(name: str) -> Callable[..., nn.Module]:
    def entry(pretrained: bool = False, **kwargs) -> nn.Module:
        return _create_timm(name, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"timm entry point of ``{name}`` (``timm.create_model({name!r}, ...)``)."
    return entry


#: The functions registered with timm (same names as MODEL_ENTRYPOINTS; they build through timm's builder).
TIMM_ENTRYPOINTS: Dict[str, Callable[..., nn.Module]] = {name: _timm_entry(name) for name in MODEL_ENTRYPOINTS}


def register_timm_models(register: Optional[Callable] = None) -> List[str]:
    """Registers the timm entry points (``timm.create_model("slak_tiny")``). ``register`` defaults to
    ``timm.models.register_model``; returns the registered names (empty when timm is not installed). Runs at import
    when timm is importable; names timm already knows from elsewhere are skipped."""
    register = register if register is not None else _timm_register_model
    if register is None:
        return []
    known = set()
    if timm is not None and register is _timm_register_model:
        known = {n for n in timm.list_models() if n not in TIMM_ENTRYPOINTS
                 or getattr(timm.models.model_entrypoint(n), "__module__", None) != __name__}
    names = []
    for name, fn in TIMM_ENTRYPOINTS.items():
        if name in known:
            continue
        register(fn)
        names.append(name)
    return names


if timm is not None:
    register_timm_models()


# --------------------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("model", "model_ema", "state_dict", "module")


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: Optional[nn.Module] = None, *,
                         use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Official SLaK checkpoint -> this model's state_dict.

    Unwraps training checkpoints (``{'model': ..., 'model_ema': ..., 'optimizer': ...}``; ``use_ema`` picks
    ``model_ema``), strips ``module.`` (DistributedDataParallel) prefixes, and, when ``model`` is a
    ``features_only`` backbone, drops the classifier's ``norm.*`` / ``head.*`` keys and a ``backbone.`` prefix.
    Keys are otherwise unchanged: the official names are this model's names.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping, got {type(state_dict).__name__}")
    sd = state_dict
    if use_ema:
        if "model_ema" not in sd:
            raise ValueError(f"use_ema: the checkpoint has no 'model_ema' entry (top-level keys: {sorted(sd)[:10]})")
        sd = sd["model_ema"]
    else:
        for key in _WRAPPER_KEYS:
            if key in sd and isinstance(sd[key], Mapping):
                sd = sd[key]
                break
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    if isinstance(model, SLaK) and model.features_only:
        out = {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in out.items()}
        out = {k: v for k, v in out.items() if not (k.startswith("norm.") or k.startswith("head."))}
    return out


_ZIP_MAGIC = b"PK\x03\x04"


def _checkpoint_file_problem(path: str) -> Optional[str]:
    """What visibly is wrong with a checkpoint file before ``torch.load`` reads it, or None."""
    if not os.path.exists(path):
        return "no such file"
    if os.path.isdir(path):
        return "it is a directory, not a file"
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC:  # torch.save's format: a zip archive with <name>/data.pkl inside
        if not zipfile.is_zipfile(path):
            return (f"the file is truncated or damaged ({size:,} bytes; a zip archive, torch.save's format, without "
                    f"its end record: an interrupted save, copy or download?)")
        with zipfile.ZipFile(path) as z:
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist()):
                return "it is a zip archive but not a torch.save checkpoint (no data.pkl inside)"
        return None
    if head[:1] == b"\x80":  # a pickle: torch.save's legacy format
        return None
    return f"it is not a PyTorch checkpoint (torch.save writes a zip archive; this file starts with {head!r})"


def _read_checkpoint(path: Union[str, os.PathLike], *, what: str, map_location="cpu", weights_only: bool = True):
    """``torch.load(path)`` with errors that name ``what`` (the argument or flag), the file and what is wrong:
    FileNotFoundError / IsADirectoryError, ValueError for a file that is not a readable checkpoint (empty,
    truncated, another format), RuntimeError (with the ``weights_only=False`` hint) only when ``weights_only``
    loading refused an object in an otherwise readable file. Also used by ``slak-train --resume``."""
    path = os.fspath(path)
    problem = _checkpoint_file_problem(path)
    if problem == "no such file":
        raise FileNotFoundError(f"{what}: no such file: {path!r}")
    if problem is not None and problem.startswith("it is a directory"):
        raise IsADirectoryError(f"{what}: expected a checkpoint file, got the directory {path!r}")
    if problem is not None:
        raise ValueError(f"{what}: cannot load {path!r}: {problem}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if weights_only and "weights only" in str(e).lower():
            first = str(e).strip().splitlines()
            detail = next((ln.strip() for ln in first if "unsupported" in ln.lower()), first[0] if first else "")
            raise RuntimeError(f"{what}: torch.load({path!r}, weights_only=True) refused an object in the file "
                               f"({detail}); if you trust the file, pass weights_only=False") from e
        raise ValueError(f"{what}: cannot load {path!r}: damaged or not a PyTorch checkpoint "
                         f"({type(e).__name__}: {e})") from e
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, IndexError) as e:
        raise ValueError(f"{what}: cannot load {path!r}: damaged or not a PyTorch checkpoint "
                         f"({type(e).__name__}: {e})") from e


def load_official_checkpoint(model: nn.Module, path_or_dict: Union[str, os.PathLike, Mapping[str, Any]], *,
                             use_ema: bool = False, strict: bool = True, map_location="cpu",
                             weights_only: bool = True):
    """Loads an official SLaK checkpoint (a ``.pth`` / ``.safetensors`` file path or an already-loaded dict) into
    ``model``.

    ``weights_only=False`` is needed for official training checkpoints that pickle an argparse Namespace (only
    for files you trust). Masks are derived from the checkpoint's zeros. With ``strict`` a mismatch raises a
    RuntimeError that lists the missing and unexpected keys (a ``features_only`` backbone's new ``norm{i}`` layers
    are not an error); returns torch's ``(missing_keys, unexpected_keys)``. Load before ``fuse()``.

    Errors name the file and what is wrong with it: FileNotFoundError, IsADirectoryError, ValueError for an
    empty, truncated or foreign file, for a file that holds no tensors, or when none of the checkpoint's keys is a
    key of ``model`` (even with ``strict=False``: loading nothing is never what was meant); RuntimeError with the
    ``weights_only=False`` hint only when ``weights_only`` loading refused an object of a readable file; ValueError
    when tensors have other shapes than the model's (another variant or ``num_classes``). On any of these errors
    the model is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    source = None
    if isinstance(path_or_dict, (str, os.PathLike)) and os.fspath(path_or_dict).endswith(".safetensors"):
        source = os.fspath(path_or_dict)
        if _safetensors_load_file is None:
            raise RuntimeError("path_or_dict: a .safetensors file needs the safetensors package "
                               "(pip install safetensors)")
        if not os.path.isfile(source):
            raise FileNotFoundError(f"path_or_dict: no such file: {source!r}")
        device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
        try:
            ckpt = _safetensors_load_file(source, device=str(device))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"path_or_dict: cannot load {source!r}: damaged or not a safetensors file "
                             f"({type(e).__name__}: {e})") from e
    elif isinstance(path_or_dict, (str, os.PathLike)):
        source = os.fspath(path_or_dict)
        ckpt = _read_checkpoint(source, what="path_or_dict", map_location=map_location, weights_only=weights_only)
        if not isinstance(ckpt, Mapping):
            raise ValueError(f"path_or_dict: expected {source!r} to hold a state dict or a training checkpoint "
                             f"(a mapping), got a {type(ckpt).__name__}")
    elif isinstance(path_or_dict, Mapping):
        ckpt = path_or_dict
    else:
        raise TypeError(f"path_or_dict: expected a path or a mapping, got {type(path_or_dict).__name__}")
    sd = checkpoint_filter_fn(ckpt, model, use_ema=use_ema)
    where = f"{source!r}" if source is not None else "the checkpoint"
    if not sd:
        raise ValueError(f"path_or_dict: {where} holds no tensors to load (top-level keys: "
                         f"{sorted(map(str, ckpt))[:10]})")
    own = model.state_dict()
    if not set(own).intersection(sd):
        raise ValueError(f"path_or_dict: none of the {len(sd)} tensors of {where} is a key of the model "
                         f"(checkpoint keys such as {sorted(sd)[:3]}, model keys such as {sorted(own)[:3]}): "
                         f"a checkpoint of another network?")
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in sd.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:  # checked before loading: torch would copy every other tensor first and leave a half-loaded model
        raise ValueError(f"path_or_dict: {len(wrong)} tensor(s) of {where} have another shape than the model's "
                         f"(another variant, width or num_classes?): {', '.join(wrong[:5])}"
                         f"{' ...' if len(wrong) > 5 else ''}")
    sd = checkpoint_filter_fn(ckpt, model, use_ema=use_ema)
    result = model.load_state_dict(sd, strict=False)
    missing = result.missing_keys
    if isinstance(model, SLaK) and model.features_only:
        # the per-output norms of a backbone are new layers: ImageNet checkpoints cannot have them
        new = tuple(f"norm{i}." for i in model.out_indices)
        missing = [k for k in missing if not k.startswith(new)]
    if strict and (missing or result.unexpected_keys):
        def show(keys):
            return ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "") or "none"
        raise RuntimeError(
            f"load_official_checkpoint: the checkpoint does not match the model.\n"
            f"  missing keys ({len(missing)}): {show(missing)}\n"
            f"  unexpected keys ({len(result.unexpected_keys)}): {show(result.unexpected_keys)}\n"
            f"  (fused models cannot load unfused checkpoints: load first, then fuse())")
    return result


def export_official_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model``'s weights in the official checkpoint layout: every ``weight_mask`` applied (the official code
    stores sparsity as zeros) and no ``weight_mask`` keys, so the official model definition loads the result with
    ``strict=True``. Tensors are detached CPU copies. A DDP / ``torch.compile`` wrapper is unwrapped.

    Unfused models, and ``ReparamLKConv`` merged by ``fuse()`` (the official ``lkb_reparam`` keys), export; a fused
    ``SparseLKConv`` (folded branches with a summed ``bias``: no official equivalent) raises ValueError."""
    while True:  # unwrap DistributedDataParallel / DataParallel / torch.compile
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, SparseLKConv) and not isinstance(m, ReparamLKConv) and m.fused:
            raise ValueError(f"model: {name} is a fused SparseLKConv (folded branches with a summed bias), which "
                             f"the official layout cannot express; export the unfused model")
    masked = {}
    for name, m in model.named_modules():
        mask = m._buffers.get("weight_mask") if "weight_mask" in m._buffers else None
        if isinstance(mask, torch.Tensor) and isinstance(getattr(m, "weight", None), torch.Tensor):
            masked[(name + "." if name else "") + "weight"] = masked_weight(m)
    out = {}
    for k, v in model.state_dict().items():
        if k == "weight_mask" or k.endswith(".weight_mask"):
            continue
        out[k] = (masked[k] if k in masked else v).detach().cpu().clone()
    return out


# --------------------------------------------------------------------------------------------------------------
# size and cost
# --------------------------------------------------------------------------------------------------------------

def _check_density(density) -> Optional[float]:
    if density is None:
        return None
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density: expected a float in (0, 1] or None, got {density!r}")
    return float(density)


def _weight_owners(model: nn.Module) -> List[nn.Module]:
    """Modules whose ``weight`` is a conv / linear weight (2-D or 4-D), SparseLKConv branch convs included."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _active(module: nn.Module, nonzero: bool, density: Optional[float]) -> int:
    """Number of weight entries of ``module`` counted as present."""
    n = module.weight.numel()
    if density is not None:
        return int(round(density * n))
    if not nonzero:
        return n
    if module.weight.is_meta:
        raise ValueError("nonzero: cannot count non-zeros of meta tensors; pass nonzero=False or a density")
    with torch.no_grad():
        return int(torch.count_nonzero(masked_weight(module)))


def count_parameters(model: nn.Module, nonzero: bool = True, *, density: Optional[float] = None) -> int:
    """Parameter count of ``model``.

    * ``nonzero=False``: every parameter element (works on the meta device).
    * ``nonzero=True``: conv / linear weights count their non-zero entries after their ``weight_mask``;
      other parameters (biases, norms, layer scales) count in full.
    * ``density=d``: conv / linear weights count ``round(d * numel)`` each (a uniformly sparse model, e.g.
      ``d = 0.6`` for the published SLaK sizes: 30.5M for SLaK-T); other parameters in full. Meta-safe.
    """
    density = _check_density(density)
    if not nonzero and density is None:
        return sum(p.numel() for p in model.parameters())
    owners = {id(m.weight): m for m in _weight_owners(model)}
    total = 0
    for p in model.parameters():
        m = owners.get(id(p))
        total += _active(m, nonzero, density) if m is not None else p.numel()
    return total


def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), *, nonzero: bool = False,
               density: Optional[float] = None) -> int:
    """Multiply-adds of one forward pass for one image of ``input_size`` (C, H, W).

    Counts convolutions (every ``nn.Conv2d``, the ``SparseLKConv`` branches) and ``nn.Linear`` layers:
    output positions x weight entries (nominal: taps over the zero padding count, as fvcore-style counters do).
    ``nonzero=True`` counts only non-zero (mask-aware) weight entries, ``density=d`` counts ``round(d * numel)``
    per weight; the default is the dense cost (SLaK-T at 224: 8.70 G). Shapes are traced on the meta device, so
    this costs no compute and leaves ``model`` untouched.
    """
    density = _check_density(density)
    if not isinstance(input_size, (list, tuple)) or len(input_size) != 3 or not all(
            isinstance(v, int) and v > 0 for v in input_size):
        raise ValueError(f"input_size: expected (C, H, W) positive ints, got {input_size!r}")
    per_weight = {id(m): _active(m, nonzero, density) for m in _weight_owners(model)}
    total = [0]

    def conv_hook(m, inp, out):
        total[0] += out.shape[-2] * out.shape[-1] * per_weight[id(m)]

    def linear_hook(m, inp, out):
        total[0] += (out.numel() // out.shape[-1]) * per_weight[id(m)]

    def lk_hook(m, inp, out):
        convs = [m.lkb_reparam] if getattr(m, "fused", False) and hasattr(m, "lkb_reparam") else \
            [b.conv for b in m.branches()]
        total[0] += sum(out.shape[-2] * out.shape[-1] * per_weight[id(c)] for c in convs)

    handles = []
    for m in model.modules():
        if isinstance(m, SparseLKConv):
            handles.append(m.register_forward_hook(lk_hook))
        elif isinstance(m, (nn.Conv2d, LKConv2d)):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    state = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()}
    x = torch.empty((1,) + tuple(input_size), device="meta")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # batch statistics of one image would fail on 1 x 1 maps; the cost is the same
    try:
        with torch.no_grad():
            functional_call(model, state, (x,), strict=False)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return total[0]
