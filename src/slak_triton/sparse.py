"""Dynamic sparse training (SLaK's "sparse groups"): exact, AMP-safe, resumable and consistent across ranks.

``DynamicSparsity(model, optimizer, ...)`` masks the 2-D and 4-D weights of a model (every ``nn.Linear`` and
``nn.Conv2d``, or only the large-kernel branches), keeps the masks applied after every real optimizer step and
moves the topology (prune the smallest-magnitude active units, regrow exactly as many) every ``update_frequency``
real steps. See ``docs/sparse_training.md`` for the method, the differences from the official code and examples.

Units. A *unit* is what is pruned or grown at once: one element for ordinary weights; for the large-kernel branch
weights (the depthwise ``nn.Conv2d`` modules inside a module that has ``LoRA1`` and ``LoRA2`` children, i.e.
``slak_triton.nn.SparseLKConv``, detected by structure) one block of ``slak_triton.ops.block_shape(kh, kw)`` taps,
the unit the kernels skip. Blocks start at tap 0 and the last one along the long axis may be shorter (a 51-tall
kernel has blocks of 32 and 19 taps); units of different sizes form *size classes*, and growth replaces each
pruned unit by a unit of the same class, so both the unit count and the element count of every layer are exact.

Masks live in the modules, as float 0/1 buffers ``weight_mask`` shaped like the weight (so they are part of the
model's state_dict); ``DynamicSparsity.masks`` maps parameter names (``"stages.0.0.pwconv1.weight"``) to them.

Distributed: nothing is broadcast. Every random decision comes from a CPU ``torch.Generator`` seeded from
``seed`` (identical on every rank), every other decision from weights and gradients that DDP keeps identical, and
selections are made with stable sorts, so every rank computes the same masks; ``verify_consistent()`` checks it
with one all-reduce. Create ``DynamicSparsity`` after wrapping the model in DDP (masks registered afterwards are
not among DDP's broadcast buffers).
"""

import copy
import math
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from slak_triton.ops import block_shape

__all__ = [
    "DynamicSparsity",
    "MaskedEMA",
    "unwrap_model",
    "is_large_kernel_branch",
    "large_kernel_branches",
    "load_masked_state_dict",
    "cosine_prune_rate",
    "solve_layer_densities",
    "SPARSE_INITS",
    "GROWTH_MODES",
    "LK_GRANULARITIES",
    "DENSE_THRESHOLD",
    "MIN_PRUNE_RATE",
    "MASK_NAME",
]

SPARSE_INITS = ("uniform", "erk", "snip")
GROWTH_MODES = ("random", "gradient")
LK_GRANULARITIES = ("block", "element")
#: Layers whose initial density reaches this stay dense (no mask, never pruned).
DENSE_THRESHOLD = 0.99
#: The prune rate decays (cosine) to this value over ``total_steps``.
MIN_PRUNE_RATE = 0.005
MASK_NAME = "weight_mask"
_STATE_VERSION = 1


# --------------------------------------------------------------------------------------------------------------
# model structure
# --------------------------------------------------------------------------------------------------------------

def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_lk_container(module: nn.Module) -> bool:
    return isinstance(getattr(module, "LoRA1", None), nn.Module) and isinstance(getattr(module, "LoRA2", None),
                                                                              nn.Module)


def _is_depthwise_conv(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.weight is not None and module.weight.dim() == 4
            and module.groups == module.in_channels == module.out_channels)


def large_kernel_branches(model: nn.Module) -> Dict[str, nn.Conv2d]:
    """Qualified name -> conv of every large-kernel branch weight: the depthwise ``nn.Conv2d`` modules (groups ==
    in == out channels) inside a module that has ``LoRA1`` and ``LoRA2`` submodules (SLaK's large-kernel module,
    ``slak_triton.nn.SparseLKConv``: ``LoRA1.conv``, ``LoRA2.conv`` and ``small_conv.conv``). Structural, so it
    does not depend on the class."""
    model = unwrap_model(model)
    out: Dict[str, nn.Conv2d] = {}
    for cname, container in model.named_modules():
        if not _is_lk_container(container):
            continue
        for sname, sub in container.named_modules():
            if sub is not container and _is_depthwise_conv(sub):
                out[f"{cname}.{sname}" if cname else sname] = sub
    return out


