"""Triton device code for the fused large-kernel depthwise convolution (``lk_conv2d``).

Device code only: no torch, no host logic. The launchers live in ``slak_triton.ops.lk_conv2d``.

Method (Toeplitz form, so the long kernel axis runs on tensor cores)
--------------------------------------------------------------------
The op sums up to two *slots* per channel, each a depthwise kernel centred on the output pixel:

* the **tall** slot ``wt[c, KH_T, KW_T]`` (long axis = H; SLaK's 51x5 branch with the 5x5 branch folded in),
* the **wide** slot ``ww[c, KH_W, KW_W]`` (long axis = W; SLaK's 5x51 branch).

For an output tile of ``BH x BW`` pixels, the tall slot's contribution for one short-axis column ``j`` and one
run of taps ``[lo, hi)`` along H is ``T @ X`` where ``X`` is a window of input rows (shifted by ``j`` columns) and
``T[h, r] = wt[c, lo + r - h, j]`` inside the run and 0 outside: a banded Toeplitz matrix gathered straight from the
weights with one masked load. The input rows are walked in chunks of ``CK`` rows, so each step is one
``tl.dot([BH, CK], [CK, BW])``. The wide slot is the transpose: ``X @ U`` with ``U[r, w] = ww[c, i, lo + r - w]``.

A *work item* is one (short-axis position, tap run) pair. Dense launches use one item per short-axis position
whose run covers the whole long axis. Sparse launches read per-channel compacted lists of active tap blocks
(``TB`` taps each) and do work only for those, so the time scales with the number of active blocks.

``FLIP`` computes the correlation with the kernel rotated by 180 degrees (the input gradient), reading the same
weights and block lists: a run ``[lo, hi)`` of the stored kernel is the run ``[K - hi, K - lo)`` of the flipped one.
"""

import triton
import triton.language as tl


def lk_conv2d_fwd_configs():
    """Autotune candidates for the forward/input-gradient kernel.

    BH x BW is the output tile; CK the input rows (tall) / columns (wide) per ``tl.dot``. All are >= 16 because
    ``tl.dot`` needs every dimension >= 16. Small tiles waste less of a 7x7 or 14x14 plane and give more programs;
    larger tiles re-read less input.
    """
    configs = []
    for bh, bw, ck, warps in [
        (16, 16, 16, 1),
        (16, 32, 16, 2),
        (32, 32, 16, 4),
        (32, 32, 32, 4),
        (32, 64, 16, 4),
        (64, 32, 16, 4),
        (64, 64, 16, 4),
        (64, 64, 32, 4),
        (64, 64, 32, 8),
    ]:
        for stages in (2, 3):
            configs.append(triton.Config({"BH": bh, "BW": bw, "CK": ck}, num_warps=warps, num_stages=stages))
    return configs


def lk_conv2d_default_config(H, W):
    """The one config used where autotuning is off (interpreter, compile-only test): small planes get small tiles."""
    bh = 16 if H <= 16 else 32
    bw = 16 if W <= 16 else 32
    return {"BH": bh, "BW": bw, "CK": 32, "num_warps": 4, "num_stages": 2}


