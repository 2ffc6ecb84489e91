"""``slak-train``: trains a SLaK with dynamic sparsity (``slak_triton.sparse.DynamicSparsity``).

Data: with no ``--data-path``, scikit-learn's bundled 8x8 digits (1,797 images, no download), upscaled to 32x32,
split 80/20 (stratified, fixed) into train and held-out test; with ``--data-path DIR``, an ImageFolder tree
``DIR/train/<class>/...`` and ``DIR/val/<class>/...`` (needs torchvision).

Recipe knobs (official values for ImageNet in brackets): AdamW ``--lr`` [4e-3 at batch 4096], ``--weight-decay``
[0.05], ``--warmup-epochs`` [20] then cosine to ``--min-lr`` [1e-6], ``--drop-path`` [T 0.1 / S 0.4 / B 0.5],
``--smoothing`` [0.1], ``--model-ema`` / ``--model-ema-decay`` [0.9999], ``--amp``; sparsity: ``--sparse``
(default on; ``--no-sparse`` trains dense), ``--density`` [0.6], ``--sparse-init`` [snip], ``--growth`` [random],
``--prune-rate`` [T 0.5 / S, B 0.3], ``--update-frequency`` [T 2000 / S, B 100], ``--only-large-kernels``, ``--fix``
(static masks).

Distributed: ``torchrun --nproc_per_node=N -m slak_triton.train ...`` (gloo on CPU, nccl on GPU; DDP,
DistributedSampler, SyncBatchNorm on GPU). Masks stay identical on all ranks without any broadcast; their
consistency is checked (one all-reduce) at the end of every epoch.

Checkpoints (``--output-dir``): ``checkpoint-last.pth`` every epoch with model (masks included), EMA, optimizer,
scaler, sparsity state (masks, counters, schedule, growth RNG), progress and the history so far; ``--resume PATH``
or ``--resume auto`` continues from it. ``summary.json`` holds the final numbers of the whole run (all epochs,
also across resumes). Both are written atomically. A run never writes over another run's results: a fresh run
into a directory that holds one is refused; ``--resume auto`` on a finished run does nothing and keeps its
results (it rebuilds a lost ``summary.json`` from the checkpoint). Every flag is checked before anything runs
(docs/errors.md).

On CPU the large-kernel modules run through ``use_backend("reference")`` (``F.conv2d``), since the Triton
interpreter is far too slow for training; on CUDA ``--backend auto`` uses the Triton kernels.
"""

import argparse
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from slak_triton.models import MODEL_ENTRYPOINTS, SLaK, _read_checkpoint, checkpoint_filter_fn, export_official_state_dict
from slak_triton.ops import interpreter_active, use_backend
from slak_triton.sparse import (
    GROWTH_MODES,
    LK_GRANULARITIES,
    SPARSE_INITS,
    DynamicSparsity,
    MaskedEMA,
    load_masked_state_dict,
    unwrap_model,
)

try:  # optional extra "train": the bundled digits data set
    from sklearn.datasets import load_digits
except ImportError:  # pragma: no cover - exercised only without scikit-learn
    load_digits = None

try:  # optional: ImageFolder data (--data-path)
    from torchvision import datasets as tv_datasets
    from torchvision import transforms as tv_transforms
except ImportError:
    tv_datasets = None
    tv_transforms = None

try:  # optional extra "timm": the training recipe (Mixup/CutMix, RandAugment, RandomErasing, layer decay)
    import numpy as np
    from timm.data import Mixup as TimmMixup
    from timm.data import create_transform as timm_create_transform
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.random_erasing import RandomErasing as TimmRandomErasing
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import param_groups_layer_decay
except ImportError:
    np = None
    TimmMixup = timm_create_transform = rand_augment_transform = TimmRandomErasing = None
    SoftTargetCrossEntropy = param_groups_layer_decay = None

__all__ = ["main", "run", "TrainError", "build_parser", "digits_datasets", "build_model", "lr_at", "DIGITS_MODEL",
           "Recipe", "build_recipe", "OFFICIAL_AA"]

#: ``--sparse-init`` choices: the random inits ("from_weights" / "resume" need a loaded sparse model; a run's own
#: masks come back with ``--resume``).
TRAIN_SPARSE_INITS = tuple(s for s in SPARSE_INITS if s not in ("from_weights", "resume"))

#: The small SLaK trained on the bundled digits (32x32 grey inputs: stage maps 8, 4, 2, 1).
DIGITS_MODEL = dict(depths=(1, 1, 1, 1), dims=(24, 48, 72, 96), kernel_size=(13, 11, 9, 7), small_kernel=5)
DIGITS_SIZE = 32


class TrainError(RuntimeError):
    """A problem with the run's inputs or environment, reported without a traceback by ``main``."""


# --------------------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slak-train",
        description="Train a SLaK with dynamic sparsity (SLaK's sparse-from-scratch training). Without --data-path "
                    "it trains a small SLaK on scikit-learn's bundled digits (no download) and reports the "
                    "held-out accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data-path", default=None,
                   help="ImageFolder root with train/ and val/ (needs torchvision); default: bundled digits")
    g.add_argument("--model", default="digits", choices=["digits"] + sorted(MODEL_ENTRYPOINTS),
                   help="'digits': the small SLaK for the bundled data; else a slak_triton.models entry point")
    g.add_argument("--input-size", type=int, default=None, help="image size (default 32 for digits, 224 else)")
    g.add_argument("--num-classes", type=int, default=None, help="default: number of classes in the data")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    g.add_argument("--batch-size", type=int, default=64, help="per process")
    g.add_argument("--num-workers", type=int, default=0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    g.add_argument("--min-lr", type=float, default=1e-6)
    g.add_argument("--warmup-epochs", type=float, default=1.0)
    g.add_argument("--weight-decay", type=float, default=0.05, help="on 2-D and 4-D weights only")
    g.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    g.add_argument("--clip-grad", type=float, default=None, help="max gradient norm")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=False,
                   help="keep a mask-aware EMA of the weights and evaluate it too")
    g.add_argument("--model-ema-decay", type=float, default=0.999)
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="mixed precision: fp16 + GradScaler on CUDA, bf16 autocast on CPU")
    g.add_argument("--max-steps-per-epoch", type=int, default=None, help="cut epochs short (smoke tests)")
    g = p.add_argument_group("dynamic sparsity")
    g.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=True,
                   help="train sparse with a moving topology (--no-sparse: dense)")
    g.add_argument("--density", type=float, default=0.6, help="fraction of active weights")
    g.add_argument("--sparse-init", default="snip", choices=TRAIN_SPARSE_INITS,
                   help="per-layer densities of the random initial masks (--resume restores a run's masks)")
    g.add_argument("--growth", default="random", choices=GROWTH_MODES)
    g.add_argument("--prune-rate", type=float, default=0.3)
    g.add_argument("--update-frequency", type=int, default=10, help="optimizer steps between topology updates")
    g.add_argument("--only-large-kernels", action="store_true",
                   help="mask only the large-kernel LoRA1 / LoRA2 branches (official --only-L)")
    g.add_argument("--fix", action="store_true",
                   help="static sparsity: keep the initial masks, no prune / grow (official --fix)")
    g.add_argument("--lk-granularity", default="block", choices=LK_GRANULARITIES)
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None, help="checkpoints and summary.json go here; never written over: a new run needs a "
                        "directory without them, --resume auto continues (or leaves alone) the run in it")
    g.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for OUTPUT_DIR/checkpoint-last.pth")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"],
                   help="lk_conv2d backend; 'auto' means reference (F.conv2d) on CPU, Triton on CUDA")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal; else a few lines per epoch)")
    add_recipe_arguments(p)
    return p


