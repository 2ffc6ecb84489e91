"""``slak-bench``: autotuned microbenchmarks of slak_triton from the command line.

Subcommands: ``op`` (the large-kernel op, the default when none is given), ``model`` (whole networks), ``shapes``
(list the shapes registry with its work counts), ``candidates`` (every autotune candidate of the op's kernels timed,
as records that refit the static model). ``slak-bench --quick`` is ``slak-bench op --quick``.

CPU mode. Triton picks interpreter or compiler when a kernel is *defined*, i.e. when ``slak_triton`` is imported,
and importing this module already imported ``slak_triton`` (it is its parent package). So on a machine without
CUDA, ``main()`` called as the console script re-executes itself once with ``TRITON_INTERPRET=1`` set from the
start (``_SLAK_BENCH_REEXEC`` guards against a loop). Called in-process with an explicit ``argv`` (tests), it never
re-executes: the caller sets the variable before importing (tests/conftest.py does), or the Triton lines say
the interpreter is inactive.
"""

import argparse
import math
import os
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from slak_triton import interpreter_active

from . import bench_candidates
from . import bench_lk_conv2d as op_bench
from . import bench_models
from . import counters, report
from .env import CPU_MODE_NOTE, CPU_THREADS, cpu_mode_threads, cuda_mode, lookup_peaks, measure_ceilings, run_metadata
from .report import PlotUnavailable, format_op_table, format_op_table_wide, write_csv, write_json, write_plot
from .shapes import reduce_for_cpu, select_shapes

__all__ = ["main", "build_parser"]

SUBCOMMANDS = ("op", "model", "shapes", "candidates")
_REEXEC_FLAG = "_SLAK_BENCH_REEXEC"

# --quick defaults (explicit options override them).
QUICK_OP = dict(shapes="quick", dtypes="fp32,bf16", modes="fwd,fwdbwd", densities="1.0,0.3",
                providers=",".join(op_bench.PROVIDERS), warmup_ms=10.0, rep_ms=50.0)
FULL_OP = dict(shapes="all", dtypes="fp32,fp16,bf16", modes=",".join(op_bench.MODES),
               densities=",".join(str(d) for d in op_bench.DENSITIES), providers=",".join(op_bench.PROVIDERS),
               warmup_ms=25.0, rep_ms=100.0)


def _csv_list(value: str, allowed: Sequence[str], what: str) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what}: expected a comma-separated subset of {', '.join(allowed)}, got {value!r}")
    return items


def _densities(value: str) -> List[float]:
    try:
        ds = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--densities: expected comma-separated numbers in (0, 1], got {value!r}")
    if not ds or any(not (0.0 < d <= 1.0) for d in ds):
        raise argparse.ArgumentTypeError(f"--densities: expected comma-separated numbers in (0, 1], got {value!r}")
    return ds


