"""The SLaK network (ConvNeXt macro design with ``SparseLKConv`` large-kernel modules), checkpoint-compatible with
the official code (arXiv 2207.03620).

Composition (timm ``convnext.py`` style): ``Block`` (large-kernel module -> LayerNorm -> MLP -> layer scale ->
residual), ``SLaKStage`` (a ``nn.Sequential`` of blocks), ``SLaK`` (stem / downsample layers, four stages, head).
The module tree reproduces the official state_dict keys exactly: ``downsample_layers.{i}.{j}.*``,
``stages.{s}.{b}.{large_kernel,norm,pwconv1,pwconv2,gamma}``, ``norm.*``, ``head.*`` (``features_only``: ``norm{i}``
per output instead of ``norm`` / ``head``, as the official detection / segmentation backbone).

Variants (official width factor 1.3 applied as ``int(d * 1.3)``): ``slak_tiny`` (50,703,838 parameters with 1000
classes), ``slak_small`` (91,131,820), ``slak_base`` (157,950,792), ``slak_large``, and ``slak_test`` (tiny, for
tests). ``load_official_checkpoint`` loads an official training checkpoint; ``count_parameters`` and
``count_macs`` give dense / sparse sizes and multiply-adds.
"""

import os
import pickle
import zipfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from slak_triton.nn import LKConv2d, SparseLKConv, masked_weight, prepare_mask_for_load

try:
    import timm
    from timm.models import register_model as _timm_register_model
except ImportError:  # timm is an optional extra: pip install slak_triton[timm]
    timm = None
    _timm_register_model = None

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
    "slak_test",
    "MODEL_ENTRYPOINTS",
    "checkpoint_filter_fn",
    "load_official_checkpoint",
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
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Block(nn.Module):
    """SLaK block: ``x + DropPath(gamma * pwconv2(GELU(pwconv1(LN(LK(x))))))`` with LN / Linear channels-last.

    Args:
        dim: channels C.
        kernel_size, small_kernel, bn: of the ``SparseLKConv`` (``large_kernel``).
        drop_path: stochastic depth rate.
        layer_scale_init_value: initial ``gamma`` (None / <= 0: no layer scale, no ``gamma`` key).

    Shapes: [N, C, H, W] -> [N, C, H, W].
    """

    def __init__(self, dim: int, kernel_size: int, small_kernel: int, drop_path: float = 0.0,
                 layer_scale_init_value: Optional[float] = 1e-6, bn: bool = True):
        super().__init__()
        self.large_kernel = SparseLKConv(dim, kernel_size, small_kernel, bn=bn)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        if layer_scale_init_value is not None and layer_scale_init_value > 0:
            self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim))
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


class SLaKStage(nn.Sequential):
    """The blocks of one stage (keys ``stages.{s}.{b}.*``). The stage's downsampling layer lives in
    ``SLaK.downsample_layers`` to keep the official key layout. Shapes: [N, C, H, W] -> same."""

    def __init__(self, dim: int, depth: int, kernel_size: int, small_kernel: int, drop_path_rates: Sequence[float],
                 layer_scale_init_value: Optional[float], bn: bool):
        super().__init__(*[
            Block(dim, kernel_size, small_kernel, drop_path_rates[i], layer_scale_init_value, bn)
            for i in range(depth)
        ])


# --------------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------------

