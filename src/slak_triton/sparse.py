"""Dynamic sparse training (SLaK's "sparse groups"): exact, AMP-safe, resumable and consistent across ranks.

``DynamicSparsity(model, optimizer, ...)`` masks the 2-D and 4-D weights of a model (every ``nn.Linear`` and
``nn.Conv2d``, or only the large-kernel branches), keeps the masks applied after every real optimizer step and
moves the topology (prune the smallest-magnitude active units, regrow exactly as many) every ``update_frequency``
real steps. ``freeze_sparsity(model)`` keeps a loaded sparse model's zeros through fine-tuning (the official
backbone's ``sparse=True``). See ``docs/sparse_training.md`` for the method, the official flags and their
equivalents here, the differences from the official code and examples.

Units. A *unit* is what is pruned or grown at once: one element for ordinary weights; for the large-kernel branch
weights (the depthwise ``nn.Conv2d`` modules inside a module that has ``LoRA1`` and ``LoRA2`` children, i.e.
``slak_triton.nn.SparseLKConv``, detected by structure) one block of ``slak_triton.ops.block_shape(kh, kw)`` taps,
the unit the kernels skip. Blocks start at tap 0 and the last one along the long axis may be shorter; units of
different sizes form *size classes*, and growth replaces each pruned unit by a unit of the same class, so both the
unit count and the element count of every layer are exact.

Masks live in the modules, as float 0/1 buffers ``weight_mask`` shaped like the weight (so they are part of the
model's state_dict); ``DynamicSparsity.masks`` maps parameter names (``"stages.0.0.pwconv1.weight"``) to them.

Gradients for growth. ``nn.Linear`` and plain ``nn.Conv2d`` layers compute with their (masked, zero) weights, so
their gradients cover every entry. The large-kernel modules compute with ``weight * weight_mask`` through
``lk_conv2d``, whose weight gradient is masked (and skips inactive blocks) unless the forward ran with
``slak_triton.dense_weight_grad()``. ``DynamicSparsity`` installs forward hooks on those modules that switch it on
exactly for the forwards whose gradients growth reads: the forward before a topology-update step for
``growth="gradient"``, every training forward for the momentum modes (whose optimizer moments must see dense
gradients, as in the official code).

Distributed: nothing is broadcast. Every random decision comes from a CPU ``torch.Generator`` seeded from
``seed`` (identical on every rank), every other decision from weights, gradients and optimizer state that DDP
keeps identical, and selections are made with stable sorts, so every rank computes the same masks;
``verify_consistent()`` checks it with one all-reduce. Create ``DynamicSparsity`` after wrapping the model in DDP
(masks registered afterwards are not among DDP's broadcast buffers).
"""

import copy
import math
import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from slak_triton.nn import ConvBN, LKConv2d
from slak_triton.ops import block_shape, dense_weight_grad

__all__ = [
    "DynamicSparsity",
    "FrozenSparsity",
    "freeze_sparsity",
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
    "DEFAULT_DENSITY",
    "FROM_WEIGHTS_TOLERANCE",
    "MIN_PRUNE_RATE",
    "MASK_NAME",
]

#: "from_weights": masks = weight != 0 (a sparse model loaded from a checkpoint); "resume" is its official name.
SPARSE_INITS = ("uniform", "erk", "snip", "from_weights", "resume")
#: "momentum" / "momentum_neuron" score with the optimizer's moments (Adam: exp_avg / (sqrt(exp_avg_sq) + 1e-8),
#: SGD: momentum_buffer), as the official code does.
GROWTH_MODES = ("random", "gradient", "momentum", "momentum_neuron")
_MOMENTUM_GROWTH = ("momentum", "momentum_neuron")
LK_GRANULARITIES = ("block", "element")
#: Layers whose initial density reaches this stay dense (no mask, never pruned).
DENSE_THRESHOLD = 0.99
#: ``density`` when it is not given (the published SLaK models: 40% sparsity).
DEFAULT_DENSITY = 0.6
#: ``sparse_init="from_weights"`` with an explicit ``density``: the weights' zeros must give it to within this.
FROM_WEIGHTS_TOLERANCE = 0.01
#: The prune rate decays (cosine) to this value over ``total_steps``.
MIN_PRUNE_RATE = 0.005
MASK_NAME = "weight_mask"
_STATE_VERSION = 2
_ADAM_EPS = 1e-8  # the official momentum score's epsilon


# --------------------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------------------

def _check_module(name: str, value) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name}: expected an nn.Module, got {type(value).__name__}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} ({value!r})")
    return value


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
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def _names(items: Sequence[str], n: int = 5) -> str:
    items = list(items)
    return f"{items[:n]}{f' (+{len(items) - n} more)' if len(items) > n else ''}"


# --------------------------------------------------------------------------------------------------------------
# model structure
# --------------------------------------------------------------------------------------------------------------

def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers (any nesting)."""
    _check_module("model", model)
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


def _lk_branches(model: nn.Module) -> Dict[str, Tuple[nn.Conv2d, bool]]:
    """Qualified name -> (branch conv, is a long branch: inside ``LoRA1`` / ``LoRA2`` rather than ``small_conv``)."""
    out: Dict[str, Tuple[nn.Conv2d, bool]] = {}
    for cname, container in model.named_modules():
        if not _is_lk_container(container):
            continue
        for sname, sub in container.named_modules():
            if sub is not container and _is_depthwise_conv(sub):
                out[f"{cname}.{sname}" if cname else sname] = (sub, sname.split(".")[0] in ("LoRA1", "LoRA2"))
    return out


def large_kernel_branches(model: nn.Module) -> Dict[str, nn.Conv2d]:
    """Qualified name -> conv of every large-kernel branch weight: the depthwise ``nn.Conv2d`` modules (groups ==
    in == out channels) inside a module that has ``LoRA1`` and ``LoRA2`` submodules (SLaK's large-kernel module,
    ``slak_triton.nn.SparseLKConv``: ``LoRA1.conv``, ``LoRA2.conv`` and ``small_conv.conv``). Structural, so it
    does not depend on the class."""
    return {name: conv for name, (conv, _) in _lk_branches(unwrap_model(model)).items()}


def is_large_kernel_branch(model: nn.Module, name: str) -> bool:
    """Whether the module called ``name`` in ``model`` is a large-kernel branch conv (see
    ``large_kernel_branches``)."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a module name (str), got {type(name).__name__}")
    return name in large_kernel_branches(model)


