"""Where a benchmark runs: record metadata (device, versions, git commit, date), device peaks, measured
ceilings, timers and the progress display. Shared by every ``slak-bench`` subcommand."""

import contextlib
import datetime
import os
import platform
import statistics
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import triton
import triton.testing

import slak_triton
from slak_triton.ops import fp32_precision

__all__ = [
    "Peaks",
    "lookup_peaks",
    "run_metadata",
    "git_commit",
    "measure_ceilings",
    "Timing",
    "time_fn",
    "Progress",
    "cuda_mode",
    "cpu_mode_threads",
    "CPU_THREADS",
    "CPU_MODE_NOTE",
]

#: Intra-op threads of the PyTorch CPU timings in CPU mode.
CPU_THREADS = 1

CPU_MODE_NOTE = (
    "CPU MODE (no CUDA device): PyTorch paths timed on the CPU at reduced sizes (one thread), Triton kernels checked against "
    "the reference under the interpreter and not timed. These are NOT GPU numbers.")


def cuda_mode() -> bool:
    """True when a CUDA device is present (GPU mode); False means CPU mode."""
    return torch.cuda.is_available()


@dataclass(frozen=True)
class Peaks:
    """Datasheet peaks of one device. TFLOP/s dense; TB/s of HBM."""

    label: str
    fp32_fma_tflops: float
    tensor_16bit_tflops: float
    tensor_tf32_tflops: float
    hbm_tbs: float

    def tensor_tflops(self, dtype: torch.dtype) -> float:
        """Tensor-core peak for operands of this dtype (fp32 operands run as TF32 products)."""
        return self.tensor_tf32_tflops if dtype == torch.float32 else self.tensor_16bit_tflops


# Matched in order against torch.cuda.get_device_name(); the first rule whose words all occur wins.
_PEAK_TABLE = (
    (("H200",), Peaks("H200", 67.0, 989.5, 494.7, 4.8)),
    (("H100", "PCIe"), Peaks("H100 PCIe", 51.2, 756.0, 378.0, 2.0)),
    (("H100",), Peaks("H100 SXM", 67.0, 989.5, 494.7, 3.35)),
    (("A100",), Peaks("A100", 19.5, 312.0, 156.0, 2.0)),
)


def lookup_peaks(device_name: str) -> Optional[Peaks]:
    """Datasheet peaks for a CUDA device name, or None for a device not in the table (and for the CPU)."""
    for words, peaks in _PEAK_TABLE:
        if all(w.lower() in device_name.lower() for w in words):
            return peaks
    return None


def git_commit(path: Optional[Path] = None) -> Dict[str, object]:
    """{"git_commit": sha or "unknown", "git_dirty": bool or None} of the repository holding ``path`` (default:
    this package's source folder, which is the repository for an editable install)."""
    where = str(path or Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return {"git_commit": sha or "unknown", "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": None}


def run_metadata() -> Dict[str, object]:
    """Fields every record carries: where it ran, versions, commit, date."""
    gpu = cuda_mode()
    if gpu:
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    meta = {
        "cpu_mode": not gpu,
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "slak_triton": slak_triton.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if gpu else None,
        "triton_interpreter": slak_triton.interpreter_active(),
        "autotune": os.environ.get("SLAK_TRITON_AUTOTUNE", "1") != "0" and gpu,
        "fp32_precision": fp32_precision(),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32) if gpu else None,
        "cpu_threads": None if gpu else CPU_THREADS,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(git_commit())
    return meta


@dataclass
class Timing:
    """Median and 20/80 quantiles of one timed callable, in milliseconds."""

    ms: float
    ms_p20: float
    ms_p80: float
    timer: str  # "cuda (triton.testing.do_bench)" or "cpu (time.perf_counter)"
    # CUDA: the host's time per call to issue fn (Python, dispatch, launch), measured without waiting for the GPU.
    # A call with host_ms above ms cannot keep the GPU busy on its own; do_bench hides up to the time of its L2
    # flush (~0.1 ms on an H100) of it between runs. None on the CPU, where ms is host time.
    host_ms: Optional[float] = None


def _zero_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _host_ms(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor], runs: int = 20) -> float:
    """Mean host time per call of ``fn`` on CUDA: the calls are issued back to back and the GPU is waited for only
    after the last, so each timed call is the host's work alone (unless fn itself synchronizes)."""
    torch.cuda.synchronize()
    total = 0.0
    for _ in range(runs):
        _zero_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
    torch.cuda.synchronize()
    return total / runs * 1e3