def _shape5(value: str):
    try:
        dims = tuple(int(v) for v in value.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 5 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"--shape: expected N,C,H,W,K (five positive ints), got {value!r}")
    return dims


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", type=Path, help="write the records as JSON")
    p.add_argument("--csv", metavar="PATH", type=Path, help="write the records as CSV")
    p.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    p.add_argument("--measure-ceilings", action="store_true",
                   help="measure a device-to-device copy and a large bf16 matmul once and record them "
                        "(adds pct_*_measured fields)")
    p.add_argument("--no-autotune", action="store_true",
                   help="set SLAK_TRITON_AUTOTUNE=0: one fixed config per kernel instead of autotuning")
    p.add_argument("--warmup-ms", type=float, default=None, help="do_bench warm-up time per measurement")
    p.add_argument("--rep-ms", type=float, default=None, help="do_bench timing budget per measurement")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slak-bench",
        description="Autotuned microbenchmarks of slak_triton. Without a subcommand, runs `op` "
                    "(e.g. `slak-bench --quick`). Without CUDA it runs in CPU mode: PyTorch timed on the CPU at "
                    "reduced sizes, Triton checked under the interpreter; not GPU numbers.")
    sub = parser.add_subparsers(dest="command", metavar="{op,model,shapes,candidates}")

    p = sub.add_parser("op", help="the large-kernel depthwise op against PyTorch (default)",
                       description="Times lk_conv2d providers on SLaK stage shapes; see docs/benchmarks.md.")
    p.add_argument("--quick", action="store_true",
                   help=f"representative subset (< 2 min on a GPU): shapes {QUICK_OP['shapes']}, dtypes "
                        f"{QUICK_OP['dtypes']}, modes {QUICK_OP['modes']}, densities {QUICK_OP['densities']}")
    p.add_argument("--shapes", default=None,
                   help="all | quick | quick-cpu | tiny | ts | b | comma-separated ids such as ts-s1-b64 (see `slak-bench shapes`)")
    p.add_argument("--dtypes", default=None, type=lambda v: _csv_list(v, tuple(op_bench.DTYPES), "--dtypes"))
    p.add_argument("--modes", default=None, type=lambda v: _csv_list(v, op_bench.MODES, "--modes"))
    p.add_argument("--densities", default=None, type=_densities, help="fractions of weight blocks kept, e.g. 1.0,0.6,0.3")
    p.add_argument("--providers", default=None, type=lambda v: _csv_list(v, op_bench.PROVIDERS, "--providers"))
    p.add_argument("--plot", metavar="PNG", type=Path, help="write a bar chart (needs matplotlib)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wide", action="store_true",
                   help="one table line per record with every field (about 200 columns) instead of the compact table")
    _add_output_options(p)

    m = sub.add_parser("model", help="SLaK-T/S/B and ConvNeXt-T images/s: eval (unfused, fused) and training step",
                       description="Whole-network throughput: this library's op (triton) against PyTorch (torch: "
                                   "NCHW, torch-cl: channels_last), SLaK against the ConvNeXt-T comparator.")
    m.add_argument("--quick", action="store_true",
                   help="SLaK-T and ConvNeXt-T, batch 16 (CPU mode: batch 1 at 64x64)")
    m.add_argument("--variants", default=None, type=lambda v: _csv_list(v, tuple(bench_models.VARIANTS), "--variants"),
                   help="comma-separated subset of T, S, B, convnext (default: all on a GPU; T,convnext with --quick "
                        "or in CPU mode)")
    m.add_argument("--kinds", default=None, type=lambda v: _csv_list(v, bench_models.KINDS, "--kinds"))
    m.add_argument("--batch", type=int, default=None)
    m.add_argument("--image-size", type=int, default=None)
    m.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    _add_output_options(m)

    s = sub.add_parser("shapes", help="list the shapes registry with useful-tap FLOPs and minimum bytes")
    s.add_argument("--shapes", default="all")

    c = sub.add_parser("candidates", help="every autotune candidate of the op's kernels timed (records that refit "
                                          "the static model)",
                       description="Times one op call per autotune candidate (config forced on all its launches) "
                                   "on SLaK-T stage shapes; --json writes the records `sass_model.py calibrate "
                                   "--plan slak_triton.ops.compile_check:launch_plans` reads. See docs/benchmarks.md.")
    c.add_argument("--kinds", default=list(bench_candidates.KINDS),
                   type=lambda v: _csv_list(v, bench_candidates.KINDS, "--kinds"),
                   help="fwd, dx, dw, bwd (the fused backward: only on shapes and dtypes that have one, 16-bit on "
                        "planes up to 8x8); default all")
    c.add_argument("--stages", default=None, type=lambda v: [int(t) for t in _csv_list(v, ("1", "2", "3", "4"),
                                                                                        "--stages")],
                   help="SLaK-T stages at batch 64 (default 1,2,3,4 on a GPU)")
    c.add_argument("--shape", action="append", type=_shape5, default=None, metavar="N,C,H,W,K",
                   help="a shape instead of --stages (repeatable; default in CPU mode: "
                        f"{','.join(map(str, bench_candidates.CPU_SHAPE))})")
    c.add_argument("--dtypes", default=["bf16", "fp32"], type=lambda v: _csv_list(v, tuple(bench_candidates.DTYPES),
                                                                                 "--dtypes"))
    c.add_argument("--densities", default=[1.0, 0.6, 0.3], type=_densities,
                   help="fractions of active lines (round(10 d) of the 10 per channel), e.g. 1.0,0.6,0.3")
    c.add_argument("--limit", type=int, default=None, help="time only the first LIMIT candidates of each call")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", metavar="PATH", type=Path, help="write the records (and the failed candidates) as JSON")
    c.add_argument("--csv", metavar="PATH", type=Path, help="write the records as CSV")
    c.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    c.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warm-up time per candidate")
    c.add_argument("--rep-ms", type=float, default=50.0, help="do_bench timing budget per candidate")
    return parser


