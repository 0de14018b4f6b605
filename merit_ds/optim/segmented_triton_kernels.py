"""The Triton kernels of MERIT's tiled partition step (driven by :mod:`.segmented_triton`).

Imported at first use by :mod:`.segmented_triton` (which launches them). Triton compiles
them for the GPU, or runs them on CPU tensors under its interpreter in a process started with
``TRITON_INTERPRET=1`` (the tests: ``tests/conftest.py`` sets it where no GPU is present).

Every kernel reads one row of the tile table per program (field order: ``TILE_FIELDS`` in
:mod:`.segmented_triton`); its ``tensor`` field picks a row of the address table, the data
pointers of that tensor's w, g, m, v (one row for a flat ZeRO partition; one per parameter for
a single device's group, so that one launch covers the whole group).

The per-element arithmetic is the CPU kernel's (``csrc/merit_cpu.cpp``: ``direction``,
``trust``, ``apply_one``, ``ratio_matrix_raw``), operation for operation:
explicit fused multiply-adds where the formulas multiply and add, IEEE division and square
root (``div_rn`` / ``sqrt_rn``, not the GPU's approximate defaults), NaN-ignoring maxima in
the statistics, a clamp that passes NaN through. So one step here is bitwise the CPU kernel's
step from the same floats, under the interpreter (tested) and on a GPU (the GPU smoke test).
"""

import triton
import triton.language as tl

# the largest finite float32: |g| <= FLT_MAX is false exactly for inf, -inf and NaN
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _tensors(addr_ptr, tab_ptr, NF: tl.constexpr):
    """Pointers to w, g, m, v of this program's tile's tensor (a row of the address table)."""
    a = addr_ptr + tl.load(tab_ptr + tl.program_id(0).to(tl.int64) * NF + 15) * 4
    w = tl.load(a + 0).to(tl.pointer_type(tl.float32))
    g = tl.load(a + 1).to(tl.pointer_type(tl.float32))
    m = tl.load(a + 2).to(tl.pointer_type(tl.float32))
    v = tl.load(a + 3).to(tl.pointer_type(tl.float32))
    return w, g, m, v


@triton.jit
def _load(addr_ptr, tab_ptr, offs, mask, NF: tl.constexpr):
    """The tile's w, g, m, v (0 where masked), and the pointers to w, m, v for the writes."""
    w_ptr, g_ptr, m_ptr, v_ptr = _tensors(addr_ptr, tab_ptr, NF)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    return w, g, m, v, w_ptr, m_ptr, v_ptr


