"""``slak-bench model``: whole networks, images/s for eval forward (unfused and re-parameterised with ``.fuse()``)
and a training step: SLaK-T/S/B and the ConvNeXt-T comparator (``--variants convnext``: ``slak_convnext_tiny``,
the official code's ConvNeXt, one 7x7 depthwise conv + BN per block).

Providers: ``triton`` (this library's ``lk_conv2d``), ``torch`` (``use_backend("reference")``: F.conv2d per
branch on NCHW tensors, as the official code runs in PyTorch) and ``torch-cl`` (the same with the model and the
input in channels_last, the way PyTorch users run ConvNeXt: cuDNN's depthwise kernels). ``vs torch`` is the speedup
over ``torch`` of the same model; ``vs CNX-T`` compares images/s with ConvNeXt-T ``torch-cl`` of the same kind when
ConvNeXt-T is in the run (the end-to-end goal: SLaK-T against ConvNeXt-T on the same GPU).

``slak_triton.models`` is imported here at module level; when it cannot be imported (not written yet, or broken)
``MODELS_IMPORT_ERROR`` holds the reason and ``slak-bench model`` exits with a message instead of crashing.

CPU mode: only the ``torch`` provider is timed, at a reduced batch and resolution; a whole network under the Triton
interpreter would take hours, so the ``triton`` lines say they are unavailable (``slak-bench op`` checks the kernels).
"""

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from slak_triton import use_backend

from .env import Progress, cuda_mode, time_fn
from .report import _f, wrap_note

try:
    from slak_triton import models as slak_models

    MODELS_IMPORT_ERROR: Optional[str] = None
except ImportError as _e:
    slak_models = None
    MODELS_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

__all__ = ["VARIANTS", "KINDS", "MODEL_PROVIDERS", "ModelBenchConfig", "run_model_bench", "format_model_table",
           "MODELS_IMPORT_ERROR"]

#: variant -> constructor name in slak_triton.models
VARIANTS = {"T": "slak_tiny", "S": "slak_small", "B": "slak_base", "convnext": "slak_convnext_tiny"}
LABELS = {"T": "SLaK-T", "S": "SLaK-S", "B": "SLaK-B", "convnext": "ConvNeXt-T"}
KINDS = ("eval", "eval-fused", "train")
MODEL_PROVIDERS = ("triton", "torch", "torch-cl")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Smallest image a SLaK accepts (stem stride 4, then three downsampling layers of 2).
MIN_IMAGE_SIZE = 32


@dataclass
class ModelBenchConfig:
    variants: Sequence[str] = ("T", "S", "B")
    kinds: Sequence[str] = KINDS
    providers: Sequence[str] = MODEL_PROVIDERS
    batch: int = 64
    image_size: int = 224
    dtype: str = "fp32"
    warmup_ms: float = 25.0
    rep_ms: float = 200.0
    progress: bool = True

    def __post_init__(self):
        _validate_config(self)


def _validate_config(cfg: "ModelBenchConfig") -> None:
    """Every field up front (ValueError naming the field, the expected and the actual value)."""
    for name, allowed in (("variants", tuple(VARIANTS)), ("kinds", KINDS), ("providers", MODEL_PROVIDERS)):
        value = getattr(cfg, name)
        if isinstance(value, str) or not value or any(v not in allowed for v in value):
            raise ValueError(f"{name}: expected a non-empty sequence of {', '.join(allowed)}, got {value!r}")
    for name, lo in (("batch", 1), ("image_size", MIN_IMAGE_SIZE)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {value!r}")
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(_DTYPES)}, got {cfg.dtype!r}")
    for name, lo_ok in (("warmup_ms", lambda v: v >= 0), ("rep_ms", lambda v: v > 0)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo_ok(value):
            raise ValueError(f"{name}: expected a finite number {'>= 0' if name == 'warmup_ms' else '> 0'}, "
                             f"got {value!r}")


def _build(variant: str, device, dtype) -> torch.nn.Module:
    ctor = getattr(slak_models, VARIANTS[variant], None)
    if ctor is None:
        raise AttributeError(f"slak_triton.models has no {VARIANTS[variant]}()")
    return ctor().to(device=device, dtype=dtype)


def _for_provider(model: torch.nn.Module, x: torch.Tensor, provider: str):
    """(model, input) in the provider's memory format: channels_last for ``torch-cl``."""
    if provider == "torch-cl":
        return model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return model, x


def _fused(model: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(model).eval()
    out = m.fuse()
    return out if isinstance(out, torch.nn.Module) else m


def _timed(kind: str, model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, cfg: ModelBenchConfig):
    if kind in ("eval", "eval-fused"):
        m = model.eval() if kind == "eval" else _fused(model)

        def fn():
            with torch.no_grad():
                return m(x)
        return time_fn(fn, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).float(), labels).backward()
        opt.step()
    return time_fn(step, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms)


def run_model_bench(cfg: ModelBenchConfig, meta: Dict[str, object]) -> List[Dict[str, object]]:
    """One record per (variant, kind, provider). Raises RuntimeError when slak_triton.models is unavailable."""
    if slak_models is None:
        raise RuntimeError(f"slak_triton.models cannot be imported ({MODELS_IMPORT_ERROR})")
    gpu = cuda_mode()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = _DTYPES[cfg.dtype]
    records = []
    prog = Progress("models" if gpu else "models (CPU mode)", len(cfg.variants) * len(cfg.kinds) * len(cfg.providers),
                    cfg.progress)
    for v in cfg.variants:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=g).to(device=device, dtype=dtype)
        labels = torch.randint(0, 1000, (cfg.batch,), generator=g).to(device)
        try:
            base = _build(v, device, dtype)
            build_error = None
        except Exception as e:  # noqa: BLE001
            base, build_error = None, f"{type(e).__name__}: {e}"
        for kind in cfg.kinds:
            for prov in cfg.providers:
                prog.step(f"{LABELS[v]} {kind} {prov}")
                rec = dict(meta)
                rec.update(bench="model", where="CPU MODE" if not gpu else "GPU", model=LABELS[v], variant=v,
                           kind=kind, provider=prov, batch=cfg.batch, image_size=cfg.image_size, dtype=cfg.dtype,
                           status=None, reason=None, ms=None, ms_p20=None, ms_p80=None, host_ms=None, images_per_s=None,
                           speedup_vs_torch=None, throughput_vs_convnext=None)
                if build_error is not None:
                    rec.update(status="error", reason=build_error)
                elif prov == "triton" and not gpu:
                    rec.update(status="unavailable", reason="CPU mode: a whole network under the Triton interpreter "
                                                            "is too slow; `slak-bench op` checks the kernels")
                else:
                    try:
                        model = copy.deepcopy(base) if kind == "train" or prov == "torch-cl" else base
                        model, xin = _for_provider(model, x, prov)
                        with use_backend("triton" if prov == "triton" else "reference"):
                            t = _timed(kind, model, xin, labels, cfg)
                        rec.update(status="timed", ms=t.ms, ms_p20=t.ms_p20, ms_p80=t.ms_p80, host_ms=t.host_ms,
                                   images_per_s=cfg.batch / (t.ms * 1e-3))
                        if not gpu:
                            rec["reason"] = "CPU mode: timed on the CPU at a reduced size"
                    except Exception as e:  # noqa: BLE001
                        rec.update(status="error", reason=f"{type(e).__name__}: {e}")
                records.append(rec)
        del base
        if gpu:
            torch.cuda.empty_cache()
    ref = {(r["model"], r["kind"]): r["ms"] for r in records if r["provider"] == "torch" and r["ms"]}
    cnx = {r["kind"]: r["images_per_s"] for r in records
           if r["variant"] == "convnext" and r["provider"] == "torch-cl" and r["images_per_s"]}
    for r in records:
        b = ref.get((r["model"], r["kind"]))
        if b and r["ms"]:
            r["speedup_vs_torch"] = b / r["ms"]
        c = cnx.get(r["kind"])
        if c and r["images_per_s"]:
            r["throughput_vs_convnext"] = r["images_per_s"] / c
    return records


