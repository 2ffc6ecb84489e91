"""``slak-bench candidates``: the time of every autotune candidate of the op's kernels, one op call each.

The static model (``../shared/tools/sass_model.py``) is refitted on GPU timings with

    sass_model.py calibrate --plan slak_triton.ops.compile_check:launch_plans --plan-path . --data RECORDS.json

which matches each record to the plan's candidate of the same ``config`` and predicts the record's ``ms`` as the
sum of that candidate's launches. So a record here is one call of the op (forward, input gradient or weight
gradient, or on small 16-bit planes the fused backward: every launch it makes, e.g. the five of the fp32 split
forward on 64-padded planes on Hopper) with
one autotune config forced on all its launches, on the shape and line density the plan describes: SLaK's folded
slots, tall K x 5 and wide 5 x K, and at density d < 1 ``round(10 d)`` of the 10 lines active per channel (the
tall slot gets the odd one), as ``launch_plans`` models them.

Each call goes through the op's own launchers (``launch_lk_conv2d_fwd`` / ``_bwd_dw`` / ``_bwd``) with an
explicit config, so what is timed includes what the op does around its kernels (the fp32 weight splits, the
weight gradient's fixed-order sum of partials); a candidate that fails (e.g. more shared memory than the GPU has)
is listed under ``failed`` with its error, never among the records.

CPU mode (no CUDA): the kernels run under the interpreter and the times mean nothing; the default shape is then
a small one, so that the command can be tried (and tested) without a GPU.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from slak_triton import LAUNCH_COUNTS
from slak_triton.ops.compile_check import lk_derived_keys, spec_for
from slak_triton.ops.lk_conv2d import (device_arch, launch_lk_conv2d_bwd, launch_lk_conv2d_bwd_dw, launch_lk_conv2d_fwd,
                                       line_metadata, use_fused_backward)

from .env import Progress, cuda_mode, time_fn

__all__ = ["KINDS", "DTYPES", "STAGES", "CPU_SHAPE", "CandidateCase", "active_lines", "cases", "run_candidates",
           "format_candidates_table"]

#: fwd, dx (input gradient), dw (weight and bias gradients), bwd (the three in one fused launch, where the op has
#: one: ``use_fused_backward``).
KINDS = ("fwd", "dx", "dw", "bwd")
#: dtype names as the model's records spell them.
DTYPES: Dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
#: SLaK-T stages at batch 64 as (N, C, H=W, K): the shapes the model's ``--stages`` names.
STAGES: Dict[int, Tuple[int, int, int, int]] = {1: (64, 124, 56, 51), 2: (64, 249, 28, 49), 3: (64, 499, 14, 47),
                                                4: (64, 998, 7, 13)}
#: The default shape in CPU mode (N, C, H, W, K): small enough for the interpreter.
CPU_SHAPE = (2, 3, 12, 12, 7)


@dataclass(frozen=True)
class CandidateCase:
    """One op call whose candidates are timed: kind, x [N, C, H, W], slots K x 5 and 5 x K, dtype, density."""

    kind: str
    N: int
    C: int
    H: int
    W: int
    K: int
    dtype: str
    density: float


def active_lines(density: float) -> Tuple[int, int]:
    """Active (tall, wide) lines of 5 each at ``density``: ``round(10 * density)`` of the 10, the tall slot taking
    the odd one (``launch_plans``' model of a sparse call)."""
    active = round(10 * density)
    return (active + 1) // 2, active // 2


def cases(kinds: Sequence[str], shapes: Sequence[Tuple[int, int, int, int, int]], dtypes: Sequence[str],
          densities: Sequence[float]) -> List[CandidateCase]:
    """Every (shape, dtype, density, kind) combination; shapes as (N, C, H, W, K), dtypes by short name. Kind "bwd"
    only where the op fuses its backward (``use_fused_backward``: 16-bit, small planes); elsewhere the backward is
    the "dx" and "dw" calls."""
    return [CandidateCase(k, *s, DTYPES[d], float(den)) for s in shapes for d in dtypes for den in densities
            for k in kinds if k != "bwd" or use_fused_backward(s[2], s[3], getattr(torch, DTYPES[d]))]


def _line_masks(C: int, K: int, lines: int, tall: bool, gen: torch.Generator, device) -> Optional[torch.Tensor]:
    """A [C, K, 5] (tall) or [C, 5, K] (wide) 0/1 mask with ``lines`` random lines of 5 active per channel (None:
    all five)."""
    if lines >= 5:
        return None
    keep = torch.rand(C, 5, generator=gen).argsort(dim=1)[:, :lines]
    on = torch.zeros(C, 5).scatter_(1, keep, 1.0)
    m = on[:, None, :].expand(C, K, 5) if tall else on[:, :, None].expand(C, 5, K)
    return m.contiguous().to(device)


def _configs(case: CandidateCase, device: torch.device) -> List[Tuple[dict, dict]]:
    """(config as the plan names it, full config with any derived keys) of every autotune candidate of the call,
    as the launcher on ``device`` would build it (its compute capability picks the path)."""
    ls = spec_for(case.kind, case.N, case.C, case.H, case.W, (case.K, 5), (5, case.K), case.dtype,
                  case.density < 1, arch=device_arch(device))
    out = []
    for c in ls.configs:
        full = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        out.append(({k: v for k, v in full.items() if k not in lk_derived_keys(ls)}, full))
    return out


def _call(case: CandidateCase, device: torch.device, seed: int):
    """The call's tensors and a function launching it with a given config."""
    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, case.dtype)
    N, C, H, W, K = case.N, case.C, case.H, case.W, case.K
    x = torch.randn(N, C, H, W, generator=gen).to(device=device, dtype=dt)
    wt = (torch.randn(C, K, 5, generator=gen) / math.sqrt(5 * K)).to(device=device, dtype=dt)
    ww = (torch.randn(C, 5, K, generator=gen) / math.sqrt(5 * K)).to(device=device, dtype=dt)
    bias = torch.randn(C, generator=gen).to(device=device, dtype=dt)
    lines_t, lines_w = active_lines(case.density) if case.density < 1 else (5, 5)
    mt = _line_masks(C, K, lines_t, True, gen, device)
    mw = _line_masks(C, K, lines_w, False, gen, device)
    meta_t = line_metadata(mt, True) if mt is not None else None
    meta_w = line_metadata(mw, False) if mw is not None else None
    out = torch.empty_like(x)
    if case.kind == "dw":
        def run(cfg):
            launch_lk_conv2d_bwd_dw(x, x, (K, 5), (5, K), True, sparse_t=meta_t, sparse_w=meta_w, config=cfg)
    elif case.kind == "bwd":
        def run(cfg):
            launch_lk_conv2d_bwd(x, x, wt, ww, out, True, sparse_t=meta_t, sparse_w=meta_w, config=cfg)
    else:
        flip = case.kind == "dx"

        def run(cfg):
            launch_lk_conv2d_fwd(x, wt, ww, None if flip else bias, out, flip=flip, sparse_t=meta_t,
                                 sparse_w=meta_w, config=cfg)
    return run


