"""GPU timing of the public op (autotuned) against PyTorch's three F.conv2d calls: fwd, bwd, fwd+bwd, densities.

Usage (CUDA machine): python scripts/gpu_bench_op.py --cases T1:bfloat16:1,0.6,0.3 T1:float32:1 --out r.json
A development probe kept for the record; the user-facing benchmark is ``slak-bench``.
"""
import argparse
import datetime
import json
import subprocess

import torch
import torch.nn.functional as F
import triton

import slak_triton
from slak_triton import block_shape, lk_conv2d

SHAPES = {"T1": (64, 124, 56, 51), "T2": (64, 249, 28, 49), "T3": (64, 499, 14, 47), "T4": (64, 998, 7, 13),
          "B1": (64, 166, 56, 51)}


def block_mask(w, density):
    C, _, kh, kw = w.shape
    bh, bw = block_shape(kh, kw)
    nb = (C, 1, -(-kh // bh), -(-kw // bw))
    m = (torch.rand(nb, device=w.device) < density).to(w.dtype)
    return m.repeat_interleave(bh, 2).repeat_interleave(bw, 3)[:, :, :kh, :kw].contiguous()


def bench(fn, grads=None):
    return triton.testing.do_bench(fn, grad_to_none=grads, quantiles=[0.5, 0.2, 0.8], return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["T1:bfloat16:1,0.6,0.3", "T1:float32:1"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    recs = []
    for case in args.cases:
        sname, dname, dens = case.split(":")
        N, C, H, K = SHAPES[sname]
        dt = getattr(torch, dname)
        x = torch.randn(N, C, H, H, device="cuda", dtype=dt, requires_grad=True)
        ws = [(torch.randn(C, 1, K, 5, device="cuda") / 16).to(dt).requires_grad_(),
              (torch.randn(C, 1, 5, K, device="cuda") / 16).to(dt).requires_grad_(),
              (torch.randn(C, 1, 5, 5, device="cuda") / 5).to(dt).requires_grad_()]
        g = torch.randn(N, C, H, H, device="cuda", dtype=dt)
        params = [x] + ws

        def torch_fwd():
            return sum(F.conv2d(x, w, None, padding=(w.shape[2] // 2, w.shape[3] // 2), groups=C) for w in ws)
        yt = torch_fwd()
        t_fwd = bench(torch_fwd)
        t_bwd = bench(lambda: yt.backward(g, retain_graph=True), params)
        print(f"{sname} {dname} torch fwd {t_fwd[0]:.3f} bwd {t_bwd[0]:.3f} ms", flush=True)
        recs.append(dict(shape=sname, dtype=dname, provider="torch", density=1.0, fwd=t_fwd, bwd=t_bwd))
        for d in [float(v) for v in dens.split(",")]:
            ms = None if d >= 1.0 else [block_mask(w, d) for w in ws]
            y = lk_conv2d(x, ws, None, mask=ms)  # autotunes fwd
            y.backward(g)  # autotunes bwd
            torch.cuda.synchronize()
            tf = bench(lambda: lk_conv2d(x, ws, None, mask=ms))
            y = lk_conv2d(x, ws, None, mask=ms)
            tb = bench(lambda: y.backward(g, retain_graph=True), params)
            tfb = bench(lambda: lk_conv2d(x, ws, None, mask=ms).backward(g), params)
            print(f"{sname} {dname} triton density {d}: fwd {tf[0]:.4f} bwd {tb[0]:.4f} fwdbwd {tfb[0]:.4f} ms | "
                  f"speedup fwd {t_fwd[0] / tf[0]:.1f}x bwd {t_bwd[0] / tb[0]:.1f}x bwd/fwd {tb[0] / tf[0]:.2f}", flush=True)
            recs.append(dict(shape=sname, dtype=dname, provider="triton", density=d, fwd=tf, bwd=tb, fwdbwd=tfb))
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                commit=subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown")
    if args.out:
        json.dump(dict(meta, records=recs), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