def format_model_table(records: Sequence[Dict[str, object]]) -> str:
    """Compact table (fits 100 columns): one line per (model, kind), ms and images/s per provider. In CPU mode a
    title line says so and the Triton column, not timed there, is left out (a note says why)."""
    if not records:
        return "(no records)"
    cpu = bool(records[0]["cpu_mode"])
    providers = [p for p in dict.fromkeys(str(r["provider"]) for r in records)
                 if not (cpu and all(r["status"] == "unavailable" for r in records if r["provider"] == p))]
    rows: Dict[tuple, Dict[str, Dict[str, object]]] = {}
    for r in records:
        rows.setdefault((r["model"], r["kind"]), {})[str(r["provider"])] = r
    r0 = records[0]
    size = f"batch {r0['batch']} x {r0['image_size']}x{r0['image_size']} {r0['dtype']}"
    lines = [f"CPU MODE: whole networks timed on the CPU at a reduced size ({size}); not GPU numbers"
             if cpu else f"GPU: {size}; ms per call (median), images/s"]
    head = f"{'model':<11} {'kind':<10}" + "".join(f"{p + ' ms':>12}{'img/s':>8}" for p in providers)
    show_cnx = any(r.get("throughput_vs_convnext") for r in records)
    if not cpu:
        head += f"{'vs torch':>9}"
    if show_cnx:
        head += f"{'vs CNX-T':>9}"
    lines += [head, "-" * len(head)]
    notes: List[str] = []
    for (model, kind), by in rows.items():
        line = f"{model:<11} {kind:<10}"
        for p in providers:
            r = by.get(p)
            if r is None or r["status"] != "timed":
                cell = "" if r is None else {"unavailable": "n/a", "error": "ERROR"}.get(str(r["status"]), "?")
                line += f"{cell:>12}{'':>8}"
            else:
                line += f"{_f(r['ms'], '.4g'):>12}{_f(r['images_per_s'], '.1f'):>8}"
        best = by.get("triton") if not cpu else None
        if not cpu:
            sp = _f(best.get("speedup_vs_torch") if best else None, ".2f")
            line += f"{sp + ('x' if sp != '-' else ''):>9}"
        if show_cnx:
            fastest = max((r for r in by.values() if r.get("throughput_vs_convnext")),
                          key=lambda r: r["throughput_vs_convnext"], default=None)
            c = _f(fastest["throughput_vs_convnext"] if fastest else None, ".2f")
            line += f"{c + ('x' if c != '-' else ''):>9}"
        lines.append(line.rstrip())
        for p, r in by.items():
            if r["status"] == "error" or (r["status"] == "unavailable" and (not cpu or p != "triton")):
                notes.append(f"{r['status']}: {model} {kind} {p} ({r['reason']})")
    if cpu and any(r["provider"] == "triton" for r in records):
        notes.append("triton: not timed in CPU mode (a whole network under the interpreter is too slow); "
                     "`slak-bench op` checks the kernels")
    if show_cnx:
        notes.append("vs CNX-T: images/s of the line's fastest provider over ConvNeXt-T torch-cl, same kind")
    return "\n".join(lines + [wrap_note(n) for n in dict.fromkeys(notes)])
