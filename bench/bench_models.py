"""``slak-bench model``: whole SLaK-T/S/B networks, images/s for eval forward (unfused and re-parameterised with
``.fuse()``) and a training step, on this library's kernels (``triton``) against the PyTorch reference path
(``torch``: ``use_backend("reference")``, i.e. F.conv2d per branch).

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
from .report import _f

try:
    from slak_triton import models as slak_models

    MODELS_IMPORT_ERROR: Optional[str] = None
except ImportError as _e:
    slak_models = None
    MODELS_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

__all__ = ["VARIANTS", "KINDS", "MODEL_PROVIDERS", "ModelBenchConfig", "run_model_bench", "format_model_table",
           "MODELS_IMPORT_ERROR"]

#: variant -> constructor name in slak_triton.models
VARIANTS = {"T": "slak_tiny", "S": "slak_small", "B": "slak_base"}
KINDS = ("eval", "eval-fused", "train")
MODEL_PROVIDERS = ("triton", "torch")
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
                prog.step(f"SLaK-{v} {kind} {prov}")
                rec = dict(meta)
                rec.update(bench="model", where="CPU MODE" if not gpu else "GPU", model=f"SLaK-{v}", kind=kind,
                           provider=prov, batch=cfg.batch, image_size=cfg.image_size, dtype=cfg.dtype,
                           status=None, reason=None, ms=None, ms_p20=None, ms_p80=None, images_per_s=None,
                           speedup_vs_torch=None)
                if build_error is not None:
                    rec.update(status="error", reason=build_error)
                elif prov == "triton" and not gpu:
                    rec.update(status="unavailable", reason="CPU mode: a whole network under the Triton interpreter "
                                                            "is too slow; `slak-bench op` checks the kernels")
                else:
                    try:
                        model = copy.deepcopy(base) if kind == "train" else base
                        with use_backend("triton" if prov == "triton" else "reference"):
                            t = _timed(kind, model, x, labels, cfg)
                        rec.update(status="timed", ms=t.ms, ms_p20=t.ms_p20, ms_p80=t.ms_p80,
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
    for r in records:
        b = ref.get((r["model"], r["kind"]))
        if b and r["ms"]:
            r["speedup_vs_torch"] = b / r["ms"]
    return records


def format_model_table(records: Sequence[Dict[str, object]]) -> str:
    head = (f"{'where':<10} {'model':<7} {'kind':<10} {'provider':<8} {'NxHxW':<11} {'dtype':<5} {'ms':>9} "
            f"{'images/s':>9} {'vs torch':>8}  note")
    lines = [head, "-" * len(head)]
    for r in records:
        where = "[CPU MODE]" if r["cpu_mode"] else "GPU"
        ms = _f(r["ms"], ".4g")
        ips = _f(r["images_per_s"], ".1f")
        sp = "-" if r["speedup_vs_torch"] is None else _f(r["speedup_vs_torch"], ".2f") + "x"
        note = "" if r["status"] == "timed" and not r["reason"] else f"{r['status'].upper()}: {r['reason']}"
        lines.append(f"{where:<10} {r['model']:<7} {r['kind']:<10} {r['provider']:<8} "
                     f"{str(r['batch']) + 'x' + str(r['image_size']) + 'x' + str(r['image_size']):<11} "
                     f"{r['dtype']:<5} {ms:>9} {ips:>9} {sp:>8}  {note}")
    return "\n".join(lines)
