"""Compile-only checks of every kernel launch the op makes, and its launch plan for the static performance model.

Both are built from the launchers' own descriptions (``fwd_launch_spec`` / ``dw_launch_spec`` /
``bwd_launch_spec`` in
``slak_triton.ops.lk_conv2d``), so what is compiled and modelled here is what the op launches.

* ``python -m slak_triton.ops.compile_check [--arch 90 80] [--sass]``: ``triton.compile(ASTSource(...),
  target=GPUTarget("cuda", arch, 32))`` runs Triton's compiler and ptxas (shipped in the Triton wheel) for a CUDA
  architecture, with the argument specialisation Triton's JIT applies on a GPU (integers equal to 1 become
  constants, multiples of 16 and 16-byte aligned pointers get divisibility hints); ``cuobjdump`` reports registers,
  spills (local memory) and the instruction mix. Must run without TRITON_INTERPRET (kernels are compiled). Exits
  non-zero on a compile failure or a spill of a default configuration.
* ``launch_plans(kind, N, C, H, W, K, dtype, density)``: the launch plan that ``sass_model.py`` (the project's
  GPU-free H100 model, ../shared/tools/README_sass_model.md) predicts from, for SLaK's slots (tall K x 5 with the
  5 x 5 branch folded in, wide 5 x K) on an NCHW-contiguous input.
"""

import argparse
import dataclasses
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from slak_triton.ops.lk_conv2d import LaunchSpec, bwd_launch_spec, dw_launch_spec, fwd_launch_spec

#: Stack bytes tolerated without calling it a spill (see main()).
MINOR_STACK_BYTES = 8
#: H100 SXM multiprocessors (the launchers size some grids from the device's count).
SMS = 132

_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_TL = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
#: Triton element type of the tensor behind each pointer role ("data": x's dtype).
_ROLE_TYPE = {"t_act": "i32", "w_act": "i32", "t_items": "i32", "t_count": "i32", "w_items": "i32",
              "w_count": "i32", "dwt": "fp32", "dww": "fp32", "db": "fp32", "wt_split": "bf16", "ww_split": "bf16"}

#: Slot patterns the op produces: (name, (KH_T, KW_T), (KH_W, KW_W)); (0, 0) = slot absent.
SLOT_PATTERNS = [
    ("slak51", (51, 5), (5, 51)),   # SLaK stage 1 (5x5 folded into the tall slot)
    ("slak13", (13, 5), (5, 13)),   # SLaK stage 4
    ("square", (7, 7), (0, 0)),     # one square branch (e.g. a converted ConvNeXt dwconv)
    ("wide_only", (0, 0), (3, 31)),
]
#: Planes checked: the plane kernels at a 64-padded plane (SLaK stage 1), a 32-padded one (stage 2) and a
#: 16-padded one (stage 3; the 16-bit weight gradient takes the stacked kernel at stages 2 and 3), the matrix
#: kernels at 7 x 7 (stage 4, an 8 x 8 grid of at most ``MATRIX_MAX_PIXELS`` pixels), and the tiled kernels on a
#: plane larger than ``PLANE_MAX``.
PLANES = [(56, 56), (28, 28), (14, 14), (7, 7), (96, 96)]


@dataclasses.dataclass
class Spec:
    """One compilation: a launch (kernel and arguments) with one config."""
    kernel: object
    label: str
    args: Dict[str, object]    # every argument: pointers as "ptr:<type>", the rest as passed
    num_warps: int
    num_stages: int


def _contiguous_strides(N, C, H, W):
    return (C * H * W, H * W, W, 1)


def _slot_strides(shape):
    return None if shape is None else (shape[0] * shape[1], shape[1], 1)


def _nonzero(shape):
    return shape if shape is not None and shape[0] else None