def _normalise_argv(argv: Sequence[str]) -> List[str]:
    """``slak-bench [op options]`` means ``slak-bench op [op options]``."""
    argv = list(argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "op")
    return argv


def _maybe_reexec_with_interpreter(argv: Sequence[str]) -> None:
    """Console-script CPU mode: restart once with TRITON_INTERPRET=1 so that the kernels are defined for the
    interpreter. Does nothing on CUDA machines or when the interpreter is already active."""
    if cuda_mode() or interpreter_active() or os.environ.get(_REEXEC_FLAG) == "1":
        return
    env = dict(os.environ, TRITON_INTERPRET="1", **{_REEXEC_FLAG: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "slak_triton.bench.cli", *argv], env)


def _pick(value, quick: bool, key: str, quick_defaults: dict, full_defaults: dict):
    if value is not None:
        return value
    return (quick_defaults if quick else full_defaults)[key]


def _meta(args) -> dict:
    if args.no_autotune:
        os.environ["SLAK_TRITON_AUTOTUNE"] = "0"
    meta = run_metadata()
    meta["ceilings"] = measure_ceilings() if args.measure_ceilings else None
    return meta


def _wrap(text: str, indent: str = "") -> str:
    return textwrap.fill(text, width=100, subsequent_indent=indent, break_on_hyphens=False)


def _banner(meta: dict) -> None:
    if meta["cpu_mode"]:
        print(_wrap(f"*** {CPU_MODE_NOTE} ***"))
    date = str(meta["date"])[:16].replace("T", " ")
    print(_wrap(f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit "
                f"{meta['git_commit'][:10]}{' (dirty)' if meta['git_dirty'] else ''} | {date} | autotune "
                f"{'on' if meta['autotune'] else 'off'}", indent="  "))
    if meta.get("ceilings"):
        c = meta["ceilings"]
        print(f"measured ceilings: copy {c['copy_tbs']:.2f} TB/s, matmul ({c['matmul']}) {c['matmul_tflops']:.1f} TFLOP/s")


def _footer(meta: dict) -> None:
    if meta["cpu_mode"]:
        print("*** CPU MODE: not GPU numbers (run on a CUDA machine for the Triton timings) ***")


def _write_outputs(args, records, meta, fmt_extra=None) -> int:
    """JSON/CSV (and plot for op); returns 0, or 1 when the plot could not be made."""
    if args.json:
        write_json(args.json, records, meta, dict(fmt_extra or {}, partial=False))
        print(f"wrote {len(records)} records to {args.json}")
    if args.csv:
        write_csv(args.csv, records)
        print(f"wrote {args.csv}")
    if getattr(args, "plot", None):
        try:
            write_plot(args.plot, records, meta)
            print(f"wrote {args.plot}")
        except PlotUnavailable as e:
            print(f"slak-bench: {e}", file=sys.stderr)
            return 1
    return 0


