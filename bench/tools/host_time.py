"""The host's time per ``lk_conv2d`` call, by part, on any machine: Python and torch around the kernel launches.

At SLaK stages 3-4 the kernels take 0.01-0.03 ms (bench/NOTES.md), so the Python that prepares a launch can cost
more than the launch runs. ``slak-bench`` records the whole of it on CUDA (``host_ms``); this tool splits it into
the op's parts and runs without a GPU: the kernels are defined under Triton's interpreter and the launch itself
(``_run``) is stubbed out, so what is timed is everything but the kernel. Tensor arithmetic that a GPU would do
in a kernel (the branch fold, the sums of weight-gradient partials) runs here on the CPU, so the default shape
keeps channels and batch small: the numbers are the per-call overhead, not the arithmetic.

Usage (repository tool, not installed):
    python bench/tools/host_time.py [--stage 4] [--batch 1] [--channels 4] [--dtype bfloat16] [--calls 2000]
Prints the median microseconds per call of each part; medians move by about 10-20 % run to run.
"""
import argparse
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"    # before slak_triton: the kernels must be interpretable (launch stubbed)

import torch  # noqa: E402

import slak_triton  # noqa: E402,F401  (registers the ops)
from slak_triton.bench.shapes import IMAGE_SIZE, SMALL_KERNEL, STAGE_KERNELS  # noqa: E402

op = sys.modules["slak_triton.ops.lk_conv2d"]


def median_us(fn, calls: int) -> float:
    for _ in range(max(10, calls // 20)):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def parts(stage: int, batch: int, channels: int, dtype: torch.dtype, calls: int) -> dict:
    """Median us per call of the whole op (no grad; forward and backward) and of its parts."""
    side = IMAGE_SIZE // 4 // 2 ** (stage - 1)
    k = STAGE_KERNELS[stage - 1]
    x = torch.randn(batch, channels, side, side, dtype=dtype, requires_grad=True)
    ws = [torch.randn(channels, 1, *s, dtype=dtype, requires_grad=True)
          for s in ((k, SMALL_KERNEL), (SMALL_KERNEL, k), (SMALL_KERNEL, SMALL_KERNEL))]
    bias = torch.randn(channels, dtype=dtype, requires_grad=True)
    masks = [None] * len(ws)
    with torch.no_grad():
        wt, ww = op.fold_branches(ws, masks)
    y = torch.empty_like(x)
    spec_args = (batch, channels, side, side, dtype, x.stride(), y.stride(), wt.shape[1:], wt.stride(),
                 ww.shape[1:], ww.stride())
    spec_kwargs = dict(has_bias=True, flip=False, sparse_t=False, sparse_w=False, interpreter=True, arch=0)

    build = getattr(op.fwd_launch_spec, "__wrapped__", op.fwd_launch_spec)   # (the builder itself, uncached)

    def step():
        out = op.lk_conv2d(x, ws, bias)
        out.backward(torch.ones_like(out))

    res = {}
    real_run = op._run
    op._run = lambda spec, tensors, config: None
    try:
        with torch.no_grad():
            res["lk_conv2d forward (no grad)"] = median_us(lambda: op.lk_conv2d(x, ws, bias), calls)
            res["  _validate"] = median_us(lambda: op._validate(x, ws, bias, None, "auto"), calls)
            res["  slot_metadata"] = median_us(lambda: op.slot_metadata(ws, masks), calls)
            res["  fold_branches"] = median_us(lambda: op.fold_branches(ws, masks), calls)
            res["  torch.ops.slak_triton.lk_conv2d_fwd"] = median_us(
                lambda: torch.ops.slak_triton.lk_conv2d_fwd(x, wt, ww, bias, *(None,) * 6, False, False), calls)
            res["    launch_lk_conv2d_fwd"] = median_us(lambda: op.launch_lk_conv2d_fwd(x, wt, ww, bias, y), calls)
            res["      fwd_launch_spec (cached)"] = median_us(
                lambda: op.fwd_launch_spec(*spec_args, **spec_kwargs), calls)
            res["      fwd_launch_spec (built)"] = median_us(
                lambda: build(*spec_args, **spec_kwargs), calls)
        res["lk_conv2d forward + backward"] = median_us(step, calls)
    finally:
        op._run = real_run
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, default=4, choices=(1, 2, 3, 4), help="SLaK stage (plane size, kernel)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--channels", type=int, default=4, help="few: the CPU's arithmetic is not the point")
    p.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--calls", type=int, default=2000, help="timed calls per part (the median is printed)")
    a = p.parse_args(argv)
    res = parts(a.stage, a.batch, a.channels, getattr(torch, a.dtype), a.calls)
    print(f"host time per call, stage {a.stage}, [{a.batch}, {a.channels}] {a.dtype}, launch stubbed (us, median)")
    for name, us in res.items():
        print(f"{name:44s} {us:8.1f}")


if __name__ == "__main__":
    main()
