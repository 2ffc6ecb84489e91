"""lk_conv2d: forward, backward and block-sparse skipping against F.conv2d in float64.

On CPU-only machines the Triton kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1) and every
test asserts that they did (``LAUNCH_COUNTS``). The "gpu" tests run the compiled kernels at full size on CUDA.
"""

import contextlib
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import slak_triton
from slak_triton import LAUNCH_COUNTS, block_shape, lk_conv2d
from slak_triton.ops.compile_check import autotune_specializations, specializations

# the module (the package re-exports the function under the same name)
op_mod = importlib.import_module("slak_triton.ops.lk_conv2d")
from slak_triton.reference import lk_conv2d_reference

from conftest import ON_GPU

DEV = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# unit roundoff of the output dtype; fp32 results go through tf32x3 tensor-core products on GPU (~1e-6)
EPS = {torch.float32: 2e-6, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def tolerances(dtype, n_taps):
    """atol/rtol for outputs of unit scale: output rounding (rtol) plus accumulated rounding of ~sqrt(taps) terms."""
    eps = EPS[dtype]
    return eps * 4 * math.sqrt(max(n_taps, 1)), eps * 4


def assert_close(actual, expected, dtype, n_taps, what):
    assert not torch.isnan(actual).any(), f"{what}: NaN in result (an element was never written)"
    atol, rtol = tolerances(dtype, n_taps)
    scale = expected.abs().max().item() if expected.numel() else 1.0
    err = (actual.double() - expected).abs()
    bound = atol * max(scale, 1e-3) + rtol * expected.abs()
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, f"{what}: max abs err {err.max().item():.3e} exceeds tolerance (atol {atol:.1e}*{scale:.2f}, rtol {rtol:.1e})"


@pytest.fixture(autouse=True)
def nan_poison(monkeypatch):
    """Every buffer the op allocates (outputs, dx, dW partials) starts as NaN, so unwritten elements fail."""
    real_like = op_mod._empty_like_layout
    real_new = op_mod._new_empty
    monkeypatch.setattr(op_mod, "_empty_like_layout", lambda x: real_like(x).fill_(float("nan")))
    monkeypatch.setattr(op_mod, "_new_empty", lambda *s, device: real_new(*s, device=device).fill_(float("nan")))


class TritonRan:
    """Context manager asserting that the given Triton kernels were launched inside it."""

    def __init__(self, *names):
        self.names = names or ("fwd",)

    def __enter__(self):
        self.before = {n: LAUNCH_COUNTS[n] for n in self.names}
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            for n in self.names:
                assert LAUNCH_COUNTS[n] > self.before[n], f"{n} did not run: the Triton path was not taken"


def make_layout(t, layout):
    """Same values, different memory layout: 'contiguous', 'channels_last', or 'strided' (a non-dense view)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    big = torch.empty(t.shape[0], t.shape[1], t.shape[2], 2 * t.shape[3], dtype=t.dtype, device=t.device)
    big.normal_()
    view = big[:, :, :, ::2]
    view.copy_(t)
    return view


def rand_weights(C, shapes, dtype):
    ws = []
    for kh, kw in shapes:
        w = torch.randn(C, 1, kh, kw, device=DEV, dtype=torch.float64) / math.sqrt(kh * kw)
        ws.append(w.to(dtype))
    return ws


def rand_mask(w, kind, density, gen=None):
    C, _, kh, kw = w.shape
    if kind == "element":
        return (torch.rand(w.shape, device=DEV) < density).to(w.dtype)
    # block-structured, in block_shape units
    bh, bw = block_shape(kh, kw)
    nbh, nbw = -(-kh // bh), -(-kw // bw)
    blocks = (torch.rand(C, 1, nbh, nbw, device=DEV) < density).to(w.dtype)
    m = blocks.repeat_interleave(bh, 2).repeat_interleave(bw, 3)[:, :, :kh, :kw]
    return m.contiguous()


def reference64(x, ws, b, ms):
    return lk_conv2d_reference(x.double(), [w.double() for w in ws], None if b is None else b.double(),
                               None if ms is None else [None if m is None else m.double() for m in ms])


def n_taps(shapes):
    return sum(kh * kw for kh, kw in shapes)


# ----------------------------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------------------------

odd = lambda lo, hi: st.integers(lo // 2, hi // 2).map(lambda k: 2 * k + 1)  # noqa: E731

if ON_GPU:
    MAX_HW, MAX_C, MAX_N, MAX_K = 64, 16, 4, 63
else:
    MAX_HW, MAX_C, MAX_N, MAX_K = 14, 3, 2, 31


@st.composite
def branch_sets(draw):
    kind = draw(st.sampled_from(["single", "slak", "pair"]))
    if kind == "single":
        return [(draw(odd(1, MAX_K)), draw(odd(1, MAX_K)))]
    if kind == "slak":
        K = draw(odd(7, MAX_K))
        n = draw(st.sampled_from([3, 5]))
        return [(K, n), (n, K), (n, n)]
    return [(draw(odd(1, MAX_K)), draw(odd(1, 7))), (draw(odd(1, 7)), draw(odd(1, MAX_K)))]


@st.composite
def problems(draw, masks=True):
    shapes = draw(branch_sets())
    C = draw(st.integers(1, MAX_C))
    return dict(
        path=draw(st.sampled_from(["auto", "plane", "tiled"])),
        N=draw(st.integers(0 if not ON_GPU else 1, MAX_N)), C=C,
        H=draw(st.integers(1, MAX_HW)), W=draw(st.integers(1, MAX_HW)),
        shapes=shapes, dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
        bias=draw(st.booleans()),
        mask=draw(st.sampled_from([None, "element", "block"])) if masks else None,
        density=draw(st.sampled_from([0.0, 0.3, 0.6, 1.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(p, requires_grad=False):
    torch.manual_seed(p["seed"])
    x = torch.randn(p["N"], p["C"], p["H"], p["W"], device=DEV, dtype=torch.float64).to(p["dtype"])
    x = make_layout(x, p["layout"])
    ws = rand_weights(p["C"], p["shapes"], p["dtype"])
    b = torch.randn(p["C"], device=DEV, dtype=p["dtype"]) if p["bias"] else None
    ms = None
    if p["mask"] is not None:
        ms = [rand_mask(w, p["mask"], p["density"]) for w in ws]
        if len(ms) > 1:
            ms[-1] = None  # a branch without a mask next to masked ones
    if requires_grad:
        x.requires_grad_(True)
        for w in ws:
            w.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
    return x, ws, b, ms


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def kernel_path(path):
    """path "auto": the op's own choice (matrix kernels for planes whose power-of-two grid holds at most 64 pixels,
    plane kernels for planes up to 64 x 64, tiled otherwise); "plane": no matrix kernels (the plane kernels also on
    the smallest planes); "tiled": the tiled kernels for every plane (as for planes over PLANE_MAX)."""
    old = op_mod.PLANE_MAX, op_mod.MATRIX_MAX_PIXELS
    if path in ("plane", "tiled"):
        op_mod.MATRIX_MAX_PIXELS = 0
    if path == "tiled":
        op_mod.PLANE_MAX = 0
    try:
        yield
    finally:
        op_mod.PLANE_MAX, op_mod.MATRIX_MAX_PIXELS = old


def backward_kernels(H, W, dtype):
    """The launch counters a backward that needs every gradient moves: the fused backward on small 16-bit planes
    (``use_fused_backward``), else the input-gradient ("fwd" with flip) and weight-gradient kernels."""
    return ("bwd",) if op_mod.use_fused_backward(H, W, dtype) else ("fwd", "dw")


@given(p=problems())
def test_forward_matches_conv2d_float64(p):
    x, ws, b, ms = build(p)
    with kernel_path(p["path"]), TritonRan() if p["N"] > 0 else _null():
        y = lk_conv2d(x, ws, b, mask=ms, backend="triton")
    ref = reference64(x, ws, b, ms)
    assert y.dtype == x.dtype and y.shape == x.shape
    if p["layout"] == "channels_last" and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, ref, p["dtype"], n_taps(p["shapes"]), "y")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [
    # SLaK-T stage 1 cut down: 51x5 + 5x51 + 5x5 on 12x12 (image smaller than the kernel)
    dict(N=2, C=3, H=12, W=12, shapes=[(51, 5), (5, 51), (5, 5)]),
    # SLaK stage 4 kernels: 13x5 + 5x13 + 5x5
    dict(N=1, C=2, H=7, W=9, shapes=[(13, 5), (5, 13), (5, 5)]),
    # H or W smaller than the kernel, C = 1
    dict(N=1, C=1, H=3, W=17, shapes=[(7, 9)]),
    # N = 0
    dict(N=0, C=2, H=5, W=5, shapes=[(5, 5)]),
])
def test_forward_examples(case, dtype):
    p = dict(case, dtype=dtype, layout="contiguous", bias=True, mask=None, density=1.0, seed=1234)
    x, ws, b, ms = build(p)
    with TritonRan() if p["N"] > 0 else _null():
        y = lk_conv2d(x, ws, b, backend="triton")
    assert_close(y, reference64(x, ws, b, ms), dtype, n_taps(p["shapes"]), "y")


def test_auto_backend_uses_triton_here():
    x = torch.randn(1, 2, 6, 6, device=DEV)
    w = torch.randn(2, 1, 5, 3, device=DEV)
    with TritonRan():
        y = lk_conv2d(x, w)
    assert_close(y, reference64(x, [w], None, None), torch.float32, 15, "y")


def test_reference_backend_runs_no_kernel():
    x = torch.randn(1, 2, 6, 6, device=DEV)
    w = torch.randn(2, 1, 5, 3, device=DEV)
    before = LAUNCH_COUNTS["fwd"]
    y = lk_conv2d(x, w, backend="reference")
    assert LAUNCH_COUNTS["fwd"] == before
    assert_close(y, reference64(x, [w], None, None), torch.float32, 15, "y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])   # tiled and plane kernels
@pytest.mark.parametrize("H, W", [(9, 7), (7, 6)])                     # plane / matrix kernels
def test_large_offsets_use_64bit_indexing(monkeypatch, dtype, H, W):
    """Planes whose offsets reach 2**31 switch the kernels to int64 in-plane offsets (batch/channel offsets are
    always int64); the int64 variant computes the same result."""
    assert op_mod._wide_idx((70000, 70000), (1, 1, 70000, 1))
    assert not op_mod._wide_idx((224, 224), (3 * 224 * 224, 224 * 224, 224, 1))
    assert op_mod.matrix_wide_idx(64, (2**25, 1, 7, 1)) and not op_mod.matrix_wide_idx(64, (2**24, 1, 7, 1))
    assert op_mod.use_matrix_kernels(H, W) == (W == 6)
    monkeypatch.setattr(op_mod, "_wide_idx", lambda plane, strides: True)
    monkeypatch.setattr(op_mod, "matrix_wide_idx", lambda mb, *strides: True)
    x = torch.randn(2, 2, H, W, device=DEV).to(dtype).requires_grad_(True)
    ws = [(torch.randn(2, 1, 13, 3, device=DEV) / 6).to(dtype).requires_grad_(True),
          (torch.randn(2, 1, 3, 13, device=DEV) / 6).to(dtype).requires_grad_(True)]
    with TritonRan("fwd", *backward_kernels(H, W, dtype)):
        y = lk_conv2d(x, ws, backend="triton")
        y.backward(torch.ones_like(y))
    assert_close(y, reference64(x, ws, None, None), dtype, 78, "y")
    xd = x.detach().double().requires_grad_(True)
    wd = [w.detach().double().requires_grad_(True) for w in ws]
    lk_conv2d_reference(xd, wd).backward(torch.ones(2, 2, H, W, dtype=torch.float64))
    assert_close(x.grad, xd.grad, dtype, 78, "dx")
    for w, r in zip(ws, wd):
        assert_close(w.grad, r.grad, dtype, 2 * H * W, "dW")


# ----------------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------------

@given(p=problems())
@settings(max_examples=16 if not ON_GPU else 25)
def test_backward_matches_autograd_float64(p):
    x, ws, b, ms = build(p, requires_grad=True)
    with kernel_path(p["path"]):
        y = lk_conv2d(x, ws, b, mask=ms, backend="triton")
        g = torch.randn(y.shape, device=DEV, dtype=torch.float64).to(y.dtype)
        with TritonRan(*backward_kernels(p["H"], p["W"], p["dtype"])) if p["N"] > 0 else _null():
            y.backward(g)
    xd = x.detach().double().requires_grad_(True)
    wd = [w.detach().double().requires_grad_(True) for w in ws]
    bd = b.detach().double().requires_grad_(True) if b is not None else None
    md = None if ms is None else [None if m is None else m.double() for m in ms]
    ref = lk_conv2d_reference(xd, wd, bd, md)
    ref.backward(g.double())
    taps = n_taps(p["shapes"])
    assert_close(x.grad, xd.grad, p["dtype"], taps, "dx")
    # dW and db accumulate in fp32 from the same inputs: 16-bit results differ by their final rounding only;
    # fp32 (tf32x3 products on a GPU) also by the rounding of its N*H*W-term sums
    pix = max(p["N"] * p["H"] * p["W"], 1) if p["dtype"] == torch.float32 else 1
    for i, (w, r) in enumerate(zip(ws, wd)):
        assert w.grad.dtype == w.dtype
        assert_close(w.grad, r.grad, p["dtype"], pix, f"dW[{i}]")
        if ms is not None and ms[i] is not None:
            assert (w.grad[ms[i] == 0] == 0).all(), "weight gradient must be zero outside the mask"
    if b is not None:
        assert_close(b.grad, bd.grad, p["dtype"], pix, "db")


@pytest.mark.parametrize("how", ["kwarg", "context"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("plane", [(11, 10), (7, 6)])
def test_dense_weight_grad_covers_inactive_taps(how, dtype, plane):
    """dense_weight_grad: each weight's gradient is dL/d(weight * mask) at every tap (inactive blocks included),
    checked against float64 autograd through F.conv2d with the masked weight as the leaf; the forward and dx are
    unchanged, and a call outside the option still gives the masked gradient. On 7 x 6 planes the 16-bit backward
    is the fused matrix kernel (dx from the masked weights, every tap's gradient)."""
    torch.manual_seed(3)
    C, N, (H, W) = 3, 2, plane
    x = torch.randn(N, C, H, W, device=DEV, dtype=dtype, requires_grad=True)
    ws = [w.requires_grad_(True) for w in rand_weights(C, [(13, 3), (3, 13), (3, 3)], dtype)]
    ms = [rand_mask(ws[0], "block", 0.5), rand_mask(ws[1], "block", 0.5), None]
    g = torch.randn(N, C, H, W, device=DEV, dtype=torch.float64)
    if how == "kwarg":
        y = lk_conv2d(x, ws, mask=ms, backend="triton", dense_weight_grad=True)
    else:
        with slak_triton.dense_weight_grad():
            y = lk_conv2d(x, ws, mask=ms, backend="triton")
    with TritonRan(*backward_kernels(H, W, dtype)):
        y.backward(g.to(dtype))   # backward outside the context: the choice was recorded at forward time
    xd = x.detach().double().requires_grad_(True)
    eff = [(w.detach().double() * (m.double() if m is not None else 1)).requires_grad_(True) for w, m in zip(ws, ms)]
    ref = lk_conv2d_reference(xd, eff)
    ref.backward(g)
    assert_close(y, ref, dtype, n_taps([(13, 3), (3, 13), (3, 3)]), "y")
    assert_close(x.grad, xd.grad, dtype, n_taps([(13, 3), (3, 13), (3, 3)]), "dx")
    for i, (w, r, m) in enumerate(zip(ws, eff, ms)):
        assert_close(w.grad, r.grad, dtype, N * H * W, f"dW[{i}]")
        if m is not None:
            assert (w.grad[m == 0] != 0).any(), "the dense gradient must reach inactive taps"
    # the reference backend gives the same semantics
    wr = [w.detach().double().requires_grad_(True) for w in ws]
    lk_conv2d(xd.detach(), wr, mask=[None if m is None else m.double() for m in ms], backend="reference",
              dense_weight_grad=True).backward(g)
    for i, (w, r) in enumerate(zip(wr, eff)):
        torch.testing.assert_close(w.grad, r.grad)
    # default again: masked gradient
    for w in ws:
        w.grad = None
    lk_conv2d(x, ws, mask=ms, backend="triton").backward(g.to(dtype))
    assert (ws[0].grad[ms[0] == 0] == 0).all()


def test_dense_weight_grad_rejects_non_bool():
    x = torch.randn(1, 1, 5, 5, device=DEV)
    w = torch.randn(1, 1, 3, 3, device=DEV)
    with pytest.raises(TypeError, match="dense_weight_grad"):
        lk_conv2d(x, w, dense_weight_grad=1)
    with pytest.raises(TypeError, match="enabled"):
        with slak_triton.dense_weight_grad("yes"):
            pass


def test_backward_is_deterministic():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12, device=DEV, requires_grad=True)
    ws = [torch.randn(3, 1, 13, 5, device=DEV, requires_grad=True), torch.randn(3, 1, 5, 13, device=DEV, requires_grad=True)]
    b = torch.randn(3, device=DEV, requires_grad=True)
    g = torch.randn(2, 3, 12, 12, device=DEV)
    grads = []
    for _ in range(2):
        for t in [x, b] + ws:
            t.grad = None
        lk_conv2d(x, ws, b, backend="triton").backward(g)
        grads.append([t.grad.clone() for t in [x, b] + ws])
    for a, c in zip(*grads):
        assert torch.equal(a, c), "two backward passes differ bitwise"


