"""``slak-bench op``: the large-kernel depthwise op (``slak_triton.lk_conv2d``) against PyTorch.

Providers (each computes ``conv(x, K x 5) + conv(x, 5 x K) + conv(x, 5 x 5)`` of one SLaK module):

* ``triton``: this library's fused op, all branches in one ``lk_conv2d`` call (one kernel launch forward);
* ``triton-branch``: one ``lk_conv2d`` call per branch, outputs summed (what the fused launch saves);
* ``torch``: three ``F.conv2d`` calls on NCHW tensors, as the official code runs in PyTorch (ATen's generic
  depthwise kernel for these shapes);
* ``torch-cl``: the same on channels_last tensors, which routes to cuDNN.

Modes ``fwd`` (forward only, no autograd), ``bwd`` (backward of a recorded forward: input and weight gradients),
``fwdbwd`` (both). Densities < 1 zero a random fraction of each channel's weight blocks, in the units of
``slak_triton.block_shape`` (what the kernels can skip); the Triton providers also receive the masks, the PyTorch
providers run the zeroed weights densely, as the official code does.

Each (shape, dtype, density) first runs every provider once under a progress display: this triggers Triton's
autotuning and checks the result against a float64 reference. Timing comes after, with
``triton.testing.do_bench`` (median and 20/80 quantiles, gradients reset between runs).

CPU mode (no CUDA): shapes are reduced (``shapes.reduce_for_cpu``), the PyTorch providers are timed on the CPU and
the Triton providers only checked under the interpreter (their time there means nothing). Every record and table
line says so.
"""

import math
import operator
import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from slak_triton import LAUNCH_COUNTS, block_shape, interpreter_active, lk_conv2d
from slak_triton.reference import lk_conv2d_reference, slak_branch_conv_reference

from . import counters
from .env import Peaks, Progress, cuda_mode, time_fn
from .shapes import ConvShape

__all__ = [
    "PROVIDERS",
    "TRITON_PROVIDERS",
    "DTYPES",
    "DENSITIES",
    "MODES",
    "OpBenchConfig",
    "block_masks",
    "run_op_bench",
    "TOLERANCES",
    "tolerance",
]

PROVIDERS = ("triton", "triton-branch", "torch", "torch-cl")
TRITON_PROVIDERS = ("triton", "triton-branch")
DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DENSITIES = (1.0, 0.6, 0.3)
MODES = counters.MODES
#: Max |result - float64 reference| / max |reference| accepted by the sanity check, per dtype.
TOLERANCES = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 5e-2}
#: fp32 tolerance of the PyTorch providers on CUDA when cuDNN may use TF32 (PyTorch's default for convolutions).
TF32_TOLERANCE = 1e-2


def tolerance(dname: str, provider: str) -> float:
    """Check tolerance of one line: the dtype's, loosened to TF32 accuracy for PyTorch's fp32 convolutions on
    CUDA while ``torch.backends.cudnn.allow_tf32`` is on (the Triton providers keep the fp32 bound)."""
    if (dname == "fp32" and provider not in TRITON_PROVIDERS and cuda_mode()
            and torch.backends.cudnn.allow_tf32):
        return TF32_TOLERANCE
    return TOLERANCES[dname]


@dataclass
class OpBenchConfig:
    """What ``run_op_bench`` measures (the product of all lists)."""

    shapes: List[ConvShape]
    dtypes: Sequence[str] = ("fp32", "bf16")
    modes: Sequence[str] = MODES
    densities: Sequence[float] = DENSITIES
    providers: Sequence[str] = PROVIDERS
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    seed: int = 0
    progress: bool = True