def run_candidates(case_list: Sequence[CandidateCase], device: torch.device, *, warmup_ms: float = 25.0,
                   rep_ms: float = 100.0, limit: Optional[int] = None, seed: int = 0,
                   progress: bool = True) -> Tuple[List[dict], List[dict]]:
    """(records, failed): one record per case and candidate (the first ``limit`` candidates of each case when
    given) with the call's median time ``ms``, its 20 / 80 % quantiles, the host's time per call ``host_ms``
    (CUDA; ``Timing.host_ms``) and the number of launches it made;
    failed: the candidates that raised, with the error."""
    work = [(case, cfgs) for case in case_list for cfgs in [_configs(case, device)[:limit]]]
    prog = Progress("candidates", sum(len(c) for _, c in work), enabled=progress)
    records, failed = [], []
    for case, cfgs in work:
        run = _call(case, device, seed)
        for plan_cfg, full in cfgs:
            base = dict(kind=case.kind, N=case.N, C=case.C, H=case.H, W=case.W, K=case.K, dtype=case.dtype,
                        density=case.density, config=plan_cfg)
            prog.step(f"{case.kind} {case.N}x{case.C}x{case.H}x{case.W} K{case.K} {case.dtype} d={case.density}")
            try:
                before = sum(LAUNCH_COUNTS[k] for k in ("fwd", "dw", "bwd"))
                run(full)   # compiles, and counts the call's launches
                launches = sum(LAUNCH_COUNTS[k] for k in ("fwd", "dw", "bwd")) - before
                t = time_fn(lambda cfg=full: run(cfg), warmup_ms=warmup_ms, rep_ms=rep_ms)
            except Exception as e:  # noqa: BLE001 - a failing candidate is reported, the others still run
                first = str(e).splitlines()[0][:300] if str(e) else ""
                failed.append(dict(base, error=f"{type(e).__name__}: {first}"))
                continue
            records.append(dict(base, ms=t.ms, ms_p20=t.ms_p20, ms_p80=t.ms_p80, host_ms=t.host_ms, launches=launches,
                                timer=t.timer))
    return records, failed


def format_candidates_table(records: Sequence[dict], failed: Sequence[dict]) -> str:
    """One line per record, fastest candidate of each case first."""
    lines = [f"{'kind':<4} {'N x C x H x W':<16} {'K':>3} {'dtype':<9} {'dens':>4} {'ms':>9} {'launches':>8}  config"]
    key = lambda r: (r["kind"], r["N"], r["C"], r["H"], r["W"], r["K"], r["dtype"], r["density"])  # noqa: E731
    for r in sorted(records, key=lambda r: (key(r), r["ms"])):
        cfg = ",".join(f"{k}={v}" for k, v in r["config"].items())
        lines.append(f"{r['kind']:<4} {r['N']}x{r['C']}x{r['H']}x{r['W']:<7} {r['K']:>3} {r['dtype']:<9} "
                     f"{r['density']:>4} {r['ms']:>9.4f} {r['launches']:>8}  {cfg}")
    for f in failed:
        lines.append(f"FAILED {f['kind']} {f['N']}x{f['C']}x{f['H']}x{f['W']} K{f['K']} {f['dtype']} "
                     f"d={f['density']} {f['config']}: {f['error']}")
    return "\n".join(lines)