#: What ``--output-dir`` holds for a run; a fresh run never writes over these (see ``_check_output_dir``).
CHECKPOINT_NAME = "checkpoint-last.pth"
SUMMARY_NAME = "summary.json"
#: The network downsamples by 32 (stem 4, three downsampling layers of 2): smaller inputs leave no pixel.
MIN_INPUT_SIZE = 32


def _number_check(name: str, value, lo: Optional[float] = None, hi: Optional[float] = None,
                  lo_open: bool = False, hi_open: bool = False) -> Optional[str]:
    """None when ``value`` is a finite number in the interval, else the error message (names the flag)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if ok:
        return None
    if lo is not None and hi is not None:
        rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        rng = f"{'>' if lo_open else '>='} {lo:g}"
    else:
        rng = f"{'<' if hi_open else '<='} {hi:g}"
    kind = "an int" if isinstance(value, int) and not isinstance(value, bool) else "a finite number"
    return f"{name}: expected {kind} {rng}, got {value!r}"


def _validate_args(args: argparse.Namespace) -> None:
    """Checks every flag on its own (no file system, no data): raises ValueError naming the flag, the expected
    and the actual value. Called first by ``run``; the data-dependent checks (``--num-classes`` against the data's
    classes, ``--batch-size`` against its size) and the file checks (``_check_output_dir``, ``--resume``) follow."""
    checks = [
        _number_check("--epochs", args.epochs, 1),
        _number_check("--batch-size", args.batch_size, 1),
        _number_check("--num-workers", args.num_workers, 0),
        _number_check("--lr", args.lr, 0, lo_open=True),
        _number_check("--min-lr", args.min_lr, 0),
        _number_check("--warmup-epochs", args.warmup_epochs, 0),
        _number_check("--weight-decay", args.weight_decay, 0),
        _number_check("--smoothing", args.smoothing, 0, 1, hi_open=True),
        _number_check("--density", args.density, 0, 1, lo_open=True),
        _number_check("--prune-rate", args.prune_rate, 0, 1, hi_open=True),
        _number_check("--update-frequency", args.update_frequency, 1),
        _number_check("--drop-path", args.drop_path, 0, 1, hi_open=True),
        _number_check("--model-ema-decay", args.model_ema_decay, 0, 1),
        _number_check("--seed", args.seed, 0, 2**31 - 1),
    ]
    if args.input_size is not None:
        checks.append(_number_check("--input-size", args.input_size, MIN_INPUT_SIZE))
    if args.num_classes is not None:
        checks.append(_number_check("--num-classes", args.num_classes, 1))
    if args.clip_grad is not None:
        checks.append(_number_check("--clip-grad", args.clip_grad, 0, lo_open=True))
    if args.max_steps_per_epoch is not None:
        checks.append(_number_check("--max-steps-per-epoch", args.max_steps_per_epoch, 1))
    for message in checks:
        if message is not None:
            raise ValueError(message)
    if args.warmup_epochs > args.epochs:
        raise ValueError(f"--warmup-epochs: expected at most --epochs ({args.epochs}), got {args.warmup_epochs!r}")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr: expected at most --lr ({args.lr!r}), got {args.min_lr!r}")
    if args.fix and not args.sparse:
        raise ValueError("--fix: expected --sparse (static masks need a sparse run), got --no-sparse")
    if args.resume == "auto" and not args.output_dir:
        raise ValueError("--resume: 'auto' needs --output-dir")
    if args.resume is not None and not args.resume:
        raise ValueError("--resume: expected a checkpoint path or 'auto', got ''")
    if args.output_dir is not None and not args.output_dir:
        raise ValueError("--output-dir: expected a directory path, got ''")
    if args.data_path is not None and not os.path.isdir(args.data_path):
        raise ValueError(f"--data-path: expected an existing directory (an ImageFolder root with train/ and val/), "
                         f"got {args.data_path!r}")
    _check_device(args.device)
    _validate_recipe_args(args)


def _check_device(value: Optional[str]) -> None:
    """``--device``: None, 'cpu', 'cuda' or 'cuda:N' with N a device of this machine."""
    if value is None:
        return
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: expected 'cpu', 'cuda' or 'cuda:N', got {value!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: expected a device of this machine, got {value!r}, but CUDA is not "
                             f"available here (torch {torch.__version__}"
                             f"{'' if torch.version.cuda else ' is a CPU-only build'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device: expected cuda:0 .. cuda:{torch.cuda.device_count() - 1}, got {value!r}")


def _check_backend(backend: str, device: torch.device) -> None:
    """``--backend triton`` runs the Triton kernels: on CUDA, or on the CPU only under the interpreter."""
    if backend == "triton" and device.type == "cpu" and not interpreter_active():
        raise ValueError("--backend: expected 'auto' or 'reference' on the CPU, got 'triton' (the Triton kernels "
                         "need CUDA, or TRITON_INTERPRET=1 set before start: the interpreter, far too slow to train)")


def _resume_path(args: argparse.Namespace) -> Optional[str]:
    if not args.resume:
        return None
    return os.path.join(args.output_dir, CHECKPOINT_NAME) if args.resume == "auto" else args.resume


def _check_output_dir(args: argparse.Namespace) -> None:
    """``--output-dir`` must be a writable directory (created if missing), checked before any training; and a run
    never writes over another run's results: a directory that already holds ``checkpoint-last.pth`` or
    ``summary.json`` is accepted only when this run resumes from that very checkpoint."""
    out = args.output_dir
    if out is None:
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output-dir: expected a directory, got the existing file {out!r}")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--output-dir: expected a writable directory, got {out!r} "
                         f"({type(e).__name__}: {e.strerror or e})") from None
    ckpt = os.path.join(out, CHECKPOINT_NAME)
    held = [name for name in (CHECKPOINT_NAME, SUMMARY_NAME) if os.path.exists(os.path.join(out, name))]
    if not held:
        return
    resume = _resume_path(args)
    if resume is not None and os.path.exists(ckpt) and os.path.realpath(resume) == os.path.realpath(ckpt):
        return  # continuing (or re-finishing) the run that lives here
    if os.path.exists(ckpt):
        hint = "pass --resume auto to continue (or finish) that run"
    else:
        hint = f"it has {SUMMARY_NAME} but no {CHECKPOINT_NAME}, so there is nothing to resume"
    raise ValueError(f"--output-dir: {out!r} already holds a run ({', '.join(held)}) and this run would write over "
                     f"it; {hint}, or choose another --output-dir (or move those files away)")


# --------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------

def digits_datasets(size: int = DIGITS_SIZE, test_fraction: float = 0.2, seed: int = 0
                    ) -> Tuple[TensorDataset, TensorDataset, int]:
    """scikit-learn's 8x8 digits as ``[N, 1, size, size]`` float tensors (bilinear upscaling, normalised with the
    training split's mean / std) and int64 labels; a fixed stratified split (``seed``). Returns (train, test, 10)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected an int >= 1, got {size!r}")
    if not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
    if load_digits is None:
        raise TrainError("the bundled digits data needs scikit-learn: pip install 'slak_triton[train]' "
                           "(or pip install scikit-learn), or pass --data-path")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    test_idx: List[int] = []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        test_idx += idx[: int(round(test_fraction * idx.numel()))].tolist()
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[test_idx] = True
    xtr, ytr, xte, yte = x[~is_test], y[~is_test], x[is_test], y[is_test]
    mean, std = xtr.mean(), xtr.std()
    train, test = TensorDataset((xtr - mean) / std, ytr), TensorDataset((xte - mean) / std, yte)
    train.mean, train.std = float(mean), float(std)  # the recipe's per-image augmentations undo it
    return train, test, 10