def block_masks(
    channels: int, kernels: Sequence[Tuple[int, int]], density: float, generator: torch.Generator
) -> Optional[List[torch.Tensor]]:
    """Block-structured masks [C, 1, kh, kw] (bool, CPU) per branch, or None for density 1.

    Each branch's kernel is cut into blocks of ``block_shape(kh, kw)`` (the last block along the long axis may be
    shorter); every channel keeps ``max(1, round(density * blocks))`` blocks chosen at random."""
    if density >= 1.0:
        return None
    masks = []
    for kh, kw in kernels:
        bh, bw = block_shape(kh, kw)
        nbh, nbw = math.ceil(kh / bh), math.ceil(kw / bw)
        nb = nbh * nbw
        keep = max(1, round(density * nb))
        order = torch.rand(channels, nb, generator=generator).argsort(dim=1)[:, :keep]
        active = torch.zeros(channels, nb, dtype=torch.bool).scatter_(1, order, True).view(channels, nbh, nbw)
        m = active.repeat_interleave(bh, dim=1).repeat_interleave(bw, dim=2)[:, :kh, :kw]
        masks.append(m[:, None].contiguous())
    return masks


@dataclass
class _Case:
    """Base tensors of one (shape, dtype, density): x [N, C, H, W], masked weights, masks, upstream gradient."""

    x: torch.Tensor
    ws: List[torch.Tensor]
    masks: Optional[List[torch.Tensor]]
    dy: torch.Tensor