def test_double_backward_raises():
    x = torch.randn(1, 1, 5, 5, device=DEV, requires_grad=True)
    w = torch.randn(1, 1, 3, 3, device=DEV, requires_grad=True)
    y = lk_conv2d(x, w, backend="triton")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_gradcheck_reference_float64():
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(2, 1, 5, 3, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 1, 1, 5, dtype=torch.float64, requires_grad=True)]
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w0, w1, b: lk_conv2d(x, [w0, w1], b, backend="reference"),
                                    (x, ws[0], ws[1], b))


@pytest.mark.skipif(ON_GPU, reason="CPU autocast check; the GPU tier covers CUDA autocast")
def test_autocast_runs_in_autocast_dtype():
    x = torch.randn(1, 2, 8, 8)
    w = torch.randn(2, 1, 7, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16), TritonRan():
        y = lk_conv2d(x, w, backend="triton")
    assert y.dtype == torch.bfloat16
    ref = reference64(x.bfloat16(), [w.bfloat16()], None, None)
    assert_close(y, ref, torch.bfloat16, 21, "y")


# ----------------------------------------------------------------------------------------------------------------
# block-sparse skipping
# ----------------------------------------------------------------------------------------------------------------

def brute_force_active_lines(mask, tall):
    """Per channel, the lines (columns of a tall mask, rows of a wide one) with any nonzero tap, by looping."""
    C, _, kh, kw = mask.shape
    return [[j for j in range(kw if tall else kh)
             if bool(((mask[c, 0, :, j] if tall else mask[c, 0, j, :]) != 0).any())] for c in range(C)]