def _seq4(name: str, value, kind=int, allow_scalar: bool = False) -> Tuple:
    if allow_scalar and isinstance(value, kind) and not isinstance(value, bool):
        return (value,) * 4
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ValueError(f"{name}: expected a sequence of 4 {kind.__name__}s (one per stage), got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, kind):
            raise TypeError(f"{name}: expected {kind.__name__} entries, got {type(v).__name__} in {value!r}")
    return tuple(value)


class SLaK(nn.Module):
    """SLaK: ConvNeXt with sparse decomposed large kernels (official architecture and init).

    Args:
        in_chans: input channels.
        num_classes: classifier outputs (0: no head, ``forward`` returns pooled features).
        depths: blocks per stage (4 ints).
        dims: channels per stage (4 ints, the actual counts, i.e. width factor already applied).
        kernel_size: large kernel K per stage (4 odd ints, or one int for all stages).
        small_kernel: N of every ``SparseLKConv``.
        drop_path_rate: stochastic depth, linear from 0 to this over all blocks.
        layer_scale_init_value: initial layer scale ``gamma`` (<= 0: none).
        head_init_scale: multiplies the initial head weight and bias.
        bn: per-branch BatchNorm in the large-kernel modules.
        features_only: backbone mode: ``forward`` returns a list of feature maps at ``out_indices``, each through
            its own channels-first LayerNorm ``norm{i}``; no final ``norm`` / ``head``.
        out_indices: stages to return with ``features_only``.

    Shapes: x [N, in_chans, H, W] (H, W multiples of 32 for the full resolution chain) -> logits [N, num_classes];
    ``features_only``: list of [N, dims[i], H / 2**(i+2), W / 2**(i+2)].
    """

    def __init__(self, *, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int], dims: Sequence[int],
                 kernel_size: Union[int, Sequence[int]] = OFFICIAL_KERNEL_SIZES, small_kernel: int = 5,
                 drop_path_rate: float = 0.0, layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.0,
                 bn: bool = True, features_only: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        depths = _seq4("depths", depths)
        dims = _seq4("dims", dims)
        kernel_size = _seq4("kernel_size", kernel_size, allow_scalar=True)
        if any(d < 0 for d in depths):
            raise ValueError(f"depths: expected non-negative ints, got {depths}")
        if any(d < 1 for d in dims):
            raise ValueError(f"dims: expected positive ints, got {dims}")
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans: expected a positive int, got {in_chans!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes: expected an int >= 0, got {num_classes!r}")
        if not 0.0 <= float(drop_path_rate) < 1.0:
            raise ValueError(f"drop_path_rate: expected a float in [0, 1), got {drop_path_rate!r}")
        out_indices = tuple(out_indices)
        if features_only and (not out_indices or any(i not in range(4) for i in out_indices)):
            raise ValueError(f"out_indices: expected distinct stage indices in 0..3, got {out_indices}")
        self.num_classes = num_classes
        self.dims = dims
        self.depths = depths
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.features_only = bool(features_only)
        self.out_indices = out_indices
        self.num_features = dims[-1]

        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6)))
        for i in range(1, 4):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2)))

        total = sum(depths)
        rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.stages = nn.ModuleList()
        start = 0
        for i in range(4):
            self.stages.append(SLaKStage(dims[i], depths[i], kernel_size[i], small_kernel,
                                         rates[start:start + depths[i]], layer_scale_init_value, bn))
            start += depths[i]

        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stages.{i}") for i in range(4)]
        if self.features_only:
            self.feature_info = [self.feature_info[i] for i in out_indices]
            for i in out_indices:
                self.add_module(f"norm{i}", LayerNorm2d(dims[i], eps=1e-6))
        else:
            self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
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

    # -- timm-style API --------------------------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the head by a freshly initialised ``Linear(num_features, num_classes)`` (0: Identity)."""
        if self.features_only:
            raise ValueError("reset_classifier: a features_only model has no head")
        self.num_classes = num_classes
        w = self.norm.weight
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=w.device, dtype=w.dtype)
            self._init_weights(self.head)
        else:
            self.head = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in_chans, H, W] -> last stage map [N, dims[3], H/32, W/32] (no final norm)."""
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """[N, dims[3], h, w] -> global mean -> LayerNorm -> [N, dims[3]] (pre_logits) -> head [N, num_classes]."""
        if self.features_only:
            raise ValueError("forward_head: a features_only model has no head")
        x = self.norm(x.mean(dim=(-2, -1)))
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Backbone outputs: per stage in ``out_indices``, the stage output through ``norm{i}``."""
        if not self.features_only:
            raise ValueError("forward_intermediates: build the model with features_only=True")
        outs = []
        for i, (down, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            x = stage(down(x))
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(x))
            if i == max(self.out_indices):
                break
        return outs

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_intermediates(x)
        return self.forward_head(self.forward_features(x))

    # -- re-parameterisation and loading ---------------------------------------------------------------------
    def fuse(self) -> "SLaK":
        """Folds every large-kernel module's BNs into its weights (``SparseLKConv.fuse``); for inference.
        Load checkpoints before fusing (fused modules have ``bias`` and no ``bn`` keys). Returns self."""
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