def is_large_kernel_branch(model: nn.Module, name: str) -> bool:
    """Whether the module called ``name`` in ``model`` is a large-kernel branch conv (see
    ``large_kernel_branches``)."""
    return name in large_kernel_branches(model)


def _maskable_modules(model: nn.Module, only_large_kernels: bool) -> List[Tuple[str, nn.Module, bool]]:
    """(module name, module, is large-kernel branch) of every weight to mask, in ``named_modules`` order."""
    lk = large_kernel_branches(model)
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() not in (2, 4):
            continue
        is_lk = name in lk
        if only_large_kernels and not is_lk:
            continue
        out.append((name, mod, is_lk))
    return out


def _get_mask(module: nn.Module) -> Optional[torch.Tensor]:
    m = module._buffers.get(MASK_NAME) if hasattr(module, "_buffers") else None
    return m if isinstance(m, torch.Tensor) else None


def _set_mask(module: nn.Module, mask: Optional[torch.Tensor]) -> None:
    """Writes ``mask`` into ``module.weight_mask`` (in place when a buffer of that shape exists), registering the
    buffer when needed. ``None`` makes the module dense (the buffer becomes None: absent from the state_dict)."""
    w = module.weight
    if mask is None:
        if MASK_NAME in module._buffers:
            module._buffers[MASK_NAME] = None
        return
    mask = mask.to(device=w.device, dtype=w.dtype if w.is_floating_point() else torch.float32)
    cur = _get_mask(module)
    if cur is not None and cur.shape == w.shape and cur.dtype == mask.dtype and cur.device == mask.device:
        cur.copy_(mask)
    elif MASK_NAME in module._buffers:
        module._buffers[MASK_NAME] = mask.clone()
    else:
        module.register_buffer(MASK_NAME, mask.clone())


def load_masked_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True):
    """``model.load_state_dict(state_dict, strict)`` after registering a ``weight_mask`` buffer on every module
    whose key ``<module>.weight_mask`` the state_dict holds (a fresh ``nn.Linear`` has none). Strips a DDP
    ``module.`` prefix when every key has it. Returns what ``load_state_dict`` returns."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict: expected a dict, got {type(state_dict).__name__}")
    model = unwrap_model(model)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    mods = dict(model.named_modules())
    for key, value in state_dict.items():
        if key != MASK_NAME and not key.endswith("." + MASK_NAME):
            continue
        mod = mods.get(key[: -len(MASK_NAME)].rstrip("."))
        if mod is None or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        if _get_mask(mod) is None and isinstance(value, torch.Tensor) and value.shape == mod.weight.shape:
            _set_mask(mod, torch.ones_like(mod.weight))
    return model.load_state_dict(state_dict, strict=strict)


# --------------------------------------------------------------------------------------------------------------
# units (elements or kernel blocks)
# --------------------------------------------------------------------------------------------------------------

class _Layer:
    """One masked weight: its module and unit geometry. ``block`` is None for elementwise units."""

    def __init__(self, name: str, module: nn.Module, block: Optional[Tuple[int, int]]):
        self.name = name  # parameter name: "<module>.weight"
        self.module = module
        self.block = block
        shape = tuple(module.weight.shape)
        self.shape = shape
        self.numel = module.weight.numel()
        if block is None:
            self.n_units = self.numel
            self.classes = None  # one class
            self.class_sizes = [1]
        else:
            sizes = self.reduce(torch.ones(shape, dtype=torch.float32)).round().long()
            self.n_units = sizes.numel()
            uniq = sorted(set(sizes.tolist()))
            self.class_sizes = uniq
            self.classes = torch.bucketize(sizes, torch.tensor(uniq))  # CPU long: class id of every unit
        self._classes_dev: Dict[torch.device, torch.Tensor] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def mask(self) -> Optional[torch.Tensor]:
        return _get_mask(self.module)

    def classes_on(self, device: torch.device) -> Optional[torch.Tensor]:
        if self.classes is None:
            return None
        if device not in self._classes_dev:
            self._classes_dev[device] = self.classes.to(device)
        return self._classes_dev[device]

    def _grid(self):
        A, B, kh, kw = self.shape
        bh, bw = self.block
        return A, B, kh, kw, bh, bw, -(-kh // bh), -(-kw // bw)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Per-unit sums of an element tensor shaped like the weight: a flat [n_units] tensor (deterministic:
        padding and reshapes, no atomics)."""
        if self.block is None:
            return t.reshape(-1)
        A, B, kh, kw, bh, bw, nbh, nbw = self._grid()
        t = F.pad(t, (0, nbw * bw - kw, 0, nbh * bh - kh))
        return t.reshape(A, B, nbh, bh, nbw, bw).sum(dim=(3, 5)).reshape(-1)

    def expand(self, u: torch.Tensor) -> torch.Tensor:
        """Element tensor shaped like the weight from a flat per-unit tensor."""
        if self.block is None:
            return u.reshape(self.shape)
        A, B, kh, kw, bh, bw, nbh, nbw = self._grid()
        u = u.reshape(A, B, nbh, 1, nbw, 1).expand(A, B, nbh, bh, nbw, bw)
        return u.reshape(A, B, nbh * bh, nbw * bw)[:, :, :kh, :kw]

    def unit_mask(self) -> torch.Tensor:
        """Bool [n_units]: a unit is active when any of its elements is."""
        m = self.mask
        if m is None:
            return torch.ones(self.n_units, dtype=torch.bool, device=self.weight.device)
        return self.reduce((m != 0).to(torch.float32)) > 0

    def element_sizes(self, unit_sel: torch.Tensor) -> int:
        """Number of elements in the selected units (bool [n_units])."""
        if self.block is None:
            return int(unit_sel.sum())
        cls = self.classes_on(unit_sel.device)
        sizes = torch.tensor(self.class_sizes, device=unit_sel.device)
        return int(sizes[cls][unit_sel].sum())


