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

Three families, by plane size: the *tiled* kernels above (any plane), the *plane* kernels (a whole plane of up to
64 x 64 per tile, ``lk_conv2d_plane_*``) and the *matrix* kernels (planes up to 8 x 8, 4 x 16, 16 x 4: a channel's
whole convolution as one matrix over the flattened plane, ``lk_conv2d_matrix_*``).
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
    fp32 (tf32x3 splits every operand in three) needs 16 x 16 tiles, 16-row chunks and no software pipelining to
    stay clear of spills on sm_80 and sm_90 for every slot pattern (``python -m slak_triton.ops.compile_check``;
    under triton 3.8 a 16 x 32 tile spills at 4 warps on sm_80 and at 8 warps on sm_90)."""
    bw = 16 if W <= 16 else 32
    if elem_bytes >= 4:
        return {"BH": 16, "BW": 16, "CK": 16, "num_warps": 4, "num_stages": 1}
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


# ==============================================================================================================
# Plane kernels (v3): one program = one channel, whole planes of several images (H, W <= 64)
# ==============================================================================================================
#
# Every SLaK stage at ImageNet resolution has planes of at most 56 x 56, so one output tile holds a whole plane
# (padded to BH x BW, powers of two) and the long-axis Toeplitz operands no longer depend on the tile: for the
# tall slot and short-axis position j,
#     T_j[h, r] = wt[c, r - h + KH_T // 2, j]      ([BH, BH]: output row h, input row r; 0 outside the kernel)
# so that   y_tall = sum_j T_j @ X_j   with   X_j[r, w] = x[r, w + j - KW_T // 2]   (input columns shifted by j);
# for the wide slot and short-axis position i,
#     U_i[q, w] = ww[c, i, q - w + KW_W // 2]      ([BW, BW]: input column q, output column w)
# so that   y_wide = sum_i X_i @ U_i   with   X_i[h, q] = x[h + i - KH_W // 2, q]   (input rows shifted by i).
# Zero padding is free: input rows/columns outside the plane are masked to 0, and the Toeplitz matrices need no
# halo because the whole plane is one window. A program builds the T_j and U_i of its channel ONCE (they stay in
# shared memory) and then streams images through them, NB images per tl.dot (tall: side by side along N;
# wide: stacked along M). The only per-image work is loading x (aligned 16-byte vectors for the wide slot and
# the centre column; the tall slot's shifted columns are 2- or 4-byte loads), the dots, and one store of y.
#
# A *line* is one short-axis position of a slot (a column of the tall kernel, a row of the wide kernel): the unit
# of block sparsity these kernels skip (``SPARSE_*``: per-channel 0/1 flags of active lines).


def lk_conv2d_plane_configs():
    """Autotune candidates of the plane forward kernel: NB images per tl.dot, IMG images per program (a multiple
    of NB; more images per program amortise building the Toeplitz operands, fewer give more programs), TALL_T (the
    tall slot transposed; pays on planes of 32 and less). The static model's ranking is in bench/NOTES.md."""
    return [
        triton.Config({"NB": nb, "IMG": img, "TALL_T": tt}, num_warps=w, num_stages=1)
        for nb, img, tt, w in [(1, 8, False, 4), (1, 16, False, 4), (1, 32, False, 4), (2, 16, False, 4),
                               (2, 32, False, 8), (4, 64, False, 4), (2, 16, True, 4), (4, 32, True, 4),
                               (4, 64, True, 4), (8, 64, True, 4), (8, 64, True, 8)]
    ]


def lk_conv2d_plane_default_config(H, W, elem_bytes=2):
    """The plane forward kernel's config where autotuning is off (interpreter, compile-only checks): near the
    static model's best per plane size (bench/NOTES.md) and spill-free for sm_80 and sm_90 under triton 3.6 to
    3.8; small planes stack more images per dot, tall slot transposed (fp32 splits on 32-padded planes: one image
    per dot). (On 64-padded planes the model's best, 4 warps, holds its [64, 64] fp32 accumulator in 250 registers
    under triton 3.6 but spills under 3.8.)"""
    if max(H, W) > 32:
        return {"NB": 1, "IMG": 32, "TALL_T": False, "num_warps": 8, "num_stages": 1}
    if elem_bytes == 4 and max(H, W) > 16:   # fp32 as bf16 splits on 32-padded planes: one image per dot
        return {"NB": 1, "IMG": 16, "TALL_T": False, "num_warps": 4, "num_stages": 1}
    return {"NB": 4, "IMG": 64, "TALL_T": True, "num_warps": 4, "num_stages": 1}


def lk_conv2d_plane_dw_configs():
    """Autotune candidates of the plane weight-gradient kernel: NB images per tl.dot (along its K dimension), LG
    lines accumulated per pass over the images (each pass loads dy once; LG [B, B] fp32 accumulators in
    registers at once). The static model's ranking is in bench/NOTES.md; on 32- and 16-padded planes (SLaK-T stages
    2-4) its best keep every line of a slot in one pass with 2 or 4 warps: fewer warps per program leave room for
    more resident programs, which hide the passes' global-load latency."""
    return [triton.Config({"NB": nb, "LG": lg}, num_warps=w, num_stages=1)
            for nb, lg, w in [(1, 1, 4), (1, 2, 4), (1, 3, 8), (1, 5, 8), (2, 2, 4), (2, 3, 8), (2, 5, 8), (4, 2, 4),
                              (4, 5, 4), (4, 5, 8), (2, 5, 2), (4, 5, 2), (2, 5, 4)]]


def lk_conv2d_plane_dw_split_configs(H, W):
    """The candidates of fp32 as bf16 splits (three parts of dy and x in registers): one image per dot (more
    spill kilobytes: NB 4 13 KB at 64-padded planes, and ptxas takes minutes over each), plus 3 lines per pass on
    4 warps and, on planes padded to 32 and less, 5 on 2 warps: the model's best at SLaK-T stages 2-4 (on
    64-padded planes 2 warps spill 44 KB)."""
    extra = [(1, 3, 4)] + ([(1, 5, 2)] if max(H, W) <= 32 else [])
    return [c for c in lk_conv2d_plane_dw_configs() if c.kwargs["NB"] == 1] + \
        [triton.Config({"NB": nb, "LG": lg}, num_warps=w, num_stages=1) for nb, lg, w in extra]


def lk_conv2d_plane_dw_stack_configs(H, W, split=False):
    """Autotune candidates of the stacked weight-gradient kernel (``lk_conv2d_plane_dw_stack_kernel``): NB images
    per tl.dot, warps. The static model's best (bench/NOTES.md): one image per dot on 32-padded planes, four on
    16-padded ones, 4 warps. fp32 as bf16 splits (three parts of every operand): one or two images per dot on 4
    warps (more spill kilobytes on 32-padded planes), and on 16-padded planes one on 2 warps (the model's best
    there)."""
    if split:
        shapes = [(1, 4), (2, 4)] + ([(1, 2)] if max(H, W) <= 16 else [])
    else:
        shapes = [(1, 4), (2, 4), (4, 4), (2, 8), (4, 8)]
    return [triton.Config({"NB": nb}, num_warps=w, num_stages=1) for nb, w in shapes]


def lk_conv2d_plane_dw_stack_default_config(H, W, elem_bytes=2):
    """The stacked weight-gradient kernel's config where autotuning is off: the static model's best per plane
    size, spill-free for sm_80 and sm_90 (compile check); fp32 (bf16 splits): one image per dot."""
    if max(H, W) > 16 or elem_bytes == 4:
        return {"NB": 1, "num_warps": 4, "num_stages": 1}
    return {"NB": 4, "num_warps": 4, "num_stages": 1}


def lk_conv2d_plane_dw_default_config(H, W, elem_bytes=2, sparse=False):
    """The plane weight-gradient kernel's config where autotuning is off (bench/NOTES.md), the largest LG that
    compiles spill-free for sm_80 and sm_90 (triton 3.6 to 3.8): on 64-padded planes 2 lines per pass (LG [64, 64]
    fp32 accumulators), on small planes every line of a SLaK slot (5) in one pass; 8 warps. fp32 as bf16 splits
    (three parts of dy held in registers as the A operands of every line): one image per dot, 4 warps, and per
    plane size the most lines per pass that compile spill-free: 5 (16-padded; the model's best, 2 warps, spills
    on 7x7 planes for sm_80), 2 (32-padded, a slot per launch; 3 are predicted 6% faster but spill under triton
    3.8), 1 (64-padded, a slot per launch; ``sparse`` launches there take 8 warps: on 4 the tall one spills)."""
    if elem_bytes == 4:
        lg, warps = (1, 8 if sparse else 4) if max(H, W) > 32 else (2, 4) if max(H, W) > 16 else (5, 4)
        return {"NB": 1, "LG": lg, "num_warps": warps, "num_stages": 1}
    if max(H, W) > 32:
        return {"NB": 1, "LG": 2, "num_warps": 8, "num_stages": 1}
    return {"NB": 4, "LG": 5, "num_warps": 8, "num_stages": 1}


def plane_pad(n):
    """BH / BW of the plane kernels: the plane's size rounded up to a power of two, at least 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _aligned(v, ALIGN: tl.constexpr):
    """``v`` unchanged, rewritten so that Triton's alignment analysis knows it is a multiple of ALIGN (the host
    checked it; ``tl.multiple_of`` on a scalar argument is dropped by triton 3.6)."""
    if ALIGN > 1:
        v = (v // ALIGN) * ALIGN
    return v


@triton.jit
def _plane_program(C, N, imgs_per_prog):
    """The plane kernels' program -> (channel c, image group g, first image n_start, end n_stop) for a grid of
    C * cdiv(N, imgs_per_prog) programs; n_start is int64 (image offsets n * stride may pass 2**31)."""
    pid = tl.program_id(0)
    c = pid % C
    g = pid // C
    n_start = g.to(tl.int64) * imgs_per_prog
    n_stop = tl.minimum(n_start + imgs_per_prog, N)
    return c, g, n_start, n_stop


@triton.jit
def _aligned_strides(sn, sc, sh, ALIGN: tl.constexpr):
    """A tensor's image, channel and row strides restated as multiples of ALIGN (``_aligned``)."""
    return _aligned(sn, ALIGN), _aligned(sc, ALIGN), _aligned(sh, ALIGN)


@triton.jit
def _in_registers(t):
    """``t`` itself (up to the sign of zeros): any elementwise op makes Triton feed a dot's A operand from registers
    rather than from shared memory, so that an operand shared by several dots is converted once and the wgmmas
    read only B from shared memory (adding +0.0 only turns -0.0 into +0.0, which no product sum can see)."""
    return t + 0.0


@triton.jit
def _line_on(act_ptr, c, line, LINES: tl.constexpr, SPARSE: tl.constexpr):
    """Whether line ``line`` of channel ``c`` is computed: its flag in the [C, LINES] table when SPARSE, else a
    compile-time True (the branch disappears)."""
    if SPARSE:
        return tl.load(act_ptr + c * LINES + line) != 0
    return True


