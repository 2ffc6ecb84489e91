"""GPU tuning probe for the lk_conv2d forward: correctness vs float64 and per-config timings at SLaK stage shapes.

Usage (on a CUDA machine): python scripts/gpu_tune_fwd.py [--shapes T1,T2] [--out results.json]
Prints one line per (shape, dtype, config) and the torch baselines; not part of the library.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("SLAK_TRITON_AUTOTUNE", "0")
import torch
import torch.nn.functional as F
import triton

import slak_triton
from slak_triton.kernels.lk_conv2d import lk_conv2d_fwd_configs, lk_conv2d_fwd_kernel
from slak_triton.ops.lk_conv2d import fold_branches, fp32_precision
from slak_triton.reference import lk_conv2d_reference

SHAPES = {
    "T1": (64, 124, 56, 51), "T2": (64, 249, 28, 49), "T3": (64, 499, 14, 47), "T4": (64, 998, 7, 13),
    "B1": (64, 166, 56, 51),
}


def useful_flops(N, C, H, K, n=5):
    # multiply-adds on taps inside the image, x2
    def taps_1d(L, k):
        tot = 0
        for p in range(L):
            lo = max(0, p - k // 2); hi = min(L - 1, p + k // 2)
            tot += hi - lo + 1
        return tot
    tall = taps_1d(H, K) * taps_1d(H, n)
    small = taps_1d(H, n) * taps_1d(H, n)
    return 2 * N * C * (2 * tall + small)


def run_cfg(x, wt, ww, b, out, cfg):
    N, C, H, W = x.shape
    grid = (N * C * triton.cdiv(H, cfg["BH"]) * triton.cdiv(W, cfg["BW"]),)
    lk_conv2d_fwd_kernel[grid](
        x_ptr=x, wt_ptr=wt, ww_ptr=ww, b_ptr=b, y_ptr=out, t_items_ptr=x, t_count_ptr=x, w_items_ptr=x, w_count_ptr=x,
        N=N, C=C, H=H, W=W, sxn=x.stride(0), sxc=x.stride(1), sxh=x.stride(2), sxw=x.stride(3),
        syn=out.stride(0), syc=out.stride(1), syh=out.stride(2), syw=out.stride(3),
        swt_c=wt.stride(0), swt_h=wt.stride(1), swt_w=wt.stride(2), sww_c=ww.stride(0), sww_h=ww.stride(1), sww_w=ww.stride(2),
        st_items=0, sw_items=0, KH_T=wt.shape[1], KW_T=wt.shape[2], KH_W=ww.shape[1], KW_W=ww.shape[2], TB_T=1, TB_W=1,
        SPARSE_T=False, SPARSE_W=False, HAS_BIAS=True, FLIP=False, WIDE_IDX=False, DOT_PREC=fp32_precision(),
        DOT_UPCAST=False, **cfg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="T1,T2,T3,T4")
    ap.add_argument("--dtypes", default="float16,float32")
    ap.add_argument("--out", default=None)
    ap.add_argument("--all-configs", action="store_true")
    args = ap.parse_args()
    dev = "cuda"
    recs = []
    for sname in args.shapes.split(","):
        N, C, H, K = SHAPES[sname]
        W = H
        for dname in args.dtypes.split(","):
            dt = getattr(torch, dname)
            x = torch.randn(N, C, H, W, device=dev, dtype=dt)
            ws = [torch.randn(C, 1, K, 5, device=dev, dtype=dt) / 8, torch.randn(C, 1, 5, K, device=dev, dtype=dt) / 8,
                  torch.randn(C, 1, 5, 5, device=dev, dtype=dt) / 4]
            b = torch.randn(C, device=dev, dtype=dt)
            ref = lk_conv2d_reference(x.double(), [w.double() for w in ws], b.double())
            wt, ww = fold_branches(ws, [None] * 3)
            wt = wt.contiguous(); ww = ww.contiguous()
            fl = useful_flops(N, C, H, K)
            # torch baselines
            t_torch = triton.testing.do_bench(lambda: sum(F.conv2d(x, w, None, padding=(w.shape[2] // 2, w.shape[3] // 2), groups=C) for w in ws), return_mode="median")
            xcl = x.to(memory_format=torch.channels_last)
            t_torch_cl = triton.testing.do_bench(lambda: sum(F.conv2d(xcl, w, None, padding=(w.shape[2] // 2, w.shape[3] // 2), groups=C) for w in ws), return_mode="median")
            print(f"{sname} {dname} torch {t_torch:.3f} ms  torch-cl {t_torch_cl:.3f} ms", flush=True)
            cfgs = lk_conv2d_fwd_configs()
            best = None
            for c in cfgs:
                cfg = dict(c.kwargs); cfg["num_warps"] = c.num_warps; cfg["num_stages"] = c.num_stages
                out = torch.full_like(x, float("nan"))
                try:
                    run_cfg(x, wt, ww, b, out, cfg)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001
                    print(f"  cfg {cfg} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                err = ((out.double() - ref).norm() / ref.norm()).item()
                t = triton.testing.do_bench(lambda: run_cfg(x, wt, ww, b, out, cfg), return_mode="median")
                rec = dict(shape=sname, dtype=dname, cfg=cfg, ms=t, rel_err=err, tflops=fl / t / 1e9,
                           torch_ms=t_torch, torch_cl_ms=t_torch_cl)
                recs.append(rec)
                if best is None or t < best["ms"]:
                    best = rec
                print(f"  {cfg} {t:.4f} ms err {err:.2e} {fl / t / 1e9:.1f} TFLOP/s nan={torch.isnan(out).any().item()}", flush=True)
            print(f"BEST {sname} {dname}: {best['ms']:.4f} ms {best['cfg']} vs torch {t_torch:.3f} ({t_torch / best['ms']:.1f}x) torch-cl {t_torch_cl:.3f}", flush=True)
    if args.out:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, records=recs), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