def _maskable_modules(model: nn.Module, only_large_kernels: bool, include_small_conv: bool
                      ) -> List[Tuple[str, nn.Module, bool]]:
    """(module name, module, is large-kernel branch) of every weight to mask, in ``named_modules`` order.
    ``only_large_kernels``: the ``LoRA1`` / ``LoRA2`` branches (official ``--only-L``), plus ``small_conv`` with
    ``include_small_conv``."""
    lk = _lk_branches(model)
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() not in (2, 4):
            continue
        is_lk = name in lk
        if only_large_kernels and not (is_lk and (lk[name][1] or include_small_conv)):
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


def _active_from_weights(module: nn.Module) -> torch.Tensor:
    """Bool, shaped like the weight: the module's own mask where it holds one (loaded with a slak_triton checkpoint,
    or derived from the loaded zeros by the modules' loaders), else ``weight != 0``."""
    mask = _get_mask(module)
    if mask is not None:
        return mask != 0
    return module.weight.detach() != 0


def _is_binary(t: torch.Tensor) -> bool:
    if t.dtype == torch.bool:
        return True
    return bool(((t == 0) | (t == 1)).all())


def load_masked_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True):
    """``model.load_state_dict(state_dict, strict)`` after registering a ``weight_mask`` buffer on every module
    whose key ``<module>.weight_mask`` the state_dict holds (a fresh ``nn.Linear`` has none). Strips a DDP
    ``module.`` prefix when every key has it. Masks must hold only 0 and 1. Returns what ``load_state_dict``
    returns."""
    _check_module("model", model)
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict: expected a dict, got {type(state_dict).__name__}")
    _check_bool("strict", strict)
    model = unwrap_model(model)
    if state_dict and all(isinstance(k, str) and k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    mods = dict(model.named_modules())
    for key, value in state_dict.items():
        if not isinstance(key, str) or (key != MASK_NAME and not key.endswith("." + MASK_NAME)):
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}]: expected a tensor, got {type(value).__name__}")
        if not _is_binary(value):
            bad = value[(value != 0) & (value != 1)].flatten()[:3].tolist()
            raise ValueError(f"state_dict[{key!r}]: expected a mask of 0s and 1s, got other values, e.g. {bad}")
        mod = mods.get(key[: -len(MASK_NAME)].rstrip("."))
        if mod is None or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        if _get_mask(mod) is None and value.shape == mod.weight.shape:
            _set_mask(mod, torch.ones_like(mod.weight))
    return model.load_state_dict(state_dict, strict=strict)


# --------------------------------------------------------------------------------------------------------------
# who manages a module's mask (one manager per module)
# --------------------------------------------------------------------------------------------------------------

_OWNERS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


def _owner_of(module: nn.Module):
    ref = _OWNERS.get(module)
    owner = ref() if ref is not None else None
    return owner if owner is not None and owner._active else None


def _claim(owner, modules: Sequence[Tuple[str, nn.Module]], check_only: bool = False) -> None:
    """Registers ``owner`` as the manager of ``modules``; raises when another live manager holds any of them."""
    taken = [(name, _owner_of(mod)) for name, mod in modules if _owner_of(mod) not in (None, owner)]
    if taken:
        other = taken[0][1]
        raise ValueError(
            f"model: expected weights no other DynamicSparsity / FrozenSparsity manages, got {len(taken)} managed "
            f"by a live {type(other).__name__} (e.g. {_names([n for n, _ in taken], 3)}); a second manager would "
            f"redraw the masks and apply every prune / grow twice: call .remove() on the first one (or keep using it)")
    if check_only:
        return
    for _, mod in modules:
        _OWNERS[mod] = weakref.ref(owner)


def _release(owner, modules: Iterable[nn.Module]) -> None:
    for mod in modules:
        ref = _OWNERS.get(mod)
        if ref is not None and ref() is owner:
            del _OWNERS[mod]


class _DenseGradSwitch:
    """A forward pre-hook / forward hook pair that runs a module's forward inside ``dense_weight_grad()`` when its
    owner says so (``owner.dense_grad_next_step`` and gradients enabled). Deep copies (``MaskedEMA``'s model copy)
    and pickles get an inert switch, not a copy of the owner."""

    def __init__(self, owner=None):
        self._owner = weakref.ref(owner) if owner is not None else None
        self._open: List[Any] = []

    def pre(self, module, args):
        owner = self._owner() if self._owner is not None else None
        ctx = None
        if owner is not None and torch.is_grad_enabled():
            dense = owner.dense_grad_next_step
            owner._forward_dense[module] = dense
            if dense:
                ctx = dense_weight_grad(True)
                ctx.__enter__()
        self._open.append(ctx)

    def post(self, module, args, output):
        ctx = self._open.pop() if self._open else None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def __deepcopy__(self, memo):
        return _DenseGradSwitch()

    def __reduce__(self):
        return (_DenseGradSwitch, ())


class _OwnerHook:
    """A module hook that calls ``getattr(owner, method)(*args)`` while the owner lives. Deep copies of the module
    (``MaskedEMA``'s model copy) and pickles get an inert hook, not a copy of the owner."""

    def __init__(self, owner=None, method: str = ""):
        self._owner = weakref.ref(owner) if owner is not None else None
        self._method = method

    def __call__(self, *args):
        owner = self._owner() if self._owner is not None else None
        if owner is not None:
            getattr(owner, self._method)(*args)

    def __deepcopy__(self, memo):
        return _OwnerHook()

    def __reduce__(self):
        return (_OwnerHook, ())