def time_fn(
    fn: Callable[[], object],
    grad_to_none: Sequence[torch.Tensor] = (),
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    cpu_max_runs: int = 20,
) -> Timing:
    """Times ``fn``: on CUDA with ``triton.testing.do_bench`` (L2 flushed, gradients of ``grad_to_none`` reset
    between runs), and the host's time per call (``Timing.host_ms``); on the CPU with ``time.perf_counter`` over up
    to ``cpu_max_runs`` runs or ``rep_ms``, gradients reset between runs outside the timed region."""
    if cuda_mode():
        q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none) or None,
                                    quantiles=[0.5, 0.2, 0.8])
        return Timing(float(q[0]), float(q[1]), float(q[2]), "cuda (triton.testing.do_bench)",
                      host_ms=_host_ms(fn, grad_to_none))
    _zero_grads(grad_to_none)
    fn()  # warm-up
    times: List[float] = []
    budget = rep_ms / 1e3
    start = time.perf_counter()
    while not times or (len(times) < cpu_max_runs and time.perf_counter() - start < budget):
        _zero_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return Timing(statistics.median(times), qs[1], qs[7], "cpu (time.perf_counter)")


def measure_ceilings() -> Dict[str, object]:
    """Measures the device once: a device-to-device copy (TB/s, bytes read + written) and a large matmul
    (TFLOP/s; bf16 8192^3 on CUDA, fp32 1024^3 on the CPU)."""
    if cuda_mode():
        n = 1 << 28  # 256 Mi floats = 1 GiB
        a = torch.empty(n, dtype=torch.float32, device="cuda").fill_(1.0)
        b = torch.empty_like(a)
        t_copy = time_fn(lambda: b.copy_(a)).ms
        copy_bytes = 2 * a.numel() * a.element_size()
        del a, b
        m = 8192
        x = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
        y = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
        t_mm = time_fn(lambda: x @ y).ms
        del x, y
        torch.cuda.empty_cache()
        mm = f"bf16 {m}^3"
    else:
        n = 1 << 24
        a = torch.ones(n, dtype=torch.float32)
        b = torch.empty_like(a)
        t_copy = time_fn(lambda: b.copy_(a), rep_ms=300).ms
        copy_bytes = 2 * a.numel() * a.element_size()
        m = 1024
        x, y = torch.randn(m, m), torch.randn(m, m)
        t_mm = time_fn(lambda: x @ y, rep_ms=300).ms
        mm = f"fp32 {m}^3 (CPU)"
    return {
        "copy_tbs": copy_bytes / (t_copy * 1e-3) / 1e12,
        "copy_bytes": copy_bytes,
        "matmul_tflops": 2 * m ** 3 / (t_mm * 1e-3) / 1e12,
        "matmul": mm,
    }


@contextlib.contextmanager
def cpu_mode_threads(n: int = 1):
    """In CPU mode, run with ``n`` intra-op threads (stable timings on a shared machine); restored afterwards.
    Does nothing on CUDA machines."""
    if cuda_mode():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class Progress:
    """A progress display on stderr.

    On a terminal: one live line, rewritten in place and cut to the terminal's width; a finished phase clears its
    line, so consecutive phases (check, then timing) share that one line and the table prints on a clean screen.
    Elsewhere (CI logs, pipes): one summary line per phase when it ends, instead of a line per step."""

    def __init__(self, title: str, total: int, enabled: bool = True):
        self.title, self.total, self.done = title, total, 0
        self.enabled = enabled and total > 0
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        el = time.perf_counter() - self.t0
        if not self.tty:
            if self.done == self.total:
                sys.stderr.write(f"{self.title}: {self.total} steps in {el:.1f}s\n")
                sys.stderr.flush()
            return
        width = 20
        fill = int(width * self.done / self.total)
        line = f"{self.title} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {el:5.1f}s {what}"
        cols = shutil.get_terminal_size((100, 24)).columns
        sys.stderr.write("\r\033[K" + line[:max(20, cols - 1)])
        if self.done == self.total:
            sys.stderr.write("\r\033[K")
        sys.stderr.flush()


def peaks_dict(peaks: Optional[Peaks]) -> Optional[Dict[str, object]]:
    return asdict(peaks) if peaks is not None else None