def _make_case(shape: ConvShape, dtype: torch.dtype, density: float, device: torch.device, seed: int) -> _Case:
    g = torch.Generator().manual_seed(seed)
    masks = block_masks(shape.channels, shape.kernels, density, g)
    scale = 1.0 / math.sqrt(sum(kh * kw for kh, kw in shape.kernels))
    ws = []
    for b, (kh, kw) in enumerate(shape.kernels):
        w = torch.randn(shape.channels, 1, kh, kw, generator=g) * scale
        if masks is not None:
            w = w * masks[b]
        ws.append(w.to(device=device, dtype=dtype))
    dims = (shape.batch, shape.channels, shape.height, shape.width)
    x = torch.randn(*dims, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(*dims, generator=g).to(device=device, dtype=dtype)
    if masks is not None:
        masks = [m.to(device) for m in masks]
    return _Case(x, ws, masks, dy)


@dataclass
class _Leaves:
    """One provider's own leaf tensors (in its memory format)."""

    x: torch.Tensor
    ws: List[torch.Tensor]
    masks: Optional[List[torch.Tensor]]

    @property
    def all(self) -> List[torch.Tensor]:
        return [self.x, *self.ws]


def _leaves(provider: str, case: _Case, requires_grad: bool) -> _Leaves:
    fmt = torch.channels_last if provider == "torch-cl" else torch.contiguous_format
    x = case.x.detach().clone().contiguous(memory_format=fmt).requires_grad_(requires_grad)
    ws = [w.detach().clone().contiguous(memory_format=fmt).requires_grad_(requires_grad) for w in case.ws]
    return _Leaves(x, ws, case.masks)


def _forward(provider: str, t: _Leaves) -> torch.Tensor:
    if provider == "triton":
        return lk_conv2d(t.x, t.ws, mask=t.masks, backend="triton")
    if provider == "triton-branch":
        ms = t.masks if t.masks is not None else [None] * len(t.ws)
        return functools.reduce(operator.add, [lk_conv2d(t.x, w, mask=m, backend="triton") for w, m in zip(t.ws, ms)])
    if provider in ("torch", "torch-cl"):
        return functools.reduce(operator.add, slak_branch_conv_reference(t.x, t.ws))
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (got.double() - ref).abs().max().item() / (scale if scale > 0 else 1.0)


@dataclass
class _Check:
    """Outcome of a provider's first run: errors against float64, launch count, availability of backward."""

    fwd_err: Optional[float] = None
    bwd_err: Optional[float] = None
    launches: int = 0
    fwd_error: Optional[str] = None
    bwd_unavailable: Optional[str] = None
    bwd_error: Optional[str] = None
    notes: List[str] = field(default_factory=list)


def _reference(case: _Case, nb: int, need_grads: bool):
    """float64 forward (and gradients) on the first ``nb`` images. Weight gradients only when nb is the batch."""
    x = case.x[:nb].detach().double().requires_grad_(need_grads)
    ws = [w.detach().double().requires_grad_(need_grads and nb == case.x.shape[0]) for w in case.ws]
    y = lk_conv2d_reference(x, ws)
    grads = None
    if need_grads:
        y.backward(case.dy[:nb].double())
        grads = (x.grad, [w.grad for w in ws])
    return y.detach(), grads


def _check_provider(provider: str, case: _Case, ref, need_bwd: bool) -> _Check:
    """Runs the provider once forward (and backward): autotunes on CUDA, compares with the float64 reference."""
    chk = _Check()
    nb = ref[0].shape[0]
    before = sum(LAUNCH_COUNTS.values())
    try:
        # With backward modes the forward of the autograd run is the one checked (one interpreter run less).
        t = _leaves(provider, case, need_bwd)
        if need_bwd:
            y = _forward(provider, t)
        else:
            with torch.no_grad():
                y = _forward(provider, t)
        chk.fwd_err = _rel_err(y.detach()[:nb], ref[0])
    except Exception as e:  # noqa: BLE001 - reported per line, the run goes on
        chk.fwd_error = f"{type(e).__name__}: {e}"
        return chk
    if need_bwd:
        try:
            if not y.requires_grad:
                chk.bwd_unavailable = (f"{provider}: lk_conv2d returned an output without grad_fn (no backward in this "
                                       f"build of slak_triton)")
            else:
                y.backward(case.dy.contiguous(memory_format=torch.channels_last) if provider == "torch-cl" else case.dy)
                dx_ref, dws_ref = ref[1]
                errs = [_rel_err(t.x.grad[:nb], dx_ref)]
                if dws_ref[0] is not None:
                    for b, (w, wr) in enumerate(zip(t.ws, dws_ref)):
                        m = case.masks[b].to(wr.dtype) if case.masks is not None else 1.0
                        g = w.grad if w.grad is not None else torch.zeros_like(w)
                        errs.append(_rel_err(g * m, wr * m))
                chk.bwd_err = max(errs)
        except Exception as e:  # noqa: BLE001
            chk.bwd_error = f"{type(e).__name__}: {e}"
    del y, t
    chk.launches = sum(LAUNCH_COUNTS.values()) - before
    return chk


def _timed_fn(provider: str, case: _Case, mode: str) -> Tuple[Callable[[], object], List[torch.Tensor]]:
    """The callable timed for ``mode`` and the tensors whose gradients are reset between runs."""
    if mode == "fwd":
        t = _leaves(provider, case, False)

        def fwd():
            with torch.no_grad():
                return _forward(provider, t)
        return fwd, []
    t = _leaves(provider, case, True)
    dy = case.dy.contiguous(memory_format=torch.channels_last) if provider == "torch-cl" else case.dy
    if mode == "bwd":
        y = _forward(provider, t)
        return (lambda: y.backward(dy, retain_graph=True)), t.all
    if mode == "fwdbwd":
        return (lambda: _forward(provider, t).backward(dy)), t.all
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def _derived(rec: Dict[str, object], dtype: torch.dtype, peaks: Optional[Peaks], ceilings: Optional[dict]) -> None:
    """Adds TFLOP/s, % of peaks and of the memory floor to a record with a time."""
    ms = rec["ms"]
    floor_ms = None if peaks is None else rec["bytes_min"] / (peaks.hbm_tbs * 1e12) * 1e3
    rec["mem_floor_ms"] = floor_ms
    rec["fp32_fma_floor_ms"] = None if peaks is None else rec["flop_useful"] / (peaks.fp32_fma_tflops * 1e12) * 1e3
    if ms is None or ms <= 0:
        rec.update(tflops=None, pct_fp32_fma_peak=None, pct_tensor_peak=None, pct_mem_floor=None)
        return
    tflops = rec["flop_useful"] / (ms * 1e-3) / 1e12
    rec["tflops"] = tflops
    rec["pct_fp32_fma_peak"] = None if peaks is None else 100.0 * tflops / peaks.fp32_fma_tflops
    rec["pct_tensor_peak"] = None if peaks is None else 100.0 * tflops / peaks.tensor_tflops(dtype)
    rec["pct_mem_floor"] = None if floor_ms is None else 100.0 * floor_ms / ms
    if ceilings:
        rec["pct_mem_floor_measured"] = 100.0 * (rec["bytes_min"] / (ceilings["copy_tbs"] * 1e12) * 1e3) / ms
        if dtype != torch.float32 and not ceilings["matmul"].startswith("fp32"):
            rec["pct_matmul_measured"] = 100.0 * tflops / ceilings["matmul_tflops"]


def _base_record(meta, shape: ConvShape, dname: str, dtype: torch.dtype, density: float, case: _Case, mode: str,
                 provider: str, peaks: Optional[Peaks]) -> Dict[str, object]:
    dims = (shape.batch, shape.channels, shape.height, shape.width)
    useful = counters.useful_taps(*dims, shape.kernels, case.masks)
    dense_useful = counters.useful_taps(*dims, shape.kernels, None)
    active = sum(int(m.sum()) for m in case.masks) if case.masks is not None else None
    total = shape.channels * sum(kh * kw for kh, kw in shape.kernels)
    rec = dict(meta)
    rec.update(
        bench="op",
        op="lk_conv2d",
        where="CPU MODE" if meta["cpu_mode"] else "GPU",
        shape=shape.id,
        shape_label=shape.label,
        stands_for=list(shape.source) if shape.source else [shape.id],
        batch=shape.batch, channels=shape.channels, height=shape.height, width=shape.width,
        kernels=shape.kernels_str,
        dtype=dname,
        density=density,
        tap_density=(active / total) if active is not None else 1.0,
        mode=mode,
        provider=provider,
        useful_taps=useful,
        useful_fraction_of_dense=useful / dense_useful if dense_useful else None,
        flop_useful=counters.flops(useful, mode),
        flop_nominal=2 * counters.passes(mode) * counters.nominal_taps(*dims, shape.kernels),
        bytes_min=counters.min_bytes(*dims, shape.kernels, torch.empty((), dtype=dtype).element_size(), mode),
        peaks=None if peaks is None else peaks.__dict__.copy(),
        status=None, reason=None, timed=False, timer=None,
        ms=None, ms_p20=None, ms_p80=None, host_ms=None,
        check_rel_err=None, check_tol=tolerance(dname, provider), check_ok=None, triton_launches=None,
        speedup_vs_torch=None,
    )
    return rec


def run_op_bench(cfg: OpBenchConfig, meta: Dict[str, object], peaks: Optional[Peaks],
                 ceilings: Optional[dict] = None,
                 checkpoint: Optional[Callable[[List[Dict[str, object]]], None]] = None) -> List[Dict[str, object]]:
    """Runs the benchmark and returns one record per (shape, dtype, density, mode, provider).

    ``checkpoint(records_so_far)`` is called after each timed (shape, dtype, density), so that a run cut short (a
    time limit) still leaves its finished lines behind.

    Record ``status``: "timed" (ms set), "checked" (CPU mode, Triton: verified under the interpreter, not timed),
    "unavailable" (``reason`` says why, e.g. no backward yet), "error" (``reason`` holds the exception)."""
    gpu = cuda_mode()
    device = torch.device("cuda" if gpu else "cpu")
    need_bwd = any(m != "fwd" for m in cfg.modes)
    groups = [(s, d, p) for s in cfg.shapes for d in cfg.dtypes for p in cfg.densities]

    def seed_of(i: int) -> int:
        return cfg.seed * 1_000_003 + i

    # Phase 1: one run of every provider per group (autotuning on CUDA) and the float64 check.
    checks: Dict[Tuple[int, str], _Check] = {}
    prog = Progress("check+autotune" if gpu else "check (CPU mode, interpreter)",
                    len(groups) * len(cfg.providers), cfg.progress)
    for gi, (shape, dname, density) in enumerate(groups):
        case = _make_case(shape, DTYPES[dname], density, device, seed_of(gi))
        nb = shape.batch if not gpu else 1
        try:
            ref = _reference(case, nb, need_bwd)
        except Exception as e:  # noqa: BLE001
            ref = None
            ref_error = f"float64 reference failed: {type(e).__name__}: {e}"
        for prov in cfg.providers:
            prog.step(f"{shape.id} {dname} d={density} {prov}")
            if ref is None:
                checks[(gi, prov)] = _Check(fwd_error=ref_error)
                continue
            if prov in TRITON_PROVIDERS and not gpu and not interpreter_active():
                checks[(gi, prov)] = _Check(fwd_error=(
                    "Triton interpreter inactive: set TRITON_INTERPRET=1 before importing slak_triton "
                    "(the slak-bench command does this itself)"))
                continue
            checks[(gi, prov)] = _check_provider(prov, case, ref, need_bwd)
        del case, ref
        if gpu:
            torch.cuda.empty_cache()

    # Phase 2: timing.
    records: List[Dict[str, object]] = []
    n_timed = sum(1 for _ in groups) * len(cfg.modes) * len(cfg.providers)
    prog = Progress("timing" if gpu else "timing (CPU mode)", n_timed, cfg.progress)
    for gi, (shape, dname, density) in enumerate(groups):
        dtype = DTYPES[dname]
        case = _make_case(shape, dtype, density, device, seed_of(gi))
        for mode in cfg.modes:
            for prov in cfg.providers:
                prog.step(f"{shape.id} {dname} d={density} {mode} {prov}")
                rec = _base_record(meta, shape, dname, dtype, density, case, mode, prov, peaks)
                chk = checks[(gi, prov)]
                rec["triton_launches"] = chk.launches if prov in TRITON_PROVIDERS else None
                err = chk.fwd_err if mode == "fwd" else chk.bwd_err
                if chk.fwd_error is not None:
                    rec.update(status="error", reason=chk.fwd_error)
                elif mode != "fwd" and chk.bwd_unavailable is not None:
                    rec.update(status="unavailable", reason=chk.bwd_unavailable)
                elif mode != "fwd" and chk.bwd_error is not None:
                    rec.update(status="error", reason=chk.bwd_error)
                else:
                    if mode == "fwdbwd":
                        err = max(chk.fwd_err, chk.bwd_err)
                    rec["check_rel_err"] = err
                    rec["check_ok"] = bool(err is not None and err <= rec["check_tol"])
                    if not gpu and prov in TRITON_PROVIDERS:
                        rec.update(status="checked", reason="CPU mode: checked against float64 under the Triton "
                                                            "interpreter; not timed")
                    else:
                        try:
                            fn, grads = _timed_fn(prov, case, mode)
                            t = time_fn(fn, grads, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms)
                            rec.update(status="timed", timed=True, timer=t.timer, ms=t.ms, ms_p20=t.ms_p20,
                                       ms_p80=t.ms_p80, host_ms=t.host_ms)
                            if not gpu:
                                rec["reason"] = "CPU mode: timed on the CPU at a reduced size"
                            del fn, grads
                        except Exception as e:  # noqa: BLE001
                            rec.update(status="error", reason=f"{type(e).__name__}: {e}")
                _derived(rec, dtype, peaks, ceilings)
                records.append(rec)
        del case
        if gpu:
            torch.cuda.empty_cache()
        if checkpoint is not None:
            _speedups(records)
            checkpoint(records)
    _speedups(records)
    return records


def _speedups(records: List[Dict[str, object]]) -> None:
    """speedup_vs_torch = ms of the ``torch`` provider / ms, for the same shape, dtype, density and mode."""
    key = operator.itemgetter("shape", "dtype", "density", "mode")
    torch_ms = {key(r): r["ms"] for r in records if r["provider"] == "torch" and r["ms"]}
    for r in records:
        base = torch_ms.get(key(r))
        if base and r["ms"]:
            r["speedup_vs_torch"] = base / r["ms"]