def _dense_grad_modules(model: nn.Module, masked: Sequence[nn.Module]) -> List[nn.Module]:
    """The modules whose forward computes with a mask through ``lk_conv2d`` (so that their weight gradient is
    masked unless the forward runs inside ``dense_weight_grad()``), outermost only: the large-kernel containers
    holding a masked branch, and masked ``LKConv2d`` / ``ConvBN`` modules outside such containers."""
    ids = {id(m) for m in masked}
    out: List[nn.Module] = []
    containers: List[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(c + ".") for c in containers):
            continue
        if _is_lk_container(mod):
            if any(id(sub) in ids for sub in mod.modules()):
                out.append(mod)
                containers.append(name)
        elif isinstance(mod, LKConv2d) and id(mod) in ids:
            out.append(mod)
        elif isinstance(mod, ConvBN) and id(mod.conv) in ids:
            out.append(mod)
    return out


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

    def partial_units(self, active: torch.Tensor) -> int:
        """Number of units whose elements are partly on in the bool element tensor ``active`` (0 for elements)."""
        if self.block is None:
            return 0
        on = self.reduce(active.to(torch.float32))
        sizes = torch.tensor(self.class_sizes, dtype=torch.float32, device=on.device)[self.classes_on(on.device)]
        return int(((on > 0) & (on < sizes)).sum())

    def neuron_of_units(self, device: torch.device) -> torch.Tensor:
        """Long [n_units]: the output neuron (index along dim 0) of every unit."""
        return torch.arange(self.n_units, device=device) // (self.n_units // self.shape[0])

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



def _neuron_select(layer: _Layer, score: torch.Tensor, magnitude: torch.Tensor, cand: torch.Tensor, k: int,
                   perm: torch.Tensor) -> torch.Tensor:
    """``momentum_neuron`` growth of ``k`` units among ``cand`` (bool [n_units]).

    Each output neuron i gets ``floor(v_i * k)`` units (capped by its candidates), v_i = mean |momentum| over the
    neuron's elements, normalised to sum 1 (the official definition); within a neuron the largest scores win. The
    units the floors and caps leave over go to the largest remaining scores of the layer, so exactly ``k`` grow
    (the official code drops them, and neurons whose share is below 10). Ties: ``perm`` order."""
    dev = score.device
    A = layer.shape[0]
    neuron = layer.neuron_of_units(dev)
    v = magnitude.reshape(A, -1).mean(dim=1)
    total = v.sum()
    frac = v / total if bool(total > 0) else torch.zeros_like(v)
    avail = torch.bincount(neuron[cand], minlength=A)
    quota = torch.minimum(torch.floor(frac * k).long(), avail)
    s = torch.where(cand, score, torch.full_like(score, -math.inf))
    order = perm[torch.sort(s[perm], descending=True, stable=True).indices]  # by score, ties in perm order
    order = order[torch.sort(neuron[order], stable=True).indices]  # grouped by neuron, best first in each
    per = layer.n_units // A
    rank = torch.arange(layer.n_units, device=dev) - neuron[order] * per
    take = order[(rank < quota[neuron[order]]) & cand[order]][:k]
    rest = k - int(take.numel())
    if rest > 0:
        chosen = torch.zeros_like(cand)
        chosen[take] = True
        s2 = torch.where(cand & ~chosen, score, torch.full_like(score, -math.inf))
        take = torch.cat([take, perm[_select(s2[perm], rest, largest=True)]])
    return take


# --------------------------------------------------------------------------------------------------------------
# schedules and initial densities
# --------------------------------------------------------------------------------------------------------------

def cosine_prune_rate(step: int, prune_rate: float, total_steps: int, min_rate: float = MIN_PRUNE_RATE) -> float:
    """The prune rate after ``step`` real optimizer steps: cosine from ``prune_rate`` (step 0) to
    ``min(min_rate, prune_rate)`` (step >= ``total_steps``)."""
    _check_int("step", step, 0)
    _check_number("prune_rate", prune_rate, 0.0, 1.0)
    _check_int("total_steps", total_steps, 1)
    _check_number("min_rate", min_rate, 0.0, 1.0)
    lo = min(min_rate, prune_rate)
    t = min(step, total_steps) / total_steps
    return lo + (prune_rate - lo) * 0.5 * (1.0 + math.cos(math.pi * t))


def solve_layer_densities(sizes: Sequence[int], raw: Sequence[float], density: float,
                          dense_threshold: float = DENSE_THRESHOLD) -> List[float]:
    """Per-layer densities ``eps * raw[i]`` whose element-weighted mean is ``density``; layers that would reach
    ``dense_threshold`` become dense (1.0) and ``eps`` is solved again for the rest (RigL's ERK procedure)."""
    if not isinstance(sizes, (list, tuple)) or not isinstance(raw, (list, tuple)):
        raise TypeError(f"sizes, raw: expected sequences, got {type(sizes).__name__}, {type(raw).__name__}")
    if len(sizes) != len(raw) or not sizes:
        raise ValueError(f"sizes, raw: expected two non-empty sequences of one length, got lengths {len(sizes)} "
                         f"and {len(raw)}")
    for i, s in enumerate(sizes):
        _check_int(f"sizes[{i}]", s, 1)
    for i, r in enumerate(raw):
        _check_number(f"raw[{i}]", r, 0.0, math.inf, hi_open=True)
    _check_number("density", density, 0.0, 1.0, lo_open=True)
    _check_number("dense_threshold", dense_threshold, 0.0, 1.0, lo_open=True)
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


def _optimizer_params(optimizer: torch.optim.Optimizer) -> set:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def _check_optimizer_holds(optimizer: torch.optim.Optimizer, layers: Sequence[Tuple[str, nn.Module]]) -> None:
    held = _optimizer_params(optimizer)
    missing = [name for name, mod in layers if id(mod.weight) not in held]
    if missing:
        raise ValueError(
            f"optimizer: expected an optimizer over the model's parameters (DynamicSparsity re-applies the masks "
            f"after its steps), got one that holds none of {len(missing)} of the {len(layers)} weights to mask "
            f"(e.g. {_names(missing, 3)}): build it from this model's parameters (frozen ones included), or "
            f"restrict the masked weights (only_large_kernels=True)")


# --------------------------------------------------------------------------------------------------------------
# DynamicSparsity
# --------------------------------------------------------------------------------------------------------------

