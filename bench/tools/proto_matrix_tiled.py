"""Prototype for the static model only (not installed, not launched by the op): the matrix forward of
``slak_triton.kernels.lk_conv2d`` on 16 x 16 grids (SLaK-T stage 3: 14 x 14 planes), tiled along its output pixels
because M [256, 256] per slot no longer fits one program. Program (tile t, channel c, image group g) builds
M[:, tile] (HT output rows of WP pixels) for the tall and the wide slot by the one-hot products of
``_offset_expand`` and computes Y[:, tile] = X @ M[:, tile] for IMG images, MB per dot. 16-bit, dense, with bias.
bench/NOTES.md ("Stage 3 on matrix kernels?") has its predictions; ``launch_plans`` is its plan:
    python bench/tools/sass_model_loops.py predict --plan proto_matrix_tiled:launch_plans \
        --plan-path bench/tools --plan-path . --kinds fwd --stages 3 --dtypes bfloat16 --density 1.0 --all
Run as a script (project venv, ``TRITON_INTERPRET=1``) it checks the kernel against float64 ``F.conv2d`` on a
few small planes, so that the numbers above are those of a correct kernel. Repository tool only."""
import math

import triton
import triton.language as tl

from slak_triton.kernels.lk_conv2d import _offset_grid


@triton.jit
def _offset_expand_tile(wk, h0, HP: tl.constexpr, WP: tl.constexpr, HT: tl.constexpr):
    """Columns p = (hp, wp), h0 <= hp < h0 + HT, of ``_offset_expand``'s M: [HP * WP, HT * WP]."""
    DH: tl.constexpr = wk.shape[0]
    DW: tl.constexpr = wk.shape[1]
    m = tl.arange(0, HP * HT)
    e_h = ((m // HT - (h0 + m % HT) + (HP - 1))[:, None] == tl.arange(0, DH)[None, :]).to(wk.dtype)
    a = tl.dot(e_h, wk).to(wk.dtype)
    k = tl.arange(0, WP * WP)
    e_w = (tl.arange(0, DW)[:, None] == (k // WP - k % WP + (WP - 1))[None, :]).to(wk.dtype)
    mp = tl.dot(a, e_w).to(wk.dtype)
    return tl.reshape(tl.permute(tl.reshape(mp, (HP, HT, WP, WP)), (0, 2, 1, 3)), (HP * WP, HT * WP))


@triton.jit
def mt_fwd_kernel(x_ptr, wt_ptr, ww_ptr, b_ptr, y_ptr, N, C, H, W,
                  sxn, sxc, sxh, sxw, syn, syc, syh, syw, swt_c, swt_h, swt_w, sww_c, sww_h, sww_w,
                  KH_T: tl.constexpr, KW_T: tl.constexpr, KH_W: tl.constexpr, KW_W: tl.constexpr,
                  HP: tl.constexpr, WP: tl.constexpr, HT: tl.constexpr, MB: tl.constexpr, IMG: tl.constexpr):
    """Grid: (HP // HT * C * cdiv(N, IMG),); arguments as ``lk_conv2d_matrix_fwd_kernel``'s (dense, 16-bit)."""
    T: tl.constexpr = HP // HT
    pid = tl.program_id(0)
    t = pid % T
    c = (pid // T) % C
    g = pid // (T * C)
    n_start = g.to(tl.int64) * IMG
    n_stop = tl.minimum(n_start + IMG, N)
    c64 = c.to(tl.int64)
    h0 = t * HT
    DH: tl.constexpr = 2 * HP
    DW: tl.constexpr = 2 * WP
    dh = tl.arange(0, DH)[:, None] - (HP - 1)
    dw = tl.arange(0, DW)[None, :] - (WP - 1)
    wk_t = _offset_grid(wt_ptr + c64 * swt_c, swt_h, swt_w, wt_ptr, dh, dw, KH_T, KW_T, True, False, False)
    wk_w = _offset_grid(ww_ptr + c64 * sww_c, sww_h, sww_w, ww_ptr, dh, dw, KH_W, KW_W, False, False, False)
    m_t = _offset_expand_tile(wk_t, h0, HP, WP, HT)
    m_w = _offset_expand_tile(wk_w, h0, HP, WP, HT)
    q = tl.arange(0, HP * WP)
    hq = q // WP
    wq = q % WP
    q_in = (hq < H) & (wq < W)
    p = tl.arange(0, HT * WP)
    hp = h0 + p // WP
    wp = p % WP
    p_in = (hp < H) & (wp < W)
    r = tl.arange(0, MB)
    off_x = r[:, None] * sxn + (hq * sxh + wq * sxw)[None, :]
    off_y = r[:, None] * syn + (hp * syh + wp * syw)[None, :]
    bias = tl.load(b_ptr + c).to(tl.float32)
    x_c = x_ptr + c64 * sxc
    y_c = y_ptr + c64 * syc
    for n0 in range(n_start, n_stop, MB):
        img = (n0 + r) < n_stop
        xt = tl.load(x_c + n0 * sxn + off_x, mask=img[:, None] & q_in[None, :], other=0.0)
        acc = tl.dot(xt, m_t, tl.zeros((MB, HT * WP), dtype=tl.float32))
        acc = tl.dot(xt, m_w, acc)
        acc += bias
        tl.store(y_c + n0 * syn + off_y, acc.to(y_ptr.dtype.element_ty), mask=img[:, None] & p_in[None, :])


def launch_plans(kind, N, C, H, W, K, dtype, density):
    """The prototype's candidates for a dense 16-bit forward on planes up to 16 x 16 (the plan interface of
    ``slak_triton.ops.compile_check.launch_plans``)."""
    if kind != "fwd" or density < 1 or dtype == "float32" or max(H, W) > 16:
        raise ValueError("the prototype covers the dense 16-bit forward on planes up to 16 x 16")
    eb = 4 if dtype == "float32" else 2
    HP = WP = 16
    pt = "ptr:bf16" if dtype == "bfloat16" else "ptr:fp16"
    plans = []
    for ht, mb, img, w in [(2, 64, 64, 4), (4, 64, 64, 4), (4, 64, 64, 8), (8, 64, 64, 8), (4, 32, 64, 4),
                           (4, 16, 64, 4), (8, 32, 64, 8), (16, 64, 64, 8), (16, 32, 64, 8)]:
        T = HP // ht
        args = dict(x_ptr=pt, wt_ptr=pt, ww_ptr=pt, b_ptr=pt, y_ptr=pt, N=N, C=C, H=H, W=W,
                    sxn=C * H * W, sxc=H * W, sxh=W, sxw=1, syn=C * H * W, syc=H * W, syh=W, syw=1,
                    swt_c=K * 5, swt_h=5, swt_w=1, sww_c=5 * K, sww_h=K, sww_w=1,
                    KH_T=K, KW_T=5, KH_W=5, KW_W=K, HP=HP, WP=WP, HT=ht, MB=mb, IMG=img)
        plans.append({"config": {"HT": ht, "MB": mb, "IMG": img, "num_warps": w},
                      "launches": [{"kernel": mt_fwd_kernel, "args": args, "num_warps": w, "num_stages": 1,
                                    "trips": {"mt_fwd_kernel.n0": math.ceil(img / mb)},
                                    "programs": C * T * math.ceil(N / img),
                                    "dram_bytes": 2 * N * C * H * W * eb}],
                      "torch_bytes": 0, "pixels": N * C * H * W})
    return plans


def _check():
    """The prototype against float64 F.conv2d under the interpreter (fp32 tensors stand in for 16-bit ones)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    for H, W, K, ht in [(14, 14, 47, 4), (13, 11, 9, 8), (7, 16, 13, 2)]:
        N, C = 3, 2
        x = torch.randn(N, C, H, W)
        wt, ww, b = torch.randn(C, K, 5), torch.randn(C, 5, K), torch.randn(C)
        y = torch.full_like(x, float("nan"))
        mt_fwd_kernel[(16 // ht * C * triton.cdiv(N, 2),)](
            x, wt, ww, b, y, N, C, H, W, *x.stride(), *y.stride(), *wt.stride(), *ww.stride(),
            KH_T=K, KW_T=5, KH_W=5, KW_W=K, HP=16, WP=16, HT=ht, MB=2, IMG=2)
        ref = F.conv2d(x.double(), wt.double()[:, None], b.double(), padding=(K // 2, 2), groups=C) + \
            F.conv2d(x.double(), ww.double()[:, None], None, padding=(2, K // 2), groups=C)
        err = (y.double() - ref).abs().max().item()
        print(f"{H}x{W} K{K} HT{ht}: max |error| {err:.2e}")
        if not err < 1e-4:
            raise SystemExit("the prototype does not compute the convolution")


if __name__ == "__main__":
    _check()
