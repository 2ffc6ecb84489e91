"""Test set-up: the Triton interpreter on CPU-only machines, and hypothesis profiles.

TRITON_INTERPRET must be set before Triton decorates any kernel, i.e. before slak_triton is imported; this file is
imported by pytest before every test module. On a CUDA machine the compiled kernels run instead.
"""

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The tests use tiny tensors: OpenMP start-up per op costs more than the work, and on a loaded 2-core machine
    # two threads made small ops ~100x slower. One thread keeps the suite's time predictable.
    torch.set_num_threads(1)

# Tests check results, not speed: use the default configs instead of autotuning every new shape (on a GPU a
# hypothesis run would otherwise autotune hundreds of shapes). The benchmark autotunes.
os.environ.setdefault("SLAK_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# "ci": the interpreter is ~1000x slower than a GPU, so small shapes and few examples.
# "gpu": full-size shapes and many examples, selected automatically on a CUDA machine.
settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "gpu", max_examples=40, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "ci"))

ON_GPU = torch.cuda.is_available()


@pytest.fixture
def device():
    return torch.device("cuda" if ON_GPU else "cpu")


def pytest_collection_modifyitems(config, items):
    """``-m gpu`` tests need CUDA: skip them (with the reason shown) on CPU-only machines."""
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run bench/gpu_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def require(module: str, why: str):
    """``pytest.importorskip`` for an optional extra, except where the extras must be there: with
    ``SLAK_REQUIRE_EXTRAS=1`` (scripts/test.sh, hence CI, installs them and sets it) a missing module fails the test
    instead of skipping it."""
    if os.environ.get("SLAK_REQUIRE_EXTRAS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=why)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64 on the CPU (shared by the module and model tests)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture
def gen():
    """A CPU generator with a fresh random seed per test (fresh data, reproducible from the printed seed)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
