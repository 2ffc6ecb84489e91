"""Step time of dynamic sparse training on CPU (``lk_conv2d`` reference path): ordinary steps against topology-
update steps, per growth mode, and ordinary steps with and without DynamicSparsity's dense-gradient forward hooks.

    python scripts/sparse_step_time.py [--steps 80] [--update-frequency 10] [--batch 64] [--threads 1]

Model: slak-train's digits SLaK (217k parameters, 32x32 inputs), AdamW, density 0.6, block masks. Each step is
forward + backward + optimizer.step (the masks, and on update steps the prune / grow, run in the step's hook).
Prints the median time of ordinary and of update steps (the first update and the first steps are warm-up) and the
median time of ``update_topology`` alone.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from slak_triton import use_backend
from slak_triton.sparse import DynamicSparsity
from slak_triton.train import build_model


class _Config:
    def __init__(self, label, growth, update_frequency, steps, batch, hooks=True, sparse=True, seed=0):
        torch.manual_seed(seed)
        self.label = label
        self.model = build_model("digits", 1, 10, 0.0)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.ds = None
        if sparse:
            self.ds = DynamicSparsity(self.model, self.opt, density=0.6, sparse_init="uniform", growth=growth,
                                      prune_rate=0.3, update_frequency=update_frequency, total_steps=steps)
            if not hooks:
                for h in self.ds._module_hooks:
                    h.remove()
        self.ordinary, self.update = [], []

    def step(self, x, y, record):
        is_update = self.ds is not None and self.ds.is_update_step_next
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        self.opt.step()
        dt = time.perf_counter() - t0
        if record:
            (self.update if is_update else self.ordinary).append(dt)

    def topology_time(self, n=5):
        if self.ds is None:
            return float("nan")
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.ds.update_topology()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3


def _med(v):
    return statistics.median(v) * 1e3 if v else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--update-frequency", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    for name, v, lo in (("--steps", a.steps, 20), ("--update-frequency", a.update_frequency, 2), ("--batch", a.batch, 1),
                        ("--threads", a.threads, 1)):
        if v < lo:
            raise SystemExit(f"{name}: expected >= {lo}, got {v}")
    torch.set_num_threads(a.threads)
    print(f"CPU, reference backend, digits SLaK, batch {a.batch}, {a.threads} thread(s), update every "
          f"{a.update_frequency} steps, medians over {a.steps} steps")
    with use_backend("reference"):
        configs = [_Config("dense (no DynamicSparsity)", "random", a.update_frequency, a.steps, a.batch, sparse=False)]
        for growth, hooks in (("random", False), ("random", True), ("gradient", False), ("gradient", True),
                              ("momentum", True)):
            configs.append(_Config(f"growth={growth:9s} hooks={'on ' if hooks else 'off'}", growth,
                                   a.update_frequency, a.steps, a.batch, hooks=hooks))
        xs = [torch.randn(a.batch, 1, 32, 32) for _ in range(4)]
        ys = [torch.randint(0, 10, (a.batch,)) for _ in range(4)]
        for i in range(a.steps):  # round-robin: every configuration sees the same machine load
            for c in configs:
                c.step(xs[i % 4], ys[i % 4], record=i >= 3)
        for c in configs:
            o, u = _med(c.ordinary), _med(c.update)
            line = f"{c.label:28s}: ordinary step {o:6.1f} ms (min {min(c.ordinary) * 1e3:6.1f})"
            if c.ds is not None:
                line += (f" | update step {u:6.1f} ms ({len(c.update)} updates; +{u - o:5.1f} ms) | "
                         f"update_topology alone {c.topology_time():5.1f} ms")
            print(line)

if __name__ == "__main__":
    main()