@triton.jit
def _mma_anchor(acc, DT: tl.constexpr):
    """``acc`` unchanged (plus a k=16 product of zero tiles): keeps an accumulator that flows through line
    branches in the MMA layout. Without a dot after the branches, Triton propagates the store's layout back into
    them and converts the accumulator (through shared memory) inside every branch."""
    M: tl.constexpr = acc.shape[0]
    N: tl.constexpr = acc.shape[1]
    return tl.dot(tl.zeros((M, 16), dtype=DT), tl.zeros((16, N), dtype=DT), acc)


@triton.jit
def _operand_parts(v, NP: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    """The dot operands standing for ``v``: ``(v,)``, or when SPLIT its first NP bf16 parts v_0 + v_1 + v_2 = v
    (each the bf16 rounding of what the earlier parts leave; the residuals are exact in fp32, and three parts
    hold all 24 bits of an fp32 significand). UPCAST: the parts as fp32 (interpreter)."""
    if SPLIT:   # (one return statement: triton types every return alike, taken or not)
        parts = ()
        r = v
        for a in tl.static_range(NP):
            p = r.to(tl.bfloat16)
            if a + 1 < NP:
                r = r - p.to(tl.float32)
            if UPCAST:
                p = p.to(tl.float32)
            parts = parts + (p,)
    else:
        if UPCAST:
            v = v.to(tl.float32)
        parts = (v,)
    return parts


@triton.jit
def _a_operands(v, NP: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    """``_operand_parts`` of ``v`` kept in registers (``_in_registers``): A operands shared by several dots."""
    parts = _operand_parts(v, NP, SPLIT, UPCAST)
    out = ()
    for a in tl.static_range(NP):
        out = out + (_in_registers(parts[a]),)
    return out


@triton.jit
def _split_dots(a_parts, b_parts, acc, NP: tl.constexpr, B_T: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + sum over a + b < NP of a_parts[a] @ b_parts[b] (b_parts[b]^T when B_T; NP parts each): one product
    without splits, the six that matter of three-part splits."""
    for a in tl.static_range(NP):
        for b in tl.static_range(NP - a):
            if B_T:
                acc = tl.dot(a_parts[a], tl.trans(b_parts[b]), acc, input_precision=DOT_PREC)
            else:
                acc = tl.dot(a_parts[a], b_parts[b], acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _line_dots(acc, xps, mats, LINE: tl.constexpr, LINES: tl.constexpr, NS: tl.constexpr, XS: tl.constexpr,
               X_LEFT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + one line's products in the plane forward: its x parts ``xps`` (``_operand_parts``) times its Toeplitz
    operand of each of the launch's NS weight splits (``mats[s * LINES + LINE]``), split s with the parts a < XS - s;
    xps[a] @ M when X_LEFT, else M @ xps[a]. UPCAST: M as fp32 (interpreter)."""
    for s in tl.static_range(NS):
        m = mats[s * LINES + LINE]
        if UPCAST:
            m = m.to(tl.float32)
        for a in tl.static_range(XS - s):
            if X_LEFT:
                acc = tl.dot(xps[a], m, acc, input_precision=DOT_PREC)
            else:
                acc = tl.dot(m, xps[a], acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _toeplitz(w_c, s_tap, s_line, line, ar, live, K: tl.constexpr, LINES: tl.constexpr, FLIP: tl.constexpr,
              TALL: tl.constexpr):
    """The Toeplitz operand of one line of a slot (of the 180-degree rotated kernel when FLIP), 0 off the band:
    tall (w_c [K taps along H, LINES lines], s_tap = its row stride): T_j [BH(h), BH(r)] = w[r - h + K//2, j];
    wide (w_c [LINES, K], s_tap = its column stride): U_i [BW(q), BW(w)] = w[i, q - w + K//2].
    live: the line is computed (a runtime flag in sparse launches, else a compile-time True and no branch); an
    inactive line's operand is never read (its products are skipped), so its gather is skipped too and a zero tile
    stands in. The band is computed inside the branch: hoisted, its tiles lived across it and sparse launches
    spilled for sm_80 (64-padded bf16, 32-padded fp32 splits)."""
    t = tl.zeros((ar.shape[0], ar.shape[0]), dtype=w_c.dtype.element_ty)
    if live:
        if TALL:
            k = ar[None, :] - ar[:, None] + K // 2
        else:
            k = ar[:, None] - ar[None, :] + K // 2
        if FLIP:
            t = tl.load(w_c + (K - 1 - k) * s_tap + (LINES - 1 - line) * s_line, mask=(k >= 0) & (k < K), other=0.0)
        else:
            t = tl.load(w_c + k * s_tap + line * s_line, mask=(k >= 0) & (k < K), other=0.0)
    return t


@triton.jit
def lk_conv2d_plane_fwd_kernel(
    # ---- pointers ----
    x_ptr,        # [N, C, H, W] input (dy for the input gradient), any strides
    wt_ptr,       # [C, KH_T, KW_T] tall-slot weights (unused when KW_T == 0; SPLIT: [3, C, KH_T, KW_T] bf16)
    ww_ptr,       # [C, KH_W, KW_W] wide-slot weights (unused when KH_W == 0; SPLIT: [3, C, KH_W, KW_W] bf16)
    b_ptr,        # [C] bias (HAS_BIAS only)
    y_ptr,        # [N, C, H, W] output, any strides, fully overwritten (ADD_Y: added to)
    t_act_ptr,    # [C, KW_T] int32: 1 = tall line j of channel c has an active tap (SPARSE_T only)
    w_act_ptr,    # [C, KH_W] int32: 1 = wide line i active (SPARSE_W only)
    # ---- sizes ----
    N, C, H, W,
    # ---- strides (elements) ----
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    swt_c, swt_h, swt_w,
    sww_c, sww_h, sww_w,
    # ---- meta-parameters ----
    KH_T: tl.constexpr, KW_T: tl.constexpr,   # tall slot kernel (0, 0 when absent)
    KH_W: tl.constexpr, KW_W: tl.constexpr,   # wide slot kernel (0, 0 when absent)
    SPARSE_T: tl.constexpr, SPARSE_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FLIP: tl.constexpr,       # correlate with the 180-degree rotated kernels (the input gradient)
    ALIGN: tl.constexpr,      # W, the row / image / channel strides of x and y and both base pointers are
                              # multiples of ALIGN elements (host-checked; 16-byte vector loads when 16 // elt)
    WIDE_IDX: tl.constexpr,   # offsets inside a group of NB images in int64 (host: plane_wide_idx)
    DOT_PREC: tl.constexpr,   # input_precision of fp32 dots
    DOT_UPCAST: tl.constexpr, # dots in fp32 (interpreter + bf16 only: its tl.dot multiplies bf16 bit patterns)
    BH: tl.constexpr, BW: tl.constexpr,       # plane_pad(H), plane_pad(W)
    NB: tl.constexpr,         # images per tl.dot
    IMG: tl.constexpr,        # images per program (a multiple of NB)
    TALL_T: tl.constexpr = False,   # the tall slot as X_j^T @ T_j^T: images stacked along M as in the wide slot,
                                    # both Toeplitz operands B operands, the sum in the wide layout
    SPLIT_LO: tl.constexpr = 0,     # fp32 as bf16 splits (0, 0: off): x = x_0 + x_1 + x_2 exactly (split here, in
    SPLIT_HI: tl.constexpr = 0,     # registers), wt / ww hold [3, C, KH, KW] bf16 splits w_0 + w_1 + w_2 of the
                                    # fp32 weights; this launch adds the products x_a w_s with a + s <= 2 for
                                    # SPLIT_LO <= s < SPLIT_HI (6 bf16 products: within 2**-23 relative, fp32
                                    # sums)
    ADD_Y: tl.constexpr = False,    # y holds the sum of this call's earlier launches (fp32 splits on 64-padded
                                    # planes: a few weight splits or one slot per launch): add to it (bias there)
):
    """Grid: (C * cdiv(N, IMG),). Program (c, g) computes y[n, c] for the IMG images n of group g:
    y = sum_j T_j @ X_j + sum_i X_i @ U_i (+ bias), the T_j / U_i built once per program (see above)."""
    SPLIT: tl.constexpr = SPLIT_HI > 0
    NS: tl.constexpr = SPLIT_HI - SPLIT_LO if SPLIT else 1    # weight splits (Toeplitz sets) of this launch
    XS: tl.constexpr = 3 - SPLIT_LO if SPLIT else 1           # x parts this launch multiplies
    # One image per dot, tall slot untransposed: both slots' products are [BH, BW] in the same MMA layout, so they
    # share one fp32 accumulator (on 64-padded planes a second one costs 32 registers per thread at 4 warps).
    ONE_ACC: tl.constexpr = NB == 1 and not TALL_T
    c, _, n_start, n_stop = _plane_program(C, N, IMG)
    sxn, sxc, sxh = _aligned_strides(sxn, sxc, sxh, ALIGN)
    syn, syc, syh = _aligned_strides(syn, syc, syh, ALIGN)
    W = _aligned(W, ALIGN)
    ar_h = tl.arange(0, BH)
    ar_w = tl.arange(0, BW)
    if WIDE_IDX:
        ar_h = ar_h.to(tl.int64)
        ar_w = ar_w.to(tl.int64)
    c64 = c.to(tl.int64)

    # The channel's Toeplitz operands, built once (loop-invariant: they stay in shared memory) for its active lines
    # (the flags index the stored lines; FLIP reads stored line KW_T - 1 - j); weight split s of channel c is
    # channel s * C + c of the [3, C, KH, KW] splits.
    ts = ()
    us = ()
    for s in tl.static_range(SPLIT_LO, SPLIT_LO + NS):
        for j in tl.static_range(KW_T):
            t = _toeplitz(wt_ptr + (s * C + c64) * swt_c, swt_h, swt_w, j, ar_h,
                          _line_on(t_act_ptr, c, KW_T - 1 - j if FLIP else j, KW_T, SPARSE_T), KH_T, KW_T, FLIP, True)
            if TALL_T:
                t = tl.trans(t)
            ts = ts + (t,)
        for i in tl.static_range(KH_W):
            us = us + (_toeplitz(ww_ptr + (s * C + c64) * sww_c, sww_w, sww_h, i, ar_w,
                                 _line_on(w_act_ptr, c, KH_W - 1 - i if FLIP else i, KH_W, SPARSE_W), KW_W, KH_W, FLIP,
                                 False),)

    # Tall layout: accumulator column cc = image cc // BW, column cc % BW; wide layout: row rq = image rq // BH.
    cc = tl.arange(0, NB * BW)
    cw = cc % BW
    cb = cc // BW
    rq = tl.arange(0, NB * BH)
    rh = rq % BH
    rb = rq // BH
    if WIDE_IDX:
        cw = cw.to(tl.int64)
        cb = cb.to(tl.int64)
        rh = rh.to(tl.int64)
        rb = rb.to(tl.int64)
    x_c = x_ptr + c64 * sxc
    y_c = y_ptr + c64 * syc
    BIAS: tl.constexpr = HAS_BIAS and not ADD_Y   # (the first of several launches adds it)
    if BIAS:
        bias = tl.load(b_ptr + c).to(tl.float32)
    row_in = ar_h < H
    # the dots' operand type (the anchors of sparse accumulators must match it)
    OP_DT: tl.constexpr = tl.float32 if DOT_UPCAST else (tl.bfloat16 if SPLIT else x_ptr.dtype.element_ty)

    # Offsets inside a group of NB images from its first image (int32 unless WIDE_IDX): loop-invariant.
    if NB == 1:   # one tile for both layouts, no image terms (fewer loop-invariant tiles held in registers)
        off_t = ar_h[:, None] * sxh + ar_w[None, :] * sxw
        off_w = off_t
        off_y = ar_h[:, None] * syh + ar_w[None, :] * syw
    else:
        off_t = cb[None, :] * sxn + ar_h[:, None] * sxh + cw[None, :] * sxw      # tall layout [BH, NB*BW]
        off_w = rb[:, None] * sxn + rh[:, None] * sxh + ar_w[None, :] * sxw      # wide layout [NB*BH, BW]
        off_y = cb[None, :] * syn + ar_h[:, None] * syh + cw[None, :] * syw
    off_tt = off_t     # (unused unless TALL_T)
    off_yw = off_y
    if TALL_T:
        # the tall operand X_j^T [NB*BW, BH]: row (image, column), column = input row
        qb = tl.arange(0, NB * BW) // BW
        qw = tl.arange(0, NB * BW) % BW
        off_tt = qb[:, None] * sxn + qw[:, None] * sxw + ar_h[None, :] * sxh
        off_yw = rb[:, None] * syn + rh[:, None] * syh + ar_w[None, :] * syw

    for n0 in range(n_start, n_stop, NB):
        if TALL_T:
            acc_t = tl.zeros((NB * BW, BH), dtype=tl.float32)
        else:
            acc_t = tl.zeros((BH, NB * BW), dtype=tl.float32)
        if not ONE_ACC:
            acc_w = tl.zeros((NB * BH, BW), dtype=tl.float32)
        if NB == 1:   # (the loop's own bound)
            img_c = True
            img_r = True
        else:
            img_c = (n0 + cb) < n_stop
            img_r = (n0 + rb) < n_stop
        x_g = x_c + n0 * sxn      # the group's first image (n0 is int64)
        for j in tl.static_range(KW_T):
            # (the flags index the stored lines; FLIP reads stored line KW_T - 1 - j)
            if _line_on(t_act_ptr, c, KW_T - 1 - j if FLIP else j, KW_T, SPARSE_T):
                if TALL_T:
                    qcols = tl.arange(0, NB * BW) % BW + (j - KW_T // 2)
                    qimg = (n0 + tl.arange(0, NB * BW) // BW) < n_stop
                    xt = tl.load(x_g + off_tt + (j - KW_T // 2) * sxw,
                                 mask=((qcols >= 0) & (qcols < W) & qimg)[:, None] & row_in[None, :], other=0.0)
                else:
                    cols = cw + (j - KW_T // 2)
                    xt = tl.load(x_g + off_t + (j - KW_T // 2) * sxw,
                                 mask=row_in[:, None] & ((cols >= 0) & (cols < W) & img_c)[None, :], other=0.0)
                acc_t = _line_dots(acc_t, _operand_parts(xt, XS, SPLIT, DOT_UPCAST), ts, j, KW_T, NS, XS,
                                   TALL_T, DOT_UPCAST, DOT_PREC)
        if SPARSE_T:
            acc_t = _mma_anchor(acc_t, OP_DT)
        if ONE_ACC:   # the wide lines add to the tall lines' sum
            acc_w = acc_t
        for i in tl.static_range(KH_W):
            if _line_on(w_act_ptr, c, KH_W - 1 - i if FLIP else i, KH_W, SPARSE_W):
                rows = rh + (i - KH_W // 2)
                xw = tl.load(x_g + off_w + (i - KH_W // 2) * sxh,
                             mask=((rows >= 0) & (rows < H) & img_r)[:, None] & (ar_w < W)[None, :], other=0.0)
                acc_w = _line_dots(acc_w, _operand_parts(xw, XS, SPLIT, DOT_UPCAST), us, i, KH_W, NS, XS,
                                   True, DOT_UPCAST, DOT_PREC)
        if SPARSE_W:
            acc_w = _mma_anchor(acc_w, OP_DT)
        if TALL_T:   # everything in the wide layout [NB*BH, BW]
            acc = acc_w + tl.reshape(tl.permute(tl.reshape(acc_t, (NB, BW, BH)), (0, 2, 1)), (NB * BH, BW))
            if BIAS:
                acc += bias
            out_ok = ((rh < H) & img_r)[:, None] & (ar_w < W)[None, :]
            if ADD_Y:
                acc += tl.load(y_c + n0 * syn + off_yw, mask=out_ok, other=0.0)
            tl.store(y_c + n0 * syn + off_yw, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
        else:
            if ONE_ACC:
                acc = acc_w
            elif NB == 1:
                acc = acc_t + acc_w
            else:   # the wide accumulator to the tall layout, once per NB images
                acc = acc_t + tl.reshape(tl.permute(tl.reshape(acc_w, (NB, BH, BW)), (1, 0, 2)), (BH, NB * BW))
            if BIAS:
                acc += bias
            out_ok = row_in[:, None] & ((cw < W) & img_c)[None, :]
            if ADD_Y:
                acc += tl.load(y_c + n0 * syn + off_y, mask=out_ok, other=0.0)
            tl.store(y_c + n0 * syn + off_y, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


# --------------------------------------------------------------------------------------------------------------
# Small planes: the whole convolution of a channel as one matrix (``lk_conv2d_matrix_*``)
# --------------------------------------------------------------------------------------------------------------
# On small planes (SLaK's stage 4: 7 x 7) a 16-padded Toeplitz tile is under a fifth useful and every line is its
# own product. There the channel's whole convolution is one matrix instead. Pixels sit on a power-of-two grid
# (``matrix_grid``: HP x WP <= 64, pixel (h, w) at h * WP + w): y[n, p] = sum_q x[n, q] M[q, p] with
# M[q, p] = wt[dh + KH_T//2, dw + KW_T//2] + ww[dh + KH_W//2, dw + KW_W//2] for (dh, dw) = pixel q - pixel p (0
# outside a kernel). For a 13-tap kernel on a 7 x 7 plane 83% of M's 49 x 49 pixel pairs are taps, and one
# [MB, PP] @ [PP, PP] product per MB images does all of it, images along M. M depends only on the offsets, so it
# is expanded from the weights at every offset by products with one-hot matrices (``_offset_expand``), and the
# weight gradient sums along the offsets the same way (``_offset_sums``).


def lk_conv2d_matrix_configs():
    """Autotune candidates of the matrix forward: MB images per tl.dot (its M), IMG images per program (a multiple
    of MB; the forward builds its matrix once per program). The static model's ranking is in bench/NOTES.md."""
    return [triton.Config({"MB": mb, "IMG": img}, num_warps=w, num_stages=1)
            for mb, img, w in [(16, 16, 4), (16, 64, 4), (32, 64, 4), (64, 64, 4), (64, 128, 4), (64, 64, 8)]]


def lk_conv2d_matrix_default_config(N):
    """The matrix forward's config where autotuning is off: near the static model's best for the batch
    (bench/NOTES.md), spill-free for sm_80 and sm_90 (compile check)."""
    if N > 16:
        return {"MB": 64, "IMG": 64, "num_warps": 4, "num_stages": 1}
    return {"MB": 16, "IMG": 64, "num_warps": 4, "num_stages": 1}


def matrix_grid(h, w):
    """(HP, WP) of the matrix kernels: the plane's rows and columns padded to powers of two, at least 4 (their
    offset products run over HP * HP and WP * WP pixel pairs: tl.dot's dimensions >= 16). Pixel (h, w) is index
    h * WP + w of an HP * WP vector."""
    return max(4, triton.next_power_of_2(h)), max(4, triton.next_power_of_2(w))


@triton.jit
def _offset_grid(w_c, s_h, s_w, act_c, dh, dw, KH: tl.constexpr, KW: tl.constexpr, TALL: tl.constexpr,
                 FLIP: tl.constexpr, SPARSE: tl.constexpr):
    """One slot's weight at every pixel offset (dh, dw) (tensors of one shape): w_c [KH, KW] (strides s_h, s_w),
    rotated by 180 degrees when FLIP; 0 outside the kernel and, when SPARSE, on its inactive lines (act_c [lines]
    0/1, indexing the stored lines: the columns of a tall slot, the rows of a wide one)."""
    if FLIP:
        kh = KH // 2 - dh
        kw = KW // 2 - dw
    else:
        kh = dh + KH // 2
        kw = dw + KW // 2
    ok = (kh >= 0) & (kh < KH) & (kw >= 0) & (kw < KW)
    if SPARSE:
        if TALL:
            ok = ok & (tl.load(act_c + kw, mask=ok, other=0) != 0)
        else:
            ok = ok & (tl.load(act_c + kh, mask=ok, other=0) != 0)
    return tl.load(w_c + kh * s_h + kw * s_w, mask=ok, other=0.0)


@triton.jit
def _offset_expand(wk, HP: tl.constexpr, WP: tl.constexpr):
    """The channel matrix M [HP * WP (q), HP * WP (p)] of the offset grid wk [DH, DW] (offset (dh, dw) at
    (dh + HP - 1, dw + WP - 1)): M[q, p] = wk[hq - hp + HP - 1, wq - wp + WP - 1] for pixels q = hq * WP + wq,
    p = hp * WP + wp. Two products with one-hot matrices (each output selects one weight: exact in wk's 16-bit
    or fp32 type), then [hq, hp, wq, wp] -> [hq, wq, hp, wp]."""
    DH: tl.constexpr = wk.shape[0]
    DW: tl.constexpr = wk.shape[1]
    m = tl.arange(0, HP * HP)      # (hq, hp) = (m // HP, m % HP)
    e_h = ((m // HP - m % HP + (HP - 1))[:, None] == tl.arange(0, DH)[None, :]).to(wk.dtype)
    a = tl.dot(e_h, wk).to(wk.dtype)                                       # [(hq, hp), DW]
    k = tl.arange(0, WP * WP)      # (wq, wp) = (k // WP, k % WP)
    e_w = (tl.arange(0, DW)[:, None] == (k // WP - k % WP + (WP - 1))[None, :]).to(wk.dtype)
    mp = tl.dot(a, e_w).to(wk.dtype)                                       # [(hq, hp), (wq, wp)]
    return tl.reshape(tl.permute(tl.reshape(mp, (HP, HP, WP, WP)), (0, 2, 1, 3)), (HP * WP, HP * WP))


@triton.jit
def _channel_matrices(wt_c, swt_h, swt_w, ww_c, sww_h, sww_w, t_act_c, w_act_c, KH_T: tl.constexpr,
                      KW_T: tl.constexpr, KH_W: tl.constexpr, KW_W: tl.constexpr, SPARSE_T: tl.constexpr,
                      SPARSE_W: tl.constexpr, FLIP: tl.constexpr, F32: tl.constexpr, SPLIT: tl.constexpr,
                      UPCAST: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr):
    """One channel's matrices M [PP, PP] (``_offset_expand``) of its tall (wt_c [KH_T, KW_T]) and wide (ww_c
    [KH_W, KW_W]) slots, rotated by 180 degrees when FLIP, inactive lines read as 0 when SPARSE (t_act_c / w_act_c:
    the channel's line flags). 16-bit (not F32): one exact matrix per slot present. F32: the slots' fp32 sum (a tap
    in both slots rounds once, as the fp32 sum of their products would) as three exact bf16 parts when SPLIT, else
    the parts summed back into one fp32 matrix (for fp32 dots). UPCAST: the parts as fp32 (interpreter)."""
    DH: tl.constexpr = 2 * HP if 2 * HP > 16 else 16      # offsets per axis (2 HP - 1 used; tl.dot: >= 16)
    DW: tl.constexpr = 2 * WP if 2 * WP > 16 else 16
    dh = tl.arange(0, DH)[:, None] - (HP - 1)
    dw = tl.arange(0, DW)[None, :] - (WP - 1)
    if KW_T > 0:
        wk_t = _offset_grid(wt_c, swt_h, swt_w, t_act_c, dh, dw, KH_T, KW_T, True, FLIP, SPARSE_T)
    if KH_W > 0:
        wk_w = _offset_grid(ww_c, sww_h, sww_w, w_act_c, dh, dw, KH_W, KW_W, False, FLIP, SPARSE_W)
    if F32:
        if KW_T > 0 and KH_W > 0:
            wk = wk_t + wk_w
        elif KW_T > 0:
            wk = wk_t
        else:
            wk = wk_w
        # its three exact bf16 parts expanded one by one (the expansion selects: exact)
        wps = _operand_parts(wk, 3, True, UPCAST)
        mps = ()
        for a in tl.static_range(3):
            mps = mps + (_offset_expand(wps[a], HP, WP),)
        if not SPLIT:
            mps = (mps[0].to(tl.float32) + mps[1].to(tl.float32) + mps[2].to(tl.float32),)
    else:
        if KW_T > 0:
            mps = (_offset_expand(_operand_parts(wk_t, 1, False, UPCAST)[0], HP, WP),)
        if KH_W > 0:
            mws = (_offset_expand(_operand_parts(wk_w, 1, False, UPCAST)[0], HP, WP),)
            if KW_T > 0:
                mps = mps + mws
            else:
                mps = mws
    return mps


@triton.jit
def _matrix_dot(a_parts, mps, acc, F32: tl.constexpr, NP: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + A @ M for the operand parts of A (``_operand_parts``, NP of them) and the channel's matrices
    (``_channel_matrices``): the split products of the fp32 sum, or one product per 16-bit slot matrix."""
    if F32:
        acc = _split_dots(a_parts, mps, acc, NP, False, DOT_PREC)
    else:
        for k in tl.static_range(len(mps)):
            acc = tl.dot(a_parts[0], mps[k], acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _matrix_tile(sn, sh, sw, H, W, HP: tl.constexpr, WP: tl.constexpr, MB: tl.constexpr, WIDE_IDX: tl.constexpr):
    """(offsets [MB, PP] of MB consecutive images' planes on the HP x WP grid for strides sn, sh, sw, in int64 when
    WIDE_IDX; the grid's pixels inside the H x W plane [PP])."""
    q = tl.arange(0, HP * WP)
    hq = q // WP
    wq = q % WP
    q_in = (hq < H) & (wq < W)
    r = tl.arange(0, MB)
    if WIDE_IDX:
        r = r.to(tl.int64)
        hq = hq.to(tl.int64)
        wq = wq.to(tl.int64)
    return r[:, None] * sn + (hq * sh + wq * sw)[None, :], q_in


@triton.jit
def lk_conv2d_matrix_fwd_kernel(
    # ---- pointers ----
    x_ptr,        # [N, C, H, W] input (dy for the input gradient), any strides
    wt_ptr,       # [C, KH_T, KW_T] tall-slot weights (unused when KW_T == 0)
    ww_ptr,       # [C, KH_W, KW_W] wide-slot weights (unused when KH_W == 0)
    b_ptr,        # [C] bias (HAS_BIAS only)
    y_ptr,        # [N, C, H, W] output, any strides, fully overwritten
    t_act_ptr,    # [C, KW_T] int32: 1 = tall line j of channel c has an active tap (SPARSE_T only)
    w_act_ptr,    # [C, KH_W] int32: 1 = wide line i active (SPARSE_W only)
    # ---- sizes ----
    N, C, H, W,
    # ---- strides (elements) ----
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    swt_c, swt_h, swt_w,
    sww_c, sww_h, sww_w,
    # ---- meta-parameters ----
    KH_T: tl.constexpr, KW_T: tl.constexpr,   # tall slot kernel (0, 0 when absent)
    KH_W: tl.constexpr, KW_W: tl.constexpr,   # wide slot kernel (0, 0 when absent)
    SPARSE_T: tl.constexpr, SPARSE_W: tl.constexpr,   # inactive lines' weights read as 0 (the work is the same)
    HAS_BIAS: tl.constexpr,
    FLIP: tl.constexpr,       # correlate with the 180-degree rotated kernels (the input gradient)
    WIDE_IDX: tl.constexpr,   # offsets inside a group of MB images in int64 (host: matrix_wide_idx)
    SPLIT: tl.constexpr,      # fp32 as bf16 splits: x and M as three bf16 parts each, the six products that
                              # matter summed in fp32 (as the plane kernels' bf16x6)
    DOT_PREC: tl.constexpr,   # input_precision of fp32 dots (fp32 without SPLIT)
    DOT_UPCAST: tl.constexpr, # dots in fp32 (interpreter: its tl.dot multiplies bf16 bit patterns)
    HP: tl.constexpr,         # the plane's rows and columns padded to powers of two (matrix_grid), HP * WP <= 64:
    WP: tl.constexpr,         # pixel (h, w) is index h * WP + w
    MB: tl.constexpr,         # images per tl.dot (its M)
    IMG: tl.constexpr,        # images per program (a multiple of MB)
):
    """Grid: (C * cdiv(N, IMG),). Program (c, g) computes y[n, c] for the IMG images n of group g:
    Y [MB, PP] = X [MB, PP] @ M [PP, PP] (+ bias) per MB images (PP = HP * WP). M is built once per program from
    the slots' weights at every pixel offset (an [DH, DW] grid: a few hundred loads) by two products with one-hot
    matrices (``_offset_expand``). 16-bit: the tall and wide slots as two matrices, each exact in the weights'
    dtype; fp32: their fp32 sum, expanded as three bf16 parts. Every entry is computed (the work does not depend on
    the taps); in sparse launches the offset grid reads an inactive line's weights as 0."""
    c, _, n_start, n_stop = _plane_program(C, N, IMG)
    c64 = c.to(tl.int64)
    F32: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    NP: tl.constexpr = 3 if SPLIT else 1
    mps = _channel_matrices(wt_ptr + c64 * swt_c, swt_h, swt_w, ww_ptr + c64 * sww_c, sww_h, sww_w,
                            t_act_ptr + c * KW_T, w_act_ptr + c * KH_W, KH_T, KW_T, KH_W, KW_W, SPARSE_T, SPARSE_W,
                            FLIP, F32, SPLIT, DOT_UPCAST, HP, WP)
    off_x, q_in = _matrix_tile(sxn, sxh, sxw, H, W, HP, WP, MB, WIDE_IDX)
    off_y, _ = _matrix_tile(syn, syh, syw, H, W, HP, WP, MB, WIDE_IDX)
    x_c = x_ptr + c64 * sxc
    y_c = y_ptr + c64 * syc
    if HAS_BIAS:
        bias = tl.load(b_ptr + c).to(tl.float32)
    for n0 in range(n_start, n_stop, MB):
        ok = ((n0 + tl.arange(0, MB)) < n_stop)[:, None] & q_in[None, :]
        xt = tl.load(x_c + n0 * sxn + off_x, mask=ok, other=0.0)
        acc = _matrix_dot(_operand_parts(xt, NP, SPLIT, DOT_UPCAST), mps, tl.zeros((MB, HP * WP), dtype=tl.float32),
                          F32, NP, DOT_PREC)
        if HAS_BIAS:
            acc += bias
        tl.store(y_c + n0 * syn + off_y, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _offset_sums(v, N: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr):
    """S[m, j] = sum_{a - b = j - (N - 1)} v[m, b * N + a] for v [M, N * N] fp32 (the columns are pairs (b, a) of
    one axis): the sums along each offset a - b of that axis, j < D (>= 2N - 1; the others 0). One product with a
    0/1 matrix, v as three bf16 parts (exact: the products are exact and the sums fp32)."""
    k = tl.arange(0, N * N)
    OP: tl.constexpr = tl.float32 if UPCAST else tl.bfloat16
    e = ((k % N - k // N + (N - 1))[:, None] == tl.arange(0, D)[None, :]).to(OP)
    parts = _operand_parts(v, 3, True, UPCAST)
    s = tl.zeros((v.shape[0], D), dtype=tl.float32)
    for a in tl.static_range(3):
        s = tl.dot(parts[a], e, s)
    return s


@triton.jit
def _store_taps(t, out_c, act_c, HP: tl.constexpr, WP: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                TALL: tl.constexpr, SPARSE: tl.constexpr):
    """Writes one slot's tap gradients out_c [KH, KW] (contiguous) from t [DH, DW], the gradient of every pixel
    offset (dh, dw) = (i - (HP - 1), j - (WP - 1)); taps past t's offsets (kernels longer than the plane) get 0.
    SPARSE: inactive lines (act_c [lines] 0/1: tall columns, wide rows) get 0."""
    DH: tl.constexpr = t.shape[0]
    DW: tl.constexpr = t.shape[1]
    kh = tl.arange(0, DH)[:, None] - (HP - 1) + KH // 2
    kw = tl.arange(0, DW)[None, :] - (WP - 1) + KW // 2
    ok = (kh >= 0) & (kh < KH) & (kw >= 0) & (kw < KW)
    if SPARSE:
        if TALL:
            t = tl.where(tl.load(act_c + kw, mask=ok, other=0) != 0, t, 0.0)
        else:
            t = tl.where(tl.load(act_c + kh, mask=ok, other=0) != 0, t, 0.0)
    tl.store(out_c + kh * KW + kw, t, mask=ok)
    # (static: only kernels reaching past the offsets t holds have such taps)
    if KH // 2 > HP - 1 or KH // 2 > DH - HP or KW // 2 > WP - 1 or KW // 2 > DW - WP:
        TP: tl.constexpr = 512
        for t0 in tl.static_range(0, KH * KW, TP):
            i = t0 + tl.arange(0, TP)
            dh = i // KW - KH // 2
            dw = i % KW - KW // 2
            far = (dh < 1 - HP) | (dh > DH - HP) | (dw < 1 - WP) | (dw > DW - WP)
            tl.store(out_c + i, tl.zeros((TP,), dtype=tl.float32), mask=far & (i < KH * KW))


@triton.jit
def _pair_sums(dps, xt, g, NP: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """g + DY^T X over MB images: g [PP (output pixel p), PP (input pixel q)] fp32; dps: the operand parts of DY
    [MB, PP] (``_operand_parts``, NP of them), xt: X [MB, PP] (split alike)."""
    dts = ()
    for a in tl.static_range(NP):
        dts = dts + (tl.trans(dps[a]),)
    return _split_dots(dts, _operand_parts(xt, NP, SPLIT, UPCAST), g, NP, False, DOT_PREC)


@triton.jit
def _store_offset_grads(g, bsum, dwt_c, dww_c, db_c, t_act_c, w_act_c, KH_T: tl.constexpr, KW_T: tl.constexpr,
                        KH_W: tl.constexpr, KW_W: tl.constexpr, SPARSE_T: tl.constexpr, SPARSE_W: tl.constexpr,
                        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr):
    """Writes one channel's tap gradients (dwt_c [KH_T, KW_T], dww_c [KH_W, KW_W], contiguous; SPARSE: inactive
    lines 0) and bias gradient (db_c, HAS_BIAS: the sum of bsum) from g [PP, PP] = sum_n DY_n^T X_n. The gradient
    of the taps at pixel offset (dh, dw) is the sum of g over the pixel pairs q - p = (dh, dw): viewed as
    [hp, wp, hq, wq], g is summed along its w offsets (one product with a 0/1 matrix, ``_offset_sums``), then along
    its h offsets (another), which gives every offset's gradient at once; the padding pixels are zero, so no pair
    leaves the plane."""
    DH: tl.constexpr = 2 * HP if 2 * HP > 16 else 16      # offsets per axis (2 HP - 1 used; tl.dot: >= 16)
    DW: tl.constexpr = 2 * WP if 2 * WP > 16 else 16
    # [hp, wp, hq, wq] -> [(hp, hq), (wp, wq)]: sums along w offsets, then (transposed) along h offsets
    gp = tl.reshape(tl.permute(tl.reshape(g, (HP, WP, HP, WP)), (0, 2, 1, 3)), (HP * HP, WP * WP))
    sw = _offset_sums(gp, WP, DW, UPCAST)                      # [(hp, hq), DW]
    t = tl.trans(_offset_sums(tl.trans(sw), HP, DH, UPCAST))   # [DH, DW]
    if KW_T > 0:
        _store_taps(t, dwt_c, t_act_c, HP, WP, KH_T, KW_T, True, SPARSE_T)
    if KH_W > 0:
        _store_taps(t, dww_c, w_act_c, HP, WP, KH_W, KW_W, False, SPARSE_W)
    if HAS_BIAS:
        tl.store(db_c, tl.sum(tl.sum(bsum, axis=1), axis=0))


def lk_conv2d_matrix_bwd_configs(dx: bool):
    """Autotune candidates of the matrix backward (``lk_conv2d_matrix_bwd_kernel``; ``dx``: with the input
    gradient): MB images per tl.dot, warps."""
    if dx:
        return [triton.Config({"MB": mb}, num_warps=w, num_stages=1)
                for mb, w in [(16, 4), (16, 8), (32, 4), (32, 8), (64, 4), (64, 8)]]
    return [triton.Config({"MB": mb}, num_warps=w, num_stages=1)
            for mb, w in [(16, 2), (16, 4), (16, 8), (32, 4), (64, 4), (64, 8)]]


def lk_conv2d_matrix_bwd_default_config():
    """The matrix backward's config where autotuning is off, with or without the input gradient: the static
    model's best (bench/NOTES.md), spill-free for sm_80 and sm_90 (compile check): 16 images per dot, 4 warps."""
    return {"MB": 16, "num_warps": 4, "num_stages": 1}


@triton.jit
def lk_conv2d_matrix_bwd_kernel(
    # ---- pointers ----
    x_ptr,        # [N, C, H, W] forward input, any strides
    dy_ptr,       # [N, C, H, W] output gradient, any strides
    wt_ptr,       # [C, KH_T, KW_T] tall-slot weights (DX only)
    ww_ptr,       # [C, KH_W, KW_W] wide-slot weights (DX only)
    dx_ptr,       # [N, C, H, W] input gradient, any strides, fully overwritten (DX only)
    dwt_ptr,      # [S, C, KH_T, KW_T] fp32 partial tall gradients, one slice per image group (contiguous)
    dww_ptr,      # [S, C, KH_W, KW_W] fp32 partial wide gradients (contiguous)
    db_ptr,       # [S, C] fp32 partial bias gradients (HAS_BIAS only)
    t_act_ptr,    # [C, KW_T] int32: 1 = tall line j of channel c is active (SPARSE_T only)
    w_act_ptr,    # [C, KH_W] int32: 1 = wide line i active (SPARSE_W only)
    # ---- sizes ----
    N, C, H, W,
    imgs_per_prog,  # images per program (the host's plane_dw_images_per_program); S = cdiv(N, imgs_per_prog)
    # ---- strides (elements) ----
    sxn, sxc, sxh, sxw,
    sdn, sdc, sdh, sdw,
    sgn, sgc, sgh, sgw,     # dx (DX only)
    swt_c, swt_h, swt_w,    # (DX only)
    sww_c, sww_h, sww_w,    # (DX only)
    # ---- meta-parameters ----
    KH_T: tl.constexpr, KW_T: tl.constexpr, KH_W: tl.constexpr, KW_W: tl.constexpr,
    SPARSE_T: tl.constexpr, SPARSE_W: tl.constexpr,   # inactive lines' weights read as 0 (dx)...
    DENSE_DW: tl.constexpr,   # ... and their taps' gradients computed all the same (else written as 0)
    HAS_BIAS: tl.constexpr,   # the bias gradient too
    DX: tl.constexpr,         # the input gradient too (16-bit only)
    WIDE_IDX: tl.constexpr,   # offsets inside a group of MB images in int64 (host: matrix_wide_idx)
    SPLIT: tl.constexpr,      # fp32 as bf16 splits: dy and x as three bf16 parts each, six products in fp32
    DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
    HP: tl.constexpr,         # the plane's rows and columns padded to powers of two (matrix_grid), HP * WP
    WP: tl.constexpr,         # <= 64: pixel (h, w) is index h * WP + w
    MB: tl.constexpr,         # images per tl.dot
):
    """Weight (and bias) gradients of one channel over one group of images and, with DX, its input gradient in the
    same pass over dy. Grid: (C * S,).

    G = sum_n DY_n^T X_n ([PP, PP], PP = HP * WP: output pixel p x input pixel q, MB images per dot along K); once
    per program its offset sums give every tap's gradient (``_store_offset_grads``). DX: per MB images also
    DX [MB, PP] = DY @ M_flip (the input gradient of ``lk_conv2d_matrix_fwd_kernel`` with FLIP, M built once per
    program) from the same dy tile, so that the backward of a training step reads dy once and launches once.
    Deterministic: each program writes its own fp32 partial; the host sums the S partials in a fixed order.

    DX takes 16-bit tensors only: with fp32's three bf16 parts of dy, x and M the program needs 255 registers and
    spills, and the static model puts it above the two separate launches (bench/NOTES.md)."""
    F32: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    tl.static_assert(not (DX and F32), "the matrix backward computes dx for 16-bit tensors only")
    c, s, n_start, n_stop = _plane_program(C, N, imgs_per_prog)
    c64 = c.to(tl.int64)
    NP: tl.constexpr = 3 if SPLIT else 1
    off_x, q_in = _matrix_tile(sxn, sxh, sxw, H, W, HP, WP, MB, WIDE_IDX)
    off_d, _ = _matrix_tile(sdn, sdh, sdw, H, W, HP, WP, MB, WIDE_IDX)
    x_c = x_ptr + c64 * sxc
    d_c = dy_ptr + c64 * sdc
    if DX:
        mps = _channel_matrices(wt_ptr + c64 * swt_c, swt_h, swt_w, ww_ptr + c64 * sww_c, sww_h, sww_w,
                                t_act_ptr + c * KW_T, w_act_ptr + c * KH_W, KH_T, KW_T, KH_W, KW_W, SPARSE_T,
                                SPARSE_W, True, False, False, DOT_UPCAST, HP, WP)
        off_g, _ = _matrix_tile(sgn, sgh, sgw, H, W, HP, WP, MB, WIDE_IDX)
        g_c = dx_ptr + c64 * sgc
    g = tl.zeros((HP * WP, HP * WP), dtype=tl.float32)
    bsum = tl.zeros((MB, HP * WP) if HAS_BIAS else (1, 1), dtype=tl.float32)
    for n0 in range(n_start, n_stop, MB):
        ok = ((n0 + tl.arange(0, MB)) < n_stop)[:, None] & q_in[None, :]
        xt = tl.load(x_c + n0 * sxn + off_x, mask=ok, other=0.0)
        dt = tl.load(d_c + n0 * sdn + off_d, mask=ok, other=0.0)
        if HAS_BIAS:
            bsum += dt.to(tl.float32)
        dps = _operand_parts(dt, NP, SPLIT, DOT_UPCAST)
        if DX:
            acc = _matrix_dot(dps, mps, tl.zeros((MB, HP * WP), dtype=tl.float32), False, 1, DOT_PREC)
            tl.store(g_c + n0 * sgn + off_g, acc.to(dx_ptr.dtype.element_ty), mask=ok)
        g = _pair_sums(dps, xt, g, NP, SPLIT, DOT_UPCAST, DOT_PREC)
    out_c = s.to(tl.int64) * C + c64      # slice (s, c) of the partials
    _store_offset_grads(g, bsum, dwt_ptr + out_c * (KH_T * KW_T), dww_ptr + out_c * (KH_W * KW_W), db_ptr + out_c,
                        t_act_ptr + c * KW_T, w_act_ptr + c * KH_W, KH_T, KW_T, KH_W, KW_W,
                        SPARSE_T and not DENSE_DW, SPARSE_W and not DENSE_DW, HAS_BIAS, DOT_UPCAST, HP, WP)


@triton.jit
def _plane_slots(k, n, B: tl.constexpr, PACK: tl.constexpr):
    """(position in its plane, image) of each index k along a K dimension of images side by side: images of the
    plane's own size n when PACK, else of its padded size B."""
    if PACK:
        return k % n, k // n
    return k % B, k // B


@triton.jit
def _diagonal_sums(p, limit, KP: tl.constexpr, OFF: tl.constexpr):
    """g[k] = sum_h p[h, h + k - OFF] for k < KP, over the columns r < limit of p (others count 0): the tap
    gradients of one line from the correlation matrix p [B(h), B(r)] of output rows and input rows (or columns)."""
    B: tl.constexpr = p.shape[0]
    h = tl.arange(0, B)[:, None]
    r = h + tl.arange(0, KP)[None, :] - OFF
    ok = (r >= 0) & (r < limit)
    g = tl.gather(p, tl.minimum(tl.maximum(r, 0), B - 1), axis=1)
    return tl.sum(tl.where(ok, g, 0.0), axis=0)


@triton.jit
def _pass_end(live, n_start, n_stop, WHOLE: tl.constexpr):
    """The end of a weight-gradient pass's loop over its images: n_stop, or n_start (no image) when WHOLE (a sparse
    pass of one line that sums no dy for the bias) and its line is inactive: the whole pass is skipped, its dy
    loads too, and the loop body has no branch (fewer registers: with the branch the fp32 split passes on
    64-padded planes spilled)."""
    n_hi = n_stop
    if WHOLE:
        if not live[0]:
            n_hi = n_start
    return n_hi


@triton.jit
def _dw_tall_x(x_g, off_x, row_in, cw, img, W, sxw, ar_h, XS: tl.constexpr, ONES: tl.constexpr,
               DOT_UPCAST: tl.constexpr, BH: tl.constexpr):
    """x of a group of images shifted by XS columns, in the tall layout [BH, NB*BW] (0 outside the planes); ONES:
    row BH - 1 (padding, H < BH) set to 1 in the real columns (the bias gradient, see ``_dw_tall_pass``)."""
    cols = cw + XS
    xt = tl.load(x_g + off_x + XS * sxw, mask=row_in[:, None] & ((cols >= 0) & (cols < W) & img)[None, :], other=0.0)
    if DOT_UPCAST:
        xt = xt.to(tl.float32)
    if ONES:
        xt = tl.where((ar_h == BH - 1)[:, None] & ((cw < W) & img)[None, :], 1.0, xt)
    return xt


@triton.jit
def _dw_tall_pass(acc_b, x_c, d_c, t_act_ptr, c, n_start, n_stop, H, W, sxn, sxh, sxw, sdn, sdh, sdw,
                  ar_h, cw, cb, g, dwt_c,
                  KH: tl.constexpr, KW: tl.constexpr, J0: tl.constexpr, LG: tl.constexpr, SPARSE: tl.constexpr,
                  BIAS: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
                  BH: tl.constexpr, NB: tl.constexpr, KP: tl.constexpr, DY_LAG: tl.constexpr, SPLIT: tl.constexpr):
    """Tall lines J0 .. J0+LG-1 (those < KW) over the program's images: P_j += DY @ X_j^T for every image group
    (dy loaded once per group for all the lines), then the lines' tap gradients (diagonal sums of P_j) are written
    to dwt_c [KH, KW]. BIAS: 1 = add the images' dy to acc_b ([BH, NB*BW] fp32; with SPLIT [1, 1]: the pass keeps
    row sums, as the tile would take registers the split operands need); 2 = the bias gradient by the tensor cores:
    the centre line's X gets a row of ones in its padding row BH - 1 (needs H < BH), so that column BH - 1 of its P
    sums dy; acc_b[0, 0] receives it. Returns acc_b.

    DY_LAG (dense passes; needs W < BW and unpacked images: the lag moves one real column into the padding): x
    shifted by an odd number of columns cannot be loaded as vectors, so a line of odd shift s takes dy lagged by
    one column and x shifted by s - 1 (even): P_s = sum_w dy[h, w - 1] x[r, w + s - 1]. Every x load is then at
    an even shift, and an odd line shares the x of the even line before it: 2 dy loads and ceil(LG / 2) x loads
    per image group instead of 1 and LG, one of them (the lagged dy) scalar instead of two. (Sparse passes load
    each live line's x: a lagged dy loaded for lines that may all be skipped cost more than it saved.)

    SPLIT (fp32; not with DY_LAG): dy and x as three bf16 parts each, P_j += DY_a @ X_{j,b}^T for a + b <= 2."""
    NL: tl.constexpr = min(LG, KW - J0)
    NP: tl.constexpr = 3 if SPLIT else 1
    live = ()
    accs = ()
    for l in tl.static_range(NL):
        live = live + (_line_on(t_act_ptr, c, J0 + l, KW, SPARSE),)
        accs = accs + (tl.zeros((BH, BH), dtype=tl.float32),)
    rows_b = tl.zeros((BH,), dtype=tl.float32)   # (BIAS 1 with SPLIT)
    # a sparse pass of one line that sums no dy for the bias runs only if its line is active (no branch inside)
    WHOLE: tl.constexpr = SPARSE and NL == 1 and BIAS != 1
    n_hi = _pass_end(live, n_start, n_stop, WHOLE)
    row_in = ar_h < H
    # offsets inside a group of NB images from its first image (tall layout [BH, NB*BW]): loop-invariant
    off_d = cb[None, :] * sdn + ar_h[:, None] * sdh + cw[None, :] * sdw
    off_x = cb[None, :] * sxn + ar_h[:, None] * sxh + cw[None, :] * sxw
    for n0 in range(n_start, n_hi, g):
        img = ((n0 + cb) < n_stop) & (cb < g)
        x_g = x_c + n0 * sxn     # n0 is int64
        dy = tl.load(d_c + n0 * sdn + off_d, mask=row_in[:, None] & ((cw < W) & img)[None, :],
                     other=0.0)
        if BIAS == 1:
            if SPLIT:
                rows_b += tl.sum(dy.to(tl.float32), axis=1)
            else:
                acc_b += dy.to(tl.float32)
        dys = _a_operands(dy, NP, SPLIT, DOT_UPCAST)   # the A operands of every line's dots
        dy_lag = dys             # (unused unless DY_LAG)
        if DY_LAG and not SPARSE:
            dy_lag = _a_operands(tl.load(d_c + n0 * sdn + off_d - sdw,
                                         mask=row_in[:, None] & ((cw >= 1) & (cw <= W) & img)[None, :], other=0.0),
                                 NP, SPLIT, DOT_UPCAST)
        new = ()
        for l in tl.static_range(NL):
            p = accs[l]
            # (compile-time values, one per unrolled line: the column shift, lagged dy or not, the shift of its x)
            s = J0 + l - KW // 2
            lag = DY_LAG and not SPARSE and s % 2 != 0
            xs = s - 1 if lag else s
            ones = BIAS == 2 and s == 0
            if SPARSE and not WHOLE:
                if live[l]:   # (a runtime branch: the line loads its own x)
                    xt = _dw_tall_x(x_g, off_x, row_in, cw, img, W, sxw, ar_h, s, ones, DOT_UPCAST, BH)
                    p = _split_dots(dys, _operand_parts(xt, NP, SPLIT, DOT_UPCAST), p, NP, True, DOT_PREC)
            else:
                if not (lag and l > 0):   # else the previous (even) line's x, at shift s - 1
                    # (a line sharing the centre line's x sees its ones row only in P's column BH - 1 >= H,
                    # outside every diagonal sum)
                    xt = _dw_tall_x(x_g, off_x, row_in, cw, img, W, sxw, ar_h, xs, ones, DOT_UPCAST, BH)
                    xts = _operand_parts(xt, NP, SPLIT, DOT_UPCAST)
                if lag:
                    p = _split_dots(dy_lag, xts, p, NP, True, DOT_PREC)
                else:
                    p = _split_dots(dys, xts, p, NP, True, DOT_PREC)
            new = new + (p,)
        accs = new
    if BIAS == 1 and SPLIT:
        acc_b += tl.sum(rows_b, axis=0)
    kk = tl.arange(0, KP)
    for l in tl.static_range(NL):   # an inactive line kept its zero accumulator: zero gradient
        tl.store(dwt_c + kk * KW + (J0 + l), _diagonal_sums(accs[l], H, KP, KH // 2), mask=kk < KH)
        if BIAS == 2 and J0 + l == KW // 2:
            ones_col = (tl.arange(0, BH) == BH - 1)[None, :]
            acc_b += tl.where((tl.arange(0, acc_b.shape[0]) == 0)[:, None] & (tl.arange(0, acc_b.shape[1]) == 0)[None, :],
                              tl.sum(tl.where(ones_col, accs[l], 0.0)), 0.0)
    return acc_b


@triton.jit
def _dw_wide_pass(acc_b, x_c, d_c, w_act_ptr, c, n_start, n_stop, H, W, sxn, sxh, sxw, sdn, sdh, sdw,
                  ar_w, rh, rb, g, dww_c,
                  KH: tl.constexpr, KW: tl.constexpr, I0: tl.constexpr, LG: tl.constexpr, SPARSE: tl.constexpr,
                  BIAS: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
                  BW: tl.constexpr, NB: tl.constexpr, KP: tl.constexpr, SPLIT: tl.constexpr):
    """Wide lines I0 .. I0+LG-1: Q_i += DY^T @ X_i ([BW, BW]) per image group, then dww_c[i, k] = the diagonal
    sums of Q_i. The transpose of ``_dw_tall_pass`` (images stacked along rows; BIAS 2 uses column BW - 1)."""
    NL: tl.constexpr = min(LG, KH - I0)
    NP: tl.constexpr = 3 if SPLIT else 1
    live = ()
    accs = ()
    for l in tl.static_range(NL):
        live = live + (_line_on(w_act_ptr, c, I0 + l, KH, SPARSE),)
        accs = accs + (tl.zeros((BW, BW), dtype=tl.float32),)
    rows_b = tl.zeros((rh.shape[0],), dtype=tl.float32)   # (BIAS 1 with SPLIT: NB * BH rows)
    WHOLE: tl.constexpr = SPARSE and NL == 1 and BIAS != 1   # (as in ``_dw_tall_pass``)
    n_hi = _pass_end(live, n_start, n_stop, WHOLE)
    flags = live
    if WHOLE:
        flags = (True,)
    col_in = ar_w < W
    # offsets inside a group of NB images from its first image (wide layout [NB*BH, BW]): loop-invariant
    off_d = rb[:, None] * sdn + rh[:, None] * sdh + ar_w[None, :] * sdw
    off_x = rb[:, None] * sxn + rh[:, None] * sxh + ar_w[None, :] * sxw
    for n0 in range(n_start, n_hi, g):
        img = ((n0 + rb) < n_stop) & (rb < g)
        x_g = x_c + n0 * sxn     # n0 is int64
        dy = tl.load(d_c + n0 * sdn + off_d, mask=((rh < H) & img)[:, None] & col_in[None, :],
                     other=0.0)
        if BIAS == 1:
            if SPLIT:
                rows_b += tl.sum(dy.to(tl.float32), axis=1)
            else:
                acc_b += dy.to(tl.float32)
        dyts = _a_operands(tl.trans(dy), NP, SPLIT, DOT_UPCAST)   # the A operands of every line's dots
        new = ()
        for l in tl.static_range(NL):
            q = accs[l]
            if flags[l]:
                rows = rh + (I0 + l - KH // 2)
                xw = tl.load(x_g + off_x + (I0 + l - KH // 2) * sxh,
                             mask=((rows >= 0) & (rows < H) & img)[:, None] & col_in[None, :], other=0.0)
                if DOT_UPCAST:
                    xw = xw.to(tl.float32)
                if BIAS == 2 and I0 + l == KH // 2:
                    xw = tl.where(((rh < H) & img)[:, None] & (ar_w == BW - 1)[None, :], 1.0, xw)
                q = _split_dots(dyts, _operand_parts(xw, NP, SPLIT, DOT_UPCAST), q, NP, False, DOT_PREC)
            new = new + (q,)
        accs = new
    if BIAS == 1 and SPLIT:
        acc_b += tl.sum(rows_b, axis=0)
    kk = tl.arange(0, KP)
    for l in tl.static_range(NL):
        tl.store(dww_c + (I0 + l) * KW + kk, _diagonal_sums(accs[l], W, KP, KW // 2), mask=kk < KW)
        if BIAS == 2 and I0 + l == KH // 2:
            ones_col = (tl.arange(0, BW) == BW - 1)[None, :]
            acc_b += tl.where((tl.arange(0, acc_b.shape[0]) == 0)[:, None] & (tl.arange(0, acc_b.shape[1]) == 0)[None, :],
                              tl.sum(tl.where(ones_col, accs[l], 0.0)), 0.0)
    return acc_b


@triton.jit
def lk_conv2d_plane_dw_kernel(
    # ---- pointers ----
    x_ptr,        # [N, C, H, W] forward input, any strides
    dy_ptr,       # [N, C, H, W] output gradient, any strides
    dwt_ptr,      # [S, C, KH_T, KW_T] fp32 partial tall gradients, one slice per image group (contiguous)
    dww_ptr,      # [S, C, KH_W, KW_W] fp32 partial wide gradients (contiguous)
    db_ptr,       # [S, C] fp32 partial bias gradients
    t_act_ptr,    # [C, KW_T] int32 active tall lines (SPARSE_T only; inactive lines get a zero gradient)
    w_act_ptr,    # [C, KH_W] int32 active wide lines (SPARSE_W only)
    # ---- sizes ----
    N, C, H, W,
    imgs_per_prog,  # images per program (the host's plane_dw_images_per_program); S = cdiv(N, imgs_per_prog)
    # ---- strides (elements) ----
    sxn, sxc, sxh, sxw,
    sdn, sdc, sdh, sdw,
    # ---- meta-parameters ----
    KH_T: tl.constexpr, KW_T: tl.constexpr, KH_W: tl.constexpr, KW_W: tl.constexpr,
    SPARSE_T: tl.constexpr, SPARSE_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    ALIGN: tl.constexpr, WIDE_IDX: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr,
    H_PADDED: tl.constexpr,   # H < BH (a padding row exists; W_PADDED: W < BW)
    W_PADDED: tl.constexpr,
    NB: tl.constexpr,         # images per tl.dot (along its K dimension) at the padded plane size
    PACK_T: tl.constexpr,     # tall passes pack images at width W: (NB * BW) // W per dot (host: plane_dw_pack)
    PACK_W: tl.constexpr,     # wide passes pack images at height H: (NB * BH) // H per dot
    LG: tl.constexpr,         # lines accumulated together per pass over the images (their [B, B] fp32
                              # accumulators live in registers at once)
    KPT: tl.constexpr,        # next_power_of_2(KH_T) (1 when absent): taps of a tall line
    KPW: tl.constexpr,        # next_power_of_2(KW_W): taps of a wide line
    SPLIT: tl.constexpr = False,  # fp32 as bf16 splits: x and dy as three bf16 parts each (exact), the six
                                  # products x_b dy_a with a + b <= 2 summed in fp32 (bf16 tensor-core dots)
):
    """Weight (and bias) gradients of one channel over one group of images. Grid: (C * S,).

    Tall line j: ``P_j = sum_n DY_n @ X_{n,j}^T`` ([BH, BH], output rows x input rows, accumulated over the
    group's images, NB images per dot along K), then dwt[k, j] = sum_h P_j[h, h + k - KH_T // 2] once per program.
    Wide line i: ``Q_i = sum_n DY_n^T @ X_{n,i}`` ([BW, BW]), dww[i, k] = sum_w Q_i[w, w + k - KW_W // 2].
    Each pass over the images loads dy once for LG lines. Deterministic: each program writes its own fp32
    partial; the host sums the S partials in a fixed order."""
    c, s, n_start, n_stop = _plane_program(C, N, imgs_per_prog)
    sxn, sxc, sxh = _aligned_strides(sxn, sxc, sxh, ALIGN)
    sdn, sdc, sdh = _aligned_strides(sdn, sdc, sdh, ALIGN)
    W = _aligned(W, ALIGN)
    ar_h = tl.arange(0, BH)
    ar_w = tl.arange(0, BW)
    # tall layout [BH, NB*BW]: column cc = image cc // BW, column cc % BW; wide layout [NB*BH, BW]: row rq.
    # Both sum over their K dimension (images and columns / rows alike), so on small planes (PACK_*) the images
    # are packed at the plane's own width (height) instead: cc // W images of W columns, (NB*BW) // W per dot
    # (a 7x7 plane: 9 images per 64 columns instead of 4).
    cw, cb = _plane_slots(tl.arange(0, NB * BW), W, BW, PACK_T)
    rh, rb = _plane_slots(tl.arange(0, NB * BH), H, BH, PACK_W)
    if PACK_T:   # images per dot (runtime when packed: W is an argument)
        g_t = (NB * BW) // W
    else:
        g_t = NB
    if PACK_W:
        g_w = (NB * BH) // H
    else:
        g_w = NB
    if WIDE_IDX:
        ar_h = ar_h.to(tl.int64)
        ar_w = ar_w.to(tl.int64)
        cw = cw.to(tl.int64)
        cb = cb.to(tl.int64)
        rh = rh.to(tl.int64)
        rb = rb.to(tl.int64)
    c64 = c.to(tl.int64)
    x_c = x_ptr + c64 * sxc
    d_c = dy_ptr + c64 * sdc
    out_c = s.to(tl.int64) * C + c64      # slice (s, c) of the partials
    # The bias gradient rides along the pass over the images that holds the slot's centre line: computed by its
    # dot when the plane has a padding row (column) to hold ones (BIAS_* 2), else summed from dy (1). Not by the
    # dot in sparse passes: an inactive centre line skips it.
    if HAS_BIAS and KW_T > 0:
        BIAS_T: tl.constexpr = 2 if H_PADDED and not SPARSE_T else 1
    else:
        BIAS_T: tl.constexpr = 0
    if HAS_BIAS and KW_T == 0:
        BIAS_W: tl.constexpr = 2 if W_PADDED and not SPARSE_W else 1
    else:
        BIAS_W: tl.constexpr = 0
    acc_bt = tl.zeros((BH, NB * BW) if BIAS_T == 1 and not SPLIT else (1, 1), dtype=tl.float32)
    acc_bw = tl.zeros((NB * BH, BW) if BIAS_W == 1 and not SPLIT else (1, 1), dtype=tl.float32)
    for j0 in tl.static_range(0, KW_T, LG):
        acc_bt = _dw_tall_pass(acc_bt, x_c, d_c, t_act_ptr, c, n_start, n_stop, H, W, sxn, sxh, sxw, sdn, sdh,
                               sdw, ar_h, cw, cb, g_t, dwt_ptr + out_c * (KH_T * KW_T), KH=KH_T, KW=KW_T, J0=j0, LG=LG,
                               SPARSE=SPARSE_T,
                               BIAS=BIAS_T if (BIAS_T == 2 and j0 <= KW_T // 2 and KW_T // 2 < j0 + LG)
                               or (BIAS_T == 1 and j0 == 0) else 0, DOT_PREC=DOT_PREC, DOT_UPCAST=DOT_UPCAST, BH=BH, NB=NB, KP=KPT,
                               DY_LAG=W_PADDED and not PACK_T and not SPLIT, SPLIT=SPLIT)
    for i0 in tl.static_range(0, KH_W, LG):
        acc_bw = _dw_wide_pass(acc_bw, x_c, d_c, w_act_ptr, c, n_start, n_stop, H, W, sxn, sxh, sxw, sdn, sdh,
                               sdw, ar_w, rh, rb, g_w, dww_ptr + out_c * (KH_W * KW_W), KH=KH_W, KW=KW_W, I0=i0, LG=LG,
                               SPARSE=SPARSE_W,
                               BIAS=BIAS_W if (BIAS_W == 2 and i0 <= KH_W // 2 and KH_W // 2 < i0 + LG)
                               or (BIAS_W == 1 and i0 == 0) else 0, DOT_PREC=DOT_PREC, DOT_UPCAST=DOT_UPCAST, BW=BW, NB=NB, KP=KPW, SPLIT=SPLIT)
    if HAS_BIAS:
        tl.store(db_ptr + out_c, tl.sum(tl.sum(acc_bt, axis=1), axis=0) + tl.sum(tl.sum(acc_bw, axis=1), axis=0))


@triton.jit
def _stacked_diagonal_sums(acc, limit, L: tl.constexpr, KP: tl.constexpr, OFF: tl.constexpr):
    """g [L, KP]: g[l, k] = sum_{h < limit} acc[l * B + h + k - OFF, h] over rows h + k - OFF in [0, limit): the tap
    gradients of L lines from their correlation matrices stacked along the rows of acc [L * B (line, input row or
    column r), B (output row or column h)] (``_diagonal_sums`` of each block, transposed)."""
    B: tl.constexpr = acc.shape[1]
    p = tl.permute(tl.reshape(acc, (L, B, B)), (0, 2, 1))        # [l, h, r]
    h = tl.arange(0, B)[None, :, None]
    r = h + tl.arange(0, KP)[None, None, :] - OFF + tl.zeros((L, 1, 1), dtype=tl.int32)
    ok = (r >= 0) & (r < limit) & (h < limit)
    g = tl.gather(p, tl.minimum(tl.maximum(r, 0), B - 1), axis=2)
    return tl.sum(tl.where(ok, g, 0.0), axis=1)


@triton.jit
def _stack_store(dw_c, g, L0: tl.constexpr, STEP: tl.constexpr, NL: tl.constexpr, LINES: tl.constexpr,
                 TAPS: tl.constexpr, TALL: tl.constexpr):
    """Writes g [L, KP] (``_stacked_diagonal_sums``): row l is line L0 + STEP * l of a slot of LINES lines of TAPS
    taps each (dw_c [TAPS, LINES] when TALL, else [LINES, TAPS]); rows past NL lines or past LINES are dropped."""
    ll = tl.arange(0, g.shape[0])
    kk = tl.arange(0, g.shape[1])
    line = L0 + STEP * ll
    ok = ((ll < NL) & (line < LINES))[:, None] & (kk < TAPS)[None, :]
    if TALL:
        tl.store(dw_c + kk[None, :] * LINES + line[:, None], g, mask=ok)
    else:
        tl.store(dw_c + line[:, None] * TAPS + kk[None, :], g, mask=ok)


@triton.jit
def lk_conv2d_plane_dw_stack_kernel(
    # ---- pointers ----
    x_ptr,        # [N, C, H, W] forward input (16-bit), any strides
    dy_ptr,       # [N, C, H, W] output gradient, any strides
    dwt_ptr,      # [S, C, KH_T, KW_T] fp32 partial tall gradients, one slice per image group (contiguous)
    dww_ptr,      # [S, C, KH_W, KW_W] fp32 partial wide gradients (contiguous)
    db_ptr,       # [S, C] fp32 partial bias gradients (HAS_BIAS only)
    # ---- sizes ----
    N, C, H, W,
    imgs_per_prog,  # images per program; S = cdiv(N, imgs_per_prog)
    # ---- strides (elements) ----
    sxn, sxc, sxh, sxw,
    sdn, sdc, sdh, sdw,
    # ---- meta-parameters ----
    KH_T: tl.constexpr, KW_T: tl.constexpr, KH_W: tl.constexpr, KW_W: tl.constexpr,   # odd; (0, 0): slot absent
    HAS_BIAS: tl.constexpr,
    ALIGN: tl.constexpr, WIDE_IDX: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
    # (as in lk_conv2d_plane_dw_kernel)
    BH: tl.constexpr, BW: tl.constexpr,   # plane_pad(H), plane_pad(W); W < BW when KW_T > 1 (the lagged dy)
    TS: tl.constexpr,     # tall slots: next_power_of_2(KW_T // 2 + 1) (1 when absent)
    WL0: tl.constexpr,    # wide lines in the first stack: the largest power of two <= KH_W (1 when absent)
    WL1: tl.constexpr,    # slots of the second wide stack (the remaining KH_W - WL0 lines, padded; 0: none)
    KPT: tl.constexpr, KPW: tl.constexpr,   # next_power_of_2 of the taps per tall / wide line (1 when absent)
    NB: tl.constexpr,     # images per tl.dot (along its K dimension)
    SPLIT: tl.constexpr = False,  # fp32 as bf16 splits: x and dy as three bf16 parts each (exact), the six
                                  # products with a + b <= 2 of every stack summed in fp32
):
    """Dense weight (and bias) gradients of one channel over one group of images, with the lines of a slot
    stacked along the M dimension of one product per image group (Grid: (C * S,)).

    ``lk_conv2d_plane_dw_kernel`` makes one [B, B] product per line and image group; on 16- and 32-padded planes
    those are too small for Hopper's wgmma (M >= 64) and each line reloads its shifted operand. Here:
    * tall: x at the even column shifts e = -KW_T//2, -KW_T//2 + 2, ... (TS slots of BH rows) is one A operand
      [TS*BH, NB*BW] (one load: every shift of one parity keeps the loads' alignment); A @ DY^T gives the lines of
      even offset from the first, A @ DYL^T, with dy lagged by one column (dy[h, w - 1]), those of odd offset:
      sum_w x[r, w + e] dy[h, w - 1] = sum_w x[r, w + e + 1] dy[h, w] (the lag moves column W - 1 into the
      padding column W, so W < BW). Two products per image group for all the tall lines.
    * wide: x at the row shifts of WL0 lines (then of the remaining ones), transposed, is the A operand
      [WL0*BW, NB*BH] of one product with DY [NB*BH, BW] (row shifts keep the alignment).
    * bias: a spare tall slot (TS > KW_T // 2 + 1) holds ones, so its products sum dy; else the dy tiles are
      summed in registers.
    Accumulated over the group's images in fp32; the diagonal sums of each line's block once per program; each
    program writes its own partials (deterministic, summed by the host in a fixed order)."""
    c, s, n_start, n_stop = _plane_program(C, N, imgs_per_prog)
    sxn, sxc, sxh = _aligned_strides(sxn, sxc, sxh, ALIGN)
    sdn, sdc, sdh = _aligned_strides(sdn, sdc, sdh, ALIGN)
    W = _aligned(W, ALIGN)
    TALL: tl.constexpr = KW_T > 0
    WIDE: tl.constexpr = KH_W > 0
    HT: tl.constexpr = KW_T // 2
    ODD: tl.constexpr = KW_T > 1                  # tall lines of odd offset from the first exist
    ONES: tl.constexpr = HAS_BIAS and TALL and TS > HT + 1    # a spare tall slot (the last) sums dy
    SUM_DY: tl.constexpr = HAS_BIAS and not ONES
    NP: tl.constexpr = 3 if SPLIT else 1          # parts per operand
    # the wide slot's DY as the tall slot's DY^T transposed (one image per dot); not for fp32 splits on 32-padded
    # planes, where the longer-lived tile spills inside the image loop under triton 3.8 (96 bytes)
    DY_T: tl.constexpr = NB == 1 and TALL and not (SPLIT and BH > 16)
    # tall stack [TS*BH (slot e, input row r), NB*BW (image b, column w)]; DY^T [NB*BW, BH]
    k = tl.arange(0, NB * BW)
    kb = k // BW
    kw = k % BW
    q = tl.arange(0, TS * BH)
    qe = q // BH
    qr = q % BH
    ar_h = tl.arange(0, BH)
    # wide stacks [WL*BW (line l, input column w'), NB*BH (image b, row h)]; DY [NB*BH, BW]
    m = tl.arange(0, NB * BH)
    mb = m // BH
    mh = m % BH
    p0 = tl.arange(0, WL0 * BW)
    p1 = tl.arange(0, max(WL1, 1) * BW)
    ar_w = tl.arange(0, BW)
    if WIDE_IDX:
        k, kb, kw, q, qe, qr, ar_h = k.to(tl.int64), kb.to(tl.int64), kw.to(tl.int64), q.to(tl.int64), \
            qe.to(tl.int64), qr.to(tl.int64), ar_h.to(tl.int64)
        m, mb, mh, p0, p1, ar_w = m.to(tl.int64), mb.to(tl.int64), mh.to(tl.int64), p0.to(tl.int64), \
            p1.to(tl.int64), ar_w.to(tl.int64)
    c64 = c.to(tl.int64)
    x_c = x_ptr + c64 * sxc
    d_c = dy_ptr + c64 * sdc
    # loop-invariant offsets inside a group of NB images, and the masks that do not depend on the images
    sh = 2 * qe - HT                                              # each tall slot's column shift
    cols = kw[None, :] + sh[:, None]
    off_a = kb[None, :] * sxn + qr[:, None] * sxh + cols * sxw
    in_a = (qr < H)[:, None] & ((cols >= 0) & (cols < W) & (sh <= HT)[:, None])
    # (1 in the spare slot's rows: the masked loads' value there)
    ones_a = tl.where((qe == TS - 1)[:, None] & (kw >= 0)[None, :], 1.0, 0.0).to(x_ptr.dtype.element_ty)
    off_dt = kb[:, None] * sdn + ar_h[None, :] * sdh + kw[:, None] * sdw
    off_dw = mb[:, None] * sdn + mh[:, None] * sdh + ar_w[None, :] * sdw
    rows0 = mh[None, :] + (p0 // BW - KH_W // 2)[:, None]
    off_w0 = mb[None, :] * sxn + rows0 * sxh + (p0 % BW)[:, None] * sxw
    in_w0 = ((p0 % BW) < W)[:, None] & (rows0 >= 0) & (rows0 < H)
    rows1 = mh[None, :] + (WL0 + p1 // BW - KH_W // 2)[:, None]
    off_w1 = mb[None, :] * sxn + rows1 * sxh + (p1 % BW)[:, None] * sxw
    in_w1 = ((p1 % BW) < W)[:, None] & ((WL0 + p1 // BW) < KH_W)[:, None] & (rows1 >= 0) & (rows1 < H)

    acc_e = tl.zeros((TS * BH, BH), dtype=tl.float32)       # tall lines 0, 2, 4, ... (and the ones slot)
    acc_o = tl.zeros((TS * BH, BH), dtype=tl.float32)       # tall lines 1, 3, ...
    acc_w0 = tl.zeros((WL0 * BW, BW), dtype=tl.float32)
    acc_w1 = tl.zeros((max(WL1, 1) * BW, BW), dtype=tl.float32)
    acc_b = tl.zeros((NB * BW, BH) if SUM_DY and TALL else (NB * BH, BW) if SUM_DY else (1, 1), dtype=tl.float32)
    for n0 in range(n_start, n_stop, NB):
        d_g = d_c + n0 * sdn      # n0 is int64
        x_g = x_c + n0 * sxn
        if TALL:
            img = (n0 + kb) < n_stop
            dyt = tl.load(d_g + off_dt, mask=(img & (kw < W))[:, None] & (ar_h < H)[None, :], other=0.0)
            if SUM_DY:
                acc_b += dyt.to(tl.float32)
            if ONES:
                a = tl.load(x_g + off_a, mask=in_a & img[None, :], other=ones_a)
            else:
                a = tl.load(x_g + off_a, mask=in_a & img[None, :], other=0.0)
            a = _operand_parts(a, NP, SPLIT, DOT_UPCAST)
            acc_e = _split_dots(a, _operand_parts(dyt, NP, SPLIT, DOT_UPCAST), acc_e, NP, False, DOT_PREC)
            if ODD:
                dyl = tl.load(d_g + off_dt - sdw, mask=(img & (kw >= 1) & (kw <= W))[:, None] & (ar_h < H)[None, :],
                              other=0.0)
                acc_o = _split_dots(a, _operand_parts(dyl, NP, SPLIT, DOT_UPCAST), acc_o, NP, False, DOT_PREC)
        if WIDE:
            img = (n0 + mb) < n_stop
            if DY_T:   # one image: DY [BH, BW] is the tall slot's DY^T transposed (no second load)
                dyw = tl.trans(dyt)
            else:
                dyw = tl.load(d_g + off_dw, mask=(img & (mh < H))[:, None] & (ar_w < W)[None, :], other=0.0)
                if SUM_DY and not TALL:
                    acc_b += dyw.to(tl.float32)
            dyw = _operand_parts(dyw, NP, SPLIT, DOT_UPCAST)
            a0 = tl.load(x_g + off_w0, mask=in_w0 & img[None, :], other=0.0)
            acc_w0 = _split_dots(_operand_parts(a0, NP, SPLIT, DOT_UPCAST), dyw, acc_w0, NP, False, DOT_PREC)
            if WL1 > 0:
                a1 = tl.load(x_g + off_w1, mask=in_w1 & img[None, :], other=0.0)
                acc_w1 = _split_dots(_operand_parts(a1, NP, SPLIT, DOT_UPCAST), dyw, acc_w1, NP, False, DOT_PREC)

    out_c = s.to(tl.int64) * C + c64      # slice (s, c) of the partials
    if TALL:
        dwt_c = dwt_ptr + out_c * (KH_T * KW_T)
        # even slot e is line 2e (the ones slot, if any, lies past the last line); odd slot e is line 2e + 1
        _stack_store(dwt_c, _stacked_diagonal_sums(acc_e, H, TS, KPT, KH_T // 2), 0, 2, HT + 1, KW_T, KH_T, True)
        if ODD:
            _stack_store(dwt_c, _stacked_diagonal_sums(acc_o, H, TS, KPT, KH_T // 2), 1, 2, HT, KW_T, KH_T, True)
    if WIDE:
        dww_c = dww_ptr + out_c * (KH_W * KW_W)
        _stack_store(dww_c, _stacked_diagonal_sums(acc_w0, W, WL0, KPW, KW_W // 2), 0, 1, WL0, KH_W, KW_W, False)
        if WL1 > 0:
            _stack_store(dww_c, _stacked_diagonal_sums(acc_w1, W, WL1, KPW, KW_W // 2), WL0, 1, KH_W - WL0, KH_W,
                         KW_W, False)
    if ONES:   # any row of the ones slot holds the dy sums of every output row h
        db = tl.sum(tl.sum(tl.where((tl.arange(0, TS * BH) == (TS - 1) * BH)[:, None], acc_e, 0.0), axis=1), axis=0)
        tl.store(db_ptr + out_c, db)
    if SUM_DY:
        tl.store(db_ptr + out_c, tl.sum(tl.sum(acc_b, axis=1), axis=0))


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
    """Untuned weight-gradient config. P = dy @ X^T must stay in registers: 32x32 tiles need 8 warps; fp32 (whose
    tf32x3 split triples the operands) takes 16-row tiles and 8 warps, the one choice without spills for every
    slot pattern, dense and sparse (a sparse block spans a whole line), on sm_80 and sm_90 (compile-only check)."""
    bh = 16 if H <= 16 else 32
    bw = 16 if W <= 16 else 32
    if elem_bytes >= 4:
        return {"BH": 16, "BW": bw, "num_warps": 8, "num_stages": 1}
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