class DynamicSparsity:
    """Sparse-from-scratch training with a moving topology, as SLaK trains (exact, AMP-safe, resumable, no
    per-step communication).

    Args:
        model: the network, plain or wrapped (DDP, DataParallel, ``torch.compile``).
        optimizer: its optimizer, holding every weight to mask; a step post-hook is registered on it
            (``remove()`` takes it off).
        density: target fraction of active weights over all masked layers, in (0, 1]. Default: 0.6
            (``DEFAULT_DENSITY``); with ``sparse_init="from_weights"`` the default takes the weights' own density
            and a given value must match it to within ``FROM_WEIGHTS_TOLERANCE`` (0.01).
        sparse_init: "uniform", "erk" (density proportional to sum(shape) / prod(shape)) or "snip" (one batch's
            |w * grad| kept by a global top-k; needs ``snip_data``) set per-layer densities, then masks are drawn at
            random per layer; layers that reach ``DENSE_THRESHOLD`` (0.99) stay dense. "from_weights" (alias
            "resume", the official name): the masks of the model as it is (a loaded sparse checkpoint): the
            ``weight_mask`` buffers where they exist (slak_triton checkpoints; the large-kernel modules derive them
            from the loaded zeros), else weight != 0; block-masked layers must have whole blocks (else ValueError).
        prune_rate: fraction of each layer's active units replaced per topology update, decaying by a cosine over
            ``total_steps`` to ``MIN_PRUNE_RATE`` (0.005).
        growth: "random" (seeded generator), "gradient" (largest |grad| of the step that triggered the update,
            dense on the large-kernel branches too), "momentum" (largest |optimizer momentum|: Adam's
            exp_avg / (sqrt(exp_avg_sq) + 1e-8) or SGD's momentum_buffer) or "momentum_neuron" (momentum growth
            shared among output neurons in proportion to their mean |momentum|).
        update_frequency: real optimizer steps between topology updates; None keeps the topology static (official
            ``--fix``).
        total_steps: real optimizer steps of the whole run (the prune-rate schedule's length).
        only_large_kernels: mask only the large-kernel branches ``LoRA1`` and ``LoRA2`` (official ``--only-L``).
        include_small_conv: with ``only_large_kernels``, mask the small ``small_conv`` branch too.
        seed: seeds the CPU generator behind every random draw (use the same on every rank).
        snip_data: ``(inputs, targets)`` for "snip" (and only then); the loss is ``snip_loss(model(inputs),
            targets)``.
        lk_granularity: "block" (units of ``block_shape`` on the large-kernel branches, which the kernels skip)
            or "element" (elementwise everywhere, as the official code).
        snip_loss: loss for "snip" (default ``F.cross_entropy``).

    After every real ``optimizer.step()`` (a step skipped by ``torch.amp.GradScaler`` never calls it, so it
    neither counts nor changes anything) weights are multiplied by the masks, and so is optimizer state shaped like
    them (SGD ``momentum_buffer``, Adam / AdamW ``exp_avg``, ``exp_avg_sq``...) except in the momentum growth
    modes, whose scores need it. Every ``update_frequency`` real steps each layer prunes ``ceil(rate * active
    units)`` smallest-|w| active units (a block scores the sum of |w| over its taps) and grows exactly as many
    inactive units of the same sizes (a block's growth score is the sum over its taps); grown weights start at
    zero, and so does their optimizer state except in the momentum modes; a unit pruned and grown back in the same
    update keeps its weight and state (as officially).

    Dense gradients: forward hooks on the large-kernel modules run the forwards whose gradients growth reads
    inside ``slak_triton.dense_weight_grad()`` (see ``dense_grad_next_step``); every other forward keeps the
    block-skipping masked weight gradient.

    Raises ValueError when another live ``DynamicSparsity`` / ``FrozenSparsity`` already manages the model's
    weights, when the optimizer does not hold them, and, for the random inits, when the model already holds masks
    (a loaded sparse model: use ``sparse_init="from_weights"``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        density: Optional[float] = None,
        sparse_init: str = "snip",
        prune_rate: float = 0.3,
        growth: str = "random",
        update_frequency: Optional[int] = 100,
        total_steps: int,
        only_large_kernels: bool = False,
        include_small_conv: bool = False,
        seed: int = 0,
        snip_data: Optional[Tuple[Any, Any]] = None,
        lk_granularity: str = "block",
        snip_loss: Optional[Callable] = None,
    ):
        self._active = False
        _check_module("model", model)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.sparse_init = _check_choice("sparse_init", sparse_init, SPARSE_INITS)
        if self.sparse_init == "resume":
            self.sparse_init = "from_weights"
        if density is not None:
            _check_number("density", density, 0.0, 1.0, lo_open=True)
        self.prune_rate = _check_number("prune_rate", prune_rate, 0.0, 1.0, hi_open=True)
        self.growth = _check_choice("growth", growth, GROWTH_MODES)
        self.update_frequency = _check_int("update_frequency", update_frequency, 1, allow_none=True)
        self.total_steps = _check_int("total_steps", total_steps, 1)
        self.only_large_kernels = _check_bool("only_large_kernels", only_large_kernels)
        self.include_small_conv = _check_bool("include_small_conv", include_small_conv)
        self.seed = _check_int("seed", seed, 0)
        self.lk_granularity = _check_choice("lk_granularity", lk_granularity, LK_GRANULARITIES)
        if self.sparse_init == "snip":
            if not (isinstance(snip_data, (tuple, list)) and len(snip_data) == 2):
                raise ValueError(f"snip_data: expected (inputs, targets) for sparse_init='snip', got "
                                 f"{type(snip_data).__name__ if snip_data is not None else None}")
        elif snip_data is not None:
            raise ValueError(f"snip_data: expected None for sparse_init={sparse_init!r} (only 'snip' uses a batch), "
                             f"got {type(snip_data).__name__}")
        if snip_loss is not None and not callable(snip_loss):
            raise TypeError(f"snip_loss: expected a callable or None, got {type(snip_loss).__name__}")
        if snip_loss is not None and self.sparse_init != "snip":
            raise ValueError(f"snip_loss: expected None for sparse_init={sparse_init!r} (only 'snip' uses a loss)")

        self.wrapped_model = model
        self.model = unwrap_model(model)
        self.optimizer = optimizer
        modules = _maskable_modules(self.model, self.only_large_kernels, self.include_small_conv)
        if not modules:
            raise ValueError(f"model: expected at least one nn.Linear / nn.Conv2d weight to mask "
                             f"(only_large_kernels={only_large_kernels}), found none")
        named = [(name + ".weight", mod) for name, mod, _ in modules]
        _check_optimizer_holds(optimizer, named)
        if self.growth in _MOMENTUM_GROWTH:
            self._check_momentum_optimizer(named)
        _claim(self, named, check_only=True)
        if self.sparse_init != "from_weights":
            held = [name for name, mod in named if _get_mask(mod) is not None]
            if held:
                raise ValueError(
                    f"sparse_init: expected 'from_weights' for a model that already holds masks (a loaded sparse "
                    f"checkpoint?), got {sparse_init!r}, which would draw new masks and zero the surviving weights "
                    f"of {len(held)} layers (e.g. {_names(held, 3)}); use sparse_init='from_weights' to keep "
                    f"them, or build DynamicSparsity before loading a checkpoint")
        _claim(self, [(name, mod) for name, mod in named])
        self._active = True
        try:
            self.steps = 0
            self.topology_updates = 0
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(self.seed)
            self._warned: set = set()
            self.candidates: List[_Layer] = [_Layer(name + ".weight", mod, self._block_for(mod, is_lk))
                                             for name, mod, is_lk in modules]
            self._by_name = {layer.name: layer for layer in self.candidates}
            if self.sparse_init == "from_weights":
                self.density = self._init_from_weights(density)
            else:
                self.density = DEFAULT_DENSITY if density is None else float(density)
                raw = self._raw_densities(snip_data, snip_loss or F.cross_entropy)
                densities = solve_layer_densities([layer.numel for layer in self.candidates], raw, self.density)
                self._init_masks(densities)
            self.apply_masks()
        except BaseException:
            self._active = False
            _release(self, [mod for _, mod in named])
            raise
        self._hook = optimizer.register_step_post_hook(self._after_step)
        switch = _DenseGradSwitch(self)
        self._module_hooks = []
        # hooked module -> whether its last forward with gradients ran with dense weight gradients; layer name ->
        # its hooked module (the layers whose gradient is masked unless that forward was dense)
        self._forward_dense: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
        self._hooked_by: Dict[str, nn.Module] = {}
        by_module = {id(layer.module): layer.name for layer in self.candidates}
        for mod in _dense_grad_modules(self.model, [layer.module for layer in self.candidates]):
            self._module_hooks.append(mod.register_forward_pre_hook(switch.pre))
            self._module_hooks.append(mod.register_forward_hook(switch.post, always_call=True))
            for sub in mod.modules():
                if id(sub) in by_module:
                    self._hooked_by[by_module[id(sub)]] = mod

    # -- construction ----------------------------------------------------------------------------------------
    def _check_momentum_optimizer(self, named: Sequence[Tuple[str, nn.Module]]) -> None:
        opt = self.optimizer
        if isinstance(opt, torch.optim.SGD):
            ids = {id(mod.weight) for _, mod in named}
            for i, g in enumerate(opt.param_groups):
                if g.get("momentum", 0) == 0 and any(id(p) in ids for p in g["params"]):
                    raise ValueError(f"growth: {self.growth!r} scores with the optimizer's momentum, but "
                                     f"optimizer.param_groups[{i}] (SGD) has momentum=0; use momentum > 0, an "
                                     f"Adam-type optimizer, or growth='gradient'")
        # other optimizers: checked at the first update (Adam's exp_avg / exp_avg_sq or SGD's momentum_buffer)

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

    @torch.no_grad()
    def _init_from_weights(self, density: Optional[float]) -> float:
        """Masks = ``_active_from_weights``; layers at >= ``DENSE_THRESHOLD`` stay dense. Returns the overall
        density. Checks block alignment, that the weights are sparse at all, and ``density`` when given."""
        nonzero = [_active_from_weights(layer.module) for layer in self.candidates]
        partial = [(layer.name, n, layer.n_units) for layer, nz in zip(self.candidates, nonzero)
                   if (n := layer.partial_units(nz))]
        if partial:
            name, n, total = partial[0]
            raise ValueError(
                f"sparse_init: 'from_weights' with lk_granularity='block' expects the large-kernel branches' "
                f"zeros to be whole block_shape blocks, got {len(partial)} layers with partly-zero blocks (e.g. "
                f"{name}: {n} of {total} blocks), as an elementwise-sparse (official) checkpoint has, or a "
                f"block-sparse one saved without its weight_mask entries (grown blocks keep exact zeros on taps "
                f"that never see the image): use lk_granularity='element', or load the checkpoint with its masks")
        dens = [float(nz.sum()) / layer.numel for layer, nz in zip(self.candidates, nonzero)]
        if all(d >= DENSE_THRESHOLD for d in dens):
            raise ValueError(
                f"sparse_init: 'from_weights' expects a sparse model (zeros in its weights, e.g. a loaded sparse "
                f"checkpoint), got {len(self.candidates)} weights that are all at least {DENSE_THRESHOLD:.0%} "
                f"non-zero: load the sparse weights before building DynamicSparsity, or use a random init")
        self.layer_init_densities = {}
        for layer, nz, d in zip(self.candidates, nonzero, dens):
            self.layer_init_densities[layer.name] = d
            _set_mask(layer.module, None if d >= DENSE_THRESHOLD else nz.to(torch.float32))
        overall = self.overall_density()
        if density is not None and abs(overall - float(density)) > FROM_WEIGHTS_TOLERANCE:
            raise ValueError(f"density: expected the density of the loaded weights ({overall:.4f}, within "
                             f"{FROM_WEIGHTS_TOLERANCE}) or None with sparse_init='from_weights', got {density!r}")
        return overall

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

    @property
    def is_update_step_next(self) -> bool:
        """Whether the next real optimizer step will run a topology update."""
        return (self._active and self.update_frequency is not None
                and (self.steps + 1) % self.update_frequency == 0)

    @property
    def dense_grad_next_step(self) -> bool:
        """Whether the forwards before the next real optimizer step need dense large-kernel weight gradients:
        ``growth="gradient"`` on the step before a topology update, the momentum modes on every step (while the
        topology moves). The forward hooks read it; a training loop that calls ``lk_conv2d`` outside the model's
        modules can wrap its forward in ``slak_triton.dense_weight_grad(sparsity.dense_grad_next_step)``."""
        if not self._active or self.update_frequency is None:
            return False
        if self.growth in _MOMENTUM_GROWTH:
            return True
        return self.growth == "gradient" and self.is_update_step_next

    @property
    def _masks_optimizer_state(self) -> bool:
        return self.growth not in _MOMENTUM_GROWTH

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
        """Detaches the optimizer hook and the forward hooks (masks stay in the modules); another
        ``DynamicSparsity`` may then manage the model."""
        if not self._active:
            return
        self._hook.remove()
        for h in self._module_hooks:
            h.remove()
        self._module_hooks = []
        self._active = False
        _release(self, [layer.module for layer in self.candidates])

    # -- per step --------------------------------------------------------------------------------------------
    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        self.apply_masks()
        if self.update_frequency is not None and self.steps % self.update_frequency == 0:
            self.update_topology()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """weights *= masks, and every optimizer-state tensor shaped like a masked weight likewise (except in the
        momentum growth modes, which score with that state)."""
        for layer in self.layers:
            m = layer.mask
            w = layer.weight
            w.mul_(m.to(w.dtype))
            if self._masks_optimizer_state:
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

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _momentum(self, layer: _Layer) -> Optional[torch.Tensor]:
        """The official momentum score tensor of a weight: Adam exp_avg / (sqrt(exp_avg_sq) + 1e-8), else SGD
        momentum_buffer; None when the weight has no optimizer state yet."""
        state = self.optimizer.state.get(layer.weight)
        if not state:
            return None
        m1, m2 = state.get("exp_avg"), state.get("exp_avg_sq")
        if isinstance(m1, torch.Tensor) and isinstance(m2, torch.Tensor):
            return m1 / (m2.sqrt() + _ADAM_EPS)
        buf = state.get("momentum_buffer")
        if isinstance(buf, torch.Tensor):
            return buf
        raise RuntimeError(f"growth={self.growth!r}: expected Adam's exp_avg / exp_avg_sq or SGD's momentum_buffer "
                           f"in the optimizer state of {layer.name}, got keys {sorted(state)} "
                           f"({type(self.optimizer).__name__}); use growth='gradient' or 'random'")

    def _growth_scores(self, layer: _Layer, before: torch.Tensor
                       ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(per-unit growth score, element magnitudes) or (None, None) for random growth. ``before``: bool
        [n_units] active before this update."""
        if self.growth == "random":
            return None, None
        w = layer.weight
        if self.growth == "gradient":
            src = w.grad
            what = "gradient"
        else:
            src = self._momentum(layer)
            what = "optimizer momentum"
        if src is None:
            self._warn_once(layer.name + ":none", f"DynamicSparsity: growth={self.growth!r} but {layer.name} has no "
                            f"{what} at update {self.topology_updates}; growing at random instead")
            return None, None
        magnitude = src.detach().abs().float()
        score = layer.reduce(magnitude)
        inactive = ~before
        hooked = self._hooked_by.get(layer.name)
        if hooked is not None and self._forward_dense.get(hooked, False):
            return score, magnitude  # dense gradients: zeros are real (e.g. taps that never touch the image)
        if bool(inactive.any()) and not bool((score[inactive] != 0).any()):
            # The forward masked the weight gradient (an lk_conv2d call outside the modules DynamicSparsity
            # hooks): inactive units carry no information and the just-pruned ones would always win their place
            # back. Rank those last: growth picks (at random) among the units that were inactive before.
            self._warn_once(layer.name + ":zero", f"DynamicSparsity: growth={self.growth!r}: every inactive unit of "
                            f"{layer.name} has a zero {what} (its forward masked the weight gradient: run it inside "
                            f"slak_triton.dense_weight_grad(sparsity.dense_grad_next_step)); growing at random "
                            f"among them")
            score = torch.where(inactive, score, torch.full_like(score, -1.0))
        return score, magnitude

    def _prune_grow(self, layer: _Layer, rate: float) -> int:
        w = layer.weight
        old = layer.mask
        dev = w.device
        unit = layer.unit_mask()
        n_active = int(unit.sum())
        k = min(int(math.ceil(rate * n_active)), n_active)
        # One random permutation per layer per update, whatever happens next (the generator's consumption depends
        # only on the layer shapes): it orders the units for growth; scores sort stably on top of it, so "random"
        # growth (all scores equal) takes the first k candidates of the permutation and the score modes break
        # ties at random.
        perm = torch.argsort(torch.rand(layer.n_units, generator=self.generator).to(dev), stable=True)
        if k == 0:
            return 0
        mag = layer.reduce(w.detach().abs().float())
        prune = _select(torch.where(unit, mag, torch.full_like(mag, math.inf)), k, largest=False)
        new = unit.clone()
        new[prune] = False
        gscore, magnitude = self._growth_scores(layer, unit)
        by_neuron = self.growth == "momentum_neuron" and gscore is not None
        if gscore is None:
            gscore = torch.zeros(layer.n_units, device=dev)
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
            if by_neuron:
                grow = _neuron_select(layer, gscore, magnitude, cand, kc, perm)
            else:
                score = torch.where(cand, gscore, neg)[perm]
                grow = perm[_select(score, kc, largest=True)]
            new[grow] = True
        new_mask = layer.expand(new).to(old.dtype)
        # Pruned units become zero and grown ones start at zero (weights, and optimizer state except in the
        # momentum modes). A unit pruned and grown back in the same update keeps its weight and state, as in the
        # official code: for it the update is a no-op.
        keep = layer.expand(new & unit)
        w.mul_(keep.to(w.dtype))
        if self._masks_optimizer_state:
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
                       "only_large_kernels": self.only_large_kernels, "include_small_conv": self.include_small_conv,
                       "sparse_init": self.sparse_init, "seed": self.seed},
        }

    def _check_state(self, state: Dict[str, Any]) -> None:
        """Validates a ``state_dict()`` against this model before anything changes."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict from DynamicSparsity.state_dict(), got {type(state).__name__}")
        missing = [k for k in ("version", "steps", "topology_updates", "masks", "rng_state", "schedule", "config")
                   if k not in state]
        if missing:
            raise ValueError(f"state: expected keys of DynamicSparsity.state_dict(), missing {missing}")
        if state["version"] not in (1, _STATE_VERSION):
            raise ValueError(f"state['version']: expected 1 or {_STATE_VERSION}, got {state['version']!r}")
        for key in ("steps", "topology_updates"):
            v = state[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"state[{key!r}]: expected an int >= 0, got {v!r}")
        masks, sched, cfg = state["masks"], state["schedule"], state["config"]
        if not isinstance(masks, dict) or not isinstance(sched, dict) or not isinstance(cfg, dict):
            raise TypeError("state['masks'], state['schedule'], state['config']: expected dicts, got "
                            f"{type(masks).__name__}, {type(sched).__name__}, {type(cfg).__name__}")
        _check_choice("state['config']['growth']", cfg.get("growth"), GROWTH_MODES)
        _check_choice("state['config']['lk_granularity']", cfg.get("lk_granularity"), LK_GRANULARITIES)
        _check_number("state['schedule']['prune_rate']", sched.get("prune_rate"), 0.0, 1.0, hi_open=True)
        _check_int("state['schedule']['total_steps']", sched.get("total_steps"), 1)
        _check_int("state['schedule']['update_frequency']", sched.get("update_frequency"), 1, allow_none=True)
        # the layer sets must agree: a state from another model (or masking choice) must not turn layers dense
        dense = state.get("dense_layers", [])
        listed = set(masks) | set(dense)
        ours = set(self._by_name)
        extra, absent = sorted(listed - ours), sorted(ours - listed)
        if extra or absent:
            hint = ""
            if (cfg.get("only_large_kernels"), cfg.get("include_small_conv", cfg.get("only_large_kernels"))) != (
                    self.only_large_kernels, self.include_small_conv):
                hint = (f" (the state was saved with only_large_kernels={cfg.get('only_large_kernels')!r}, "
                        f"include_small_conv={cfg.get('include_small_conv', 'implied by version 1')!r}; this one "
                        f"has {self.only_large_kernels}, {self.include_small_conv})")
            raise ValueError(f"state['masks']: expected the layers of this model, got a state from another model or "
                             f"masking choice{hint}: this model's layers missing from it: {_names(absent)}; layers "
                             f"in it that this model does not mask: {_names(extra)}")
        for name, m in masks.items():
            shape = self._by_name[name].shape
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != shape:
                got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"state['masks'][{name!r}]: expected a tensor of shape {shape}, got {got}")
            if not _is_binary(m):
                raise ValueError(f"state['masks'][{name!r}]: expected a mask of 0s and 1s (bool), got other values")

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores masks (into the modules' buffers, re-applied to the weights), counters, schedule, growth
        mode and generator state: the run continues exactly as if it had not stopped. The checkpoint's settings
        win over the constructor's; its layers must be this model's (else ValueError naming the differences)."""
        self._check_state(state)
        sched, cfg = state["schedule"], state["config"]
        if cfg["growth"] in _MOMENTUM_GROWTH:
            growth, self.growth = self.growth, cfg["growth"]
            try:
                self._check_momentum_optimizer([(layer.name, layer.module) for layer in self.candidates])
            finally:
                self.growth = growth
        candidates = self.candidates
        if cfg["lk_granularity"] != self.lk_granularity:
            lk = _lk_branches(self.model)
            old = self.lk_granularity
            self.lk_granularity = cfg["lk_granularity"]
            candidates = [_Layer(layer.name, layer.module,
                                 self._block_for(layer.module, layer.name[: -len(".weight")] in lk))
                          for layer in self.candidates]
            self.lk_granularity = old
        for layer in candidates:
            m = state["masks"].get(layer.name)
            if m is not None and layer.partial_units(m != 0):
                raise ValueError(f"state['masks'][{layer.name!r}]: expected whole block_shape blocks for "
                                 f"lk_granularity={cfg['lk_granularity']!r}, got partly-on blocks")
        self.candidates = candidates
        self._by_name = {layer.name: layer for layer in self.candidates}
        self.lk_granularity = cfg["lk_granularity"]
        self.prune_rate = float(sched["prune_rate"])
        self.total_steps = int(sched["total_steps"])
        self.update_frequency = sched["update_frequency"]
        self.growth = cfg["growth"]
        self.density = float(cfg["density"])
        self.sparse_init = "from_weights" if cfg["sparse_init"] == "resume" else cfg["sparse_init"]
        self.seed = cfg["seed"]
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
# fine-tuning a sparse model with its zeros kept (official backbone sparse=True)
# --------------------------------------------------------------------------------------------------------------