def _cmd_op(args, parser) -> int:
    q = args.quick
    try:
        spec = _pick(args.shapes, q, "shapes", QUICK_OP, FULL_OP)
        if spec == "quick" and not cuda_mode():
            spec = "quick-cpu"
        shapes = select_shapes(spec)
    except ValueError as e:
        parser.error(str(e))
    dtypes = _pick(args.dtypes, q, "dtypes", QUICK_OP, FULL_OP)
    modes = _pick(args.modes, q, "modes", QUICK_OP, FULL_OP)
    dens = _pick(args.densities, q, "densities", QUICK_OP, FULL_OP)
    provs = _pick(args.providers, q, "providers", QUICK_OP, FULL_OP)
    dtypes = dtypes.split(",") if isinstance(dtypes, str) else dtypes
    modes = modes.split(",") if isinstance(modes, str) else modes
    dens = [float(d) for d in dens.split(",")] if isinstance(dens, str) else dens
    provs = provs.split(",") if isinstance(provs, str) else provs
    if args.plot and report.plt is None:
        print("slak-bench: --plot needs matplotlib, which is not installed; the benchmark runs and the plot is "
              "skipped (pip install matplotlib)", file=sys.stderr)
    meta = _meta(args)
    if meta["cpu_mode"]:
        shapes = reduce_for_cpu(shapes)
    _banner(meta)
    peaks = lookup_peaks(meta["device"]) if not meta["cpu_mode"] else None
    if not meta["cpu_mode"] and peaks is None:
        print(f"note: no peak table entry for {meta['device']!r}: % columns empty (try --measure-ceilings)")
    cfg = op_bench.OpBenchConfig(
        shapes=shapes, dtypes=dtypes, modes=modes, densities=dens, providers=provs,
        warmup_ms=_pick(args.warmup_ms, q, "warmup_ms", QUICK_OP, FULL_OP),
        rep_ms=_pick(args.rep_ms, q, "rep_ms", QUICK_OP, FULL_OP),
        seed=args.seed, progress=not args.no_progress)
    def checkpoint(done):
        write_json(args.json, done, meta, {"partial": True})

    with cpu_mode_threads(CPU_THREADS):
        records = op_bench.run_op_bench(cfg, meta, peaks, meta.get("ceilings"),
                                        checkpoint if args.json else None)
    print(format_op_table_wide(records) if args.wide else format_op_table(records))
    _footer(meta)
    rc = _write_outputs(args, records, meta)
    bad = [r for r in records if r["status"] == "error" or r["check_ok"] is False]
    if args.wide:
        for reason in sorted({r["reason"] for r in records if r["status"] == "unavailable"}):
            print(f"unavailable: {reason}")
    if bad:
        print(f"slak-bench: {len(bad)} line(s) failed (status error or check failed)", file=sys.stderr)
        return 1
    return rc


def _cmd_model(args, parser) -> int:
    if bench_models.MODELS_IMPORT_ERROR is not None:
        print(f"slak-bench model: slak_triton.models is not available ({bench_models.MODELS_IMPORT_ERROR}); "
              f"nothing to benchmark. `slak-bench op` still works.", file=sys.stderr)
        return 2
    meta = _meta(args)
    gpu = not meta["cpu_mode"]
    if gpu:
        batch, size = (16 if args.quick else 64), 224
    else:
        batch, size = 1, 64
    cfg = bench_models.ModelBenchConfig(
        variants=args.variants or (("T", "convnext") if args.quick or not gpu else tuple(bench_models.VARIANTS)),
        kinds=args.kinds or bench_models.KINDS,
        batch=args.batch if args.batch is not None else batch,
        image_size=args.image_size if args.image_size is not None else size, dtype=args.dtype,
        warmup_ms=args.warmup_ms if args.warmup_ms is not None else (10.0 if args.quick else 25.0),
        rep_ms=args.rep_ms if args.rep_ms is not None else (50.0 if args.quick else 200.0),
        progress=not args.no_progress)
    _banner(meta)
    with cpu_mode_threads(CPU_THREADS):
        records = bench_models.run_model_bench(cfg, meta)
    print(bench_models.format_model_table(records))
    _footer(meta)
    rc = _write_outputs(args, records, meta)
    if any(r["status"] == "error" for r in records):
        return 1
    return rc


def _cmd_shapes(args, parser) -> int:
    try:
        shapes = select_shapes(args.shapes)
    except ValueError as e:
        parser.error(str(e))
    print(f"{'id':<11} {'label':<26} {'NxCxHxW':<16} {'kernels':<14} {'GFLOP useful':>12} {'GFLOP nominal':>13} "
          f"{'MB fp32':>8} {'MB 16-bit':>9}  (forward, dense)")
    for s in shapes:
        dims = (s.batch, s.channels, s.height, s.width)
        u = counters.useful_taps(*dims, s.kernels)
        print(f"{s.id:<11} {s.label:<26} {'x'.join(map(str, dims)):<16} {s.kernels_str:<14} "
              f"{counters.flops(u, 'fwd') / 1e9:>12.3f} {2 * counters.nominal_taps(*dims, s.kernels) / 1e9:>13.3f} "
              f"{counters.min_bytes(*dims, s.kernels, 4, 'fwd') / 1e6:>8.1f} "
              f"{counters.min_bytes(*dims, s.kernels, 2, 'fwd') / 1e6:>9.1f}")
    return 0