def spec_for(kind, N, C, H, W, tall, wide, dtype, sparse, bias=True, arch=90) -> LaunchSpec:
    """The launcher's description of one call on an NCHW-contiguous x: kind 'fwd' (with ``bias``), 'dx' (FLIP),
    'dw' or 'bwd' (the fused backward: dx, dW and, with ``bias``, db in one launch; 16-bit on small planes only,
    else ValueError); tall / wide: (KH, KW) or None; sparse: line metadata passed for both slots; on a GPU of compute
    capability ``arch`` (90 or 80)."""
    st = _contiguous_strides(N, C, H, W)
    dt = _TORCH[dtype]
    tall, wide = _nonzero(tall), _nonzero(wide)
    if kind == "bwd":
        fused = bwd_launch_spec(N, C, H, W, dt, st, st, st, tall, _slot_strides(tall), wide, _slot_strides(wide),
                                need_bias=bias, sparse_t=sparse and tall is not None,
                                sparse_w=sparse and wide is not None, dense_dw=False, sms=SMS)
        if fused is None:
            raise ValueError(f"no fused backward for {dtype} on {H} x {W} planes (it exists where "
                             "use_fused_backward): time kinds 'dx' and 'dw'")
        return fused[0]
    if kind == "dw":
        return dw_launch_spec(N, C, H, W, dt, st, st, tall, wide, need_bias=bias, sparse_t=sparse and tall is not None,
                              sparse_w=sparse and wide is not None, items_strides=(tall[1] if tall else 0,
                                                                                   wide[0] if wide else 0),
                              sms=SMS, arch=arch)[0]
    return fwd_launch_spec(N, C, H, W, dt, st, st, tall, _slot_strides(tall), wide, _slot_strides(wide),
                           has_bias=bias and kind == "fwd", flip=kind == "dx",
                           sparse_t=sparse and tall is not None, sparse_w=sparse and wide is not None,
                           items_strides=(tall[1] if tall else 0, wide[0] if wide else 0), arch=arch)


def launch_args(spec: LaunchSpec, dtype: str, config: dict, extra: Optional[dict] = None) -> Dict[str, object]:
    """Every kernel argument of ``spec`` with ``config`` (and one of its ``passes``' overrides): pointers as
    'ptr:<triton type>' (16-byte aligned)."""
    ptrs = {n: "ptr:" + _ROLE_TYPE.get(role, _TL[dtype]) for n, role in spec.pointers.items()}
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    return {**ptrs, **spec.args, **(extra or {}), **meta}   # (the overrides replace spec.args' values)


def _pass_label(extra: dict) -> str:
    if not extra:
        return ""
    slot = " tall" if extra.get("KW_W") == 0 else " wide" if extra.get("KW_T") == 0 else ""
    return slot + (f" split{extra['SPLIT_LO']}{extra['SPLIT_HI']}" if "SPLIT_LO" in extra else "")


def _config_dict(c) -> dict:
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) if isinstance(c, triton.Config) else dict(c)


def jit_signature(fn, vals):
    """(signature, constexprs, attrs) as Triton's JIT specialises a launch with argument values ``vals``: declared
    constexprs; integers equal to 1 become constants and multiples of 16 get a divisibility hint; booleans i1;
    pointers ('ptr:<type>') are 16-byte aligned (divisibility hint)."""
    sig, const, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        v = vals[name] if name in vals else param.default
        if param.is_constexpr:
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, str) and v.startswith("ptr:"):
            sig[name] = "*" + v[4:]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name], const[name] = "constexpr", 1
                continue
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name}={v!r} has no Triton type")
    return sig, const, attrs