class FrozenSparsity:
    """Keeps a sparse model's zeros while it is fine-tuned, with any training loop: the official detection /
    segmentation backbone's ``sparse=True``.

    Every ``nn.Linear`` / ``nn.Conv2d`` weight (or only the large-kernel ``LoRA1`` / ``LoRA2`` branches, plus
    ``small_conv`` with ``include_small_conv``) gets the mask ``weight != 0`` (or keeps the ``weight_mask`` it
    holds) as its ``weight_mask`` buffer; weights without zeros stay dense. Before every forward of the model, and before
    ``state_dict()``, the weights are multiplied by their masks (a forward pre-hook and a state_dict pre-hook on
    the unwrapped model), so no optimizer needs to be known (mmdet / mmseg runners build theirs later).

    Use ``DynamicSparsity(model, optimizer, sparse_init="from_weights", update_frequency=None)`` instead when the
    optimizer is at hand: it also masks the optimizer state, after every step.

    Args:
        model: the loaded sparse model (plain or wrapped).
        only_large_kernels, include_small_conv: as in ``DynamicSparsity``.

    Raises ValueError when no weight has zeros (the checkpoint was not loaded?) or when another manager holds the
    model's weights.
    """

    def __init__(self, model: nn.Module, *, only_large_kernels: bool = False, include_small_conv: bool = False):
        self._active = False
        _check_module("model", model)
        _check_bool("only_large_kernels", only_large_kernels)
        _check_bool("include_small_conv", include_small_conv)
        self.model = unwrap_model(model)
        named = [(name + ".weight", mod) for name, mod, _ in
                 _maskable_modules(self.model, only_large_kernels, include_small_conv)]
        if not named:
            raise ValueError(f"model: expected at least one nn.Linear / nn.Conv2d weight to mask "
                             f"(only_large_kernels={only_large_kernels}), found none")
        with torch.no_grad():
            nonzero = [_active_from_weights(mod) for _, mod in named]
        if all(bool(nz.all()) for nz in nonzero):
            raise ValueError(f"model: expected a sparse model (zeros in its weights, e.g. a loaded sparse checkpoint), "
                             f"got {len(named)} weights without a single zero: load the weights first")
        _claim(self, named)
        self._active = True
        self.candidates = named
        self._masked: List[Tuple[str, nn.Module]] = []
        for (name, mod), nz in zip(named, nonzero):
            if bool(nz.all()):
                _set_mask(mod, None)
            else:
                _set_mask(mod, nz.to(torch.float32))
                self._masked.append((name, mod))
        self.apply_masks()
        self._hooks = [self.model.register_forward_pre_hook(_OwnerHook(self, "_before_forward")),
                       self.model.register_state_dict_pre_hook(_OwnerHook(self, "_before_state_dict"))]

    @property
    def masks(self) -> Dict[str, torch.Tensor]:
        """Parameter name -> live mask buffer of every masked weight."""
        return {name: _get_mask(mod) for name, mod in self._masked}

    @torch.no_grad()
    def overall_density(self) -> float:
        """Active elements / elements over all candidate weights."""
        active = sum(mod.weight.numel() if _get_mask(mod) is None else int((_get_mask(mod) != 0).sum())
                     for _, mod in self.candidates)
        return active / sum(mod.weight.numel() for _, mod in self.candidates)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """weights *= masks."""
        for _, mod in self._masked:
            m = _get_mask(mod)
            if m is not None:
                mod.weight.mul_(m.to(mod.weight.dtype))

    def _before_forward(self, module, args):
        self.apply_masks()

    def _before_state_dict(self, module, prefix, keep_vars):
        self.apply_masks()

    def remove(self) -> None:
        """Detaches the hooks (masks stay in the modules)."""
        if not self._active:
            return
        for h in self._hooks:
            h.remove()
        self._active = False
        _release(self, [mod for _, mod in self.candidates])

    def __repr__(self) -> str:
        return f"FrozenSparsity(layers={len(self._masked)}/{len(self.candidates)}, density={self.overall_density():.4f})"