class _ImageLoader:
    """The ImageFolder loader, with errors that name the file: a corrupted or unreadable image raises TrainError
    ``--data-path: cannot read image '<path>' (<error>)`` instead of the decoder's bare message (also from
    DataLoader workers, which re-raise it in the main process)."""

    def __init__(self, load: Callable[[str], Any]):
        self.load = load

    def __call__(self, path: str):
        try:
            return self.load(path)
        except Exception as e:  # noqa: BLE001 - any decoder error; re-raised with the file's name
            raise TrainError(f"--data-path: cannot read image {path!r} ({type(e).__name__}: {e})") from e


def imagefolder_datasets(root: str, size: int, recipe_args: Optional[argparse.Namespace] = None
                         ) -> Tuple[Dataset, Dataset, int]:
    if tv_datasets is None:
        raise TrainError("--data-path: ImageFolder data needs torchvision (pip install torchvision)")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise ValueError(f"--data-path: expected an ImageFolder root with {split}/ inside, got {root!r}")
    train_tf, val_tf = imagefolder_transforms(size, recipe_args)
    loader = _ImageLoader(tv_datasets.folder.default_loader)
    try:
        train = tv_datasets.ImageFolder(os.path.join(root, "train"), train_tf, loader=loader)
        val = tv_datasets.ImageFolder(os.path.join(root, "val"), val_tf, loader=loader)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or a class folder without images
        raise TrainError(f"--data-path: {root!r} is not a usable ImageFolder tree ({e})") from e
    _check_same_classes(train.classes, val.classes, root)
    return train, val, len(train.classes)


def _check_same_classes(train_classes: Sequence[str], val_classes: Sequence[str], root: str) -> None:
    """ImageFolder numbers the classes by their sorted folder names in each split: train/ and val/ must have the
    same folders, or the same label would mean different classes."""
    if list(train_classes) != list(val_classes):
        only_train = sorted(set(train_classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(train_classes))[:5]
        raise ValueError(f"--data-path: expected the same class folders in train/ and val/ of {root!r}, got "
                         f"{len(train_classes)} and {len(val_classes)} (only in train/: {only_train}; only in "
                         f"val/: {only_val})")


def _random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Digits augmentation: each image translated by up to ``max_shift`` pixels (zero fill)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=float(x.min()))
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


# --------------------------------------------------------------------------------------------------------------
# the training recipe through timm: Mixup/CutMix, RandAugment, RandomErasing, layer decay, gradient accumulation,
# evaluation-only runs, fine-tuning, best checkpoints and the official export (kept apart from the loop in run())
# --------------------------------------------------------------------------------------------------------------

#: The official RandAugment policy (ConvNeXt / SLaK ImageNet recipe).
OFFICIAL_AA = "rand-m9-mstd0.5-inc1"
#: ImageNet mean / std for ImageFolder data.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "recipe (official ImageNet values in the help; Mixup/CutMix, RandAugment, RandomErasing and layer decay "
        "come from timm: pip install 'slak_triton[timm]')")
    g.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha, 0 = off [0.8]")
    g.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha, 0 = off [1.0]")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of CutMix when both are on")
    g.add_argument("--aa", default=None, help=f"RandAugment policy, e.g. {OFFICIAL_AA} (the official one); "
                                              f"default off")
    g.add_argument("--reprob", type=float, default=0.0, help="RandomErasing probability [0.25]")
    g.add_argument("--remode", default="pixel", choices=("pixel", "rand", "const"), help="RandomErasing fill")
    g.add_argument("--recount", type=int, default=1, help="RandomErasing regions per image")
    g.add_argument("--layer-decay", type=float, default=None,
                   help="layer-wise learning-rate decay in (0, 1] (timm's, over SLaK.group_matcher); default off")
    g.add_argument("--accum-iter", type=int, default=1,
                   help="gradient accumulation: micro-batches per optimizer step (effective batch = batch-size x "
                        "accum-iter x processes)")
    g.add_argument("--crop-pct", type=float, default=224 / 256,
                   help="evaluation crop of ImageFolder data: bicubic resize of the short side to size / crop-pct, "
                        "then centre crop (224 / 256 as the official evaluation)")
    g = p.add_argument_group("evaluation, fine-tuning and export")
    g.add_argument("--eval", action="store_true",
                   help="only evaluate the model of --resume PATH (or --finetune PATH) on the held-out set")
    g.add_argument("--finetune", default=None, metavar="PATH",
                   help="start from these weights (a slak-train checkpoint or an official one); a head of another "
                        "class count is dropped and re-initialised. With --sparse the masks are then drawn anew, "
                        "as the official code does")
    g.add_argument("--finetune-ema", action="store_true", help="take the checkpoint's model_ema weights")
    g.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                   help="with --output-dir, write model-official.pth at the end: the weights in the official "
                        "checkpoint layout ({'model', 'model_ema'}; masks applied, no weight_mask keys)")