def specializations(arch: int = 90) -> List[Spec]:
    """Every launch the op makes on a GPU of compute capability ``arch`` with its default configs (used without
    autotuning): dtypes x slot patterns x planes (plane and tiled kernels) x {forward, forward sparse, input
    gradient (dense, sparse), weight gradient (dense, sparse)}. Each must compile without spills for that arch."""
    specs = []
    for dtype in ("float16", "bfloat16", "float32"):
        for name, tall, wide in SLOT_PATTERNS:
            for H, W in PLANES:
                if name != "slak51" and (H, W) == (96, 96) and dtype != "float32":
                    continue   # the tiled kernels' slot patterns are covered by slak51 and fp32
                for kind in ("fwd", "dx", "dw", "bwd"):
                    if kind == "bwd" and ((H, W) != (7, 7) or dtype == "float32"):
                        continue   # (the fused backward exists on the matrix kernels' planes, 16-bit, only)
                    if (H, W) in ((28, 28), (14, 14)) and dtype != "float32" and kind != "dw":
                        continue   # (the 16-bit forward's plane sizes are covered by 56x56 and 7x7)
                    # the matrix kernels' defaults depend on the batch: also SLaK's stage 4 at batch 64
                    batches = (2, 64) if (H, W) == (7, 7) and name == "slak13" else (2,)
                    for sparse, N in ((s, n) for s in (False, True) for n in batches):
                        ls = spec_for(kind, N, 3, H, W, tall, wide, dtype, sparse, arch=arch)
                        cfg = dict(ls.default)
                        for extra in ls.passes:
                            label = f"{ls.name} {dtype} {name} {H}x{W} {kind}{'-sparse' if sparse else ''} " + \
                                (f"N{N} " if N != 2 else "") + \
                                ",".join(f"{k}{v}" for k, v in cfg.items() if k in ("BH", "BW", "CK", "NB", "IMG", "MB")) + \
                                f",w{cfg['num_warps']}" + _pass_label(extra)
                            specs.append(Spec(ls.kernel, label, launch_args(ls, dtype, cfg, extra), cfg["num_warps"],
                                              cfg["num_stages"]))
    return specs


def autotune_specializations(arch: int = 90) -> List[Spec]:
    """Every autotune config of every kernel at SLaK-T stage 1 and stage 4 (batch 64, dense, forward and weight
    gradient; at stage 4 also the fused backward) and of the stacked weight gradient at stages 2 and 3, per dtype: the autotuner may launch any of them
    on a GPU, so each must compile (spills are reported, not fatal: the autotuner times them)."""
    specs = []
    for dtype in ("float16", "bfloat16", "float32"):
        for H, K, C in ((56, 51, 124), (28, 49, 249), (14, 47, 499), (7, 13, 998)):
            fused = H == 7 and dtype != "float32"
            for kind in (("fwd", "dw") if H == 56 else ("fwd", "dw") + ("bwd",) * fused if H == 7 else ("dw",)):
                ls = spec_for(kind, 64, C, H, H, (K, 5), (5, K), dtype, False, arch=arch)
                for c in ls.configs:
                    cfg = _config_dict(c)
                    for extra in ls.passes:
                        label = f"{ls.name} {dtype} {H}x{H} {kind} autotune " + ",".join(
                            f"{k}{v}" for k, v in cfg.items() if k in ("BH", "BW", "CK", "NB", "IMG", "MB")) + \
                            f",w{cfg['num_warps']}" + _pass_label(extra)
                        specs.append(Spec(ls.kernel, label, launch_args(ls, dtype, cfg, extra), cfg["num_warps"],
                                          cfg["num_stages"]))
    return specs


# ------------------------------------------------------------------------------------------------------------
# launch plan (sass_model)
# ------------------------------------------------------------------------------------------------------------

def _mean_steps(N: int, img: int, per_step: int) -> float:
    """Mean trips of a plane kernel's image loop: programs of ``img`` images each (the last one may hold fewer),
    ``per_step`` images per iteration."""
    groups = math.ceil(N / img)
    return sum(math.ceil(min(img, N - g * img) / per_step) for g in range(groups)) / groups