def freeze_sparsity(model: nn.Module, *, only_large_kernels: bool = False, include_small_conv: bool = False
                    ) -> FrozenSparsity:
    """``FrozenSparsity(model, ...)``: keep a loaded sparse model's zeros through fine-tuning (official backbone
    ``sparse=True``). Returns the handle (``.masks``, ``.overall_density()``, ``.remove()``)."""
    return FrozenSparsity(model, only_large_kernels=only_large_kernels, include_small_conv=include_small_conv)


# --------------------------------------------------------------------------------------------------------------
# model EMA
# --------------------------------------------------------------------------------------------------------------

class MaskedEMA:
    """Mask-aware exponential moving average of a model's weights (timm's ModelEma, made sparse-aware as the
    official SLaK EMA).

    ``update(model)``: every floating parameter and buffer becomes ``decay * ema + (1 - decay) * live``; other
    buffers and ``weight_mask`` buffers are copied. For every masked weight, entries whose mask is off become 0,
    and active entries whose EMA is exactly 0 (grown since, or never non-zero yet) take the live value: a grown
    weight starts at 0, so its EMA entry copies the live weight at the first update after it became non-zero (the
    official rule), instead of lagging behind from 0 for about 1 / (1 - decay) updates.

    Args:
        model: the live model (plain or wrapped); the EMA copy is ``self.module`` (eval mode, no gradients).
        decay: in [0, 1].
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        _check_module("model", model)
        self.decay = _check_number("decay", decay, 0.0, 1.0)
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = unwrap_model(_check_module("model", model))
        d = self.decay
        live_mods = list(live.named_modules())
        ema_mods = list(self.module.named_modules())
        if len(live_mods) != len(ema_mods) or any(a[0] != b[0] for a, b in zip(live_mods, ema_mods)):
            diff = next((f"{a[0]!r} where the EMA has {b[0]!r}" for a, b in zip(live_mods, ema_mods) if a[0] != b[0]),
                        f"{len(live_mods)} modules where the EMA has {len(ema_mods)}")
            raise ValueError(f"model: expected the model this MaskedEMA was built from (same modules), got {diff}")
        for (name, lm), (_, em) in zip(live_mods, ema_mods):
            mask = _get_mask(lm)
            ew = em._parameters.get("weight") if mask is not None else None
            if ew is not None and ew.shape != mask.shape:
                raise ValueError(f"model: expected {name}.weight of shape {tuple(ew.shape)} as in the EMA, got "
                                 f"{tuple(mask.shape)}")
            fresh = (mask != 0) & (ew == 0) if ew is not None else None
            for pname, p in lm._parameters.items():
                ep = em._parameters.get(pname)
                if p is None or ep is None:
                    continue
                if ep.shape != p.shape:
                    raise ValueError(f"model: expected {name}.{pname} of shape {tuple(ep.shape)} as in the EMA, got "
                                     f"{tuple(p.shape)}")
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
            if MASK_NAME in lm._buffers or MASK_NAME in em._buffers:
                if ew is not None:
                    lw = lm.weight.detach().to(ew.dtype)
                    ew.copy_(torch.where(fresh, lw, ew))
                    ew.mul_((mask != 0).to(ew.dtype))
                _set_mask(em, mask)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True):
        return load_masked_state_dict(self.module, state_dict, strict=strict)