def _create(variant: str, pretrained: bool, width_factor: float, kwargs: Dict[str, Any]) -> SLaK:
    if pretrained:
        raise ValueError("pretrained: no hosted weights; build with pretrained=False and call "
                         "slak_triton.models.load_official_checkpoint(model, path)")
    # timm's create_model passes these; they carry nothing for us.
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    depths, base = _VARIANTS[variant]
    cfg = dict(depths=depths, dims=tuple(int(d * width_factor) for d in base), kernel_size=OFFICIAL_KERNEL_SIZES,
               small_kernel=5)
    cfg.update(kwargs)
    return SLaK(**cfg)


def slak_tiny(pretrained: bool = False, *, width_factor: float = OFFICIAL_WIDTH_FACTOR, **kwargs) -> SLaK:
    """SLaK-T: depths (3, 3, 9, 3), dims (124, 249, 499, 998), kernels (51, 49, 47, 13), N = 5.
    Keyword arguments override ``SLaK``'s (e.g. ``num_classes``, ``drop_path_rate=0.1`` as trained)."""
    return _create("tiny", pretrained, width_factor, kwargs)


def slak_small(pretrained: bool = False, *, width_factor: float = OFFICIAL_WIDTH_FACTOR, **kwargs) -> SLaK:
    """SLaK-S: depths (3, 3, 27, 3), dims (124, 249, 499, 998) (trained with drop_path_rate=0.4)."""
    return _create("small", pretrained, width_factor, kwargs)


def slak_base(pretrained: bool = False, *, width_factor: float = OFFICIAL_WIDTH_FACTOR, **kwargs) -> SLaK:
    """SLaK-B: depths (3, 3, 27, 3), dims (166, 332, 665, 1331) (trained with drop_path_rate=0.5)."""
    return _create("base", pretrained, width_factor, kwargs)


def slak_large(pretrained: bool = False, *, width_factor: float = OFFICIAL_WIDTH_FACTOR, **kwargs) -> SLaK:
    """SLaK-L: depths (3, 3, 27, 3), base dims (192, 384, 768, 1536) times the width factor (not released)."""
    return _create("large", pretrained, width_factor, kwargs)


def slak_test(pretrained: bool = False, **kwargs) -> SLaK:
    """A tiny SLaK for tests: depths (1, 1, 1, 1), dims (8, 16, 16, 16), kernels (13, 11, 9, 7), N = 5,
    10 classes. Inputs of 32 x 32 give stage maps of 8, 4, 2, 1 pixels."""
    if pretrained:
        raise ValueError("pretrained: slak_test has no weights")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    cfg = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), kernel_size=(13, 11, 9, 7), small_kernel=5,
               num_classes=10)
    cfg.update(kwargs)
    return SLaK(**cfg)


MODEL_ENTRYPOINTS: Dict[str, Callable[..., SLaK]] = {
    f.__name__: f for f in (slak_tiny, slak_small, slak_base, slak_large, slak_test)
}


def register_timm_models(register: Optional[Callable] = None) -> List[str]:
    """Registers the entry points with timm (``timm.create_model("slak_tiny")``). ``register`` defaults to
    ``timm.models.register_model``; returns the registered names (empty when timm is not installed). Runs at import
    when timm is importable; names timm already knows are skipped."""
    register = register if register is not None else _timm_register_model
    if register is None:
        return []
    known = set(timm.list_models()) if timm is not None and register is _timm_register_model else set()
    names = []
    for name, fn in MODEL_ENTRYPOINTS.items():
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
    """Loads an official SLaK checkpoint (file path or already-loaded dict) into ``model``.

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
    if isinstance(path_or_dict, (str, os.PathLike)):
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
        total[0] += sum(out.shape[-2] * out.shape[-1] * per_weight[id(b.conv)] for b in m.branches())

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