def _trips(ls: LaunchSpec, cfg: dict, N: int, H: int, W: int, lines: float, K: int) -> Dict[str, float]:
    """Trip count of every loop of ``ls``'s kernel (per program, per enclosing iteration; means where programs
    differ): ``lines`` is the fraction of active lines (1 when dense)."""
    name = ls.name
    if name == "lk_conv2d_plane_fwd_kernel":
        return {f"{name}.n0": _mean_steps(N, cfg["IMG"], cfg["NB"]), f"{name}._t": lines, f"{name}._w": lines}
    if name == "lk_conv2d_matrix_fwd_kernel":
        return {f"{name}.n0": _mean_steps(N, cfg["IMG"], cfg["MB"])}
    if name == "lk_conv2d_matrix_bwd_kernel":
        return {f"{name}.n0": _mean_steps(N, ls.args["imgs_per_prog"], cfg["MB"])}
    if name == "lk_conv2d_plane_dw_stack_kernel":
        return {f"{name}.n0": _mean_steps(N, ls.args["imgs_per_prog"], cfg["NB"])}
    if name == "lk_conv2d_plane_dw_kernel":
        a = ls.args   # images per dot: NB padded planes, or packed at the plane's own size
        g_t = (cfg["NB"] * a["BW"]) // W if a["PACK_T"] else cfg["NB"]
        g_w = (cfg["NB"] * a["BH"]) // H if a["PACK_W"] else cfg["NB"]
        # passes of LG lines over the images (tall, then wide); the line loops (0/1 trips) nest in them
        return {"_dw_tall_pass.n0": _mean_steps(N, a["imgs_per_prog"], g_t),
                "_dw_wide_pass.n0": _mean_steps(N, a["imgs_per_prog"], g_w),
                "_dw_tall_pass._t": lines, "_dw_wide_pass._w": lines}
    if name == "lk_conv2d_fwd_kernel":
        # a run covers a whole line (K taps): BH + K - 1 input rows (BW + K - 1 columns), CK per tl.dot
        t = {"_tall_run.q": math.ceil((cfg["BH"] + K - 1) / cfg["CK"]),
             "_wide_run.q": math.ceil((cfg["BW"] + K - 1) / cfg["CK"])}
        if ls.args["SPARSE_T"]:   # one run per active line: tall ("it"), wide ("it#2")
            t.update({f"{name}.it": 5 * lines, f"{name}.it#2": 5 * lines})
        else:
            t.update({f"{name}.j": 5, f"{name}.i": 5})
        return t
    if name == "lk_conv2d_bwd_dw_kernel":
        tiles = math.ceil(H / cfg["BH"]) * math.ceil(W / cfg["BW"])
        t = {f"{name}.it": N * tiles / ls.args["n_splits"]}
        if ls.args["SPARSE_T"]:
            t.update({f"{name}.q": 5 * lines, f"{name}.q#2": 5 * lines})
        else:
            t.update({f"{name}.j": 5, f"{name}.i": 5})
        return t
    raise KeyError(f"no trip counts for {name}")


def launch_plans(kind, N, C, H, W, K, dtype, density):
    """Candidates (one per autotune config) of one call of the op on x [N, C, H, W] (NCHW contiguous) with SLaK's
    slots, tall K x 5 (the 5 x 5 branch folded in) and wide 5 x K, as ``sass_model.py predict --plan
    slak_triton.ops.compile_check:launch_plans`` reads them. kind: 'fwd' (with bias), 'dx' (input gradient),
    'dw' (weight and bias gradients) or 'bwd' (all three in one fused launch; 16-bit on small planes only); density < 1: a line-sparse call in which that fraction of each slot's lines
    is active (expected trip counts). Each candidate lists the op's launches: one kernel (the per-call line
    metadata are a few tensor ops on [C, K, 5] masks, dW's fixed-order sum of its S x C x 2 x 5K fp32 partials
    reads under 1 MB and is skipped where S = 1, and the fp32 forward's bf16 splits of the weights are 3 x 2 x C x 5K elements: all left
    out); the fp32 split forward on 64-padded planes and the fp32 split weight gradient on 32- and 64-padded ones
    (sm_90's launches) list one launch per pass."""
    eb = 4 if dtype == "float32" else 2
    ls = spec_for(kind, N, C, H, W, (K, 5), (5, K), dtype, density < 1)
    lines_t = lines_w = 5
    if density < 1 and ls.name.startswith("lk_conv2d_plane"):
        # The plane kernels skip an inactive line with a branch, and sass_model counts both sides of a branch as
        # executed: model the call as the same (sparse) kernel over its active lines, round(10 * density) of the
        # 10 split between the slots (the skipped lines' flag loads and branches are left out: a few instructions
        # per line and image group).
        active = round(10 * density)
        lines_t, lines_w = (active + 1) // 2, active // 2
        ls = spec_for(kind, N, C, H, W, (K, lines_t), (lines_w, K), dtype, True)
    plans = []
    for c in ls.configs:
        cfg = _config_dict(c)
        # compulsory DRAM traffic: x read and y written once (dW: x and dy read; the fused backward: x and dy read,
        # dx written); a later fp32 split pass also reads the y it adds to (ADD_Y)
        launches = [{"kernel": ls.kernel, "args": launch_args(ls, dtype, cfg, extra), "num_warps": cfg["num_warps"],
                     "num_stages": cfg["num_stages"], "trips": _trips(ls, cfg, N, H, W, density, K),
                     "programs": math.prod(ls.grid(cfg)),
                     "dram_bytes": (3 if extra.get("ADD_Y") or kind == "bwd" else 2) * N * C * H * W * eb}
                    for extra in ls.passes]
        plans.append({"config": {k: v for k, v in cfg.items() if k not in lk_derived_keys(ls)},
                      "launches": launches, "torch_bytes": 0, "pixels": N * C * H * W})
    return plans