def _needs_timm(args: argparse.Namespace) -> List[str]:
    flags = []
    if args.mixup > 0:
        flags.append("--mixup")
    if args.cutmix > 0:
        flags.append("--cutmix")
    if args.aa:
        flags.append("--aa")
    if args.reprob > 0:
        flags.append("--reprob")
    if args.layer_decay is not None:
        flags.append("--layer-decay")
    return flags


def _validate_recipe_args(args: argparse.Namespace) -> None:
    def real(name, v, ok, expected):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and ok(v)):
            raise ValueError(f"{name}: expected {expected}, got {v!r}")

    real("--mixup", args.mixup, lambda v: v >= 0, "a number >= 0 (0 = off)")
    real("--cutmix", args.cutmix, lambda v: v >= 0, "a number >= 0 (0 = off)")
    real("--mixup-prob", args.mixup_prob, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    real("--mixup-switch-prob", args.mixup_switch_prob, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    real("--reprob", args.reprob, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    real("--crop-pct", args.crop_pct, lambda v: 0 < v <= 1, "a number in (0, 1]")
    if args.layer_decay is not None:
        real("--layer-decay", args.layer_decay, lambda v: 0 < v <= 1, "a number in (0, 1]")
    if args.recount < 1:
        raise ValueError(f"--recount: expected an int >= 1, got {args.recount}")
    if args.accum_iter < 1:
        raise ValueError(f"--accum-iter: expected an int >= 1, got {args.accum_iter}")
    if args.aa is not None and not (args.aa.startswith("rand") or args.aa.startswith("augmix")
                                    or args.aa in ("original", "originalr", "v0", "v0r", "3a")):
        raise ValueError(f"--aa: expected a timm auto-augment policy such as {OFFICIAL_AA!r}, got {args.aa!r}")
    if args.eval and not (args.resume or args.finetune):
        raise ValueError("--eval: expected --resume PATH or --finetune PATH (the weights to evaluate)")
    if args.eval and args.resume == "auto":
        raise ValueError("--eval: expected a checkpoint path in --resume, got 'auto'")
    if args.finetune is not None and not os.path.isfile(args.finetune):
        raise ValueError(f"--finetune: expected an existing checkpoint file, got {args.finetune!r}")
    if args.finetune is not None and args.resume:
        raise ValueError("--finetune: cannot be combined with --resume (resume continues a run; finetune starts "
                         "one from weights)")
    missing = _needs_timm(args) if TimmMixup is None else []
    if missing:
        raise TrainError(f"{', '.join(missing)}: needs timm, which is not installed "
                         f"(pip install 'slak_triton[timm]'), or leave the flag off")


class _DigitsAugment(Dataset):
    """The bundled digits with per-image recipe augmentations: RandAugment on the (de-normalised) greyscale image,
    then RandomErasing on the normalised tensor. Python's and NumPy's RNGs drive them (seeded per epoch)."""

    def __init__(self, base: TensorDataset, aa: Optional[str], reprob: float, remode: str, recount: int):
        self.base, self.mean, self.std = base, base.mean, base.std
        size = base.tensors[0].shape[-1]
        self.aa = rand_augment_transform(aa, dict(translate_const=int(size * 0.45), img_mean=(0,))) if aa else None
        self.erase = TimmRandomErasing(reprob, mode=remode, max_count=recount, device="cpu") if reprob > 0 else None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        if self.aa is not None:
            img = tv_transforms.functional.to_pil_image(((x * self.std + self.mean).clamp(0, 1) * 255).to(torch.uint8))
            x = (tv_transforms.functional.pil_to_tensor(self.aa(img)).float() / 255 - self.mean) / self.std
        if self.erase is not None:
            x = self.erase(x)
        return x, y


def imagefolder_transforms(size: int, args: Optional[argparse.Namespace]):
    """(train, eval) transforms of ImageFolder data. With timm: ``create_transform`` (RandomResizedCrop, flip,
    RandAugment ``--aa``, RandomErasing ``--reprob``; evaluation: bicubic resize to size / ``--crop-pct``, centre
    crop). Without timm: torchvision's RandomResizedCrop + flip and the same bicubic evaluation crop."""
    crop_pct = args.crop_pct if args is not None else 224 / 256
    if timm_create_transform is not None:
        train_tf = timm_create_transform(
            size, is_training=True, auto_augment=args.aa if args is not None else None, interpolation="bicubic",
            re_prob=args.reprob if args is not None else 0.0, re_mode=args.remode if args is not None else "pixel",
            re_count=args.recount if args is not None else 1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        val_tf = timm_create_transform(size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                                       mean=IMAGENET_MEAN, std=IMAGENET_STD)
        return train_tf, val_tf
    bicubic = tv_transforms.InterpolationMode.BICUBIC
    norm = tv_transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = tv_transforms.Compose([tv_transforms.RandomResizedCrop(size, interpolation=bicubic),
                                      tv_transforms.RandomHorizontalFlip(), tv_transforms.ToTensor(), norm])
    val_tf = tv_transforms.Compose([tv_transforms.Resize(int(size / crop_pct), interpolation=bicubic),
                                    tv_transforms.CenterCrop(size), tv_transforms.ToTensor(), norm])
    return train_tf, val_tf


class Recipe:
    """What the recipe flags add to the loop: the batch mixer (timm Mixup / CutMix, with label smoothing inside),
    the training loss (soft-target cross-entropy with mixing, else cross-entropy with ``--smoothing``), the
    micro-batches per optimizer step, and per-epoch seeding of the RNGs that per-image augmentations use."""

    def __init__(self, args: argparse.Namespace, num_classes: int):
        self.accum = args.accum_iter
        self.smoothing = args.smoothing
        self.mixup_fn = None
        if args.mixup > 0 or args.cutmix > 0:
            self.mixup_fn = TimmMixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                                      switch_prob=args.mixup_switch_prob, mode="batch",
                                      label_smoothing=args.smoothing, num_classes=num_classes)
            self.soft_loss = SoftTargetCrossEntropy()

    def mix(self, x: torch.Tensor, y: torch.Tensor):
        """(inputs, targets for the loss): mixed inputs and soft targets when mixing is on."""
        if self.mixup_fn is None:
            return x, y
        if x.shape[0] % 2:
            raise TrainError(f"--batch-size: Mixup / CutMix mix a batch with its reverse and need an even batch, "
                             f"got {x.shape[0]}")
        return self.mixup_fn(x, y)

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.mixup_fn is not None:
            return self.soft_loss(out.float(), target)
        return F.cross_entropy(out.float(), target, label_smoothing=self.smoothing)

    @staticmethod
    def seed_epoch(seed: int, rank: int, epoch: int) -> None:
        """Python's and NumPy's RNGs (RandAugment, RandomErasing's counts, Mixup's lambda) per epoch and rank, so
        that a resumed run draws what an uninterrupted one would."""
        s = ((seed * 1000 + rank) * 7919 + epoch) % (2**32)
        random.seed(s)
        if np is not None:
            np.random.seed(s)


def build_recipe(args: argparse.Namespace, num_classes: int) -> Recipe:
    return Recipe(args, num_classes)


def recipe_datasets(args: argparse.Namespace, train_set: Dataset) -> Dataset:
    """The digits training set with ``--aa`` / ``--reprob`` applied per image (ImageFolder data gets them through
    its transforms)."""
    if args.data_path is None and (args.aa or args.reprob > 0):
        return _DigitsAugment(train_set, args.aa, args.reprob, args.remode, args.recount)
    return train_set


def recipe_param_groups(model: nn.Module, args: argparse.Namespace) -> List[Dict[str, Any]]:
    """AdamW parameter groups: weight decay on 2-D and 4-D weights only; with ``--layer-decay`` timm's layer-wise
    groups over ``SLaK.group_matcher`` (each with an ``lr_scale``: 1 for the head, ``layer_decay ** depth`` below)."""
    if args.layer_decay is None:
        return [dict(g, lr_scale=1.0) for g in _param_groups(model, args.weight_decay)]
    groups = param_groups_layer_decay(model, weight_decay=args.weight_decay, layer_decay=args.layer_decay,
                                      no_weight_decay_list=tuple(model.no_weight_decay()))
    return [g for g in groups if g["params"]]


def load_finetune(model: SLaK, path: str, use_ema: bool) -> str:
    """Loads ``path`` into ``model`` (a slak-train or an official checkpoint; trusted file). Classifier keys whose
    shapes differ (another class count) are dropped and the head keeps its fresh init; any other mismatch raises
    TrainError. Returns a one-line description."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    try:
        sd = checkpoint_filter_fn(ckpt, model, use_ema=use_ema)
    except (TypeError, ValueError) as e:
        raise TrainError(f"--finetune: {path!r} is not a usable checkpoint ({e})")
    own = model.state_dict()
    dropped = [k for k in list(sd) if k.startswith("head.") and k in own and sd[k].shape != own[k].shape]
    for k in dropped:
        del sd[k]
    wrong = [f"{k} {tuple(sd[k].shape)} (model {tuple(own[k].shape)})" for k in sd
             if k in own and not k.endswith("weight_mask") and sd[k].shape != own[k].shape]
    if wrong:
        raise TrainError(f"--finetune: {path!r} does not match --model: {len(wrong)} shapes differ, e.g. "
                         f"{', '.join(wrong[:3])}")
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if k not in dropped and not k.endswith("weight_mask")]
    if missing or result.unexpected_keys:
        raise TrainError(f"--finetune: {path!r} does not match --model (missing {missing[:8]}, unexpected "
                         f"{result.unexpected_keys[:8]})")
    return f"fine-tuning from {path}" + (" (EMA weights)" if use_ema else "") + (
        f", head re-initialised for {model.num_classes} classes" if dropped else "")


def save_best_checkpoints(output_dir: str, epoch: int, model: nn.Module, ema, val_acc: float, ema_acc: float,
                          best: Dict[str, float]) -> None:
    """``checkpoint-best.pth`` when the held-out accuracy improves, ``checkpoint-best-ema.pth`` when the EMA's
    does ({'model' (masks included), 'epoch', 'accuracy'}; written atomically). ``best`` is updated in place."""
    os.makedirs(output_dir, exist_ok=True)
    for key, acc, sd, name in (("model", val_acc, lambda: model.state_dict(), "checkpoint-best.pth"),
                               ("ema", ema_acc, lambda: ema.state_dict() if ema is not None else None,
                                "checkpoint-best-ema.pth")):
        if key == "ema" and ema is None:
            continue
        if not math.isfinite(acc) or acc <= best.get(key, -1.0):
            continue
        best[key] = acc
        tmp = os.path.join(output_dir, name + ".tmp")
        torch.save({"model": sd(), "epoch": epoch, "accuracy": acc}, tmp)
        os.replace(tmp, os.path.join(output_dir, name))


def export_official(path: str, model: nn.Module, ema) -> None:
    """Writes ``{'model': ..., 'model_ema': ...}`` in the official layout (``export_official_state_dict``)."""
    state = {"model": export_official_state_dict(model)}
    if ema is not None:
        state["model_ema"] = export_official_state_dict(ema.module)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def evaluate_only(args: argparse.Namespace, model: nn.Module, test_loader: DataLoader, device: torch.device,
                  distributed: bool, amp_ctx, backend: str, is_main: bool, data_name: str) -> Dict[str, Any]:
    """``--eval``: loads the weights of ``--resume PATH`` (its ``model_ema`` with ``--model-ema``) or
    ``--finetune PATH`` and reports the held-out loss and accuracy; trains nothing and writes nothing."""
    path = args.resume or args.finetune
    ckpt = _read_checkpoint(path, what="--resume" if args.resume else "--finetune", map_location=device)
    if isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict) and args.resume:
        use_ema = args.model_ema and isinstance(ckpt.get("model_ema"), dict)
        load_masked_state_dict(model, ckpt["model_ema"] if use_ema else ckpt["model"])
    else:
        load_finetune(model, path, args.finetune_ema)
    with use_backend(backend):
        loss, acc, n = evaluate(model, test_loader, device, distributed, amp_ctx)
    if is_main:
        print(f"evaluation of {path}: held-out accuracy {100 * acc:.2f}% on {n} images, loss {loss:.4f} "
              f"({data_name})", flush=True)
    return {"eval": path, "held_out_accuracy": acc, "held_out_loss": loss, "held_out_images": n}


# --------------------------------------------------------------------------------------------------------------
# model, schedule, progress
# --------------------------------------------------------------------------------------------------------------

def build_model(name: str, in_chans: int, num_classes: int, drop_path: float) -> SLaK:
    if name == "digits":
        return SLaK(in_chans=in_chans, num_classes=num_classes, drop_path_rate=drop_path, **DIGITS_MODEL)
    if name not in MODEL_ENTRYPOINTS:
        raise ValueError(f"--model: expected 'digits' or one of {sorted(MODEL_ENTRYPOINTS)}, got {name!r}")
    return MODEL_ENTRYPOINTS[name](in_chans=in_chans, num_classes=num_classes, drop_path_rate=drop_path)


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from lr / warmup_steps to ``lr`` over ``warmup_steps``, then cosine to ``min_lr``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


class _Progress:
    """A dependency-free progress bar on stderr (a redrawn line on a terminal, a few plain lines otherwise)."""

    def __init__(self, total: int, desc: str, enabled: bool, tty: Optional[bool]):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.n, self.t0, self.next_mark = 0, time.time(), 0.25

    def update(self, text: str) -> None:
        self.n += 1
        if not self.enabled:
            return
        frac = self.n / max(1, self.total)
        rate = self.n / max(1e-9, time.time() - self.t0)
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        line = f"{self.desc} [{bar}] {self.n}/{self.total} {rate:.1f} it/s {text}"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if self.n == self.total else ""))
            sys.stderr.flush()
        elif frac >= self.next_mark or self.n == self.total:
            while self.next_mark <= frac:
                self.next_mark += 0.25
            print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# distributed
# --------------------------------------------------------------------------------------------------------------

def _env_int(name: str, default: int, lo: int) -> int:
    """An integer environment variable set by torchrun (WORLD_SIZE, RANK, LOCAL_RANK), checked."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < lo:
        raise ValueError(f"environment variable {name}: expected an int >= {lo} (as torchrun sets it), got {raw!r}")
    return value


def _setup_distributed(device_arg: Optional[str]) -> Tuple[torch.device, int, int, bool]:
    world = _env_int("WORLD_SIZE", 1, 1)
    distributed = world > 1
    rank = _env_int("RANK", 0, 0)
    local_rank = _env_int("LOCAL_RANK", 0, 0)
    if rank >= world:
        raise ValueError(f"environment variable RANK: expected 0..{world - 1} (WORLD_SIZE={world}), got {rank}")
    if device_arg is not None:
        device = torch.device(device_arg)
    else:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if distributed else (device.index or 0))
        torch.cuda.set_device(device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world, distributed


def _all_sum(values: Sequence[float], device: torch.device, distributed: bool) -> List[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------------------------------
# checkpoints, resume, summary
# --------------------------------------------------------------------------------------------------------------

#: Flags a resumed run must share with its checkpoint: what the checkpoint restores (a different value would be
#: silently ignored) or what would make the result a different run. The sparsity ones only when ``--sparse``.
_RESUME_FLAGS = ("model", "sparse", "model_ema", "accum_iter")
_RESUME_SPARSE_FLAGS = ("density", "growth", "prune_rate", "update_frequency", "only_large_kernels", "lk_granularity",
                        "fix")
_CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "global_step")


def _load_resume(path: str, device: torch.device) -> Dict[str, Any]:
    """Reads a slak-train checkpoint (``weights_only``: it holds tensors, numbers, strings and containers only);
    TrainError naming the file and what is wrong with it otherwise."""
    try:
        ckpt = _read_checkpoint(path, what="--resume", map_location=device, weights_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise TrainError(str(e)) from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _CHECKPOINT_KEYS):
        has = sorted(map(str, ckpt))[:10] if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise TrainError(f"--resume: {path!r} is not a slak-train checkpoint (expected the entries "
                         f"{list(_CHECKPOINT_KEYS)}, found {has})")
    return ckpt


def _check_resume_matches(ckpt: Dict[str, Any], path: str, args: argparse.Namespace, run_info: Dict[str, Any]
                          ) -> None:
    """Refuses to resume with settings that differ from the checkpoint's (see ``_RESUME_FLAGS``)."""
    saved = ckpt.get("args") or {}
    flags = _RESUME_FLAGS + (_RESUME_SPARSE_FLAGS if args.sparse else ())
    if args.model_ema:
        flags += ("model_ema_decay",)
    diffs = [f"--{k.replace('_', '-')} {saved[k]!r} (now {getattr(args, k)!r})"
             for k in flags if k in saved and saved[k] != getattr(args, k)]
    names = {"input_size": "--input-size", "num_classes": "--num-classes",
             "steps_per_epoch": "steps per epoch (--batch-size, --max-steps-per-epoch, processes)"}
    saved_run = ckpt.get("run") or {}
    diffs += [f"{names.get(k, k)} {saved_run[k]!r} (now {v!r})" for k, v in run_info.items()
              if k in saved_run and saved_run[k] != v]
    if diffs:
        raise TrainError(f"--resume: {path!r} was written by a run with other settings: {'; '.join(diffs)}. "
                         f"Resume with the checkpoint's settings, or start a new run in another --output-dir")


def _existing_summary(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """OUTPUT_DIR/summary.json when it exists and is readable, else None."""
    if not args.output_dir:
        return None
    try:
        with open(os.path.join(args.output_dir, SUMMARY_NAME)) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Writes through ``write(file)`` to ``path + '.tmp'``, flushes it to disk, then renames it over ``path``: a
    reader (or a resume after a crash) sees the old file or the new one, never a partial one."""
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, distributed: bool, amp_ctx
             ) -> Tuple[float, float, int]:
    """(mean loss, accuracy, images) over the whole (sharded) loader, summed over ranks."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with amp_ctx():
            out = model(x)
        loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
        correct += float((out.argmax(1) == y).sum())
        n += y.numel()
    model.train(was_training)
    loss_sum, correct, n = _all_sum([loss_sum, correct, n], device, distributed)
    return loss_sum / max(n, 1), correct / max(n, 1), int(n)


def _param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Trains as ``args`` says; returns the summary (also printed, and written to OUTPUT_DIR/summary.json)."""
    _validate_args(args)
    _check_output_dir(args)
    t_start = time.time()
    device, rank, world, distributed = _setup_distributed(args.device)
    _check_backend(args.backend, device)
    is_main = rank == 0
    torch.manual_seed(args.seed + rank)

    ckpt = None
    resume_path = _resume_path(args)
    if resume_path is not None and not args.eval:   # --eval reads only the weights (evaluate_only)
        if os.path.isfile(resume_path) or args.resume != "auto":
            ckpt = _load_resume(resume_path, device)
    done_epochs = int(ckpt["epoch"]) + 1 if ckpt is not None else 0
    if done_epochs > args.epochs:
        raise TrainError(f"--epochs: expected at least {done_epochs}: {resume_path!r} has already trained "
                         f"{done_epochs} epochs, got {args.epochs}")
    if ckpt is not None:
        _check_resume_matches(ckpt, resume_path, args, {})  # the flags; the values that need the data follow
    if ckpt is not None and done_epochs == args.epochs:
        finished = _existing_summary(args)
        if finished is not None:  # nothing to do: keep the finished run's results as they are
            if is_main:
                print(f"slak-train: the run in {resume_path!r} has finished all {args.epochs} epochs; nothing to do, "
                      f"{os.path.join(args.output_dir, SUMMARY_NAME)} is kept (held-out accuracy "
                      f"{100 * finished.get('held_out_accuracy', float('nan')):.2f}% on "
                      f"{finished.get('held_out_images')} images)", flush=True)
            return finished

    # data
    if args.data_path is None:
        size = args.input_size if args.input_size is not None else DIGITS_SIZE
        train_set, test_set, n_classes = digits_datasets(size=size, seed=0)
        in_chans, data_name = 1, "digits (scikit-learn, 8x8 upscaled to %dx%d)" % (size, size)
        augment = True
    else:
        size = args.input_size if args.input_size is not None else 224
        train_set, test_set, n_classes = imagefolder_datasets(args.data_path, size, args)
        in_chans, data_name, augment = 3, args.data_path, False
    num_classes = args.num_classes if args.num_classes is not None else n_classes
    if num_classes < n_classes:
        raise ValueError(f"--num-classes: expected at least {n_classes} (the data has labels 0..{n_classes - 1}), "
                         f"got {num_classes}")
    train_set = recipe_datasets(args, train_set)
    if distributed:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                     drop_last=True)
        test_view = Subset(test_set, list(range(rank, len(test_set), world)))
    else:
        sampler = None
        test_view = test_set
    shuffle_gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None,
                              generator=shuffle_gen if sampler is None else None, drop_last=True,
                              num_workers=args.num_workers, pin_memory=device.type == "cuda")
    test_loader = DataLoader(test_view, batch_size=max(args.batch_size, 128), shuffle=False,
                             num_workers=args.num_workers)
    steps_per_epoch = len(train_loader)
    if args.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size: expected at most {len(train_set) // world} per process for this data, "
                         f"got {args.batch_size}")
    accum = args.accum_iter
    opt_steps_per_epoch = steps_per_epoch // accum  # optimizer steps; leftover micro-batches are not drawn
    if opt_steps_per_epoch < 1:
        raise ValueError(f"--accum-iter: expected at most {steps_per_epoch} (the micro-batches of an epoch), "
                         f"got {accum}")
    steps_per_epoch = opt_steps_per_epoch * accum
    total_steps = args.epochs * opt_steps_per_epoch
    warmup_steps = int(round(args.warmup_epochs * opt_steps_per_epoch))
    run_info = {"input_size": size, "num_classes": num_classes, "steps_per_epoch": steps_per_epoch}
    if ckpt is not None:
        _check_resume_matches(ckpt, resume_path, args, run_info)

    # model
    model = build_model(args.model, in_chans, num_classes, args.drop_path).to(device)
    if distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model: nn.Module = model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(recipe_param_groups(model, args), lr=args.lr)
    recipe = build_recipe(args, num_classes)
    use_scaler = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def amp_ctx():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp)

    backend = args.backend
    if backend == "auto" and device.type == "cpu":
        backend = "reference"
    if args.eval:
        return evaluate_only(args, train_model, test_loader, device, distributed, amp_ctx, backend, is_main,
                             data_name)
    finetune_note = load_finetune(model, args.finetune, args.finetune_ema) if args.finetune else None

    real_steps = [0]
    optimizer.register_step_post_hook(lambda opt, a, k: real_steps.__setitem__(0, real_steps[0] + 1))

    with use_backend(backend):
        sparsity = None
        if args.sparse:
            snip_data = None
            sparse_init = args.sparse_init
            if ckpt is not None:
                sparse_init = "uniform"  # masks come from the checkpoint
            elif sparse_init == "snip":
                snip_data = next(iter(train_loader))
            sparsity = DynamicSparsity(
                train_model, optimizer, density=args.density, sparse_init=sparse_init, prune_rate=args.prune_rate,
                growth=args.growth, update_frequency=None if args.fix else args.update_frequency,
                total_steps=total_steps,
                only_large_kernels=args.only_large_kernels, seed=args.seed, snip_data=snip_data,
                lk_granularity=args.lk_granularity)
        ema = MaskedEMA(model, decay=args.model_ema_decay) if args.model_ema else None

        start_epoch, global_step = 0, 0
        history: List[Dict[str, Any]] = []
        prior_seconds = 0.0
        best: Dict[str, float] = {}
        if ckpt is not None:
            try:
                load_masked_state_dict(model, ckpt["model"])
                optimizer.load_state_dict(ckpt["optimizer"])
                if ckpt.get("scaler") is not None:
                    scaler.load_state_dict(ckpt["scaler"])
                if sparsity is not None and ckpt.get("sparsity") is not None:
                    sparsity.load_state_dict(ckpt["sparsity"])
                if ema is not None and ckpt.get("model_ema") is not None:
                    ema.load_state_dict(ckpt["model_ema"])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise TrainError(f"--resume: {resume_path!r} does not fit this run's model and optimizer "
                                 f"({type(e).__name__}: {str(e).strip()[:500]})") from e
            start_epoch, global_step = int(ckpt["epoch"]) + 1, int(ckpt["global_step"])
            history = list(ckpt.get("history") or [])
            real_steps[0] = int(ckpt.get("optimizer_steps", global_step))
            prior_seconds = float(ckpt.get("seconds", 0.0))
            best.update(ckpt.get("best") or {})
            if "rng_state" in ckpt:
                torch.set_rng_state(ckpt["rng_state"].cpu())
            if device.type == "cuda" and ckpt.get("cuda_rng_state") is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng_state"].cpu(), device)  # drop path draws on the GPU
            if is_main:
                print(f"resumed from {resume_path} at epoch {start_epoch}, step {global_step}", flush=True)

        if is_main:
            n_params = sum(p.numel() for p in model.parameters())
            print(f"slak-train: {args.model} SLaK ({n_params:,} parameters), data {data_name}: "
                  f"{len(train_set)} train / {len(test_set)} held-out images, {num_classes} classes; "
                  f"{world} process(es) on {device} (lk_conv2d backend {backend}); "
                  f"{args.epochs} epochs x {opt_steps_per_epoch} steps"
                  + (f" of {accum} micro-batches" if accum > 1 else ""), flush=True)
            if finetune_note:
                print(finetune_note, flush=True)
            if sparsity is not None:
                print(f"sparse: density {sparsity.overall_density():.4f} over {len(sparsity.candidates)} weights "
                      f"({len(sparsity.dense_layers)} kept dense), init {args.sparse_init}, growth {args.growth}, "
                      + ("topology fixed (--fix), " if args.fix else
                         f"prune rate {args.prune_rate} every {args.update_frequency} steps, ") +
                      f"large kernels in {args.lk_granularity}s", flush=True)

        aug_gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
        ema_acc = float("nan")
        for epoch in range(start_epoch, args.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            else:
                shuffle_gen.manual_seed(args.seed * 100_003 + epoch)
            aug_gen.manual_seed((args.seed * 1000 + rank) * 7919 + epoch)
            recipe.seed_epoch(args.seed, rank, epoch)
            model.train()
            bar = _Progress(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", is_main and args.progress is not False,
                            args.progress)
            t0 = time.time()
            loss_sum = correct = seen = 0.0
            for i, (x, y) in enumerate(train_loader):
                if i >= steps_per_epoch:
                    break
                if augment:
                    x = _random_shift(x, aug_gen)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                x, target = recipe.mix(x, y)
                first, last = i % accum == 0, (i + 1) % accum == 0
                if first:
                    lr = lr_at(global_step, total_steps, warmup_steps, args.lr, args.min_lr)
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)
                    optimizer.zero_grad(set_to_none=True)
                before = real_steps[0]
                # DDP: gradients are all-reduced on the last micro-batch of an optimizer step only
                sync = train_model.no_sync() if distributed and not last else contextlib.nullcontext()
                with sync:
                    with amp_ctx():
                        out = train_model(x)
                        loss = recipe.loss(out, target)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"loss is {float(loss.detach())} at epoch {epoch + 1}, step {i + 1} (learning rate "
                            f"{lr:.3g}); "
                            + (f"the checkpoint of epoch {epoch} in {args.output_dir!r} is kept; " if
                               args.output_dir and (epoch > start_epoch or ckpt is not None) else "")
                            + "a lower --lr, a --clip-grad, or --no-amp may help")
                    scaler.scale(loss / accum).backward()
                if last:
                    if args.clip_grad is not None:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    if ema is not None and real_steps[0] > before:
                        ema.update(model)
                    global_step += 1
                loss_sum += float(loss.detach()) * y.numel()
                correct += float((out.argmax(1) == y).sum())
                seen += y.numel()
                bar.update(f"loss {loss_sum / seen:.4f} acc {100 * correct / seen:.1f}% lr {lr:.2e}")
            tr_loss, tr_correct, tr_seen = _all_sum([loss_sum, correct, seen], device, distributed)
            val_loss, val_acc, n_val = evaluate(train_model, test_loader, device, distributed, amp_ctx)
            if ema is not None:
                _, ema_acc, _ = evaluate(ema.module, test_loader, device, distributed, amp_ctx)
            density = sparsity.overall_density() if sparsity is not None else 1.0
            updates = sparsity.topology_updates if sparsity is not None else 0
            if sparsity is not None and distributed and not sparsity.verify_consistent():
                raise TrainError(f"masks differ across ranks after epoch {epoch + 1}")
            rec = dict(epoch=epoch + 1, train_loss=tr_loss / max(tr_seen, 1), train_acc=tr_correct / max(tr_seen, 1),
                       val_loss=val_loss, val_acc=val_acc, held_out_images=n_val, density=density,
                       topology_updates=updates, lr=lr, seconds=time.time() - t0)
            if ema is not None:
                rec["ema_val_acc"] = ema_acc
            history.append(rec)
            if is_main:
                print(f"epoch {epoch + 1}/{args.epochs}: train loss {rec['train_loss']:.4f} acc "
                      f"{100 * rec['train_acc']:.2f}% | held-out loss {val_loss:.4f} acc {100 * val_acc:.2f}%"
                      + (f" (EMA {100 * ema_acc:.2f}%)" if ema is not None else "")
                      + f" | density {density:.4f} | topology updates {updates} | {rec['seconds']:.1f}s",
                      flush=True)
                if args.output_dir:
                    state = {
                        "model": model.state_dict(),
                        "model_ema": ema.state_dict() if ema is not None else None,
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict() if use_scaler else None,
                        "sparsity": sparsity.state_dict() if sparsity is not None else None,
                        "epoch": epoch, "global_step": global_step, "rng_state": torch.get_rng_state(),
                        "cuda_rng_state": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                        "args": vars(args), "run": run_info, "history": history,
                        "optimizer_steps": real_steps[0], "seconds": prior_seconds + time.time() - t_start,
                    }
                    save_best_checkpoints(args.output_dir, epoch, model, ema, val_acc, ema_acc, best)
                    state["best"] = dict(best)
                    _atomic_write(os.path.join(args.output_dir, CHECKPOINT_NAME), lambda f: torch.save(state, f))

        if history:  # the last epoch's numbers (of this process or, for a finished run, of the checkpoint)
            last = history[-1]
            val_loss, val_acc, n_val = last["val_loss"], last["val_acc"], last.get("held_out_images", len(test_set))
            ema_acc = last.get("ema_val_acc", float("nan"))
        else:  # a finished run's checkpoint without history (written before it was kept): evaluate it
            val_loss, val_acc, n_val = evaluate(train_model, test_loader, device, distributed, amp_ctx)
            ema_acc = evaluate(ema.module, test_loader, device, distributed, amp_ctx)[1] if ema is not None \
                else float("nan")

    summary = {
        "data": data_name, "model": args.model, "held_out_images": n_val, "held_out_accuracy": val_acc,
        "held_out_loss": val_loss, "density": sparsity.overall_density() if sparsity is not None else 1.0,
        "layer_densities": sparsity.layer_densities() if sparsity is not None else {},
        "topology_updates": sparsity.topology_updates if sparsity is not None else 0,
        "optimizer_steps": real_steps[0], "epochs": args.epochs, "world_size": world, "device": str(device),
        "seconds": prior_seconds + time.time() - t_start, "history": history,
    }
    if ema is not None:
        summary["ema_held_out_accuracy"] = ema_acc
    summary["best_held_out_accuracy"] = best.get("model")
    if ema is not None:
        summary["best_ema_held_out_accuracy"] = best.get("ema")
    if is_main:
        print(f"held-out accuracy: {100 * val_acc:.2f}% on {n_val} images"
              + (f" (EMA {100 * ema_acc:.2f}%)" if ema is not None else "")
              + f" | density {summary['density']:.4f} | {summary['topology_updates']} topology updates | "
              f"{summary['seconds']:.1f}s", flush=True)
        if args.output_dir:
            _atomic_write(os.path.join(args.output_dir, SUMMARY_NAME), lambda f: json.dump(summary, f, indent=2),
                          mode="w")
            if args.export:
                export_official(os.path.join(args.output_dir, "model-official.pth"), model, ema)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, TrainError) as e:
        print(f"slak-train: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the training diverged: not a usage error, but no traceback helps either
        print(f"slak-train: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