@triton.jit
def _tile(tab_ptr, NF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: element offsets (in its tensor), masks and buffer entry indices."""
    t = tab_ptr + tl.program_id(0).to(tl.int64) * NF
    base = tl.load(t + 0)  # offset in the tensor of element (row0, 0) of the parameter
    lo = tl.load(t + 1)  # the fragment's range in the tensor [lo, hi)
    hi = tl.load(t + 2)
    nrows = tl.load(t + 3)
    col0 = tl.load(t + 4)
    row_len = tl.load(t + 5)
    rows = tl.arange(0, BLOCK_R).to(tl.int64)
    cols = col0 + tl.arange(0, BLOCK_C).to(tl.int64)
    rmask = rows < nrows
    cmask = cols < row_len
    offs = base + rows[:, None] * row_len + cols[None, :]
    mask = rmask[:, None] & cmask[None, :] & (offs >= lo) & (offs < hi)
    # row |w| entry of the tile's rows (a vector: its one entry, stride 0); with K > 1 an
    # element's entry is that plus its column modulo K
    row_idx = tl.load(t + 6) + rows * tl.load(t + 7)
    row_span = tl.load(t + 8)  # row |u| entry = row |w| entry + row_span
    col_idx = tl.load(t + 9) + tl.arange(0, BLOCK_C).to(tl.int64)  # column |w| entries
    col_span = tl.load(t + 10)
    ccmask = cols < row_len * tl.load(t + 11)  # column entries: matrices only (is_matrix 1 or 0)
    flag = tl.load(t + 12)
    param = tl.load(t + 13)
    inner = tl.load(t + 14)  # K = prod(shape[2:]) of a matrix, else 1
    return offs, mask, rmask, cols, row_idx, row_span, col_idx, col_span, ccmask, flag, param, inner


@triton.jit
def _direction(w, g, m, v, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay):
    """m', v' and u = m' / (sqrt(v') + eps) + wd * w (merit_cpu.cpp ``direction``)."""
    m_new = tl.fma(m, beta1, one_minus_beta1 * g)
    v_new = tl.fma(v, beta2, one_minus_beta2 * g * g)
    u = tl.fma(weight_decay, w, tl.div_rn(m_new, tl.sqrt_rn(v_new) + eps))
    return m_new, v_new, u


@triton.jit
def _abs_ignoring_nan(x, mask):
    # 0 where masked out or NaN: the identity of max|.|, as the CPU kernel's max_ign
    a = tl.abs(x)
    return tl.where(mask & (a == a), a, 0.0)


@triton.jit
def statistics_kernel(addr_ptr, buf_ptr, tab_ptr,
                      beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay,
                      FLAGS: tl.constexpr, NF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Phase 1 of one tile: u in registers; max|w|, max|u| per row and per column of the tile
    combined into the buffer with one atomic max per row and per column entry; the
    parameter's non-finite flag. Nothing is written to w, m, v."""
    offs, mask, rmask, cols, row_idx, row_span, col_idx, col_span, ccmask, flag, param, inner = _tile(
        tab_ptr, NF, BLOCK_R, BLOCK_C)
    w, g, m, v, w_ptr, m_ptr, v_ptr = _load(addr_ptr, tab_ptr, offs, mask, NF)
    _, _, u = _direction(w, g, m, v, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay)
    aw = _abs_ignoring_nan(w, mask)
    au = _abs_ignoring_nan(u, mask)
    if inner == 1:  # one entry per row: reduce the row first
        tl.atomic_max(buf_ptr + row_idx, tl.max(aw, axis=1), mask=rmask)
        tl.atomic_max(buf_ptr + row_idx + row_span, tl.max(au, axis=1), mask=rmask)
    else:  # K entries per row, interleaved along it: one atomic per element (rare shapes)
        entry = row_idx[:, None] + (cols % inner)[None, :]
        tl.atomic_max(buf_ptr + entry, aw, mask=mask)
        tl.atomic_max(buf_ptr + entry + row_span, au, mask=mask)
    tl.atomic_max(buf_ptr + col_idx, tl.max(aw, axis=0), mask=ccmask)
    tl.atomic_max(buf_ptr + col_idx + col_span, tl.max(au, axis=0), mask=ccmask)
    if FLAGS:
        bad = tl.where(mask & ~(tl.abs(g) <= FLT_MAX), 1.0, 0.0)
        any_bad = tl.max(tl.max(bad, axis=1), axis=0)
        tl.atomic_max(buf_ptr + flag, any_bad, mask=any_bad > 0)  # no atomic where all is finite


@triton.jit
def tensor_max_kernel(buf_ptr, tmax_ptr, mat_ptr, BLOCK: tl.constexpr):
    """Per matrix of the partition: its tensor maxima max|W|, max|U|, the maxima of its
    reduced row maxima, into ``tmax[2p]``, ``tmax[2p + 1]``."""
    t = mat_ptr + tl.program_id(0).to(tl.int64) * 3
    param = tl.load(t)
    first = tl.load(t + 1)  # buffer index of the row |w| entry of row 0
    n_rows = tl.load(t + 2)  # R*K; the row |u| entries follow
    acc_w = tl.zeros((BLOCK,), tl.float32)
    acc_u = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n_rows, BLOCK):
        idx = start + tl.arange(0, BLOCK).to(tl.int64)
        ok = idx < n_rows
        acc_w = tl.maximum(acc_w, tl.load(buf_ptr + first + idx, mask=ok, other=0.0))
        acc_u = tl.maximum(acc_u, tl.load(buf_ptr + first + n_rows + idx, mask=ok, other=0.0))
    tl.store(tmax_ptr + 2 * param, tl.max(acc_w, axis=0))
    tl.store(tmax_ptr + 2 * param + 1, tl.max(acc_u, axis=0))