@triton.jit
def _tall_run(
    acc, x_base, w_c_ptr, h0, w0, offs_h, offs_w, rr_row, rr_col,
    H, W, sxh, sxw, swh, sww,
    j, lo, hi,
    KH: tl.constexpr, KW: tl.constexpr, RUN: tl.constexpr, FLIP: tl.constexpr,
    BH: tl.constexpr, CK: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Adds the tall slot's taps ``[lo, hi)`` (of the possibly flipped kernel) at column ``j`` to ``acc[BH, BW]``.

    acc:     [BH, BW] fp32 accumulator.
    x_base:  pointer to x[n, c, 0, 0].
    w_c_ptr: pointer to the stored (unflipped) weights of channel c, [KH, KW] with strides (swh, sww).
    offs_h:  [BH] output rows; offs_w: [BW] output columns.
    rr_row:  arange(CK) laid out as rows of X; rr_col: arange(CK) laid out as columns of T.
    RUN:     the longest run any item can have (KH when dense, the block length when sparse).
    """
    # Input columns used by short-axis position j; zero padding by masking.
    cols = offs_w + (j - KW // 2)
    col_ok = (cols >= 0) & (cols < W)
    # Stored column index of the tap (the flipped kernel reads the mirrored column).
    if FLIP:
        j_st = KW - 1 - j
    else:
        j_st = j
    # A run of RUN taps for BH output rows touches BH + RUN - 1 input rows.
    for q in range(0, tl.cdiv(BH + RUN - 1, CK)):
        # Input rows of this chunk: h0 - KH//2 + lo + q*CK + [0, CK).
        rows = h0 + (lo - KH // 2 + q * CK) + rr_row
        row_ok = (rows >= 0) & (rows < H)
        xt = tl.load(
            x_base + rows[:, None] * sxh + cols[None, :] * sxw,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        # T[h, r]: tap index k = lo + q*CK + r - h of the (flipped) kernel, kept only inside [lo, hi).
        k = (lo + q * CK) + rr_col[None, :] - (offs_h - h0)[:, None]
        k_ok = (k >= lo) & (k < hi)
        if FLIP:
            k_st = KH - 1 - k
        else:
            k_st = k
        t = tl.load(w_c_ptr + k_st * swh + j_st * sww, mask=k_ok, other=0.0)
        if DOT_UPCAST:
            t = t.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(t, xt, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _wide_run(
    acc, x_base, w_c_ptr, h0, w0, offs_h, offs_w, rr_row, rr_col,
    H, W, sxh, sxw, swh, sww,
    i, lo, hi,
    KH: tl.constexpr, KW: tl.constexpr, RUN: tl.constexpr, FLIP: tl.constexpr,
    BW: tl.constexpr, CK: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Adds the wide slot's taps ``[lo, hi)`` (along W) at row ``i`` to ``acc[BH, BW]``: the transpose of
    ``_tall_run``. ``rr_row`` is arange(CK) laid out as rows of U, ``rr_col`` as columns of X."""
    rows = offs_h + (i - KH // 2)
    row_ok = (rows >= 0) & (rows < H)
    if FLIP:
        i_st = KH - 1 - i
    else:
        i_st = i
    for q in range(0, tl.cdiv(BW + RUN - 1, CK)):
        cols = w0 + (lo - KW // 2 + q * CK) + rr_col
        col_ok = (cols >= 0) & (cols < W)
        xt = tl.load(
            x_base + rows[:, None] * sxh + cols[None, :] * sxw,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        # U[r, w]: tap k = lo + q*CK + r - w along W.
        k = (lo + q * CK) + rr_row[:, None] - (offs_w - w0)[None, :]
        k_ok = (k >= lo) & (k < hi)
        if FLIP:
            k_st = KW - 1 - k
        else:
            k_st = k
        u = tl.load(w_c_ptr + i_st * swh + k_st * sww, mask=k_ok, other=0.0)
        if DOT_UPCAST:
            u = u.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(xt, u, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def lk_conv2d_fwd_kernel(
    # ---- pointers ----
    x_ptr,        # [N, C, H, W] input (any strides); for the input gradient: dy
    wt_ptr,       # [C, KH_T, KW_T] tall-slot weights (ignored when KH_T == 0)
    ww_ptr,       # [C, KH_W, KW_W] wide-slot weights (ignored when KH_W == 0)
    b_ptr,        # [C] bias (ignored unless HAS_BIAS)
    y_ptr,        # [N, C, H, W] output (any strides), fully overwritten
    t_items_ptr,  # [C, n_items_t] int32 active tall blocks per channel, item = col * NB_T + block (SPARSE_T only)
    t_count_ptr,  # [C] int32 number of active tall blocks per channel (SPARSE_T only)
    w_items_ptr,  # [C, n_items_w] int32 active wide blocks per channel, item = row * NB_W + block (SPARSE_W only)
    w_count_ptr,  # [C] int32 (SPARSE_W only)
    # ---- sizes ----
    C, H, W,
    # ---- strides (elements) ----
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    swt_c, swt_h, swt_w,
    sww_c, sww_h, sww_w,
    st_items, sw_items,   # row strides of the item lists
    # ---- meta-parameters ----
    KH_T: tl.constexpr, KW_T: tl.constexpr,   # tall slot kernel (0, 0 when absent)
    KH_W: tl.constexpr, KW_W: tl.constexpr,   # wide slot kernel (0, 0 when absent)
    TB_T: tl.constexpr, TB_W: tl.constexpr,   # taps per block along the long axis (sparse launches)
    SPARSE_T: tl.constexpr, SPARSE_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FLIP: tl.constexpr,       # correlate with the 180-degree rotated kernel (input gradient)
    WIDE_IDX: tl.constexpr,   # in-plane offsets in int64 (planes of 2**31 elements or more)
    DOT_PREC: tl.constexpr,   # "tf32x3" / "ieee" / "tf32" for fp32 operands; ignored for fp16/bf16
    DOT_UPCAST: tl.constexpr, # dot in fp32: set only under the interpreter for bf16, whose tl.dot (triton <= 3.8)
                              # multiplies the raw uint16 bit patterns; bf16 x bf16 products are exact in fp32
    BH: tl.constexpr, BW: tl.constexpr, CK: tl.constexpr,
):
    """One program computes one BH x BW output tile of one (n, c) plane: y = sum of slots (+ bias).

    Grid: (N * C * cdiv(H, BH) * cdiv(W, BW),), the tiles of one plane adjacent so that they share its input in L2.
    """
    tiles_w = tl.cdiv(W, BW)
    tiles_hw = tl.cdiv(H, BH) * tiles_w
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % tiles_hw
    nc = pid // tiles_hw
    c = nc % C
    n = nc // C
    th = tile // tiles_w
    tw = tile % tiles_w

    h0 = th * BH
    w0 = tw * BW
    if not WIDE_IDX:
        h0 = h0.to(tl.int32)
        w0 = w0.to(tl.int32)
    offs_h = h0 + tl.arange(0, BH)
    offs_w = w0 + tl.arange(0, BW)
    rr = tl.arange(0, CK)
    if WIDE_IDX:
        rr = rr.to(tl.int64)

    x_base = x_ptr + n * sxn + c * sxc
    acc = tl.zeros((BH, BW), dtype=tl.float32)

    if KH_T > 0:
        wt_c = wt_ptr + c * swt_c
        if SPARSE_T:
            NB_T: tl.constexpr = (KH_T + TB_T - 1) // TB_T
            cnt = tl.load(t_count_ptr + c)
            for it in range(0, cnt):
                item = tl.load(t_items_ptr + c * st_items + it)
                jj = item // NB_T
                b = item % NB_T
                lo_st = b * TB_T
                hi_st = tl.minimum(lo_st + TB_T, KH_T)
                if FLIP:
                    lo = KH_T - hi_st
                    hi = KH_T - lo_st
                    j = KW_T - 1 - jj
                else:
                    lo = lo_st
                    hi = hi_st
                    j = jj
                acc = _tall_run(acc, x_base, wt_c, h0, w0, offs_h, offs_w, rr, rr, H, W, sxh, sxw, swt_h, swt_w,
                                j, lo, hi, KH=KH_T, KW=KW_T, RUN=TB_T, FLIP=FLIP, BH=BH, CK=CK,
                                DOT_PREC=DOT_PREC, DOT_UPCAST=DOT_UPCAST)
        else:
            for j in range(0, KW_T):
                acc = _tall_run(acc, x_base, wt_c, h0, w0, offs_h, offs_w, rr, rr, H, W, sxh, sxw, swt_h, swt_w,
                                j, 0, KH_T, KH=KH_T, KW=KW_T, RUN=KH_T, FLIP=FLIP, BH=BH, CK=CK,
                                DOT_PREC=DOT_PREC, DOT_UPCAST=DOT_UPCAST)

    if KH_W > 0:
        ww_c = ww_ptr + c * sww_c
        if SPARSE_W:
            NB_W: tl.constexpr = (KW_W + TB_W - 1) // TB_W
            cnt_w = tl.load(w_count_ptr + c)
            for it in range(0, cnt_w):
                item = tl.load(w_items_ptr + c * sw_items + it)
                ii = item // NB_W
                b = item % NB_W
                lo_st = b * TB_W
                hi_st = tl.minimum(lo_st + TB_W, KW_W)
                if FLIP:
                    lo = KW_W - hi_st
                    hi = KW_W - lo_st
                    i = KH_W - 1 - ii
                else:
                    lo = lo_st
                    hi = hi_st
                    i = ii
                acc = _wide_run(acc, x_base, ww_c, h0, w0, offs_h, offs_w, rr, rr, H, W, sxh, sxw, sww_h, sww_w,
                                i, lo, hi, KH=KH_W, KW=KW_W, RUN=TB_W, FLIP=FLIP, BW=BW, CK=CK,
                                DOT_PREC=DOT_PREC, DOT_UPCAST=DOT_UPCAST)
        else:
            for i in range(0, KH_W):
                acc = _wide_run(acc, x_base, ww_c, h0, w0, offs_h, offs_w, rr, rr, H, W, sxh, sxw, sww_h, sww_w,
                                i, 0, KW_W, KH=KH_W, KW=KW_W, RUN=KW_W, FLIP=FLIP, BW=BW, CK=CK,
                                DOT_PREC=DOT_PREC, DOT_UPCAST=DOT_UPCAST)

    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)

    out_ok = (offs_h < H)[:, None] & (offs_w < W)[None, :]
    y_ptrs = y_ptr + n * syn + c * syc + offs_h[:, None] * syh + offs_w[None, :] * syw
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