def _cmd_candidates(args, parser) -> int:
    meta = run_metadata()
    if args.shape:
        shapes = args.shape
    elif args.stages or not meta["cpu_mode"]:
        shapes = [(n, c, h, h, k) for n, c, h, k in (bench_candidates.STAGES[i] for i in (args.stages or (1, 2, 3, 4)))]
    else:
        shapes = [bench_candidates.CPU_SHAPE]
    _banner(meta)
    device = torch.device("cuda" if not meta["cpu_mode"] else "cpu")
    with cpu_mode_threads(CPU_THREADS):
        records, failed = bench_candidates.run_candidates(
            bench_candidates.cases(args.kinds, shapes, args.dtypes, args.densities), device,
            warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, limit=args.limit, seed=args.seed,
            progress=not args.no_progress)
    print(bench_candidates.format_candidates_table(records, failed))
    _footer(meta)
    if args.json:
        write_json(args.json, records, meta, {"failed": failed})
        print(f"wrote {len(records)} records ({len(failed)} failed candidates) to {args.json}")
    if args.csv:
        write_csv(args.csv, records)
        print(f"wrote {args.csv}")
    if failed:
        print(f"slak-bench candidates: {len(failed)} candidate(s) failed", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------- validation

def _validate_args(args, parser: argparse.ArgumentParser) -> None:
    """Every numeric flag and every output path, checked before anything is built or timed; a bad value ends the
    run with ``parser.error`` (exit 2) naming the flag, the expected and the actual value."""
    def bad(flag, expected, value):
        parser.error(f"{flag}: expected {expected}, got {value!r}")

    def finite(v):
        return v is not None and math.isfinite(v)

    if getattr(args, "warmup_ms", None) is not None and not (finite(args.warmup_ms) and args.warmup_ms >= 0):
        bad("--warmup-ms", "a finite number >= 0", args.warmup_ms)
    if getattr(args, "rep_ms", None) is not None and not (finite(args.rep_ms) and args.rep_ms > 0):
        bad("--rep-ms", "a finite number > 0", args.rep_ms)
    if getattr(args, "seed", None) is not None and not 0 <= args.seed < 2 ** 63:
        bad("--seed", "an int in 0..2**63-1", args.seed)
    if args.command == "candidates" and args.limit is not None and args.limit < 1:
        bad("--limit", "an int >= 1", args.limit)
    if args.command == "model":
        if args.batch is not None and args.batch < 1:
            bad("--batch", "an int >= 1", args.batch)
        if args.image_size is not None and args.image_size < bench_models.MIN_IMAGE_SIZE:
            bad("--image-size", f"an int >= {bench_models.MIN_IMAGE_SIZE} (a SLaK downsamples by 32)",
                args.image_size)
    _check_output_paths(args, parser)


def _output_problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot be written (without writing it or leaving anything behind), or None."""
    if path.is_dir():
        return "it is a directory"
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if path.exists():
        try:
            with open(path, "r+b"):
                pass
        except OSError as e:
            return f"{type(e).__name__}: {e.strerror or e}"
        return None
    try:  # in the parent, or in the nearest existing ancestor when the writers have folders to create
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"cannot write in {existing} ({type(e).__name__}: {e.strerror or e})"
    return None


def _check_output_paths(args, parser: argparse.ArgumentParser) -> None:
    """--json / --csv / --plot: writable and distinct, found out before the benchmark runs rather than after."""
    outs = [(flag, getattr(args, attr, None)) for flag, attr in (("--json", "json"), ("--csv", "csv"),
                                                                 ("--plot", "plot"))]
    outs = [(flag, Path(p)) for flag, p in outs if p is not None]
    seen = {}
    for flag, path in outs:
        key = os.path.abspath(path)
        if key in seen:
            parser.error(f"{flag}: expected a path other than {seen[key]}'s, got {str(path)!r} for both")
        seen[key] = flag
        problem = _output_problem(path)
        if problem is not None:
            parser.error(f"{flag}: expected a writable file path, got {str(path)!r} ({problem})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``slak-bench`` console script; returns the exit status (0 ok, 1 a line failed or the
    plot could not be made, 2 usage error / nothing to benchmark)."""
    if argv is None:
        raw = sys.argv[1:]
        _maybe_reexec_with_interpreter(raw)
    else:
        raw = list(argv)
    parser = build_parser()
    args = parser.parse_args(_normalise_argv(raw))
    _validate_args(args, parser)
    if args.command == "op":
        return _cmd_op(args, parser)
    if args.command == "model":
        return _cmd_model(args, parser)
    if args.command == "candidates":
        return _cmd_candidates(args, parser)
    return _cmd_shapes(args, parser)


if __name__ == "__main__":
    sys.exit(main())
