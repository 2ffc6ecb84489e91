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
scaler, sparsity state (masks, counters, schedule, growth RNG) and progress; ``--resume PATH`` or
``--resume auto`` continues from it. ``summary.json`` holds the final numbers.

On CPU the large-kernel modules run through ``use_backend("reference")`` (``F.conv2d``), since the Triton
interpreter is far too slow for training; on CUDA ``--backend auto`` uses the Triton kernels.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from slak_triton.models import MODEL_ENTRYPOINTS, SLaK
from slak_triton.ops import use_backend
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

__all__ = ["main", "run", "TrainError", "build_parser", "digits_datasets", "build_model", "lr_at", "DIGITS_MODEL"]

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
    g.add_argument("--output-dir", default=None, help="checkpoints and summary.json go here")
    g.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for OUTPUT_DIR/checkpoint-last.pth")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"],
                   help="lk_conv2d backend; 'auto' means reference (F.conv2d) on CPU, Triton on CUDA")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal; else a few lines per epoch)")
    return p


def _validate_args(args: argparse.Namespace) -> None:
    checks = [
        ("--epochs", args.epochs, args.epochs >= 1, ">= 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
        ("--lr", args.lr, args.lr > 0, "> 0"),
        ("--density", args.density, 0 < args.density <= 1, "in (0, 1]"),
        ("--prune-rate", args.prune_rate, 0 <= args.prune_rate < 1, "in [0, 1)"),
        ("--update-frequency", args.update_frequency, args.update_frequency >= 1, ">= 1"),
        ("--warmup-epochs", args.warmup_epochs, args.warmup_epochs >= 0, ">= 0"),
        ("--drop-path", args.drop_path, 0 <= args.drop_path < 1, "in [0, 1)"),
        ("--model-ema-decay", args.model_ema_decay, 0 <= args.model_ema_decay <= 1, "in [0, 1]"),
    ]
    if args.max_steps_per_epoch is not None:
        checks.append(("--max-steps-per-epoch", args.max_steps_per_epoch, args.max_steps_per_epoch >= 1, ">= 1"))
    for name, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"{name}: expected {expected}, got {value!r}")
    if args.fix and not args.sparse:
        raise ValueError("--fix: expected --sparse (static masks need a sparse run), got --no-sparse")
    if args.resume == "auto" and not args.output_dir:
        raise ValueError("--resume: 'auto' needs --output-dir")


# --------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------

def digits_datasets(size: int = DIGITS_SIZE, test_fraction: float = 0.2, seed: int = 0
                    ) -> Tuple[TensorDataset, TensorDataset, int]:
    """scikit-learn's 8x8 digits as ``[N, 1, size, size]`` float tensors (bilinear upscaling, normalised with the
    training split's mean / std) and int64 labels; a fixed stratified split (``seed``). Returns (train, test, 10)."""
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
    return TensorDataset((xtr - mean) / std, ytr), TensorDataset((xte - mean) / std, yte), 10


def imagefolder_datasets(root: str, size: int) -> Tuple[Dataset, Dataset, int]:
    if tv_datasets is None:
        raise TrainError("--data-path: ImageFolder data needs torchvision (pip install torchvision)")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise ValueError(f"--data-path: expected an ImageFolder root with {split}/ inside, got {root!r}")
    norm = tv_transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = tv_transforms.Compose([tv_transforms.RandomResizedCrop(size), tv_transforms.RandomHorizontalFlip(),
                                      tv_transforms.ToTensor(), norm])
    val_tf = tv_transforms.Compose([tv_transforms.Resize(int(size / 0.875)), tv_transforms.CenterCrop(size),
                                    tv_transforms.ToTensor(), norm])
    train = tv_datasets.ImageFolder(os.path.join(root, "train"), train_tf)
    val = tv_datasets.ImageFolder(os.path.join(root, "val"), val_tf)
    return train, val, len(train.classes)


def _random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Digits augmentation: each image translated by up to ``max_shift`` pixels (zero fill)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=float(x.min()))
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


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

