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
    # Measured on H100 (bench/NOTES.md, run 1): 64x64x16 best on 56x56 planes, 32x32x16 on 28x28, 16x16 on 7x7;
    # CK=32 and num_stages=3 never won by more than noise, so they are left out to keep autotuning short.
    # NB > 1 (several images per program, sharing each gathered Toeplitz tile) is untimed so far: predicted to cut
    # the weight-gather instructions per output by NB (bench/NOTES.md); the autotuner decides.
    configs = []
    for bh, bw, ck, nb, warps in [
        (16, 16, 16, 1, 1),
        (16, 32, 16, 1, 2),
        (32, 32, 16, 1, 4),
        (32, 64, 16, 1, 4),
        (64, 32, 16, 1, 4),
        (64, 64, 16, 1, 4),
        (64, 64, 32, 1, 8),
        (16, 16, 16, 4, 4),
        (16, 32, 16, 2, 4),
        (32, 32, 16, 2, 4),
        (64, 64, 16, 2, 8),
    ]:
        configs.append(triton.Config({"BH": bh, "BW": bw, "CK": ck, "NB": nb}, num_warps=warps, num_stages=2))
    return configs


def lk_conv2d_default_config(H, W, elem_bytes=2):
    """The one config used where autotuning is off (interpreter, compile-only test): small planes get small tiles.
    fp32 (tf32x3 splits every operand in three) needs 16-row tiles, 16-row chunks and no software pipelining to stay
    clear of spills on sm_80 and sm_90 (``python -m slak_triton.ops.compile_check``)."""
    bw = 16 if W <= 16 else 32
    if elem_bytes >= 4:
        return {"BH": 16, "BW": bw, "CK": 16, "num_warps": 4, "num_stages": 1}
    bh = 16 if H <= 16 else 32
    return {"BH": bh, "BW": bw, "CK": 16, "num_warps": 4, "num_stages": 2}