@pytest.mark.parametrize("path", ["auto", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_only_active_lines_are_computed(density, dtype, path):
    """The line metadata list exactly the lines with an active tap; the kernels compute those lines and only
    those: with every line marked inactive they do no work at all (zero output, zero gradient) even though the
    folded weights are nonzero, and with the real metadata they match float64 autograd."""
    torch.manual_seed(7)
    C = 4
    wt = torch.randn(C, 1, 51, 5, device=DEV)
    ww = torch.randn(C, 1, 5, 51, device=DEV)
    mt, mw = rand_mask(wt, "block", density), rand_mask(ww, "block", density)
    meta_t, meta_w = op_mod.slot_metadata([wt, ww], [mt, mw])
    for meta, m, tall in ((meta_t, mt, True), (meta_w, mw, False)):
        flags, items, counts = meta
        expected = brute_force_active_lines(m, tall)
        assert counts.tolist() == [len(e) for e in expected]
        for c in range(C):
            assert items[c, : counts[c]].tolist() == expected[c]
            assert [j for j, f in enumerate(flags[c].tolist()) if f] == expected[c]
    x = torch.randn(2, C, 9, 9, device=DEV).to(dtype)
    y = torch.full_like(x, float("nan"))
    wt_f, ww_f = op_mod.fold_branches([wt.to(dtype), ww.to(dtype)], [None, None])   # nonzero everywhere
    none_t = tuple(torch.zeros_like(t) for t in meta_t)
    none_w = tuple(torch.zeros_like(t) for t in meta_w)
    with kernel_path(path):
        with TritonRan():
            op_mod.launch_lk_conv2d_fwd(x, wt_f, ww_f, None, y, sparse_t=none_t, sparse_w=none_w)
        assert torch.equal(y, torch.zeros_like(y))
        wt_m, ww_m = op_mod.fold_branches([wt.to(dtype), ww.to(dtype)], [mt, mw])
        with TritonRan():
            op_mod.launch_lk_conv2d_fwd(x, wt_m, ww_m, None, y, sparse_t=meta_t, sparse_w=meta_w)
        assert_close(y, reference64(x, [wt, ww], None, [mt, mw]), dtype, 510, "y")
        dy = torch.randn_like(x)
        with TritonRan("dw"):
            gt0, gw0, _ = op_mod.launch_lk_conv2d_bwd_dw(x, dy, (51, 5), (5, 51), False, sparse_t=none_t,
                                                         sparse_w=none_w)
        assert torch.equal(gt0, torch.zeros_like(gt0)) and torch.equal(gw0, torch.zeros_like(gw0))
        with TritonRan("dw"):
            gt, gw, _ = op_mod.launch_lk_conv2d_bwd_dw(x, dy, (51, 5), (5, 51), False, sparse_t=meta_t,
                                                       sparse_w=meta_w)
    wd = [wt.double().requires_grad_(True), ww.double().requires_grad_(True)]
    lk_conv2d_reference(x.double(), wd).backward(dy.double())
    pix = 2 * 81
    assert_close(gt * mt[:, 0], wd[0].grad[:, 0] * mt[:, 0], dtype, pix, "dW tall (active lines)")
    assert_close(gw * mw[:, 0], wd[1].grad[:, 0] * mw[:, 0], dtype, pix, "dW wide (active lines)")
    assert torch.equal(gt * (1 - mt[:, 0]), torch.zeros_like(gt)), "inactive lines must get no work (zero)"
    assert torch.equal(gw * (1 - mw[:, 0]), torch.zeros_like(gw)), "inactive lines must get no work (zero)"


def check_plane_dw(x, wt, ww, meta_t, meta_w, NB, LG, dy_strided=False, max_rel_l2=None):
    """Runs the plane weight-gradient kernel (NB images per dot, LG lines per pass) on fresh dy (dy_strided: a
    view whose strides differ from x's) and compares the slot and bias gradients with float64 autograd (and their
    relative L2 errors with ``max_rel_l2`` when given); inactive lines must get exactly zero. ww may be None."""
    dtype, (N, C, H, W) = x.dtype, x.shape
    dy = torch.randn(N, 2 * C, H, W, device=DEV).to(dtype)[:, 1::2] if dy_strided else torch.randn_like(x)
    assert (dy.stride() != x.stride()) == dy_strided
    old_stack = op_mod.PLANE_DW_STACK_MAX
    op_mod.PLANE_DW_STACK_MAX = 0    # the per-line kernel even where a dense call would stack the lines
    try:
        with kernel_path("plane"), TritonRan("lk_conv2d_plane_dw_kernel"):
            gt, gw, gb = op_mod.launch_lk_conv2d_bwd_dw(x, dy, tuple(wt.shape[1:]),
                                                        None if ww is None else tuple(ww.shape[1:]), True,
                                                        sparse_t=meta_t, sparse_w=meta_w,
                                                        config=dict(NB=NB, LG=LG, num_warps=4, num_stages=1))
    finally:
        op_mod.PLANE_DW_STACK_MAX = old_stack
    wd = [w.detach().double().requires_grad_(True) for w in (wt, ww) if w is not None]
    bd = torch.zeros(C, dtype=torch.float64, device=DEV, requires_grad=True)
    lk_conv2d_reference(x.double(), [w[:, None] for w in wd], bd).backward(dy.double())
    on_t = meta_t[0][:, None, :] if meta_t is not None else 1
    on_w = meta_w[0][:, :, None] if meta_w is not None else 1
    # fp32 accumulation from the same 16-bit inputs: only the final rounding differs (n_taps 1)
    for g, w, on, what in zip((gt, gw), wd, (on_t, on_w), ("dW tall", "dW wide")):
        assert_close(g * on, w.grad * on, dtype, 1, what)
        assert torch.equal(g * (1 - on), torch.zeros_like(g)), f"{what}: inactive lines must get exactly zero"
        if max_rel_l2 is not None:
            assert rel_l2(g * on, w.grad * on) <= max_rel_l2, f"{what}: relative L2 error {rel_l2(g * on, w.grad * on):.2e}"
    assert_close(gb, bd.grad, dtype, 1, "db")
    if max_rel_l2 is not None:
        assert rel_l2(gb, bd.grad) <= max_rel_l2, f"db: relative L2 error {rel_l2(gb, bd.grad):.2e}"


@pytest.mark.parametrize("N, cfg, dtype", [
    # tiled kernel (fp32, on the tiled path): NB images per program
    (3, dict(BH=16, BW=16, CK=16, NB=2), torch.float32),   # N not a multiple of NB: a missing image
    (5, dict(BH=16, BW=32, CK=32, NB=4), torch.float32),
    (2, dict(BH=32, BW=16, CK=16, NB=2), torch.float32),
    # plane kernel (16-bit): NB images per dot, IMG per program
    (3, dict(NB=2, IMG=2, TALL_T=False), torch.float16),   # the second program has one image, half a dot
    (7, dict(NB=2, IMG=4, TALL_T=False), torch.bfloat16),
    (5, dict(NB=4, IMG=8, TALL_T=False), torch.float16),   # one program, the dot's last image missing
    (3, dict(NB=2, IMG=2, TALL_T=True), torch.bfloat16),   # the tall slot transposed
    (5, dict(NB=4, IMG=8, TALL_T=True), torch.float16),
])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_several_images_per_program(N, cfg, dtype, flip, sparse):
    """The NB > 1 autotune configs (images side by side for the tall slot, stacked for the wide one) compute the
    same result, for the forward and the flipped (input-gradient) launch, dense and sparse."""
    torch.manual_seed(N * 10 + cfg["NB"])
    C = 2
    x = torch.randn(N, C, 13, 11, device=DEV).to(dtype)
    ws = [(torch.randn(C, 1, 51, 5, device=DEV) / 16).to(dtype), (torch.randn(C, 1, 5, 51, device=DEV) / 16).to(dtype),
          (torch.randn(C, 1, 5, 5, device=DEV) / 5).to(dtype)]
    ms = [rand_mask(ws[0], "block", 0.5), rand_mask(ws[1], "element", 0.5), None] if sparse else [None] * 3
    meta_t, meta_w = op_mod.slot_metadata(ws, ms)
    wt, ww = op_mod.fold_branches(ws, ms)
    b = None if flip else torch.randn(C, device=DEV).to(dtype)
    y = torch.full_like(x, float("nan"))
    kernel = "lk_conv2d_plane_fwd_kernel" if "IMG" in cfg else "lk_conv2d_fwd_kernel"
    with kernel_path("auto" if "IMG" in cfg else "tiled"), TritonRan(kernel):
        op_mod.launch_lk_conv2d_fwd(x, wt, ww, b, y, flip=flip, sparse_t=meta_t, sparse_w=meta_w,
                                    config=dict(cfg, num_warps=4, num_stages=1))
    if flip:
        ws = [w.flip(2, 3) for w in ws]
        ms = [m.flip(2, 3) if m is not None else None for m in ms]
    assert_close(y, reference64(x, ws, b, ms), dtype, 535, "y")
    if flip or "IMG" not in cfg:
        return
    # the plane weight-gradient kernel with NB images per dot, over programs of several images
    check_plane_dw(x, wt, ww, meta_t, meta_w, NB=cfg["NB"], LG=2)


@pytest.mark.parametrize("N, H, W, NB, sparse", [
    (11, 7, 7, 4, False),    # 9 images per 64 columns (rows): one full dot, one of 2 images
    (6, 9, 5, 1, True),      # 3 (tall) / 1 (wide) images per dot, sparse lines
    (5, 7, 10, 2, False),    # wide passes packed (H = 7), tall passes packed at W = 10 (3 per dot)
])
def test_plane_dw_packs_small_planes(N, H, W, NB, sparse):
    """On small planes the weight-gradient kernel packs images at the plane's own width / height along the K
    dimension of its dots (``plane_dw_pack``): same gradients as float64 autograd, image boundaries anywhere."""
    assert op_mod.plane_dw_pack(W) and op_mod.plane_dw_pack(H)
    torch.manual_seed(N * 100 + H * 10 + W)
    C, dtype = 3, torch.bfloat16
    x = torch.randn(N, C, H, W, device=DEV).to(dtype)
    ws = [(torch.randn(C, 1, 13, 5, device=DEV) / 8).to(dtype), (torch.randn(C, 1, 5, 11, device=DEV) / 8).to(dtype)]
    ms = [rand_mask(ws[0], "block", 0.5), rand_mask(ws[1], "block", 0.5)] if sparse else [None, None]
    meta_t, meta_w = op_mod.slot_metadata(ws, ms)
    wt, ww = op_mod.fold_branches(ws, ms)
    check_plane_dw(x, wt, ww, meta_t, meta_w, NB=NB, LG=3)


@pytest.mark.parametrize("H, W, KW, LG, sparse, dy_strided", [
    (9, 14, 5, 5, False, False),   # W < BW, unpacked: odd lines take the lagged dy and share the even line's x
    (9, 13, 5, 2, False, True),    # odd W; passes of 2 lines: the odd line first in its pass; dy strided unlike x
    (6, 14, 3, 3, True, False),    # sparse passes: each live line loads its own x, no lag
    (5, 13, 7, 5, False, False),   # shifts -3..3 in passes of 5 and 2 lines
    (5, 14, 3, 3, False, True),    # shifts -1..1, the first line odd (loads x at -2 itself)
    (9, 16, 5, 5, False, True),    # W == BW: no padding column to lag into, the plain path
])
def test_plane_dw_tall_lines_with_lagged_dy(H, W, KW, LG, sparse, dy_strided):
    """The tall passes of the plane weight-gradient kernel compute a line of odd column shift s from dy lagged
    by one column and x shifted by s - 1 (``DY_LAG``): same gradients as float64 autograd, the last real column
    of dy included, at every pass boundary."""
    assert not op_mod.plane_dw_pack(W)
    torch.manual_seed(H * 100 + W * 10 + KW)
    N, C, dtype = 3, 2, torch.bfloat16
    x = torch.randn(N, C, H, W, device=DEV).to(dtype)
    ws = [(torch.randn(C, 1, 11, KW, device=DEV) / 8).to(dtype), (torch.randn(C, 1, 3, 9, device=DEV) / 8).to(dtype)]
    ms = [rand_mask(ws[0], "block", 0.5), None] if sparse else [None, None]
    meta_t, meta_w = op_mod.slot_metadata(ws, ms)
    wt, ww = op_mod.fold_branches(ws, ms)
    check_plane_dw(x, wt, ww, meta_t, meta_w, NB=2, LG=LG, dy_strided=dy_strided)


@pytest.mark.parametrize("H, W, LG, centre_on", [
    (16, 9, 2, True),     # H == BH (no padding row): dy summed once, in the first pass, not again in the centre's
    (16, 9, 1, False),    # ... with the centre line inactive
    (9, 7, 2, False),     # padding row, sparse centre line inactive: the ones row cannot carry the bias
    (9, 7, 5, True),      # padding row, centre line active: the bias by the centre line's dot
])
def test_plane_dw_bias_gradient_once(H, W, LG, centre_on):
    """The plane weight-gradient kernel's bias gradient counts every dy once whatever the pass holding the slot's
    centre line and whether that line is active (a line-sparse tall slot can drop its centre column)."""
    torch.manual_seed(H * 10 + LG)
    N, C, dtype = 3, 2, torch.bfloat16
    x = torch.randn(N, C, H, W, device=DEV).to(dtype)
    ws = [(torch.randn(C, 1, 11, 5, device=DEV) / 8).to(dtype), (torch.randn(C, 1, 3, 9, device=DEV) / 8).to(dtype)]
    m = torch.ones(C, 1, 11, 5, device=DEV, dtype=dtype)
    if not centre_on:
        m[:, :, :, 2] = 0
    ms = [m, None]
    meta_t, meta_w = op_mod.slot_metadata(ws, ms)
    assert bool(meta_t[0][:, 2].all()) == centre_on
    wt, ww = op_mod.fold_branches(ws, ms)
    check_plane_dw(x, wt, ww, meta_t, meta_w, NB=1, LG=LG)


@pytest.mark.parametrize("dtype, N, H, W, tall, wide, NB, layout", [
    # SLaK's slots on a 16-padded plane: even shifts -2, 0, 2 and a spare tall slot that sums dy for the bias
    (torch.bfloat16, 5, 14, 13, (15, 5), (5, 15), 2, "contiguous"),   # N not a multiple of NB
    (torch.float16, 3, 14, 13, (15, 5), (5, 15), 4, "channels_last"),  # one dot's last image missing
    (torch.bfloat16, 2, 28, 27, (31, 5), (5, 31), 1, "strided"),      # 32-padded (SLaK-T stage 2's padding)
    (torch.float16, 3, 15, 14, (9, 3), (3, 9), 1, "contiguous"),      # two tall slots, no spare: dy summed
    (torch.bfloat16, 4, 13, 15, (7, 7), None, 4, "contiguous"),        # shifts -3..3 in 4 slots; tall only
    (torch.float16, 3, 14, 13, None, (3, 11), 2, "channels_last"),    # wide only: 2 + 1 lines (2 slots)
    (torch.bfloat16, 3, 14, 14, (9, 1), (1, 9), 2, "contiguous"),     # one line per slot: no odd product
    # fp32 as bf16 splits (six products per stack): 16-padded, and 32-padded (sm_90's limit, raised here)
    (torch.float32, 3, 14, 13, (15, 5), (5, 15), 2, "channels_last"),
    (torch.float32, 2, 28, 27, (9, 3), (3, 9), 1, "contiguous"),
])
def test_plane_dw_stack_matches_float64(dtype, N, H, W, tall, wide, NB, layout, monkeypatch):
    """The stacked weight-gradient kernel (dense, planes padded to 32 and less): every line of a slot in one
    product per image group, odd tall offsets from dy lagged by one column, the bias from a ones slot or from dy;
    slot and bias gradients match float64 autograd, over programs of several images, any layout."""
    split = dtype == torch.float32
    monkeypatch.setattr(op_mod, "PLANE_DW_STACK_SPLIT_MAX", 32)    # (as on sm_90)
    assert op_mod.use_fp32_split(H, W, dtype, weight_grad=True) == split
    assert op_mod.use_plane_dw_stack(H, W, tall[1] if tall else 0, wide[0] if wide else 0, split)
    torch.manual_seed(N * 100 + H * 10 + W)
    C = 2
    x = make_layout(torch.randn(N, C, H, W, device=DEV).to(dtype), layout)
    dy = make_layout(torch.randn(N, C, H, W, device=DEV).to(dtype), "strided" if layout == "contiguous" else layout)
    assert op_mod.plane_dw_images_per_program(N, C, op_mod._num_sms(x.device)) < N or ON_GPU   # several programs
    with TritonRan("lk_conv2d_plane_dw_stack_kernel"):
        gt, gw, gb = op_mod.launch_lk_conv2d_bwd_dw(x, dy, tall, wide, True,
                                                    config=dict(NB=NB, num_warps=4, num_stages=1))
    shapes = [s for s in (tall, wide) if s is not None]
    wd = [torch.zeros(C, 1, *s, dtype=torch.float64, device=DEV, requires_grad=True) for s in shapes]
    bd = torch.zeros(C, dtype=torch.float64, device=DEV, requires_grad=True)
    lk_conv2d_reference(x.double(), wd, bd).backward(dy.double())
    got = [g for g in (gt, gw) if g is not None]
    assert (gt is None) == (tall is None) and (gw is None) == (wide is None)
    for g, w, what in zip(got, wd, ("dW tall", "dW wide")):
        # fp32 accumulation of exact products of the same 16-bit inputs (of the exact bf16 parts of fp32 ones):
        # only the final rounding differs
        assert_close(g, w.grad[:, 0], dtype, 1, what)
        assert rel_l2(g, w.grad[:, 0]) <= SPLIT_REL_L2, f"{what}: relative L2 error {rel_l2(g, w.grad[:, 0]):.2e}"
    assert_close(gb, bd.grad, dtype, 1, "db")
    assert rel_l2(gb, bd.grad) <= SPLIT_REL_L2


@pytest.mark.parametrize("dtype, H, W", [(torch.bfloat16, 9, 14), (torch.float32, 20, 30)])
def test_plane_dw_one_line_passes_skip_inactive_lines(dtype, H, W):
    """Sparse passes of one line (LG 1) run over the images only when their line is active (``_pass_end``), except
    the first one, which also sums dy for the bias gradient: both slots sparse, the first and the centre lines of
    some channels inactive; bf16 and fp32 as bf16 splits (32-padded: a slot per launch, the bias from row sums)."""
    torch.manual_seed(H + W)
    N, C = 3, 3
    x = torch.randn(N, C, H, W, device=DEV).to(dtype)
    ws = [(torch.randn(C, 1, 11, 5, device=DEV) / 8).to(dtype), (torch.randn(C, 1, 5, 9, device=DEV) / 8).to(dtype)]
    mt, mw = torch.ones_like(ws[0]), torch.ones_like(ws[1])
    mt[0, :, :, 0] = 0       # channel 0: the first tall line (the bias pass) inactive
    mt[1, :, :, 2] = 0       # channel 1: the centre tall line inactive
    mt[2, :, :, 1:4] = 0
    mw[0, :, 2, :] = 0
    mw[1, :, 0, :] = 0
    mw[2, :, 3:, :] = 0
    meta_t, meta_w = op_mod.slot_metadata(ws, [mt, mw])
    wt, ww = op_mod.fold_branches(ws, [mt, mw])
    check_plane_dw(x, wt, ww, meta_t, meta_w, NB=1, LG=1,
                   max_rel_l2=SPLIT_REL_L2 if dtype == torch.float32 else None)


def rel_l2(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


#: Relative L2 error allowed to the fp32 bf16x6 split (exact products, fp32 sums; ~1e-7 here): a missing cross
#: product (2**-18 relative) would cost ~4e-6.
SPLIT_REL_L2 = 1e-6


@pytest.mark.parametrize("H, W, tall_only, passes, dw_passes", [
    (12, 10, False, 1, 1),   # 16-padded: the three weight splits' Toeplitz operands in one launch (dW: both slots)
    (20, 30, False, 1, 2),   # 32-padded (SLaK stage 2); dW: a slot per launch
    (40, 10, True, 2, 1),    # 64 x 16, tall slot only: two splits, then one (64-padded: FP32_SPLIT_MAX raised)
    (20, 36, False, 5, 2),   # 32 x 64: a slot per launch, the tall one's splits in two launches, the wide one's
])                           # in three; the later launches add to y
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_fp32_split_matches_float64(H, W, tall_only, passes, dw_passes, flip, sparse, monkeypatch):
    """fp32 on the plane kernels (precision bf16x6): x and w as three bf16 parts each, the six products that
    matter over one to five launches (bias added once): float64 accuracy up to fp32 sums, forward, input
    gradient and weight gradient (one or two launches, the bias gradient once), dense and sparse. 64-padded
    planes split only on sm_90 (here FP32_SPLIT_MAX and FP32_SPLIT_DW_MAX are raised to run them)."""
    assert op_mod.fp32_precision() == "bf16x6"
    assert op_mod.use_fp32_split(H, W, torch.float32) == (max(H, W) <= 32)
    assert op_mod.use_fp32_split(H, W, torch.float32, weight_grad=True) == (max(H, W) <= 32)
    # on Hopper 64-padded planes split too (a slot per launch), on sm_80 and off a GPU they do not
    assert op_mod.use_fp32_split(H, W, torch.float32, arch=90) == (max(H, W) <= 64)
    assert op_mod.use_fp32_split(H, W, torch.float32, arch=80) == (max(H, W) <= 32)
    assert op_mod.use_fp32_split(H, W, torch.float32, weight_grad=True, arch=90) == (max(H, W) <= 64)
    assert op_mod.use_fp32_split(H, W, torch.float32, weight_grad=True, arch=80) == (max(H, W) <= 32)
    monkeypatch.setattr(op_mod, "FP32_SPLIT_MAX", 64)
    monkeypatch.setattr(op_mod, "FP32_SPLIT_DW_MAX", 64)
    torch.manual_seed(H * 10 + W + passes)
    N, C, dtype = 3, 2, torch.float32
    x = torch.randn(N, C, H, W, device=DEV)
    ws = [torch.randn(C, 1, 31, 5, device=DEV) / 12] + \
        ([] if tall_only else [torch.randn(C, 1, 5, 29, device=DEV) / 12, torch.randn(C, 1, 5, 5, device=DEV) / 5])
    ms = [rand_mask(w, "block", 0.5) for w in ws] if sparse else [None] * len(ws)
    meta_t, meta_w = op_mod.slot_metadata(ws, ms)
    wt, ww = op_mod.fold_branches(ws, ms)
    assert len(op_mod.fp32_split_passes(H, W, 5, 0 if tall_only else 5)) == passes
    b = None if flip else torch.randn(C, device=DEV)
    y = torch.full_like(x, float("nan"))
    before = LAUNCH_COUNTS["lk_conv2d_plane_fwd_kernel"]
    op_mod.launch_lk_conv2d_fwd(x, wt, ww, b, y, flip=flip, sparse_t=meta_t, sparse_w=meta_w)
    assert LAUNCH_COUNTS["lk_conv2d_plane_fwd_kernel"] - before == passes
    rws = [w.flip(2, 3) for w in ws] if flip else ws
    rms = [m.flip(2, 3) if m is not None else None for m in ms] if flip else ms
    ref = reference64(x, rws, b, rms)
    assert_close(y, ref, dtype, 31 * 5 * 2, "y")
    assert rel_l2(y, ref) <= SPLIT_REL_L2, f"y: relative L2 error {rel_l2(y, ref):.2e}"
    if not flip:
        assert len(op_mod.fp32_split_dw_passes(H, W, 5, 0 if tall_only else 5)) == dw_passes
        before = LAUNCH_COUNTS["lk_conv2d_plane_dw_kernel"]
        check_plane_dw(x, wt, ww, meta_t, meta_w, NB=2, LG=2, max_rel_l2=SPLIT_REL_L2)
        assert LAUNCH_COUNTS["lk_conv2d_plane_dw_kernel"] - before == dw_passes


# ----------------------------------------------------------------------------------------------------------------
# matrix kernels (planes whose power-of-two grid holds at most 64 pixels)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, N, H, W, shapes, layout, MB, IMG", [
    # SLaK's stage-4 slots on 7x7: N not a multiple of MB (a dot's last images missing), two programs
    (torch.bfloat16, 19, 7, 7, [(13, 5), (5, 13), (5, 5)], "contiguous", 16, 16),
    (torch.float16, 5, 7, 7, [(13, 5), (5, 13), (5, 5)], "channels_last", 32, 64),
    (torch.float32, 3, 7, 7, [(13, 5), (5, 13), (5, 5)], "strided", 16, 16),
    # 8x8: no padding pixel (the bias gradient summed from dy); kernels longer than the plane: taps no pixel
    # reaches get 0
    (torch.float32, 2, 8, 8, [(51, 5), (5, 51)], "contiguous", 16, 16),
    (torch.bfloat16, 3, 4, 15, [(3, 31)], "contiguous", 16, 16),      # wide slot only, 60 pixels (4 x 16 grid)
    (torch.float16, 2, 9, 3, [(7, 7)], "strided", 16, 16),             # tall slot only (a square kernel), 16 x 4
])
@pytest.mark.parametrize("sparse", [False, True])
def test_matrix_kernels_match_float64(dtype, N, H, W, shapes, layout, MB, IMG, sparse):
    """Small planes (grids up to 64 pixels) run as one [PP, PP] matrix per channel (``lk_conv2d_matrix_*``): the
    forward, the input gradient (FLIP) and the weight and bias gradients, and in 16-bit dtypes the fused backward
    (all three in one launch), match float64 F.conv2d / autograd, any layout, MB images per dot over programs of
    IMG. Sparse: line metadata with weights NOT masked; inactive lines contribute nothing (the kernel reads their
    weights as 0) and get exactly zero gradient."""
    assert op_mod.use_matrix_kernels(H, W)
    torch.manual_seed(N * 100 + H * 10 + W + sparse)
    C = 3
    x = make_layout(torch.randn(N, C, H, W, device=DEV).to(dtype), layout)
    ws = rand_weights(C, shapes, dtype)
    ms = [rand_mask(w, "block", 0.5) for w in ws] if sparse else [None] * len(ws)
    meta_t, meta_w = op_mod.slot_metadata(ws, ms)
    wt, ww = op_mod.fold_branches(ws, [None] * len(ws))     # not masked: the metadata alone must skip
    on_t = meta_t[0][:, None, :] if meta_t is not None else 1
    on_w = meta_w[0][:, :, None] if meta_w is not None else 1
    # the reference: the folded slots with their inactive lines zeroed, as single branches
    ref_ws = [(w.double() * on)[:, None] for w, on in ((wt, on_t), (ww, on_w)) if w is not None]
    b = torch.randn(C, device=DEV).to(dtype)
    taps = n_taps(shapes)
    for flip in (False, True):
        y = torch.full_like(x, float("nan"))
        with TritonRan("lk_conv2d_matrix_fwd_kernel"):
            op_mod.launch_lk_conv2d_fwd(x, wt, ww, None if flip else b, y, flip=flip, sparse_t=meta_t,
                                        sparse_w=meta_w, config=dict(MB=MB, IMG=IMG, num_warps=4, num_stages=1))
        ref = reference64(x, [w.flip(2, 3) for w in ref_ws] if flip else ref_ws, None if flip else b, None)
        assert_close(y, ref, dtype, taps, "dx" if flip else "y")
        if dtype == torch.float32:   # bf16x6: fp32 accuracy
            assert rel_l2(y, ref) <= SPLIT_REL_L2, f"relative L2 error {rel_l2(y, ref):.2e}"
    dy = make_layout(torch.randn(N, C, H, W, device=DEV).to(dtype), layout)
    wd = [w.detach().double().requires_grad_(True) for w in ref_ws]
    bd = torch.zeros(C, dtype=torch.float64, device=DEV, requires_grad=True)
    lk_conv2d_reference(x.double(), wd, bd).backward(dy.double())
    dx_ref = reference64(dy, [w.flip(2, 3) for w in ref_ws], None, None)
    with TritonRan("lk_conv2d_matrix_bwd_kernel", "dw"):
        grads = op_mod.launch_lk_conv2d_bwd_dw(x, dy, None if wt is None else tuple(wt.shape[1:]),
                                               None if ww is None else tuple(ww.shape[1:]), True,
                                               sparse_t=meta_t, sparse_w=meta_w,
                                               config=dict(MB=MB, num_warps=4, num_stages=1))
    runs = [("", grads)]
    if op_mod.use_fused_backward(H, W, dtype):   # the fused backward: dx and the same gradients in one launch
        dx = torch.full_like(dy, float("nan"))
        with TritonRan("lk_conv2d_matrix_bwd_kernel", "bwd"):
            out = op_mod.launch_lk_conv2d_bwd(x, dy, wt, ww, dx, True, sparse_t=meta_t, sparse_w=meta_w,
                                              config=dict(MB=MB, num_warps=4, num_stages=1))
        assert out[0] is dx
        assert_close(dx, dx_ref, dtype, taps, "fused dx")
        runs.append(("fused ", out[1:]))
    ons = [on for w, on in ((wt, on_t), (ww, on_w)) if w is not None]
    for tag, (gt, gw, gb) in runs:
        for g, w, on, what in zip([g for g in (gt, gw) if g is not None], wd, ons, ("dW first slot", "dW second slot")):
            what = tag + what
            # fp32 sums of exact products of the same inputs: only the rounding of the sums differs
            assert_close(g * on, w.grad[:, 0] * on, dtype, 1, what)
            assert torch.equal(g * (1 - on), torch.zeros_like(g)), f"{what}: inactive lines must get exactly zero"
            if dtype == torch.float32:
                assert rel_l2(g, w.grad[:, 0] * on) <= SPLIT_REL_L2, f"{what}: relative L2 error"
        assert_close(gb, bd.grad, dtype, 1, tag + "db")


def test_matrix_kernels_by_plane():
    """The matrix kernels (forward, input and weight gradients) take the planes whose rows and columns, padded to
    powers of two, hold at most MATRIX_MAX_PIXELS pixels, at every batch; larger ones keep the plane kernels."""
    def names(N, H, W):
        st = (3 * H * W, H * W, W, 1)
        fwd = op_mod.fwd_launch_spec(N, 3, H, W, torch.bfloat16, st, st, (13, 5), (65, 5, 1), (5, 13), (65, 13, 1),
                                     has_bias=True, flip=False, sparse_t=False, sparse_w=False).name
        dw = op_mod.dw_launch_spec(N, 3, H, W, torch.bfloat16, st, st, (13, 5), (5, 13), need_bias=True,
                                   sparse_t=False, sparse_w=False)[0].name
        return fwd, dw
    matrix = ("lk_conv2d_matrix_fwd_kernel", "lk_conv2d_matrix_bwd_kernel")
    assert names(1, 7, 7) == names(64, 8, 8) == names(2, 4, 16) == names(2, 3, 3) == matrix
    # 9 x 7 is a 16 x 8 grid, 2 x 30 a 4 x 32 one
    assert names(64, 9, 7)[0] == names(1, 2, 30)[0] == "lk_conv2d_plane_fwd_kernel"

    def fused(H, W, dtype):
        st = (3 * H * W, H * W, W, 1)
        spec = op_mod.bwd_launch_spec(64, 3, H, W, dtype, st, st, st, (13, 5), (65, 5, 1), (5, 13), (65, 13, 1),
                                      need_bias=True, sparse_t=False, sparse_w=False, dense_dw=False)
        return spec and spec[0].name
    # the fused backward: the matrix planes in 16-bit dtypes
    assert fused(7, 7, torch.bfloat16) == fused(4, 16, torch.float16) == "lk_conv2d_matrix_bwd_kernel"
    assert fused(7, 7, torch.float32) is None and fused(9, 7, torch.bfloat16) is None


def test_launch_specs_are_cached_until_a_setting_changes(monkeypatch):
    """A launch spec is built once per call signature (its Python costs more than a small kernel runs) and built
    again when anything it reads changes: a limit, a helper read through another function, a dict changed in place,
    the fp32 precision variable. Undoing the change gives the first spec's launch back."""
    def fwd(dtype, H, arch=0):
        st = (4 * H * H, H * H, H, 1)
        return op_mod.fwd_launch_spec(2, 4, H, H, dtype, st, st, (13, 5), (65, 5, 1), (5, 13), (65, 13, 1),
                                      has_bias=True, flip=False, sparse_t=False, sparse_w=False, arch=arch)
    first = fwd(torch.bfloat16, 30)
    assert fwd(torch.bfloat16, 30) is first
    assert fwd(torch.bfloat16, 28) is not first      # another signature
    with monkeypatch.context() as mp:     # a helper that _plane_wide_idx calls
        mp.setattr(op_mod, "_wide_idx", lambda plane, strides: True)
        assert fwd(torch.bfloat16, 30).args["WIDE_IDX"] and not first.args["WIDE_IDX"]
    again = fwd(torch.bfloat16, 30)
    assert (again.name, again.args, again.passes) == (first.name, first.args, first.passes)
    # fp32 on a 64-padded plane: tiled off Hopper until the limit is raised
    assert fwd(torch.float32, 60).name == "lk_conv2d_fwd_kernel"
    with monkeypatch.context() as mp:
        mp.setattr(op_mod, "FP32_SPLIT_MAX", 64)
        assert fwd(torch.float32, 60).name == "lk_conv2d_plane_fwd_kernel"
    assert fwd(torch.float32, 60).name == "lk_conv2d_fwd_kernel"
    # on Hopper, one launch per slot and weight split group: a dict changed in place
    passes = len(fwd(torch.float32, 60, arch=90).passes)
    with monkeypatch.context() as mp:
        mp.setitem(op_mod.FP32_SPLITS_PER_LAUNCH, "wide", op_mod.FP32_SPLITS)
        assert len(fwd(torch.float32, 60, arch=90).passes) == passes - 1   # (3 wide launches -> 2: Toeplitz bytes)
    # the fp32 precision is read from the environment on every call
    assert fwd(torch.float32, 30).name == "lk_conv2d_plane_fwd_kernel"
    with monkeypatch.context() as mp:
        mp.setenv("SLAK_TRITON_FP32_PRECISION", "ieee")
        assert fwd(torch.float32, 30).name == "lk_conv2d_fwd_kernel"
    assert fwd(torch.float32, 30).name == "lk_conv2d_plane_fwd_kernel"


@pytest.mark.parametrize("dtype, plane", [(torch.float32, (9, 8)), (torch.bfloat16, (7, 6))])
def test_eager_calls_skip_the_dispatch_and_match_the_op(dtype, plane, monkeypatch):
    """An eager call on plain tensors runs ``_LkConv2dEager`` (the op's functions without torch.library's
    dispatch; without gradients the op's function alone) and computes bit for bit what the registered op and its
    backward compute: the same launches (bf16 on 7 x 6: the fused backward). A call under a dispatch mode (what
    make_fx and FakeTensorMode are) takes the op."""
    torch.manual_seed(6)
    x = torch.randn(2, 3, *plane, device=DEV).to(dtype)
    ws = rand_weights(3, [(13, 3), (3, 13), (3, 3)], dtype)
    b = torch.randn(3, device=DEV).to(dtype)
    masks = [rand_mask(ws[0], "block", 0.6), None, None]
    dy = torch.randn(2, 3, *plane, device=DEV).to(dtype)

    def run():
        xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
        wg = [w.clone().requires_grad_() for w in ws]
        with TritonRan("fwd", *backward_kernels(*plane, dtype)):
            y = lk_conv2d(xs, wg, bs, mask=masks, backend="triton")
            y.backward(dy)
        return y.detach(), [xs.grad, *(w.grad for w in wg), bs.grad], type(y.grad_fn).__name__

    y_e, g_e, node_e = run()
    with monkeypatch.context() as mp:
        mp.setattr(op_mod, "_eager_ok", lambda *tensors: False)
        y_o, g_o, node_o = run()
    assert node_e == "_LkConv2dEagerBackward" and node_o != node_e, (node_e, node_o)
    assert torch.equal(y_e, y_o), "forward: eager path != op"
    for i, (a, o) in enumerate(zip(g_e, g_o)):
        assert torch.equal(a, o), f"gradient {i}: eager path != op"

    with torch.no_grad():   # (no autograd node: the function alone)
        assert torch.equal(lk_conv2d(x, ws, b, mask=masks, backend="triton"), y_e)

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Record(), torch.no_grad():
        y_m = lk_conv2d(x, ws, b, mask=masks, backend="triton")
    assert torch.ops.slak_triton.lk_conv2d_fwd.default in seen
    assert torch.equal(y_m, y_e)


@pytest.mark.parametrize("needs", ["all", "weights", "input", "no_bias"])
def test_fused_backward_only_when_every_gradient_is_needed(needs):
    """On small 16-bit planes a backward that needs dx and every slot's weight gradient is one fused launch; a
    backward that needs only some of them launches only their kernels. Every gradient asked for matches float64
    autograd, the others stay None."""
    torch.manual_seed(5)
    dtype, C = torch.bfloat16, 3
    x = torch.randn(3, C, 7, 6, device=DEV).to(dtype).requires_grad_(needs != "weights")
    ws = [(torch.randn(C, 1, 13, 5, device=DEV) / 8).to(dtype).requires_grad_(needs != "input"),
          (torch.randn(C, 1, 5, 13, device=DEV) / 8).to(dtype).requires_grad_(needs != "input")]
    b = torch.randn(C, device=DEV).to(dtype).requires_grad_(needs not in ("no_bias", "input"))
    y = lk_conv2d(x, ws, b, backend="triton")
    g = torch.randn_like(y)
    before = {k: LAUNCH_COUNTS[k] for k in ("fwd", "dw", "bwd")}
    y.backward(g)
    ran = {k: LAUNCH_COUNTS[k] - before[k] for k in before}
    expected = {"all": dict(fwd=0, dw=0, bwd=1), "no_bias": dict(fwd=0, dw=0, bwd=1),
                "weights": dict(fwd=0, dw=1, bwd=0), "input": dict(fwd=1, dw=0, bwd=0)}[needs]
    assert ran == expected
    xd = x.detach().double().requires_grad_(True)
    wd = [w.detach().double().requires_grad_(True) for w in ws]
    bd = b.detach().double().requires_grad_(True)
    lk_conv2d_reference(xd, wd, bd).backward(g.double())
    assert (x.grad is None) == (needs == "weights") and (b.grad is None) == (needs in ("input", "no_bias"))
    if x.grad is not None:
        assert_close(x.grad, xd.grad, dtype, n_taps([(13, 5), (5, 13)]), "dx")
    for w, r in zip(ws, wd):
        assert (w.grad is None) == (needs == "input")
        if w.grad is not None:
            assert_close(w.grad, r.grad, dtype, 1, "dW")
    if b.grad is not None:
        assert_close(b.grad, bd.grad, dtype, 1, "db")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_on_matrix_planes(bad):
    """The op's docstring: on small planes (the matrix kernels) a non-finite x[n, c, r, q] makes at most every
    output of image n and channel c non-finite (a superset of F.conv2d's); every other output is finite and
    exact."""
    torch.manual_seed(22)
    x = torch.randn(2, 2, 7, 7, device=DEV)
    x[1, 0, 2, 3] = bad
    ws = [torch.randn(2, 1, 13, 5, device=DEV) / 8, torch.randn(2, 1, 5, 13, device=DEV) / 8]
    with TritonRan("lk_conv2d_matrix_fwd_kernel"):
        y = lk_conv2d(x, ws, backend="triton")
    ref = reference64(x, ws, None, None)
    ours, theirs = ~torch.isfinite(y), ~torch.isfinite(ref)
    assert theirs.any() and bool((theirs & ~ours).sum() == 0), "an output F.conv2d makes non-finite is finite here"
    plane = torch.zeros_like(ours)
    plane[1, 0] = True
    assert bool((ours & ~plane).sum() == 0), "non-finite outputs outside the image and channel"
    assert_close(y[~plane], ref[~plane], torch.float32, 2 * 65, "other planes")


def test_fp32_precision_picks_the_path(monkeypatch):
    """SLAK_TRITON_FP32_PRECISION: bf16x6 (default) runs fp32 on the plane kernels as bf16 splits where planes
    allow, any other precision on the tiled kernels; the matrix kernels (planes up to 8 x 8) take every
    precision, bf16x6 as splits, the others as fp32 dots of that precision. An unknown value names the variable and
    the choices."""
    x = torch.randn(2, 2, 9, 9, device=DEV)
    xs = torch.randn(2, 2, 7, 6, device=DEV)     # an 8 x 8 grid: the matrix kernels
    ws = [torch.randn(2, 1, 7, 3, device=DEV) / 5, torch.randn(2, 1, 3, 7, device=DEV) / 5]
    ref, ref_s = reference64(x, ws, None, None), reference64(xs, ws, None, None)
    with TritonRan("lk_conv2d_plane_fwd_kernel"):
        y = lk_conv2d(x, ws, backend="triton")
    assert rel_l2(y, ref) <= SPLIT_REL_L2
    with TritonRan("lk_conv2d_matrix_fwd_kernel"):
        y = lk_conv2d(xs, ws, backend="triton")
    assert rel_l2(y, ref_s) <= SPLIT_REL_L2
    monkeypatch.setenv("SLAK_TRITON_FP32_PRECISION", "ieee")
    with TritonRan("lk_conv2d_fwd_kernel"):
        y = lk_conv2d(x, ws, backend="triton")
    assert_close(y, ref, torch.float32, 21 + 21, "y (ieee, tiled)")
    with TritonRan("lk_conv2d_matrix_fwd_kernel"):
        y = lk_conv2d(xs, ws, backend="triton")
    assert_close(y, ref_s, torch.float32, 21 + 21, "y (ieee, matrix)")
    monkeypatch.setenv("SLAK_TRITON_FP32_PRECISION", "bf16")
    with pytest.raises(ValueError, match="SLAK_TRITON_FP32_PRECISION.*bf16x6.*'bf16'"):
        lk_conv2d(x, ws, backend="triton")


@pytest.mark.parametrize("how", ["inplace", "data"])
def test_mask_changes_are_always_honoured(how):
    """The active lines are derived from the masks on every call, so a mask changed in place (even through
    ``.data``, which no version counter sees) changes the next output and gradient."""
    torch.manual_seed(11)
    x = torch.randn(2, 2, 10, 9, device=DEV, requires_grad=True)
    w = torch.randn(2, 1, 13, 5, device=DEV, requires_grad=True)
    m = torch.ones(2, 1, 13, 5, device=DEV)
    y1 = lk_conv2d(x, w, mask=m, backend="triton")
    target = m.data if how == "data" else m
    target[:, :, :, 1:3] = 0.0          # two lines off
    target[1, :, :, 4] = 0.0
    with TritonRan("fwd", "dw"):
        y2 = lk_conv2d(x, w, mask=m, backend="triton")
        y2.backward(torch.ones_like(y2))
    assert not torch.allclose(y1, y2)
    assert_close(y2, reference64(x, [w], None, [m]), torch.float32, 65, "y after the mask change")
    assert torch.equal(w.grad * (1 - m), torch.zeros_like(w.grad))


@pytest.mark.parametrize("path", ["auto", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_pattern_is_the_documented_one(bad, dtype, path):
    """The op's docstring: a non-finite x[n, c, r, q] makes non-finite every output F.conv2d does, plus at most
    the tall slot's columns |w - q| <= KW_T//2 and the wide slot's rows |h - r| <= KH_W//2 of the same image and
    channel; every other output is finite and exact."""
    torch.manual_seed(21)
    N, C, H, W, r, q = 2, 2, 20, 18, 7, 11
    x = torch.randn(N, C, H, W, device=DEV)
    x[1, 0, r, q] = bad
    ws = [torch.randn(C, 1, 9, 3, device=DEV), torch.randn(C, 1, 3, 11, device=DEV), torch.randn(C, 1, 3, 3, device=DEV)]
    x, ws = x.to(dtype), [w.to(dtype) for w in ws]
    with kernel_path(path), TritonRan("fwd"):
        y = lk_conv2d(x, ws, backend="triton")
    ref = reference64(x, ws, None, None)
    ours, theirs = ~torch.isfinite(y), ~torch.isfinite(ref)
    assert theirs.any() and bool((theirs & ~ours).sum() == 0), "an output F.conv2d makes non-finite is finite here"
    band = torch.zeros_like(ours)
    band[1, 0, :, q - 1:q + 2] = True          # tall slot: KW_T = 3
    band[1, 0, r - 1:r + 2, :] = True          # wide slot: KH_W = 3
    assert bool((ours & ~band & ~theirs).sum() == 0), "non-finite outputs outside the documented band"
    ok = ~ours
    assert_close(y.float()[ok], ref[ok], dtype, 9 * 3 + 3 * 11 + 9, "finite outputs")


# ----------------------------------------------------------------------------------------------------------------
# errors

# ----------------------------------------------------------------------------------------------------------------

def _ok():
    return torch.randn(1, 2, 8, 8), torch.randn(2, 1, 5, 3)


@pytest.mark.parametrize("make, exc, words", [
    (lambda: (torch.randn(2, 8, 8), torch.randn(2, 1, 3, 3)), ValueError, ["x", "4-D"]),
    (lambda: (torch.randn(1, 2, 8, 8), torch.randn(2, 2, 3, 3)), ValueError, ["weight", "[C, 1, kh, kw]"]),
    (lambda: (torch.randn(1, 2, 8, 8), torch.randn(3, 1, 3, 3)), ValueError, ["weight", "3", "2"]),
    (lambda: (torch.randn(1, 2, 8, 8), torch.randn(2, 1, 4, 3)), ValueError, ["weight", "odd", "kh=4"]),
    (lambda: (torch.randn(1, 2, 8, 8), torch.randn(2, 1, 65, 3)), ValueError, ["weight", "63", "65"]),
    (lambda: (torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3, dtype=torch.float16)), TypeError, ["weight", "float32", "float16"]),
    (lambda: (torch.randint(0, 3, (1, 2, 8, 8)), torch.randn(2, 1, 3, 3)), TypeError, ["x", "floating", "int64"]),
])
def test_bad_input_errors(make, exc, words):
    x, w = make()
    with pytest.raises(exc) as ei:
        lk_conv2d(x, w)
    for word in words:
        assert word in str(ei.value), f"{word!r} not in {ei.value}"


def test_bad_mask_bias_backend_errors():
    x, w = _ok()
    with pytest.raises(ValueError, match=r"mask.*\(2, 1, 5, 3\).*\(2, 1, 3, 3\)"):
        lk_conv2d(x, w, mask=torch.ones(2, 1, 3, 3))
    with pytest.raises(ValueError, match=r"mask: expected 2 entries.*got 1"):
        lk_conv2d(x, [w, w], mask=[None])
    with pytest.raises(ValueError, match=r"bias.*\(2,\).*\(3,\)"):
        lk_conv2d(x, w, torch.randn(3))
    with pytest.raises(ValueError, match=r"backend.*'cuda'"):
        lk_conv2d(x, w, backend="cuda")
    with pytest.raises(TypeError, match=r"backend='triton'.*float64"):
        lk_conv2d(x.double(), w.double(), backend="triton")
    with pytest.raises(ValueError, match="block_shape|kh"):
        block_shape(4, 3)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            lk_conv2d(x.cuda(), w)


# ----------------------------------------------------------------------------------------------------------------
# compile-only: every specialization compiles for sm_90 and sm_80 without spills
# ----------------------------------------------------------------------------------------------------------------

def test_every_specialization_compiles_for_sm90_and_sm80():
    """Default-config specializations (all dtypes, slot patterns, dense/sparse, forward/flip, dW) compile for sm_90
    and sm_80 with no spill; every autotune config compiles for sm_90 (spills there are the autotuner's to judge)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = [["--arch", "90"], ["--arch", "80"], ["--arch", "90", "--autotune-configs"]]
    procs = [subprocess.Popen([sys.executable, "-m", "slak_triton.ops.compile_check", *a], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for a in runs]
    outs = [p.communicate(timeout=1500)[0] for p in procs]
    for args, p, out in zip(runs, procs, outs):
        print(out)  # registers per specialization, shown with pytest -s
        assert "FAIL" not in out, out
        assert p.returncode == 0, out
        if "--autotune-configs" in args:
            assert out.count(" sm_90 ") == len(autotune_specializations(90))
        else:   # (the launches differ by arch)
            assert "SPILL" not in out, out
            assert out.count("ok sm_") + out.count("minor sm_") == len(specializations(int(args[1])))


# ----------------------------------------------------------------------------------------------------------------
# GPU tier
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_property_forward():
    """The forward property test at GPU sizes (the "gpu" hypothesis profile: H, W <= 64, kernels <= 63)."""
    test_forward_matches_conv2d_float64()


@pytest.mark.gpu
def test_gpu_property_backward():
    test_backward_matches_autograd_float64()


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    """Full opcheck (AOT dispatch included) and torch.compile of the compiled kernels."""
    test_opcheck()
    test_compile_fullgraph_matches_eager(torch.float32, (9, 8))
    test_compile_fullgraph_matches_eager(torch.bfloat16, (7, 6))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_slak_stage_shapes(dtype):
    """Full-size SLaK-T stage shapes (batch 8), forward and backward, compiled kernels, fp32 through tf32x3."""
    for C, H, K in [(124, 56, 51), (249, 28, 49), (499, 14, 47), (998, 7, 13)]:
        p = dict(N=8, C=C, H=H, W=H, shapes=[(K, 5), (5, K), (5, 5)], dtype=dtype, layout="contiguous", bias=True,
                 mask="block", density=0.6, seed=C)
        x, ws, b, ms = build(p, requires_grad=True)
        y = lk_conv2d(x, ws, b, mask=ms, backend="triton")
        assert_close(y, reference64(x, ws, b, ms), dtype, n_taps(p["shapes"]), f"y C={C}")
        y.backward(torch.randn_like(y))
        assert not torch.isnan(x.grad).any()


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration, opcheck, torch.compile
# ----------------------------------------------------------------------------------------------------------------

# Under the interpreter, AOT tracing cannot record an interpreted launch (the op raises instead of compiling a
# wrong graph), so test_aot_dispatch_dynamic runs in the GPU tier only.
OPCHECK_UTILS = None if ON_GPU else ("test_schema", "test_autograd_registration", "test_faketensor")


def _opcheck_cases():
    torch.manual_seed(3)
    x = torch.randn(1, 2, 6, 7, device=DEV, requires_grad=True)
    wt = torch.randn(2, 13, 3, device=DEV, requires_grad=True)
    ww = torch.randn(2, 3, 13, device=DEV, requires_grad=True)
    b = torch.randn(2, device=DEV, requires_grad=True)
    mt = (torch.rand(2, 13, 3, device=DEV) < 0.5).float()
    tl_, ti, tc = op_mod.line_metadata(mt, True)
    none3 = (None, None, None)
    return [
        (torch.ops.slak_triton.lk_conv2d_fwd.default, (x, wt, ww, b, *none3, *none3, False)),
        (torch.ops.slak_triton.lk_conv2d_fwd.default, (x, wt * mt, None, None, tl_, ti, tc, *none3, False)),
        (torch.ops.slak_triton.lk_conv2d_fwd.default, (x.bfloat16(), (wt * mt).bfloat16(), ww.bfloat16(), None, tl_,
                                                       ti, tc, *none3, False, True)),
        (torch.ops.slak_triton.lk_conv2d_bwd_dw.default, (x.detach(), torch.randn(1, 2, 6, 7, device=DEV), 13, 3, 3, 13, True)),
        # the fused backward (16-bit, a plane of the matrix kernels), sparse tall slot, dense wide slot
        (torch.ops.slak_triton.lk_conv2d_bwd.default, (x.detach().bfloat16(), torch.randn(1, 2, 6, 7, device=DEV).bfloat16(),
                                                       wt.detach().bfloat16(), ww.detach().bfloat16(), True, tl_, ti,
                                                       tc, *none3, False)),
    ]


def test_opcheck():
    for op, args in _opcheck_cases():
        result = torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)
        assert all(v == "SUCCESS" for v in result.values()), result


class _TwoBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(2, 1, 13, 3))
        self.v = torch.nn.Parameter(torch.randn(2, 1, 3, 13))
        self.register_buffer("m", (torch.rand(2, 1, 13, 3) < 0.6).float())

    def forward(self, x):
        return torch.relu(lk_conv2d(x, [self.w, self.v], mask=[self.m, None]))


@pytest.mark.parametrize("dtype, plane", [(torch.float32, (9, 8)), (torch.bfloat16, (7, 6))])
def test_compile_fullgraph_matches_eager(dtype, plane):
    """torch.compile(fullgraph=True) traces the op with no graph break (bf16 on 7 x 6: the fused backward). On
    CPU-only machines it runs the reference path (the interpreter cannot be compiled); on CUDA it compiles the
    Triton kernels."""
    torch.manual_seed(5)
    m = _TwoBranch().to(device=DEV, dtype=dtype)
    x = torch.randn(2, 2, *plane, device=DEV).to(dtype).requires_grad_(True)
    backend = "triton" if ON_GPU else "reference"
    cm = torch.compile(m, fullgraph=True)
    with slak_triton.use_backend(backend):
        y_c = cm(x)
        y_c.sum().backward()
        g_c = [x.grad.clone(), m.w.grad.clone(), m.v.grad.clone()]
        x.grad = m.w.grad = m.v.grad = None
        y_e = m(x)
        y_e.sum().backward()
        g_e = [x.grad, m.w.grad, m.v.grad]
    # the same kernels; autotuning may pick other configs (another order of the fp32 sums): one 16-bit rounding
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y_c, y_e, rtol=tol, atol=tol)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.skipif(ON_GPU, reason="interpreter-only guard")
def test_compile_of_interpreted_kernels_fails_loudly():
    m = _TwoBranch()
    cm = torch.compile(m, fullgraph=True)
    with slak_triton.use_backend("triton"), pytest.raises(Exception, match="TRITON_INTERPRET"):
        cm(torch.randn(1, 2, 9, 8))
