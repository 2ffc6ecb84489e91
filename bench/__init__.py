"""slak_triton.bench: the ``slak-bench`` microbenchmarks (top-level ``bench/`` in the repository).

Modules: ``cli`` (argparse entry point), ``shapes`` (SLaK stage shapes registry), ``counters`` (useful-tap FLOPs,
minimum bytes), ``env`` (metadata, device peaks, timers), ``bench_lk_conv2d`` (the op), ``bench_models`` (whole
networks), ``report`` (table, JSON, CSV, plot). Layering: imports slak_triton, never imported by it.
"""