def lk_derived_keys(ls: LaunchSpec):
    """Config keys derived from others (the tiled weight-gradient kernel's window sizes): left out of labels."""
    return ("RT", "KPT", "KWPT", "RW", "KPW", "KHPW", "RBT", "TBPT", "RBW", "TBPW") \
        if ls.name == "lk_conv2d_bwd_dw_kernel" else ()


# ------------------------------------------------------------------------------------------------------------
# compile
# ------------------------------------------------------------------------------------------------------------

def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_spec(spec: Spec, arch: int, sass: bool = False) -> Dict[str, object]:
    """Compiles one specialization for ``sm_<arch>``; returns registers, local-memory bytes and instruction counts."""
    sig, const, attrs = jit_signature(spec.kernel, spec.args)
    src = ASTSource(fn=spec.kernel, signature=sig, constexprs=const, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        res = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
        out = {"registers": int(m.group(1)), "stack": int(m.group(2)), "shared": int(m.group(3)),
               "local": int(m.group(4))}
        if sass:
            text = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True).stdout
            mix = {}
            for op in ("HGMMA", "HMMA", "FFMA", "LDG", "LDGSTS", "STG", "LDS", "STS", "LDSM", "LDL", "STL"):
                mix[op] = len(re.findall(r"\b" + op + r"\b", text))
            out["sass"] = mix
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--sass", action="store_true", help="also count matrix/FMA/load instructions")
    ap.add_argument("--filter", default="", help="substring of the label ('kernel dtype pattern plane kind ...')")
    ap.add_argument("--autotune-configs", action="store_true",
                    help="compile every autotune config (SLaK-T stages 1 and 4; the stacked weight gradient at 2 "
                         "and 3) instead of the default specializations; spills are reported but only compile "
                         "failures fail")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (kernels must be compiled, not interpreted)", file=sys.stderr)
        return 2
    bad = 0
    for arch in args.arch:   # (the launches differ by arch: fp32 splits on 64-padded planes on sm_90 only)
        for spec in (autotune_specializations(arch) if args.autotune_configs else specializations(arch)):
            if args.filter not in spec.label:
                continue
            try:
                r = compile_spec(spec, arch, sass=args.sass)
            except Exception as e:  # noqa: BLE001 - report every failing specialization, not just the first
                bad += 1
                print(f"FAIL sm_{arch} {spec.label}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
                continue
            # One 8-byte slot (a single register parked across a loop by ptxas, seen at 64-80 registers, i.e. not
            # register pressure) is reported as "minor"; any larger frame or local array is a spill and fails.
            spill = r["local"] > 0 or r["stack"] > MINOR_STACK_BYTES
            minor = not spill and r["stack"] > 0
            bad += spill and not args.autotune_configs
            status = "SPILL" if spill else ("minor" if minor else "ok")
            print(f"{status} sm_{arch} {spec.label}: regs={r['registers']} local={r['local']} "
                  f"stack={r['stack']} shared={r['shared']}" + (f" sass={r['sass']}" if "sass" in r else ""),
                  flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
