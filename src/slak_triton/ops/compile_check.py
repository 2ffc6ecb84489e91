"""Compile-only checks of every kernel specialization the ops can launch, on machines without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs Triton's real compiler and ptxas
(shipped in the Triton wheel) for a CUDA architecture, so compiler errors the interpreter cannot see show up here,
and ``cuobjdump`` reports registers, spills (local memory) and the instruction mix.

Must run in a process where TRITON_INTERPRET is NOT set (kernels are compiled, not interpreted):
``python -m slak_triton.ops.compile_check [--arch 90 80] [--sass]`` prints one line per specialization and exits
non-zero on a failure or a spill.
"""

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from slak_triton.kernels.lk_conv2d import (
    lk_conv2d_bwd_dw_configs,
    lk_conv2d_bwd_dw_default_config,
    lk_conv2d_bwd_dw_derived,
    lk_conv2d_bwd_dw_kernel,
    lk_conv2d_default_config,
    lk_conv2d_fwd_configs,
    lk_conv2d_fwd_kernel,
)
from slak_triton.ops.lk_conv2d import TAPS_PER_BLOCK

#: Stack bytes tolerated without calling it a spill (see main()).
MINOR_STACK_BYTES = 8

_TL_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}

#: Slot patterns the op produces: (name, (KH_T, KW_T), (KH_W, KW_W)); (0, 0) = slot absent.
SLOT_PATTERNS = [
    ("slak51", (51, 5), (5, 51)),   # SLaK stage 1 (5x5 folded into the tall slot)
    ("slak13", (13, 5), (5, 13)),   # SLaK stage 4
    ("square", (7, 7), (0, 0)),     # one square branch (e.g. a converted ConvNeXt dwconv)
    ("wide_only", (0, 0), (3, 31)),
]


@dataclasses.dataclass
class Spec:
    kernel: str
    dtype: str
    pattern: str
    variant: str
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int


def _fwd_spec(dtype, pattern, tall, wide, sparse, flip, bias, H=56, W=56) -> Spec:
    kern = lk_conv2d_fwd_kernel
    cfg = lk_conv2d_default_config(H, W, 4 if dtype == "float32" else 2)
    const = dict(
        KH_T=tall[0], KW_T=tall[1], KH_W=wide[0], KW_W=wide[1],
        TB_T=TAPS_PER_BLOCK if sparse else 1, TB_W=TAPS_PER_BLOCK if sparse else 1,
        SPARSE_T=sparse and tall[0] > 0, SPARSE_W=sparse and wide[0] > 0, HAS_BIAS=bias, FLIP=flip,
        WIDE_IDX=False, DOT_PREC="tf32x3", DOT_UPCAST=False, BH=cfg["BH"], BW=cfg["BW"], CK=cfg["CK"],
        NB=cfg.get("NB", 1),
    )
    sig = {}
    for n in kern.arg_names:
        if n in const:
            sig[n] = "constexpr"
        elif n in ("x_ptr", "wt_ptr", "ww_ptr", "b_ptr", "y_ptr"):
            sig[n] = "*" + _TL_DTYPE[dtype]
        elif n.endswith("_ptr"):
            sig[n] = "*i32"
        else:
            sig[n] = "i32"
    variant = ("flip" if flip else "fwd") + ("-sparse" if sparse else "-dense") + ("-bias" if bias else "")
    variant += f"-{cfg['BH']}x{cfg['BW']}"
    return Spec("lk_conv2d_fwd_kernel", dtype, pattern, variant, sig, const, cfg["num_warps"], cfg["num_stages"])


def _dw_spec(dtype, pattern, tall, wide, bias, sparse=False, H=56, W=56) -> Spec:
    kern = lk_conv2d_bwd_dw_kernel
    cfg = lk_conv2d_bwd_dw_default_config(H, W, 4 if dtype == "float32" else 2)
    tb = TAPS_PER_BLOCK if sparse else 1
    const = dict(KH_T=tall[0], KW_T=tall[1], KH_W=wide[0], KW_W=wide[1], TB_T=tb, TB_W=tb,
                 SPARSE_T=sparse and tall[0] > 0, SPARSE_W=sparse and wide[0] > 0, HAS_BIAS=bias, WIDE_IDX=False,
                 DOT_PREC="tf32x3", DOT_UPCAST=False, BH=cfg["BH"], BW=cfg["BW"])
    const.update({k: f(const) for k, f in lk_conv2d_bwd_dw_derived.items()})
    sig = {}
    for n in kern.arg_names:
        if n in const:
            sig[n] = "constexpr"
        elif n in ("x_ptr", "dy_ptr"):
            sig[n] = "*" + _TL_DTYPE[dtype]
        elif n.endswith("items_ptr") or n.endswith("count_ptr"):
            sig[n] = "*i32"
        elif n.endswith("_ptr"):
            sig[n] = "*fp32"
        else:
            sig[n] = "i32"
    variant = "dw" + ("-sparse" if sparse else "-dense") + ("-bias" if bias else "") + f"-{cfg['BH']}x{cfg['BW']}"
    return Spec("lk_conv2d_bwd_dw_kernel", dtype, pattern, variant, sig, const,
                cfg["num_warps"], cfg["num_stages"])