@triton.jit
def _ratio(max_w, max_u, floor):
    # merit_cpu.cpp ratio_matrix_raw: w/u clamped below by the tensor ratio, -1 where a
    # maximum is 0 (there s = 1)
    # NaN propagates, as the CPU kernel's max_nan (an inf/inf ratio stays NaN there too)
    return tl.where((max_w == 0) | (max_u == 0), -1.0,
                    tl.maximum(tl.div_rn(max_w, max_u), floor, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def apply_kernel(addr_ptr, buf_ptr, tmax_ptr, tab_ptr,
                 count_ptr, sum_ptr, min_ptr, max_ptr, clipped_ptr,
                 beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, neg_lr,
                 HONOUR_FLAGS: tl.constexpr, TRACK: tl.constexpr, NF: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """Phase 3 of one tile: the trust ratios of its rows and columns from the reduced maxima
    (BLOCK_R + BLOCK_C divisions, not one per element), then per element m', v', u
    recomputed, s = max(row ratio, column ratio) (1 where a maximum is 0), and
    w -= lr * clip(s * u, -1, 1); w, m, v written unless the parameter is flagged.
    ``TRACK``: also the trust-ratio statistics of the elements written, per parameter (count,
    float64 sum of s, min and max of s, count of |s*u| > 1: the CPU kernel's five numbers), by
    one atomic each per tile."""
    offs, mask, rmask, cols, row_idx, row_span, col_idx, col_span, ccmask, flag, param, inner = _tile(
        tab_ptr, NF, BLOCK_R, BLOCK_C)
    if HONOUR_FLAGS:  # a flagged parameter: no row of the tile is written
        live_rows = tl.where(tl.load(buf_ptr + flag) == 0, BLOCK_R, 0)
        mask = mask & (tl.arange(0, BLOCK_R) < live_rows)[:, None]
    # vectors: tmax holds (0, 1), so the floor is 0 and s is their one ratio (or 1)
    floor = tl.div_rn(tl.load(tmax_ptr + 2 * param), tl.load(tmax_ptr + 2 * param + 1))
    # (1.0 where masked: no 0/0 in lanes that are never used)
    if inner == 1:  # one ratio per row of the tile
        row_ratio = _ratio(tl.load(buf_ptr + row_idx, mask=rmask, other=1.0),
                           tl.load(buf_ptr + row_idx + row_span, mask=rmask, other=1.0), floor)
        a = tl.broadcast_to(row_ratio[:, None], (BLOCK_R, BLOCK_C))
    else:  # K per row, interleaved: one per element
        entry = row_idx[:, None] + (cols % inner)[None, :]
        a = _ratio(tl.load(buf_ptr + entry, mask=mask, other=1.0), tl.load(buf_ptr + entry + row_span, mask=mask,
                                                                           other=1.0), floor)
    col_ratio = _ratio(tl.load(buf_ptr + col_idx, mask=ccmask, other=1.0),
                       tl.load(buf_ptr + col_idx + col_span, mask=ccmask, other=1.0), floor)
    col_ratio = tl.where(ccmask, col_ratio, 0.0)  # vectors: no column ratio (0 never wins a max)
    b = col_ratio[None, :]
    s = tl.where((a < 0) | (b < 0), 1.0, tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL))  # CPU: trust()
    w, g, m, v, w_ptr, m_ptr, v_ptr = _load(addr_ptr, tab_ptr, offs, mask, NF)
    m_new, v_new, u = _direction(w, g, m, v, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay)
    x = s * u
    c = tl.where(x < -1.0, -1.0, tl.where(x > 1.0, 1.0, x))  # clamp; NaN passes through
    tl.store(w_ptr + offs, tl.fma(neg_lr, c, w), mask=mask)
    tl.store(m_ptr + offs, m_new, mask=mask)
    tl.store(v_ptr + offs, v_new, mask=mask)
    if TRACK:
        n = tl.sum(tl.sum(tl.where(mask, 1, 0).to(tl.int64), axis=1), axis=0)
        clipped = tl.sum(tl.sum(tl.where(mask & (tl.abs(x) > 1.0), 1, 0).to(tl.int64), axis=1), axis=0)
        total = tl.sum(tl.sum(tl.where(mask, s.to(tl.float64), 0.0), axis=1), axis=0)
        lo = tl.min(tl.min(tl.where(mask, s, float("inf")), axis=1), axis=0)
        hi = tl.max(tl.max(tl.where(mask, s, float("-inf")), axis=1), axis=0)
        tl.atomic_add(count_ptr + param, n)
        tl.atomic_add(clipped_ptr + param, clipped)
        tl.atomic_add(sum_ptr + param, total)
        tl.atomic_min(min_ptr + param, lo)
        tl.atomic_max(max_ptr + param, hi)