@triton.jit
def _tall_run(
    acc, x_c, w_c_ptr, h0, ar_h, wcol, nofs, n_ok, rr,
    H, W, sxh, sxw, swh, sww,
    j, lo, hi,
    KH: tl.constexpr, KW: tl.constexpr, RUN: tl.constexpr, FLIP: tl.constexpr,
    BH: tl.constexpr, CK: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Adds the tall slot's taps ``[lo, hi)`` (of the possibly flipped kernel) at column ``j`` to ``acc``.

    acc:     [BH, NB*BW] fp32 accumulator: NB images side by side along the columns.
    x_c:     pointer to x[n0, c, 0, 0] (n0: the program's first image).
    w_c_ptr: pointer to the stored (unflipped) weights of channel c, [KH, KW] with strides (swh, sww).
    h0:      the tile's first output row; ar_h: arange(BH).
    wcol:    [NB*BW] output column of each accumulator column; nofs: its image's offset from x_c (or 0);
    n_ok:    [NB*BW] the column's image exists (n < N). rr: arange(CK).
    RUN:     the longest run any item can have (KH when dense, the block length when sparse).
    """
    # Input columns used by short-axis position j; zero padding by masking.
    cols = wcol + (j - KW // 2)
    col_ok = (cols >= 0) & (cols < W) & n_ok
    col_off = nofs + cols * sxw
    # Stored column index of the tap (the flipped kernel reads the mirrored column).
    if FLIP:
        j_st = KW - 1 - j
    else:
        j_st = j
    # A run of RUN taps for BH output rows touches BH + RUN - 1 input rows, read CK rows per dot.
    for q in range(0, tl.cdiv(BH + RUN - 1, CK)):
        rows = h0 + (lo - KH // 2 + q * CK) + rr
        row_ok = (rows >= 0) & (rows < H)
        xt = tl.load(x_c + rows[:, None] * sxh + col_off[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        # T[h, r]: tap index k = lo + q*CK + r - h of the (flipped) kernel, kept only inside [lo, hi).
        k = (lo + q * CK) + rr[None, :] - ar_h[:, None]
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
    acc, x_c, w_c_ptr, w0, ar_w, hrow, nofs, n_ok, rr,
    H, W, sxh, sxw, swh, sww,
    i, lo, hi,
    KH: tl.constexpr, KW: tl.constexpr, RUN: tl.constexpr, FLIP: tl.constexpr,
    BW: tl.constexpr, CK: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """The transpose of ``_tall_run``: the wide slot's taps ``[lo, hi)`` along W at row ``i``, added to
    ``acc[NB*BH, BW]`` (NB images stacked along the rows; hrow / nofs / n_ok describe each accumulator row)."""
    rows = hrow + (i - KH // 2)
    row_ok = (rows >= 0) & (rows < H) & n_ok
    row_off = nofs + rows * sxh
    if FLIP:
        i_st = KH - 1 - i
    else:
        i_st = i
    for q in range(0, tl.cdiv(BW + RUN - 1, CK)):
        cols = w0 + (lo - KW // 2 + q * CK) + rr
        col_ok = (cols >= 0) & (cols < W)
        xt = tl.load(x_c + row_off[:, None] + cols[None, :] * sxw, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        # U[r, w]: tap k = lo + q*CK + r - w along W.
        k = (lo + q * CK) + rr[:, None] - ar_w[None, :]
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
    N, C, H, W,
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
    NB: tl.constexpr = 1,     # images per program: they share every gathered Toeplitz tile (fewer gathers/output)
):
    """One program computes one BH x BW output tile of one channel for NB consecutive images:
    y = sum of slots (+ bias).

    Grid: (cdiv(N, NB) * C * cdiv(H, BH) * cdiv(W, BW),), the tiles of one plane adjacent so that they share its
    input in L2. The tall slot accumulates [BH, NB*BW] (images side by side: one Toeplitz tile T serves all NB
    images in one wider dot), the wide slot [NB*BH, BW] (images stacked), combined once at the end.
    """
    tiles_w = tl.cdiv(W, BW)
    tiles_hw = tl.cdiv(H, BH) * tiles_w
    # Index arithmetic in int32 (the grid is < 2**31 programs; 64-bit division is a slow subroutine call);
    # pointer offsets of images and channels in int64.
    pid = tl.program_id(0)
    tile = pid % tiles_hw
    rest = pid // tiles_hw
    c = (rest % C).to(tl.int64)
    n0 = ((rest // C) * NB).to(tl.int64)
    th = tile // tiles_w
    tw = tile % tiles_w

    h0 = th * BH
    w0 = tw * BW
    if WIDE_IDX:
        h0 = h0.to(tl.int64)
        w0 = w0.to(tl.int64)
    ar_h = tl.arange(0, BH)
    ar_w = tl.arange(0, BW)
    rr = tl.arange(0, CK)
    if WIDE_IDX:
        rr = rr.to(tl.int64)

    # Tall layout: column cc of the accumulator = image cc // BW, output column w0 + cc % BW.
    cc = tl.arange(0, NB * BW)
    wcol = w0 + cc % BW
    n_ok_c = (n0 + cc // BW) < N
    # Wide layout: row rq = image rq // BH, output row h0 + rq % BH.
    rq = tl.arange(0, NB * BH)
    hrow = h0 + rq % BH
    n_ok_r = (n0 + rq // BH) < N
    if NB == 1:
        nofs_c = 0
        nofs_r = 0
    else:
        nofs_c = (cc // BW).to(tl.int64) * sxn
        nofs_r = (rq // BH).to(tl.int64) * sxn

    x_c = x_ptr + n0 * sxn + c * sxc
    acc_t = tl.zeros((BH, NB * BW), dtype=tl.float32)
    acc_w = tl.zeros((NB * BH, BW), dtype=tl.float32)

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
                acc_t = _tall_run(acc_t, x_c, wt_c, h0, ar_h, wcol, nofs_c, n_ok_c, rr, H, W, sxh, sxw, swt_h,
                                  swt_w, j, lo, hi, KH=KH_T, KW=KW_T, RUN=TB_T, FLIP=FLIP, BH=BH, CK=CK,
                                  DOT_PREC=DOT_PREC, DOT_UPCAST=DOT_UPCAST)
        else:
            for j in range(0, KW_T):
                acc_t = _tall_run(acc_t, x_c, wt_c, h0, ar_h, wcol, nofs_c, n_ok_c, rr, H, W, sxh, sxw, swt_h,
                                  swt_w, j, 0, KH_T, KH=KH_T, KW=KW_T, RUN=KH_T, FLIP=FLIP, BH=BH, CK=CK,
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
                acc_w = _wide_run(acc_w, x_c, ww_c, w0, ar_w, hrow, nofs_r, n_ok_r, rr, H, W, sxh, sxw, sww_h,
                                  sww_w, i, lo, hi, KH=KH_W, KW=KW_W, RUN=TB_W, FLIP=FLIP, BW=BW, CK=CK,
                                  DOT_PREC=DOT_PREC, DOT_UPCAST=DOT_UPCAST)
        else:
            for i in range(0, KH_W):
                acc_w = _wide_run(acc_w, x_c, ww_c, w0, ar_w, hrow, nofs_r, n_ok_r, rr, H, W, sxh, sxw, sww_h,
                                  sww_w, i, 0, KW_W, KH=KH_W, KW=KW_W, RUN=KW_W, FLIP=FLIP, BW=BW, CK=CK,
                                  DOT_PREC=DOT_PREC, DOT_UPCAST=DOT_UPCAST)

    # Bring the wide accumulator to the tall layout ([NB*BH, BW] -> [BH, NB*BW]) once per tile.
    if NB == 1:
        acc = acc_t + acc_w
    else:
        acc = acc_t + tl.reshape(tl.permute(tl.reshape(acc_w, (NB, BH, BW)), (1, 0, 2)), (BH, NB * BW))

    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)

    offs_h = h0 + ar_h
    out_ok = (offs_h < H)[:, None] & ((wcol < W) & n_ok_c)[None, :]
    if NB == 1:
        ynofs = 0
    else:
        ynofs = (cc // BW).to(tl.int64) * syn
    y_ptrs = y_ptr + n0 * syn + c * syc + offs_h[:, None] * syh + (ynofs + wcol * syw)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


def lk_conv2d_bwd_dw_configs():
    """Autotune candidates for the weight-gradient kernel: BH x BW is the dy tile consumed per step."""
    return [
        triton.Config({"BH": bh, "BW": bw}, num_warps=w, num_stages=s)
        # P = dy @ X^T is a [BH, pow2(BH + K - 1)] fp32 tile: wide windows need many warps to stay in registers
        # (compile-only check: 4 warps spill at 32x32 and up)
        for bh, bw, w in [(16, 16, 4), (16, 32, 4), (32, 32, 8), (32, 64, 8), (64, 32, 8), (64, 64, 16)]
        for s in (1,)
    ]


def lk_conv2d_bwd_dw_default_config(H, W, elem_bytes=2):
    """Untuned weight-gradient config. P = dy @ X^T must stay in registers: 32x32 tiles need 8 warps (16 for fp32,
    whose tf32x3 split triples the operands), fp32 16x16 tiles 2 warps (compile-only check, sm_80 and sm_90)."""
    bh = 16 if H <= 16 else 32
    bw = 16 if W <= 16 else 32
    if elem_bytes >= 4:
        return {"BH": bh, "BW": bw, "num_warps": 16 if bh * bw >= 1024 else 2, "num_stages": 1}
    return {"BH": bh, "BW": bw, "num_warps": 8 if bh * bw >= 1024 else 4, "num_stages": 1}


def _p2(n):
    return triton.next_power_of_2(n)


#: The weight-gradient kernel's derived meta-parameters (powers of two), from the tile, kernel and block sizes.
lk_conv2d_bwd_dw_derived = {
    "RT": lambda a: _p2(a["BH"] + a["KH_T"] - 1) if a["KH_T"] else 16,   # input rows per tall tile (dense)
    "KPT": lambda a: _p2(a["KH_T"]) if a["KH_T"] else 1,                  # padded tall taps
    "KWPT": lambda a: _p2(a["KW_T"]) if a["KW_T"] else 1,
    "RW": lambda a: _p2(a["BW"] + a["KW_W"] - 1) if a["KW_W"] else 16,   # input columns per wide tile (dense)
    "KPW": lambda a: _p2(a["KW_W"]) if a["KW_W"] else 1,                  # padded wide taps
    "KHPW": lambda a: _p2(a["KH_W"]) if a["KH_W"] else 1,
    "RBT": lambda a: max(16, _p2(a["BH"] + a["TB_T"] - 1)),              # input rows per tall block (sparse)
    "TBPT": lambda a: _p2(a["TB_T"]),                                     # padded taps per tall block
    "RBW": lambda a: max(16, _p2(a["BW"] + a["TB_W"] - 1)),
    "TBPW": lambda a: _p2(a["TB_W"]),
}


@triton.jit
def _dw_tall_run(
    acc, dy, x_base, h0, offs_w, ar_h, H, W, sxh, sxw, j, lo, hi,
    KH: tl.constexpr, KW: tl.constexpr, R: tl.constexpr, KP: tl.constexpr, KWP: tl.constexpr, TP: tl.constexpr,
    SCATTER: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Adds the gradient of the tall taps [lo, hi) at column j for one dy tile to ``acc[KP, KWP]``.

    dy: [BH, BW] tile at (h0, offs_w). R: input rows in the window (>= BH + (hi - lo) - 1), TP: padded run length.
    ``P = dy @ X^T`` ([BH, R]) correlates output row h with window row r; tap lo + t is the diagonal r = h + t.
    SCATTER: place the TP run values at rows lo..hi of acc (sparse blocks); else lo == 0 and TP == KP."""
    rows = h0 - KH // 2 + lo + tl.arange(0, R)
    cols = offs_w + (j - KW // 2)
    xt = tl.load(
        x_base + rows[:, None] * sxh + cols[None, :] * sxw,
        mask=((rows >= 0) & (rows < H))[:, None] & ((cols >= 0) & (cols < W))[None, :], other=0.0,
    )
    if DOT_UPCAST:
        xt = xt.to(tl.float32)
    p = tl.dot(dy, tl.trans(xt), input_precision=DOT_PREC)                      # [BH, R]
    diag = tl.minimum(ar_h[:, None] + tl.arange(0, TP)[None, :], R - 1)
    g = tl.sum(tl.gather(p, diag, axis=1), axis=0)                              # [TP]
    if SCATTER:
        t = lo + tl.arange(0, TP)
        sel = (tl.arange(0, KP)[:, None] == t[None, :]) & (t < hi)[None, :]
        g = tl.sum(tl.where(sel, g[None, :], 0.0), axis=1)                      # [KP]
    return acc + tl.where(tl.arange(0, KWP)[None, :] == j, g[:, None], 0.0)


@triton.jit
def _dw_wide_run(
    acc, dy, x_base, w0, offs_h, ar_w, H, W, sxh, sxw, i, lo, hi,
    KH: tl.constexpr, KW: tl.constexpr, R: tl.constexpr, KP: tl.constexpr, KHP: tl.constexpr, TP: tl.constexpr,
    SCATTER: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """The transpose of ``_dw_tall_run``: wide taps [lo, hi) along W at row i, into ``acc[KHP, KP]``."""
    cols = w0 - KW // 2 + lo + tl.arange(0, R)
    rows = offs_h + (i - KH // 2)
    xw = tl.load(
        x_base + rows[:, None] * sxh + cols[None, :] * sxw,
        mask=((rows >= 0) & (rows < H))[:, None] & ((cols >= 0) & (cols < W))[None, :], other=0.0,
    )
    if DOT_UPCAST:
        xw = xw.to(tl.float32)
    p = tl.dot(tl.trans(dy), xw, input_precision=DOT_PREC)                      # [BW, R]
    diag = tl.minimum(ar_w[:, None] + tl.arange(0, TP)[None, :], R - 1)
    g = tl.sum(tl.gather(p, diag, axis=1), axis=0)                              # [TP]
    if SCATTER:
        t = lo + tl.arange(0, TP)
        sel = (tl.arange(0, KP)[:, None] == t[None, :]) & (t < hi)[None, :]
        g = tl.sum(tl.where(sel, g[None, :], 0.0), axis=1)                      # [KP]
    return acc + tl.where(tl.arange(0, KHP)[:, None] == i, g[None, :], 0.0)


@triton.jit
def lk_conv2d_bwd_dw_kernel(
    # ---- pointers ----
    x_ptr,    # [N, C, H, W] forward input (any strides)
    dy_ptr,   # [N, C, H, W] output gradient (any strides)
    dwt_ptr,  # [S, C, KH_T, KW_T] fp32 partial tall-slot gradients, one slice per split (contiguous)
    dww_ptr,  # [S, C, KH_W, KW_W] fp32 partial wide-slot gradients (contiguous)
    db_ptr,   # [S, C] fp32 partial bias gradients
    t_items_ptr, t_count_ptr,  # tall block lists as in lk_conv2d_fwd_kernel (SPARSE_T only)
    w_items_ptr, w_count_ptr,  # wide block lists (SPARSE_W only)
    # ---- sizes ----
    N, C, H, W,
    n_splits,       # S: the (image, tile) work items are cut into S contiguous ranges, one per program along axis 1
    # ---- strides (elements) ----
    sxn, sxc, sxh, sxw,
    sdn, sdc, sdh, sdw,
    st_items, sw_items,
    # ---- meta-parameters ----
    KH_T: tl.constexpr, KW_T: tl.constexpr, KH_W: tl.constexpr, KW_W: tl.constexpr,
    TB_T: tl.constexpr, TB_W: tl.constexpr, SPARSE_T: tl.constexpr, SPARSE_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, WIDE_IDX: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr,
    # derived (lk_conv2d_bwd_dw_derived): window sizes and padded tap counts, all powers of two
    RT: tl.constexpr, KPT: tl.constexpr, KWPT: tl.constexpr, RW: tl.constexpr, KPW: tl.constexpr, KHPW: tl.constexpr,
    RBT: tl.constexpr, TBPT: tl.constexpr, RBW: tl.constexpr, TBPW: tl.constexpr,
):
    """Weight (and bias) gradients of both slots for one channel and one split of the (image, tile) work.

    Grid: (C, S). Deterministic: every program sums its own work items in a fixed order into registers and writes
    one fp32 partial; the host reduces the S partials with a fixed-order sum. No atomics.

    Tall slot, short-axis column j, one dy tile of BH x BW at (h0, w0): ``P = dy_tile @ X_j^T`` with ``X_j`` the
    input rows of the window shifted by ``j - KW_T//2`` columns, so ``P[h, r]`` correlates output row h with input
    row r; the tap gradients are diagonal sums of P, read with ``tl.gather``. The wide slot is the transpose.
    Dense: one window of all taps per short-axis position. Sparse: one window per active block only (taps of
    inactive blocks get no work and a zero gradient, which the mask zeroes anyway).
    """
    # Work-item arithmetic in int32 (N * tiles < 2**31; 64-bit division is a slow subroutine call); pointer
    # offsets of images and channels in int64.
    c = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    tiles_w = tl.cdiv(W, BW)
    tiles_hw = tl.cdiv(H, BH) * tiles_w
    n_work = N * tiles_hw
    work_per_prog = tl.cdiv(n_work, n_splits)
    start = s * work_per_prog
    stop = tl.minimum(start + work_per_prog, n_work)
    if SPARSE_T:
        NB_T: tl.constexpr = (KH_T + TB_T - 1) // TB_T
        cnt_t = tl.load(t_count_ptr + c)
    if SPARSE_W:
        NB_W: tl.constexpr = (KW_W + TB_W - 1) // TB_W
        cnt_w = tl.load(w_count_ptr + c)

    ar_h = tl.arange(0, BH)
    ar_w = tl.arange(0, BW)
    acc_t = tl.zeros((KPT, KWPT), dtype=tl.float32)
    acc_w = tl.zeros((KHPW, KPW), dtype=tl.float32)
    acc_b = tl.zeros((BH, BW), dtype=tl.float32)
    for it in range(start, stop):
        n = (it // tiles_hw).to(tl.int64)
        tile = it % tiles_hw
        h0 = (tile // tiles_w) * BH
        w0 = (tile % tiles_w) * BW
        if WIDE_IDX:
            h0 = h0.to(tl.int64)
            w0 = w0.to(tl.int64)
        offs_h = h0 + ar_h
        offs_w = w0 + ar_w
        x_base = x_ptr + n * sxn + c * sxc
        dy = tl.load(
            dy_ptr + n * sdn + c * sdc + offs_h[:, None] * sdh + offs_w[None, :] * sdw,
            mask=(offs_h < H)[:, None] & (offs_w < W)[None, :], other=0.0,
        )
        if HAS_BIAS:
            acc_b += dy.to(tl.float32)
        if DOT_UPCAST:
            dy = dy.to(tl.float32)
        if KH_T > 0:
            if SPARSE_T:
                for q in range(0, cnt_t):
                    item = tl.load(t_items_ptr + c * st_items + q)
                    lo = (item % NB_T) * TB_T
                    acc_t = _dw_tall_run(acc_t, dy, x_base, h0, offs_w, ar_h, H, W, sxh, sxw, item // NB_T, lo,
                                         tl.minimum(lo + TB_T, KH_T), KH=KH_T, KW=KW_T, R=RBT, KP=KPT, KWP=KWPT,
                                         TP=TBPT, SCATTER=True, DOT_PREC=DOT_PREC, DOT_UPCAST=DOT_UPCAST)
            else:
                for j in range(0, KW_T):
                    acc_t = _dw_tall_run(acc_t, dy, x_base, h0, offs_w, ar_h, H, W, sxh, sxw, j, 0, KH_T,
                                         KH=KH_T, KW=KW_T, R=RT, KP=KPT, KWP=KWPT, TP=KPT, SCATTER=False,
                                         DOT_PREC=DOT_PREC, DOT_UPCAST=DOT_UPCAST)
        if KH_W > 0:
            if SPARSE_W:
                for q in range(0, cnt_w):
                    item = tl.load(w_items_ptr + c * sw_items + q)
                    lo = (item % NB_W) * TB_W
                    acc_w = _dw_wide_run(acc_w, dy, x_base, w0, offs_h, ar_w, H, W, sxh, sxw, item // NB_W, lo,
                                         tl.minimum(lo + TB_W, KW_W), KH=KH_W, KW=KW_W, R=RBW, KP=KPW, KHP=KHPW,
                                         TP=TBPW, SCATTER=True, DOT_PREC=DOT_PREC, DOT_UPCAST=DOT_UPCAST)
            else:
                for i in range(0, KH_W):
                    acc_w = _dw_wide_run(acc_w, dy, x_base, w0, offs_h, ar_w, H, W, sxh, sxw, i, 0, KW_W,
                                         KH=KH_W, KW=KW_W, R=RW, KP=KPW, KHP=KHPW, TP=KPW, SCATTER=False,
                                         DOT_PREC=DOT_PREC, DOT_UPCAST=DOT_UPCAST)

    if KH_T > 0:
        kk = tl.arange(0, KPT)[:, None]
        jj = tl.arange(0, KWPT)[None, :]
        tl.store(dwt_ptr + ((s.to(tl.int64) * C + c) * KH_T + kk) * KW_T + jj, acc_t, mask=(kk < KH_T) & (jj < KW_T))
    if KH_W > 0:
        ii = tl.arange(0, KHPW)[:, None]
        kk2 = tl.arange(0, KPW)[None, :]
        tl.store(dww_ptr + ((s.to(tl.int64) * C + c) * KH_W + ii) * KW_W + kk2, acc_w, mask=(ii < KH_W) & (kk2 < KW_W))
    if HAS_BIAS:
        tl.store(db_ptr + s.to(tl.int64) * C + c, tl.sum(tl.sum(acc_b, axis=1), axis=0))