def _setup_distributed(device_arg: Optional[str]) -> Tuple[torch.device, int, int, bool]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
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
    t_start = time.time()
    device, rank, world, distributed = _setup_distributed(args.device)
    is_main = rank == 0
    torch.manual_seed(args.seed + rank)

    # data
    if args.data_path is None:
        size = args.input_size or DIGITS_SIZE
        train_set, test_set, n_classes = digits_datasets(size=size, seed=0)
        in_chans, data_name = 1, "digits (scikit-learn, 8x8 upscaled to %dx%d)" % (size, size)
        augment = True
    else:
        size = args.input_size or 224
        train_set, test_set, n_classes = imagefolder_datasets(args.data_path, size)
        in_chans, data_name, augment = 3, args.data_path, False
    num_classes = args.num_classes or n_classes
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
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(round(args.warmup_epochs * steps_per_epoch))

    # model
    model = build_model(args.model, in_chans, num_classes, args.drop_path).to(device)
    if distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model: nn.Module = model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(_param_groups(model, args.weight_decay), lr=args.lr)
    use_scaler = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def amp_ctx():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp)

    backend = args.backend
    if backend == "auto" and device.type == "cpu":
        backend = "reference"

    ckpt = None
    resume_path = None
    if args.resume:
        resume_path = os.path.join(args.output_dir, "checkpoint-last.pth") if args.resume == "auto" else args.resume
        if os.path.isfile(resume_path):
            ckpt = torch.load(resume_path, map_location=device, weights_only=False)
        elif args.resume != "auto":
            raise ValueError(f"--resume: expected an existing checkpoint file, got {resume_path!r}")

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
        if ckpt is not None:
            load_masked_state_dict(model, ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler") is not None:
                scaler.load_state_dict(ckpt["scaler"])
            if sparsity is not None and ckpt.get("sparsity") is not None:
                sparsity.load_state_dict(ckpt["sparsity"])
            if ema is not None and ckpt.get("model_ema") is not None:
                ema.load_state_dict(ckpt["model_ema"])
            start_epoch, global_step = int(ckpt["epoch"]) + 1, int(ckpt["global_step"])
            if "rng_state" in ckpt:
                torch.set_rng_state(ckpt["rng_state"].cpu())
            if is_main:
                print(f"resumed from {resume_path} at epoch {start_epoch}, step {global_step}", flush=True)

        if is_main:
            n_params = sum(p.numel() for p in model.parameters())
            print(f"slak-train: {args.model} SLaK ({n_params:,} parameters), data {data_name}: "
                  f"{len(train_set)} train / {len(test_set)} held-out images, {num_classes} classes; "
                  f"{world} process(es) on {device} (lk_conv2d backend {backend}); "
                  f"{args.epochs} epochs x {steps_per_epoch} steps", flush=True)
            if sparsity is not None:
                print(f"sparse: density {sparsity.overall_density():.4f} over {len(sparsity.candidates)} weights "
                      f"({len(sparsity.dense_layers)} kept dense), init {args.sparse_init}, growth {args.growth}, "
                      + ("topology fixed (--fix), " if args.fix else
                         f"prune rate {args.prune_rate} every {args.update_frequency} steps, ") +
                      f"large kernels in {args.lk_granularity}s", flush=True)

        aug_gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
        history = []
        val_loss = val_acc = ema_acc = float("nan")
        n_val = 0
        for epoch in range(start_epoch, args.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            else:
                shuffle_gen.manual_seed(args.seed * 100_003 + epoch)
            aug_gen.manual_seed((args.seed * 1000 + rank) * 7919 + epoch)
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
                lr = lr_at(global_step, total_steps, warmup_steps, args.lr, args.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                before = real_steps[0]
                with amp_ctx():
                    out = train_model(x)
                    loss = F.cross_entropy(out.float(), y, label_smoothing=args.smoothing)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {float(loss)} at epoch {epoch + 1}, step {i + 1}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
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
                       val_loss=val_loss, val_acc=val_acc, density=density, topology_updates=updates,
                       lr=lr, seconds=time.time() - t0)
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
                    os.makedirs(args.output_dir, exist_ok=True)
                    state = {
                        "model": model.state_dict(),
                        "model_ema": ema.state_dict() if ema is not None else None,
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict() if use_scaler else None,
                        "sparsity": sparsity.state_dict() if sparsity is not None else None,
                        "epoch": epoch, "global_step": global_step, "rng_state": torch.get_rng_state(),
                        "args": vars(args),
                    }
                    tmp = os.path.join(args.output_dir, "checkpoint-last.pth.tmp")
                    torch.save(state, tmp)
                    os.replace(tmp, os.path.join(args.output_dir, "checkpoint-last.pth"))

    summary = {
        "data": data_name, "model": args.model, "held_out_images": n_val, "held_out_accuracy": val_acc,
        "held_out_loss": val_loss, "density": sparsity.overall_density() if sparsity is not None else 1.0,
        "layer_densities": sparsity.layer_densities() if sparsity is not None else {},
        "topology_updates": sparsity.topology_updates if sparsity is not None else 0,
        "optimizer_steps": real_steps[0], "epochs": args.epochs, "world_size": world, "device": str(device),
        "seconds": time.time() - t_start, "history": history,
    }
    if ema is not None:
        summary["ema_held_out_accuracy"] = ema_acc
    if is_main:
        print(f"held-out accuracy: {100 * val_acc:.2f}% on {n_val} images"
              + (f" (EMA {100 * ema_acc:.2f}%)" if ema is not None else "")
              + f" | density {summary['density']:.4f} | {summary['topology_updates']} topology updates | "
              f"{summary['seconds']:.1f}s", flush=True)
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, TrainError) as e:
        print(f"slak-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
