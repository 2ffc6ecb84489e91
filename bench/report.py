"""Outputs of ``slak-bench``: the text table, JSON, CSV and the optional matplotlib plot."""

import csv
import io
import json
import os
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    MATPLOTLIB_ERROR: Optional[str] = None
except ImportError as _e:  # optional dependency (extra "bench")
    plt = None
    MATPLOTLIB_ERROR = f"{type(_e).__name__}: {_e}"

__all__ = ["SCHEMA", "format_op_table", "format_op_table_wide", "wrap_note", "write_json", "write_csv", "write_plot", "MATPLOTLIB_ERROR", "PlotUnavailable"]

SCHEMA = "slak-bench/1"


class PlotUnavailable(RuntimeError):
    """--plot was asked for but matplotlib is not installed."""


def _f(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


_PROVIDER_LABELS = {"triton": "triton", "triton-branch": "branch", "torch": "torch", "torch-cl": "torch-cl"}


def wrap_note(text: str, width: int = 100) -> str:
    """``note: text`` wrapped to ``width`` columns (continuation lines indented)."""
    return textwrap.fill("note: " + text, width=width, subsequent_indent="      ", break_on_hyphens=False)


def _op_cell(r: Optional[Dict[str, object]]) -> str:
    """One provider's result in the compact table: ms when timed, the interpreter check when only checked."""
    if r is None:
        return ""
    if r["status"] == "timed":
        cell = _f(r["ms"], ".4g")
        return cell + ("!" if r.get("check_ok") is False else "")
    if r["status"] == "checked":
        return ("ok " if r["check_ok"] else "FAIL ") + _f(r.get("check_rel_err"), ".0e")
    return {"unavailable": "n/a", "error": "ERROR"}.get(str(r["status"]), str(r["status"]))


def format_op_table(records: Sequence[Dict[str, object]]) -> str:
    """The compact table (fits 100 columns): one line per (shape, dtype, density, mode), one column per provider.

    GPU: milliseconds per provider, then for ``triton`` its speedup over ``torch`` (NCHW), TFLOP/s on useful taps,
    % of the relevant peak (FP32 FMA for fp32, tensor cores for 16-bit) and % of the memory floor. CPU mode: PyTorch
    milliseconds (CPU, reduced sizes) and, for the Triton providers, the interpreter check ("ok 1e-07": passed,
    relative error) -- a title line says it is CPU mode. Notes under the table list errors, unavailable lines and
    failed checks; ``format_op_table_wide`` has every field."""
    if not records:
        return "(no records)"
    cpu = bool(records[0]["cpu_mode"])
    providers = list(dict.fromkeys(str(r["provider"]) for r in records))
    cases: Dict[tuple, Dict[str, Dict[str, object]]] = {}
    for r in records:
        key = (r["shape"], f"{r['batch']}x{r['channels']}x{r['height']}x{r['width']}", r["dtype"], r["density"],
               r["mode"])
        cases.setdefault(key, {})[str(r["provider"])] = r
    cw = 11
    head = f"{'shape':<11} " + (f"{'NxCxHxW':<13} " if cpu else "") + f"{'dtype':<5} {'dens':>4} {'mode':<6}"
    head += "".join(f"{_PROVIDER_LABELS.get(p, p)[:cw - 1]:>{cw}}" for p in providers)
    if not cpu:
        head += f"{'speedup':>8} {'TFLOP/s':>7} {'%peak':>5} {'%mem':>5}"
    lines = []
    if cpu:
        lines.append("CPU MODE: torch ms on the CPU (1 thread, reduced sizes); triton = interpreter check, not timed")
    else:
        lines.append("ms per call (median); speedup, TFLOP/s (useful taps), % of peak and of the memory floor: triton")
    lines += [head, "-" * len(head)]
    notes: List[str] = []
    for (shape, dims, dtype, dens, mode), by in cases.items():
        line = f"{shape:<11} " + (f"{dims:<13} " if cpu else "") + f"{dtype:<5} {dens:>4.1f} {mode:<6}"
        line += "".join(f"{_op_cell(by.get(p)):>{cw}}" for p in providers)
        t = by.get("triton")
        if not cpu:
            sp = _f(t.get("speedup_vs_torch") if t else None, ".2f")
            peak = None
            if t is not None:
                peak = t.get("pct_fp32_fma_peak") if dtype == "fp32" else t.get("pct_tensor_peak")
            line += (f"{sp + ('x' if sp != '-' else ''):>8} {_f(t.get('tflops') if t else None, '.3g'):>7} "
                     f"{_f(peak, '.1f'):>5} {_f(t.get('pct_mem_floor') if t else None, '.1f'):>5}")
        lines.append(line.rstrip())
        for p, r in by.items():
            if r["status"] in ("error", "unavailable"):
                notes.append(f"{r['status']}: {p} ({r['reason']})")
            elif r.get("check_ok") is False:
                notes.append(f"CHECK FAILED: {shape} {dtype} d{dens} {mode} {p}: rel err "
                             f"{_f(r.get('check_rel_err'), '.1e')} > {_f(r.get('check_tol'), '.0e')}")
    for n in dict.fromkeys(notes):
        lines.append(wrap_note(n))
    return "\n".join(lines)


def format_op_table_wide(records: Sequence[Dict[str, object]]) -> str:
    """One line per record with every field (``slak-bench op --wide``; about 200 columns). In CPU mode every line
    starts with ``[CPU MODE]``."""
    head = (f"{'where':<10} {'shape':<11} {'NxCxHxW':<16} {'dtype':<5} {'dens':>4} {'mode':<6} {'provider':<13} "
            f"{'ms':>9} {'p20-p80':>17} {'TFLOP/s':>8} {'%FMA':>6} {'%TC':>6} {'%mem':>6} {'vs torch':>8}  note")
    lines = [head, "-" * len(head)]
    for r in records:
        where = "[CPU MODE]" if r["cpu_mode"] else "GPU"
        dims = f"{r['batch']}x{r['channels']}x{r['height']}x{r['width']}"
        if r["ms"] is not None:
            q = f"{r['ms_p20']:.4g}-{r['ms_p80']:.4g}"
        else:
            q = "-"
        note = []
        if r["status"] == "checked":
            note.append(f"interpreter check {'OK' if r['check_ok'] else 'FAILED'} "
                        f"(rel err {_f(r['check_rel_err'], '.1e')}, {r['triton_launches']} launches), not timed")
        elif r["status"] in ("unavailable", "error"):
            note.append(f"{r['status'].upper()}: {r['reason']}")
        elif r["check_ok"] is False:
            note.append(f"CHECK FAILED rel err {_f(r['check_rel_err'], '.1e')} > {r['check_tol']:.0e}")
        if r["status"] == "timed" and r["cpu_mode"]:
            note.append("CPU time, reduced size")
        sp = _f(r["speedup_vs_torch"], ".2f")
        lines.append(
            f"{where:<10} {r['shape']:<11} {dims:<16} {r['dtype']:<5} {r['density']:>4.1f} {r['mode']:<6} "
            f"{r['provider']:<13} {_f(r['ms'], '9.4g'):>9} {q:>17} {_f(r.get('tflops'), '.3g'):>8} "
            f"{_f(r.get('pct_fp32_fma_peak'), '6.1f'):>6} {_f(r.get('pct_tensor_peak'), '6.1f'):>6} "
            f"{_f(r.get('pct_mem_floor'), '6.1f'):>6} {sp + ('x' if sp != '-' else ''):>8}  {'; '.join(note)}")
    return "\n".join(lines)


def write_json(path: Path, records: List[Dict[str, object]], meta: Dict[str, object], extra: Optional[dict] = None) -> None:
    """``{"schema", "meta", "records"}``; every record also carries the meta fields itself."""
    doc = {"schema": SCHEMA, "meta": meta, "records": records}
    if extra:
        doc.update(extra)
    _atomic_write_text(Path(path), json.dumps(doc, indent=1, sort_keys=False) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    """Writes ``path`` through a temporary file renamed over it: a reader (or a run killed while writing one of
    the partial --json checkpoints) sees the previous file or the new one, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:  # newline='': the text's line ends are written as they are
        fh.write(text)
    os.replace(tmp, path)


def _flat(v):
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    return v


def write_csv(path: Path, records: List[Dict[str, object]]) -> None:
    """One row per record, the union of all keys as columns (nested values as JSON)."""
    cols: List[str] = []
    for r in records:
        for k in r:
            if k not in cols:
                cols.append(k)
    fh = io.StringIO(newline="")
    w = csv.DictWriter(fh, fieldnames=cols)
    w.writeheader()
    for r in records:
        w.writerow({k: _flat(r.get(k)) for k in cols})
    _atomic_write_text(Path(path), fh.getvalue())


def write_plot(path: Path, records: List[Dict[str, object]], meta: Dict[str, object]) -> None:
    """Grouped bars per (shape, dtype, density, mode): time per provider (log scale) and speedup vs torch.
    Raises PlotUnavailable when matplotlib is missing."""
    if plt is None:
        raise PlotUnavailable(
            f"--plot needs matplotlib, which is not installed ({MATPLOTLIB_ERROR}); install it with "
            f"`pip install matplotlib` (or the extra: `pip install 'slak_triton[bench]'`)")
    timed = [r for r in records if r["ms"] is not None]
    providers = list(dict.fromkeys(r["provider"] for r in records))
    cases = list(dict.fromkeys((r["shape"], r["dtype"], r["density"], r["mode"]) for r in records))
    by = {(r["shape"], r["dtype"], r["density"], r["mode"], r["provider"]): r for r in timed}
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.55 * len(cases) + 3), 8), sharex=True)
    width = 0.8 / max(1, len(providers))
    for pi, prov in enumerate(providers):
        xs, ms, sp, xs2 = [], [], [], []
        for ci, c in enumerate(cases):
            r = by.get((*c, prov))
            if r is None:
                continue
            xs.append(ci + pi * width)
            ms.append(r["ms"])
            if r["speedup_vs_torch"] is not None:
                xs2.append(ci + pi * width)
                sp.append(r["speedup_vs_torch"])
        axes[0].bar(xs, ms, width, label=prov)
        axes[1].bar(xs2, sp, width, label=prov)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ms (median)")
    axes[1].set_ylabel("speedup vs torch (NCHW)")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[0].legend(fontsize=8, ncol=len(providers))
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    axes[1].set_xticklabels([f"{s} {d} d{p:g} {m}" for s, d, p, m in cases], rotation=70, ha="right", fontsize=7)
    mode = "CPU MODE (not GPU numbers)" if meta.get("cpu_mode") else meta.get("device")
    fig.suptitle(f"slak-bench op: {mode}\ntorch {meta.get('torch')}, triton {meta.get('triton')}, "
                 f"commit {str(meta.get('git_commit'))[:10]}, {meta.get('date')}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
