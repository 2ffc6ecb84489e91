"""Shapes registry of the ``slak-bench op`` benchmark: every large-kernel module of SLaK-T/S/B at 224x224.

SLaK-T and SLaK-S have the same stage widths and kernels (they differ only in depth), so they share the ``ts``
shapes; SLaK-B has its own (``b``). Each stage runs three depthwise branches on a [N, C, H, W] map:
K x 5, 5 x K and 5 x 5, with K = 51, 49, 47, 13 on 56, 28, 14, 7 pixels (224 / 4 / 2**stage).

Shape ids: ``<family>-s<stage>-b<batch>``, e.g. ``ts-s1-b64`` (SLaK-T/S stage 1, batch 64). Selections for
``--shapes``: ``all``, ``quick`` (the ``--quick`` subset), ``quick-cpu`` (its CPU-mode default), ``tiny`` (a toy shape for tests), ``ts``, ``b``, or a
comma-separated list of ids.

In CPU mode (no CUDA) every shape is replaced by a reduced proxy (``reduce_for_cpu``) so that the PyTorch paths
time in milliseconds and the Triton interpreter checks finish in about a second each.
"""

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "ConvShape",
    "FAMILIES",
    "STAGE_KERNELS",
    "BATCHES",
    "REGISTRY",
    "TINY",
    "QUICK_IDS",
    "QUICK_CPU_IDS",
    "select_shapes",
    "reduce_for_cpu",
    "CPU_MAX_BATCH",
    "CPU_MAX_CHANNELS",
    "CPU_MAX_SIDE",
]

#: Input resolution of every registered shape.
IMAGE_SIZE = 224
#: Short side of every SLaK branch.
SMALL_KERNEL = 5
#: Long kernel size per stage (1-based stage index - 1).
STAGE_KERNELS = (51, 49, 47, 13)
#: Channels per stage at width factor 1.3, per family. T and S share them.
FAMILIES: Dict[str, Tuple[str, Tuple[int, int, int, int]]] = {
    "ts": ("SLaK-T/S", (124, 249, 499, 998)),
    "b": ("SLaK-B", (166, 332, 665, 1331)),
}
BATCHES = (1, 16, 64)

#: CPU-mode proxy sizes (see ``reduce_for_cpu``).
CPU_MAX_BATCH = 1
CPU_MAX_CHANNELS = 2
CPU_MAX_SIDE = 28


@dataclass(frozen=True)
class ConvShape:
    """One benchmark case of the op: ``x`` is [batch, channels, height, width], ``kernels`` the branches (kh, kw).

    ``source`` names the registry shapes a CPU-mode proxy stands for (empty for registry shapes)."""

    id: str
    family: str
    stage: int
    batch: int
    channels: int
    height: int
    width: int
    kernels: Tuple[Tuple[int, int], ...]
    source: Tuple[str, ...] = ()

    @property
    def kernels_str(self) -> str:
        return "+".join(f"{kh}x{kw}" for kh, kw in self.kernels)

    @property
    def label(self) -> str:
        name = FAMILIES[self.family][0] if self.family in FAMILIES else self.family
        return f"{name} stage {self.stage} N={self.batch}" if self.stage else f"{name} N={self.batch}"


def _slak_kernels(k: int) -> Tuple[Tuple[int, int], ...]:
    return ((k, SMALL_KERNEL), (SMALL_KERNEL, k), (SMALL_KERNEL, SMALL_KERNEL))


def _build_registry() -> Dict[str, ConvShape]:
    reg: Dict[str, ConvShape] = {}
    for fam, (_, channels) in FAMILIES.items():
        for s, (c, k) in enumerate(zip(channels, STAGE_KERNELS), start=1):
            side = IMAGE_SIZE // (4 * 2 ** (s - 1))
            for n in BATCHES:
                sid = f"{fam}-s{s}-b{n}"
                reg[sid] = ConvShape(sid, fam, s, n, c, side, side, _slak_kernels(k))
    return reg


#: Every SLaK-T/S/B stage at 224x224 and every batch size.
REGISTRY: Dict[str, ConvShape] = _build_registry()

#: A toy shape for tests and smoke runs: kernels longer than the plane, rectangular plane.
TINY = ConvShape("tiny", "tiny", 0, 1, 2, 12, 10, ((13, 5), (5, 13), (5, 5)))

#: The ``--quick`` subset: the four SLaK-T/S stages at training batch 64, plus stage 1 at batch 1 (the
#: small-batch case where the official CUTLASS path is slowest).
QUICK_IDS = ("ts-s1-b64", "ts-s2-b64", "ts-s3-b64", "ts-s4-b64", "ts-s1-b1")
#: ``--quick`` in CPU mode: stage 2's proxy (28x28, K=49) would repeat stage 1's (28x28, K=51), and the batch is
#: reduced anyway, so three proxies cover the quick subset.
QUICK_CPU_IDS = ("ts-s1-b64", "ts-s3-b64", "ts-s4-b64")


def select_shapes(spec: str) -> List[ConvShape]:
    """Resolves a ``--shapes`` value to registry shapes. Raises ValueError with the valid names on a bad value."""
    spec = spec.strip()
    if spec == "all":
        return list(REGISTRY.values())
    if spec == "quick":
        return [REGISTRY[i] for i in QUICK_IDS]
    if spec == "quick-cpu":
        return [REGISTRY[i] for i in QUICK_CPU_IDS]
    if spec == "tiny":
        return [TINY]
    if spec in FAMILIES:
        return [s for s in REGISTRY.values() if s.family == spec]
    out = []
    for part in spec.split(","):
        part = part.strip()
        if part == "tiny":
            out.append(TINY)
        elif part in REGISTRY:
            out.append(REGISTRY[part])
        else:
            raise ValueError(
                f"--shapes: unknown shape {part!r}; expected all, quick, tiny, {', '.join(FAMILIES)} or ids such as "
                f"{', '.join(list(REGISTRY)[:3])}, ... (all ids: {', '.join(REGISTRY)})")
    if not out:
        raise ValueError("--shapes: empty selection")
    return out


def reduce_for_cpu(shapes: Sequence[ConvShape]) -> List[ConvShape]:
    """CPU-mode proxies: batch <= CPU_MAX_BATCH, channels <= CPU_MAX_CHANNELS, sides <= CPU_MAX_SIDE, the same
    kernels. Shapes that reduce to the same proxy are merged; ``source`` lists what each proxy stands for."""
    merged: Dict[tuple, ConvShape] = {}
    order: List[tuple] = []
    for s in shapes:
        n, c = min(s.batch, CPU_MAX_BATCH), min(s.channels, CPU_MAX_CHANNELS)
        h, w = min(s.height, CPU_MAX_SIDE), min(s.width, CPU_MAX_SIDE)
        key = (n, c, h, w, s.kernels)
        if key in merged:
            prev = merged[key]
            merged[key] = replace(prev, source=prev.source + (s.id,))
            continue
        k = s.kernels[0][0]
        pid = f"cpu-s{s.stage}-k{k}" if s.stage else f"cpu-{s.id}"
        merged[key] = ConvShape(pid, "cpu", s.stage, n, c, h, w, s.kernels, source=(s.id,))
        order.append(key)
    return [merged[k] for k in order]


def find_shape(shape_id: str) -> Optional[ConvShape]:
    """The registry shape (or TINY) with this id, else None."""
    return TINY if shape_id == "tiny" else REGISTRY.get(shape_id)