def _select(score: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Indices of the ``k`` largest (or smallest) scores; ties go to the lowest index (stable, deterministic)."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    order = torch.sort(score, descending=largest, stable=True).indices
    return order[:k]


# --------------------------------------------------------------------------------------------------------------
# schedules and initial densities
# --------------------------------------------------------------------------------------------------------------

def cosine_prune_rate(step: int, prune_rate: float, total_steps: int, min_rate: float = MIN_PRUNE_RATE) -> float:
    """The prune rate after ``step`` real optimizer steps: cosine from ``prune_rate`` (step 0) to
    ``min(min_rate, prune_rate)`` (step >= ``total_steps``)."""
    lo = min(min_rate, prune_rate)
    t = min(max(step, 0), total_steps) / total_steps
    return lo + (prune_rate - lo) * 0.5 * (1.0 + math.cos(math.pi * t))


def solve_layer_densities(sizes: Sequence[int], raw: Sequence[float], density: float,
                          dense_threshold: float = DENSE_THRESHOLD) -> List[float]:
    """Per-layer densities ``eps * raw[i]`` whose element-weighted mean is ``density``; layers that would reach
    ``dense_threshold`` become dense (1.0) and ``eps`` is solved again for the rest (RigL's ERK procedure)."""
    n = len(sizes)
    budget = density * sum(sizes)
    raw = [float(r) for r in raw]
    dense: set = set()
    while True:
        rest = [i for i in range(n) if i not in dense]
        if not rest:
            return [1.0] * n
        remaining = budget - sum(sizes[i] for i in dense)
        denom = sum(raw[i] * sizes[i] for i in rest)
        if denom <= 0:  # all remaining raw scores zero: spread uniformly
            for i in rest:
                raw[i] = 1.0
            denom = sum(sizes[i] for i in rest)
        eps = max(remaining, 0.0) / denom
        new = {i for i in rest if eps * raw[i] >= dense_threshold}
        if not new:
            return [1.0 if i in dense else eps * raw[i] for i in range(n)]
        dense |= new


# --------------------------------------------------------------------------------------------------------------
# DynamicSparsity
# --------------------------------------------------------------------------------------------------------------

def _check_number(name: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} ({value!r})")
    v = float(value)
    if not math.isfinite(v) or (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
        raise ValueError(f"{name}: expected a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
                         f", got {value!r}")
    return v


def _check_int(name: str, value, lo: int, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int{' or None' if allow_none else ''}, got {type(value).__name__} "
                        f"({value!r})")
    if value < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {value}")
    return value


def _check_choice(name: str, value, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


class DynamicSparsity:
    """Sparse-from-scratch training with a moving topology, as SLaK trains (exact, AMP-safe, resumable, no
    per-step communication).

    Args:
        model: the network, plain or wrapped (DDP, DataParallel, ``torch.compile``).
        optimizer: its optimizer; a step post-hook is registered on it (``remove()`` takes it off).
        density: target fraction of active weights over all masked layers, in (0, 1].
        sparse_init: per-layer densities: "uniform", "erk" (proportional to sum(shape) / prod(shape)) or "snip"
            (one batch's |w * grad| kept by a global top-k; needs ``snip_data``). Masks are then drawn at random
            per layer in every case; layers that reach ``DENSE_THRESHOLD`` (0.99) stay dense.
        prune_rate: fraction of each layer's active units replaced per topology update, decaying by a cosine over
            ``total_steps`` to ``MIN_PRUNE_RATE`` (0.005).
        growth: "random" (seeded generator) or "gradient" (largest |grad| of the step that triggered the update).
        update_frequency: real optimizer steps between topology updates; None keeps the topology static.
        total_steps: real optimizer steps of the whole run (the prune-rate schedule's length).
        only_large_kernels: mask only the large-kernel branch weights.
        seed: seeds the CPU generator behind every random draw (use the same on every rank).
        snip_data: ``(inputs, targets)`` for "snip"; the loss is ``snip_loss(model(inputs), targets)``.
        lk_granularity: "block" (units of ``block_shape`` on the large-kernel branches, which the kernels skip)
            or "element" (elementwise everywhere, as the official code).
        snip_loss: loss for "snip" (default ``F.cross_entropy``).

    After every real ``optimizer.step()`` (a step skipped by ``torch.amp.GradScaler`` never calls it, so it
    neither counts nor changes anything) weights and same-shaped optimizer state (SGD ``momentum_buffer``, Adam /
    AdamW ``exp_avg``, ``exp_avg_sq``...) are multiplied by the masks; every ``update_frequency`` real steps each
    layer prunes ``ceil(rate * active units)`` smallest-|w| active units (a block scores the sum of |w| over its
    taps) and grows exactly as many inactive units of the same sizes; grown weights and their optimizer state start
    at zero.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        density: float = 0.6,
        sparse_init: str = "snip",
        prune_rate: float = 0.3,
        growth: str = "random",
        update_frequency: Optional[int] = 100,
        total_steps: int,
        only_large_kernels: bool = False,
        seed: int = 0,
        snip_data: Optional[Tuple[Any, Any]] = None,
        lk_granularity: str = "block",
        snip_loss: Optional[Callable] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.density = _check_number("density", density, 0.0, 1.0, lo_open=True)
        self.sparse_init = _check_choice("sparse_init", sparse_init, SPARSE_INITS)
        self.prune_rate = _check_number("prune_rate", prune_rate, 0.0, 1.0, hi_open=True)
        self.growth = _check_choice("growth", growth, GROWTH_MODES)
        self.update_frequency = _check_int("update_frequency", update_frequency, 1, allow_none=True)
        self.total_steps = _check_int("total_steps", total_steps, 1)
        if not isinstance(only_large_kernels, bool):
            raise TypeError(f"only_large_kernels: expected a bool, got {type(only_large_kernels).__name__}")
        self.only_large_kernels = only_large_kernels
        self.seed = _check_int("seed", seed, 0)
        self.lk_granularity = _check_choice("lk_granularity", lk_granularity, LK_GRANULARITIES)
        if sparse_init == "snip":
            if not (isinstance(snip_data, (tuple, list)) and len(snip_data) == 2):
                raise ValueError(f"snip_data: expected (inputs, targets) for sparse_init='snip', got "
                                 f"{type(snip_data).__name__ if snip_data is not None else None}")
        if snip_loss is not None and not callable(snip_loss):
            raise TypeError(f"snip_loss: expected a callable or None, got {type(snip_loss).__name__}")

        self.wrapped_model = model
        self.model = unwrap_model(model)
        self.optimizer = optimizer
        self.steps = 0
        self.topology_updates = 0
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

        self.candidates: List[_Layer] = []
        for name, mod, is_lk in _maskable_modules(self.model, only_large_kernels):
            self.candidates.append(_Layer(name + ".weight", mod, self._block_for(mod, is_lk)))
        if not self.candidates:
            raise ValueError(f"model: expected at least one nn.Linear / nn.Conv2d weight to mask "
                             f"(only_large_kernels={only_large_kernels}), found none")
        self._by_name = {layer.name: layer for layer in self.candidates}

        raw = self._raw_densities(snip_data, snip_loss or F.cross_entropy)
        densities = solve_layer_densities([layer.numel for layer in self.candidates], raw, self.density)
        self._init_masks(densities)
        self.apply_masks()
        self._hook = optimizer.register_step_post_hook(self._after_step)

    # -- construction ----------------------------------------------------------------------------------------
    def _block_for(self, module: nn.Module, is_lk: bool) -> Optional[Tuple[int, int]]:
        if not is_lk or self.lk_granularity == "element":
            return None
        kh, kw = module.weight.shape[-2:]
        try:
            return block_shape(int(kh), int(kw))
        except ValueError:  # a kernel the ops do not take (even size, > 63): elementwise
            return None

    def _raw_densities(self, snip_data, loss_fn) -> List[float]:
        if self.sparse_init == "uniform":
            return [1.0] * len(self.candidates)
        if self.sparse_init == "erk":
            return [sum(layer.shape) / layer.numel for layer in self.candidates]
        return self._snip_densities(snip_data, loss_fn)

    def _snip_densities(self, snip_data, loss_fn) -> List[float]:
        """Per-layer fraction of one batch's global top-k |w * grad| (k = density * total elements). The forward
        runs through the wrapped model (DDP averages the gradients, so every rank gets the same scores); gradients
        and buffers (BN statistics) are restored afterwards."""
        inputs, targets = snip_data
        params = [p for p in self.model.parameters()]
        saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        saved_bufs = [(b, b.detach().clone()) for b in self.model.buffers() if isinstance(b, torch.Tensor)]
        dev = self.candidates[0].weight.device
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.to(dev)
        if isinstance(targets, torch.Tensor):
            targets = targets.to(dev)
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = loss_fn(self.wrapped_model(inputs), targets)
            loss.backward()
        with torch.no_grad():
            scores = []
            for layer in self.candidates:
                w = layer.weight
                g = w.grad if w.grad is not None else torch.zeros_like(w)
                scores.append((w.detach().float() * g.float()).abs().reshape(-1))
            flat = torch.cat(scores)
            k = max(1, int(round(self.density * flat.numel())))
            keep = _select(flat, k, largest=True)
            offsets = torch.tensor([0] + [s.numel() for s in scores], device=flat.device).cumsum(0)
            layer_of = torch.bucketize(keep, offsets[1:], right=True)
            counts = torch.bincount(layer_of, minlength=len(scores)).tolist()
            for p, g in zip(params, saved_grads):
                p.grad = g
            for b, v in saved_bufs:
                b.copy_(v)
        return [c / layer.numel for c, layer in zip(counts, self.candidates)]

    @torch.no_grad()
    def _init_masks(self, densities: Sequence[float]) -> None:
        self.layer_init_densities = {}
        for layer, d in zip(self.candidates, densities):
            self.layer_init_densities[layer.name] = d
            if d >= DENSE_THRESHOLD:
                _set_mask(layer.module, None)
                continue
            unit = torch.zeros(layer.n_units, dtype=torch.bool)
            if layer.classes is None:
                groups = [torch.arange(layer.n_units)]
            else:
                groups = [torch.nonzero(layer.classes == c).flatten() for c in range(len(layer.class_sizes))]
            for idx in groups:
                k = int(round(d * idx.numel()))
                perm = torch.randperm(idx.numel(), generator=self.generator)[:k]
                unit[idx[perm]] = True
            if not bool(unit.any()):
                unit[torch.randint(layer.n_units, (1,), generator=self.generator)] = True
            dev = layer.weight.device
            _set_mask(layer.module, layer.expand(unit.to(dev)).to(torch.float32))

    # -- public state ----------------------------------------------------------------------------------------
    @property
    def layers(self) -> List[_Layer]:
        """The layers that hold a mask (dense layers excluded)."""
        return [layer for layer in self.candidates if layer.mask is not None]

    @property
    def masks(self) -> Dict[str, torch.Tensor]:
        """Parameter name -> live mask buffer (float 0/1, shaped like the weight) of every masked layer."""
        return {layer.name: layer.mask for layer in self.layers}

    @property
    def dense_layers(self) -> List[str]:
        """Names of the candidate weights that stay dense."""
        return [layer.name for layer in self.candidates if layer.mask is None]

    def current_prune_rate(self) -> float:
        return cosine_prune_rate(self.steps, self.prune_rate, self.total_steps)

    @torch.no_grad()
    def layer_densities(self) -> Dict[str, float]:
        """Parameter name -> active fraction of elements (1.0 for dense layers), over all candidate weights."""
        return {layer.name: (1.0 if layer.mask is None else float((layer.mask != 0).sum()) / layer.numel)
                for layer in self.candidates}

    @torch.no_grad()
    def overall_density(self) -> float:
        """Active elements / elements over all candidate weights (dense layers count as fully active)."""
        active = sum(layer.numel if layer.mask is None else int((layer.mask != 0).sum()) for layer in self.candidates)
        return active / sum(layer.numel for layer in self.candidates)

    def remove(self) -> None:
        """Detaches the optimizer hook (masks stay in the modules)."""
        self._hook.remove()

    # -- per step --------------------------------------------------------------------------------------------
    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        self.apply_masks()
        if self.update_frequency is not None and self.steps % self.update_frequency == 0:
            self.update_topology()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """weights *= masks, and every optimizer-state tensor shaped like a masked weight likewise."""
        for layer in self.layers:
            m = layer.mask
            w = layer.weight
            w.mul_(m.to(w.dtype))
            self._mask_state(w, m)

    def _mask_state(self, w: torch.Tensor, m: torch.Tensor) -> None:
        state = self.optimizer.state.get(w)
        if not state:
            return
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.shape == w.shape and v.is_floating_point():
                v.mul_(m.to(device=v.device, dtype=v.dtype))

    @torch.no_grad()
    def update_topology(self, rate: Optional[float] = None) -> Dict[str, int]:
        """One prune-and-grow round on every masked layer (called by the hook every ``update_frequency`` real
        steps; callable by hand). ``rate`` defaults to the scheduled rate. Returns name -> units replaced."""
        if rate is None:
            rate = self.current_prune_rate()
        rate = _check_number("rate", rate, 0.0, 1.0)
        replaced = {}
        for layer in self.layers:
            replaced[layer.name] = self._prune_grow(layer, rate)
        self.topology_updates += 1
        return replaced

    def _prune_grow(self, layer: _Layer, rate: float) -> int:
        w = layer.weight
        old = layer.mask
        dev = w.device
        unit = layer.unit_mask()
        n_active = int(unit.sum())
        k = min(int(math.ceil(rate * n_active)), n_active)
        # One random permutation per layer per update, whatever happens next (the generator's consumption depends
        # only on the layer shapes): it orders the units for growth; scores sort stably on top of it, so "random"
        # growth (all scores equal) takes the first k candidates of the permutation and "gradient" growth breaks
        # ties at random.
        perm = torch.argsort(torch.rand(layer.n_units, generator=self.generator).to(dev), stable=True)
        if k == 0:
            return 0
        mag = layer.reduce(w.detach().abs().float())
        prune = _select(torch.where(unit, mag, torch.full_like(mag, math.inf)), k, largest=False)
        new = unit.clone()
        new[prune] = False
        kept = new.clone()
        gscore = torch.zeros(layer.n_units, device=dev)
        if self.growth == "gradient":
            g = w.grad
            if g is None:
                warnings.warn(f"DynamicSparsity: growth='gradient' but {layer.name} has no gradient at update "
                              f"{self.topology_updates}; growing at random instead", RuntimeWarning, stacklevel=3)
            else:
                gscore = layer.reduce(g.detach().abs().float())
                before = ~unit  # inactive before this update
                if bool(before.any()) and not bool((gscore[before] != 0).any()):
                    # The forward multiplied the weight by its mask (SparseLKConv's op does), so inactive units
                    # carry no gradient and the just-pruned ones would always win their place back: rank them
                    # last, so growth picks (at random) among the units that were inactive before.
                    gscore = torch.where(before, gscore, torch.full_like(gscore, -1.0))
        cls = layer.classes_on(dev)
        neg = torch.full_like(gscore, -math.inf)
        if cls is None:
            per_class = [(None, k)]
        else:
            per_class = list(enumerate(torch.bincount(cls[prune], minlength=len(layer.class_sizes)).tolist()))
        for c, kc in per_class:
            if kc == 0:
                continue
            cand = ~new if c is None else (~new & (cls == c))
            score = torch.where(cand, gscore, neg)[perm]
            grow = perm[_select(score, kc, largest=True)]
            new[grow] = True
        new_mask = layer.expand(new).to(old.dtype)
        keep = layer.expand(kept)  # pruned units become zero; grown ones (re-grown included) start at zero
        w.mul_(keep.to(w.dtype))
        self._mask_state(w, keep)
        old.copy_(new_mask)
        return k

    # -- distributed -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def mask_checksum(self) -> int:
        """An integer hash of every mask (positions of the active elements, per layer) and the step counters."""
        total = 0
        for i, layer in enumerate(self.candidates):
            m = layer.mask
            if m is None:
                total += (i + 1) * 1_000_003
                continue
            idx = torch.arange(m.numel(), device=m.device, dtype=torch.int64)
            h = (idx * 2_654_435_761 + (i + 1) * 97_531) % 2_147_483_647
            total += int((h * (m.reshape(-1) != 0)).sum()) % (2**40)
            total = total % (2**52)
        return (total + self.steps * 7_919 + self.topology_updates * 104_729) % (2**52)

    @torch.no_grad()
    def verify_consistent(self, group=None) -> bool:
        """True when every rank holds the same masks and step counters (always True without an initialized
        torch.distributed). One all-reduce (MAX) of [checksum, -checksum]."""
        if not (dist.is_available() and dist.is_initialized()):
            return True
        c = self.mask_checksum()
        dev = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            dev = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor([c, -c], dtype=torch.int64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return int(t[0]) == -int(t[1])

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Masks (bool, CPU), step counters, the schedule and settings, and the growth generator's state."""
        return {
            "version": _STATE_VERSION,
            "steps": self.steps,
            "topology_updates": self.topology_updates,
            "masks": {layer.name: (layer.mask != 0).cpu() for layer in self.layers},
            "dense_layers": self.dense_layers,
            "rng_state": self.generator.get_state(),
            "schedule": {"prune_rate": self.prune_rate, "min_prune_rate": MIN_PRUNE_RATE,
                         "total_steps": self.total_steps, "update_frequency": self.update_frequency},
            "config": {"density": self.density, "growth": self.growth, "lk_granularity": self.lk_granularity,
                       "only_large_kernels": self.only_large_kernels, "sparse_init": self.sparse_init,
                       "seed": self.seed},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores masks (into the modules' buffers, re-applied to the weights), counters, schedule, growth
        mode and generator state: the run continues exactly as if it had not stopped. The checkpoint's settings
        win over the constructor's."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict from DynamicSparsity.state_dict(), got {type(state).__name__}")
        missing = [k for k in ("version", "steps", "topology_updates", "masks", "rng_state", "schedule", "config")
                   if k not in state]
        if missing:
            raise ValueError(f"state: expected keys of DynamicSparsity.state_dict(), missing {missing}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"state['version']: expected {_STATE_VERSION}, got {state['version']!r}")
        unknown = sorted(set(state["masks"]) - set(self._by_name))
        if unknown:
            raise ValueError(f"state['masks']: names not among this model's maskable weights: {unknown[:5]}"
                             f"{' ...' if len(unknown) > 5 else ''}")
        for name, m in state["masks"].items():
            shape = self._by_name[name].shape
            if tuple(m.shape) != shape:
                raise ValueError(f"state['masks'][{name!r}]: expected shape {shape}, got {tuple(m.shape)}")
        sched, cfg = state["schedule"], state["config"]
        self.prune_rate = float(sched["prune_rate"])
        self.total_steps = int(sched["total_steps"])
        self.update_frequency = sched["update_frequency"]
        self.growth = cfg["growth"]
        self.density = float(cfg["density"])
        self.sparse_init = cfg["sparse_init"]
        self.seed = cfg["seed"]
        if cfg["lk_granularity"] != self.lk_granularity:
            self.lk_granularity = cfg["lk_granularity"]
            lk = large_kernel_branches(self.model)
            self.candidates = [_Layer(layer.name, layer.module,
                                      self._block_for(layer.module, layer.name[: -len(".weight")] in lk))
                               for layer in self.candidates]
            self._by_name = {layer.name: layer for layer in self.candidates}
        for layer in self.candidates:
            m = state["masks"].get(layer.name)
            _set_mask(layer.module, None if m is None else m.to(torch.float32))
        self.steps = int(state["steps"])
        self.topology_updates = int(state["topology_updates"])
        self.generator.set_state(state["rng_state"])
        self.apply_masks()

    def __repr__(self) -> str:
        return (f"DynamicSparsity(layers={len(self.layers)}/{len(self.candidates)}, density="
                f"{self.overall_density():.4f}, growth={self.growth!r}, steps={self.steps}, "
                f"topology_updates={self.topology_updates}, prune_rate={self.current_prune_rate():.4f})")


# --------------------------------------------------------------------------------------------------------------
# model EMA
# --------------------------------------------------------------------------------------------------------------

class MaskedEMA:
    """Mask-aware exponential moving average of a model's weights (timm's ModelEma, made sparse-aware).

    ``update(model)``: every floating parameter and buffer becomes ``decay * ema + (1 - decay) * live``; other
    buffers and ``weight_mask`` buffers are copied. Then, for every masked weight, entries whose mask is off are 0
    and entries grown since the previous update (mask off before, on now) copy the live weight.

    Args:
        model: the live model (plain or wrapped); the EMA copy is ``self.module`` (eval mode, no gradients).
        decay: in [0, 1].
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.decay = _check_number("decay", decay, 0.0, 1.0)
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = unwrap_model(model)
        d = self.decay
        for (name, lm), em in zip(live.named_modules(), self.module.modules()):
            prev_mask = _get_mask(em)
            for pname, p in lm._parameters.items():
                ep = em._parameters.get(pname)
                if p is None or ep is None:
                    continue
                if ep.is_floating_point():
                    ep.mul_(d).add_(p.detach().to(ep.dtype), alpha=1.0 - d)
                else:
                    ep.copy_(p)
            for bname, b in lm._buffers.items():
                if bname == MASK_NAME:
                    continue
                eb = em._buffers.get(bname)
                if b is None or eb is None:
                    continue
                if eb.is_floating_point():
                    eb.mul_(d).add_(b.to(eb.dtype), alpha=1.0 - d)
                else:
                    eb.copy_(b)
            mask = _get_mask(lm)
            if MASK_NAME in lm._buffers or MASK_NAME in em._buffers:
                if mask is not None:
                    ew = em.weight
                    lw = lm.weight.detach().to(ew.dtype)
                    on = mask != 0
                    if prev_mask is not None:
                        grown = on & (prev_mask == 0)
                        ew.copy_(torch.where(grown, lw, ew))
                    ew.mul_(on.to(ew.dtype))
                _set_mask(em, mask)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True):
        return load_masked_state_dict(self.module, state_dict, strict=strict)