def specializations() -> List[Spec]:
    """Every (kernel, dtype, slot pattern, variant) the op launches with its default configs: 32x32 tiles for
    planes over 16 pixels, and 16x16 tiles for small planes (SLaK's 7x7 stage, pattern slak13)."""
    specs = []
    for dtype in ("float16", "bfloat16", "float32"):
        for name, tall, wide in SLOT_PATTERNS:
            sizes = [(56, 56)] + ([(7, 7)] if name == "slak13" else [])
            for H, W in sizes:
                for sparse in (False, True):
                    for flip in (False, True):
                        specs.append(_fwd_spec(dtype, name, tall, wide, sparse, flip, bias=not flip, H=H, W=W))
                for sparse in (False, True):
                    specs.append(_dw_spec(dtype, name, tall, wide, bias=True, sparse=sparse, H=H, W=W))
    return specs


def autotune_specializations() -> List[Spec]:
    """Every autotune config of both kernels at SLaK's stage-1 pattern (dense forward and dW), per dtype: the
    autotuner may launch any of them on a GPU, so each must compile (spills are reported, not fatal: the autotuner
    times them)."""
    specs = []
    for dtype in ("float16", "bfloat16", "float32"):
        for cfg in lk_conv2d_fwd_configs():
            s = _fwd_spec(dtype, "slak51", (51, 5), (5, 51), sparse=False, flip=False, bias=True)
            s.constexprs.update(cfg.kwargs)
            s.num_warps, s.num_stages = cfg.num_warps, cfg.num_stages
            s.variant = "autotune-" + "-".join(f"{k}{v}" for k, v in cfg.kwargs.items()) + f"-w{cfg.num_warps}"
            specs.append(s)
        for cfg in lk_conv2d_bwd_dw_configs():
            s = _dw_spec(dtype, "slak51", (51, 5), (5, 51), bias=True)
            s.constexprs.update(cfg.kwargs)
            s.constexprs.update({k: f(s.constexprs) for k, f in lk_conv2d_bwd_dw_derived.items()})
            s.num_warps, s.num_stages = cfg.num_warps, cfg.num_stages
            s.variant = "autotune-" + "-".join(f"{k}{v}" for k, v in cfg.kwargs.items()) + f"-w{cfg.num_warps}"
            specs.append(s)
    return specs


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_spec(spec: Spec, arch: int, sass: bool = False) -> Dict[str, object]:
    """Compiles one specialization for ``sm_<arch>``; returns registers, local-memory bytes and instruction counts."""
    kern = lk_conv2d_fwd_kernel if spec.kernel == "lk_conv2d_fwd_kernel" else lk_conv2d_bwd_dw_kernel
    src = ASTSource(fn=kern, signature=spec.signature, constexprs=spec.constexprs)
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
    ap.add_argument("--filter", default="", help="substring of 'kernel dtype pattern variant' to select")
    ap.add_argument("--autotune-configs", action="store_true",
                    help="compile every autotune config (stage-1 pattern) instead of the default specializations; "
                         "spills are reported but only compile failures fail")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (kernels must be compiled, not interpreted)", file=sys.stderr)
        return 2
    bad = 0
    for spec in (autotune_specializations() if args.autotune_configs else specializations()):
        label = f"{spec.kernel} {spec.dtype} {spec.pattern} {spec.variant}"
        if args.filter not in label:
            continue
        for arch in args.arch:
            try:
                r = compile_spec(spec, arch, sass=args.sass)
            except Exception as e:  # noqa: BLE001 - report every failing specialization, not just the first
                bad += 1
                print(f"FAIL sm_{arch} {label}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
                continue
            # One 8-byte slot (a single register parked across a loop by ptxas, seen at 64-80 registers, i.e. not
            # register pressure) is reported as "minor"; any larger frame or local array is a spill and fails.
            spill = r["local"] > 0 or r["stack"] > MINOR_STACK_BYTES
            minor = not spill and r["stack"] > 0
            bad += spill and not args.autotune_configs
            status = "SPILL" if spill else ("minor" if minor else "ok")
            print(f"{status} sm_{arch} {label}: regs={r['registers']} local={r['local']} "
                  f"stack={r['stack']} shared={r['shared']}" + (f" sass={r['sass']}" if "sass" in r else ""),
                  flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
