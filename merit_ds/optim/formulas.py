"""Every MERIT formula, in one place.

This module is the single source of truth for the arithmetic of MERIT ("MERIT: Maximum-
normalized Element-wise Ratio for Language Model Large-batch Training", ICML 2025). The
single-tensor reference, the foreach fast path, the compiled path and the sharded (ZeRO)
step all call these functions, so they cannot drift apart; the sharded step gets bitwise
equality with one device because it runs the same element-wise operations on the same
floats, only on a slice.

The algorithm, for a parameter ``w`` with gradient ``g`` (``t`` counts steps)::

    m_t = b1 * m_{t-1} + (1 - b1) * g                  # Adam moments, NO bias correction
    v_t = b2 * v_{t-1} + (1 - b2) * g * g
    u   = m_t / (sqrt(v_t) + eps) + wd * w             # decay folded in before the ratios

    matrices (ndim >= 2), with W = |w|, U = |u|:
      row_W = max over dim 1 of W   (keepdim; trailing dims of conv weights are kept)
      col_W = max over dim 0 of W   (keepdim)
      likewise row_U, col_U;  max_W = max(W), max_U = max(U)

      s_ij = max( row_W_i / row_U_i , col_W_j / col_U_j , max_W / max_U )
      s_ij = 1   wherever row_W_i, row_U_i, col_W_j or col_U_j is 0

    vectors (ndim <= 1):
      s = max_W / max_U   (1 if either is 0)

    w = w - lr * clip(s * u, -1, 1)                    # element-wise clip

Layout of the statistics of one matrix of shape (R, C, *rest)::

             col_W / col_U : shape (1, C, *rest)
            +-----------------------+
    row_W / |                       |
    row_U   |      w, u : (R, C)    |     s = max(row ratio, col ratio, tensor ratio)
    (R, 1,  |                       |         broadcast to (R, C, *rest)
     *rest) +-----------------------+

All maxima are exact (no rounding), so partial maxima computed over pieces of a matrix and
combined with ``max`` equal the maxima of the whole matrix bit for bit: that is what lets a
sharded optimizer exchange only these small vectors. ``0`` is the identity of ``max(|x|)``,
so a rank that owns nothing of a row contributes ``0``.

Nothing here imports ``torch.distributed``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "stats_size",
    "MatrixMaxima",
    "update_moments_",
    "foreach_update_moments_",
    "update_direction",
    "matrix_maxima",
    "tensor_max",
    "ratio_and_zero",
    "matrix_trust_ratio",
    "vector_trust_ratio",
    "apply_update_",
    "is_matrix",
    "updated_moments",
    "fragment_maxima_",
    "matrix_dims",
    "row_pieces",
]


class MatrixMaxima(NamedTuple):
    """Row / column maxima of |w| and |u| for one matrix (shapes in the module docstring)."""

    row_w: Tensor
    row_u: Tensor
    col_w: Tensor
    col_u: Tensor


def matrix_dims(shape) -> tuple[int, int, int]:
    """(R, C, K) of a parameter viewed as ``(R, C, K)`` with ``K = prod(shape[2:])``."""
    return int(shape[0]), int(shape[1]), int(math.prod(shape[2:]))


def stats_size(shape) -> int:
    """Entries of MERIT's statistics buffer for a parameter of ``shape``: row and column maxima
    of |w| and |u| for a matrix (``2 * (rows + cols) * inner``), the tensor maxima (2) otherwise.
    The buffer's layout is drawn in :mod:`merit_ds.optim.layout`."""
    if is_matrix(shape):
        rows, cols, inner = matrix_dims(shape)
        return 2 * (rows + cols) * inner
    return 2


def row_pieces(shape, param_start: int, numel: int) -> list[tuple[int, int, int, int]]:
    """Split elements ``[param_start, param_start + numel)`` of a matrix at row boundaries.

    Returns ``(offset_in_fragment, length, first_row, first_col_in_row)`` per piece, where a
    piece is either a partial row (``length < C*K`` or unaligned start) or a run of whole
    rows (``first_col_in_row == 0`` and ``length`` a multiple of ``C*K``)::

        fragment  [ ....head.... | ====== whole rows ====== | ..tail.. ]
                    row i, col a   rows i+1 .. i+r            row i+r+1, col 0
    """
    _, cols, inner = matrix_dims(shape)
    row_len = cols * inner
    pieces = []
    pos = 0
    while pos < numel:
        row, col0 = divmod(param_start + pos, row_len)
        if col0 == 0 and numel - pos >= row_len:
            length = (numel - pos) // row_len * row_len
        else:
            length = min(row_len - col0, numel - pos)
        pieces.append((pos, length, row, col0))
        pos += length
    return pieces


def is_matrix(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a parameter of this shape gets element-wise ratios (ndim >= 2)."""
    return len(shape) >= 2


def update_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, beta1: float, beta2: float) -> None:
    """m = b1*m + (1-b1)*g ; v = b2*v + (1-b2)*g^2, in place, without bias correction.

    The foreach path issues the same operations (``mul_``, ``add_(alpha)``, ``addcmul_``)
    so that both paths round identically.
    """
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def foreach_update_moments_(exp_avgs, exp_avg_sqs, grads, beta1: float, beta2: float) -> None:
    """:func:`update_moments_` over lists with ``torch._foreach`` ops: the same operations in the
    same order, so every element rounds exactly as in the single-tensor form."""
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)


def update_direction(
    exp_avg: Tensor, exp_avg_sq: Tensor, param: Tensor, eps: float, weight_decay: float, *, out: Tensor | None = None
) -> Tensor:
    """u = m / (sqrt(v) + eps) + wd * w, as a new tensor (or into ``out``)."""
    denom = (exp_avg_sq.sqrt() if out is None else torch.sqrt(exp_avg_sq, out=out)).add_(eps)
    u = torch.div(exp_avg, denom, out=denom)
    if weight_decay != 0:
        u.add_(param, alpha=weight_decay)
    return u


def _amax_abs(x: Tensor, dim: int | None = None) -> Tensor:
    # max |x| = max(max x, -min x), exactly (negation is exact), without materialising |x|:
    # two read-only reductions, several times faster on CPU than abs().amax() or the
    # inf-norm. Both propagate NaN, so a non-finite u shows up in every statistic. (Where
    # all entries are zero the result may be -0.0; every consumer tests maxima with == 0.)
    if dim is None:
        return torch.maximum(x.amax(), x.amin().neg_())
    return torch.maximum(x.amax(dim, keepdim=True), x.amin(dim, keepdim=True).neg_())


def matrix_maxima(w: Tensor, u: Tensor) -> MatrixMaxima:
    """Row maxima over dim 1 and column maxima over dim 0 of |w| and |u| (keepdim)."""
    return MatrixMaxima(_amax_abs(w, 1), _amax_abs(u, 1), _amax_abs(w, 0), _amax_abs(u, 0))


def tensor_max(x: Tensor) -> Tensor:
    """max |x| over the whole tensor (0 for an empty tensor: the identity of max |.|)."""
    if x.numel() == 0:
        return x.new_zeros(())
    return _amax_abs(x)


def ratio_and_zero(num: Tensor, den: Tensor) -> tuple[Tensor, Tensor]:
    """num / den, and the mask of places where either is 0 (there the trust ratio is 1)."""
    return num / den, (num == 0) | (den == 0)


def matrix_trust_ratio(
    row_w: Tensor,
    row_u: Tensor,
    col_w: Tensor,
    col_u: Tensor,
    max_w: Tensor,
    max_u: Tensor,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Element-wise trust ratio s of a matrix from its row/column/tensor maxima.

    The arguments broadcast against each other: (R,1,*rest) rows with (1,C,*rest) columns give
    the full (R,C,*rest) ratio; the sharded step passes the per-element gathered maxima of a
    slice instead (all 1-D of the slice's length) and gets the same floats. ``out``: where
    to write the full-size ratio (a preallocated buffer of the broadcast shape).
    """
    row_ratio, row_zero = ratio_and_zero(row_w, row_u)
    col_ratio, col_zero = ratio_and_zero(col_w, col_u)
    # Clamp below by the tensor-level ratio on the small vectors: max is exact, so
    # max(max(r, c), t) == max(max(r, t), max(c, t)) and the full-size ratio is written in
    # one pass. Where max_w or max_u is 0 every row is masked below, so a nan/inf here never
    # survives.
    floor = max_w / max_u
    row_ratio = row_ratio.clamp_(min=floor)
    col_ratio = col_ratio.clamp_(min=floor)
    s = torch.maximum(row_ratio, col_ratio) if out is None else torch.maximum(row_ratio, col_ratio, out=out)
    # Zeros are rare (an all-zero row of w, say); test the small vectors before building a
    # full-size mask.
    if row_zero.any() or col_zero.any():
        s.masked_fill_(row_zero | col_zero, 1.0)
    return s


def vector_trust_ratio(max_w: Tensor, max_u: Tensor) -> Tensor:
    """Tensor-level ratio max|w| / max|u| for vectors; 1 if either maximum is 0."""
    ratio, zero = ratio_and_zero(max_w, max_u)
    return torch.where(zero, torch.ones_like(ratio), ratio)


def apply_update_(param: Tensor, u: Tensor, trust: Tensor, lr: float) -> None:
    """w -= lr * clip(s * u, -1, 1), in place; ``u`` is overwritten as scratch."""
    u.mul_(trust).clamp_(-1.0, 1.0)
    param.add_(u, alpha=-lr)


def updated_moments(
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    grad: Tensor,
    beta1: float,
    beta2: float,
    *,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The moments :func:`update_moments_` would write, as new tensors or into ``out``
    (state untouched).

    Same operations in the same order (``mul`` then ``add_(alpha)`` / ``addcmul_``), so every
    element rounds exactly as in the in-place form. The sharded step uses this when a
    parameter's step may still be skipped after the ranks agree on non-finite gradients.
    """
    m_out, v_out = out if out is not None else (None, None)
    m = (exp_avg.mul(beta1) if m_out is None else torch.mul(exp_avg, beta1, out=m_out)).add_(grad, alpha=1 - beta1)
    v = (exp_avg_sq.mul(beta2) if v_out is None else torch.mul(exp_avg_sq, beta2, out=v_out)).addcmul_(
        grad, grad, value=1 - beta2
    )
    return m, v


def fragment_maxima_(x: Tensor, start: int, cols: int, inner: int, row_out: Tensor, col_out: Tensor) -> None:
    """Partial row / column maxima of ``|x|``, where ``x`` is a flat slice of a matrix.

    ``x`` holds the elements ``[start, start + x.numel())`` of a parameter of shape
    ``(R, C, *rest)`` flattened in row-major order; ``cols = C`` and ``inner = prod(rest)``
    (1 for a plain matrix). Element ``e`` sits in row ``i = e // (C*inner)``, column
    ``j = (e // inner) % C`` and trailing position ``k = e % inner``; its row statistic is
    ``row_out[i*inner + k]`` (``R*inner`` entries, the flattened ``(R, 1, *rest)`` maxima) and
    its column statistic ``col_out[j*inner + k] = col_out[e % (C*inner)]`` (``C*inner``
    entries). Both outputs must start at 0 (the identity of ``max |.|``); on return they hold
    the maxima over the elements of ``x`` only, everything else stays 0::

        parameter (R=4, C=5) flattened:       fragment x = elements [7, 18)
             c0 c1 c2 c3 c4
        r0 [  .  .  .  .  . ]                 head: r1, cols 2..4   (partial row)
        r1 [  .  .  x  x  x ]   <- head       body: r2              (whole rows)
        r2 [  x  x  x  x  x ]   <- body       tail: r3, cols 0..2   (partial row)
        r3 [  x  x  x  .  . ]   <- tail
                                              row_out = [0, max r1[2:], max r2, max r3[:3]]
                                              col_out = column-wise max over the x's

    Whole rows are reduced as a ``(rows, C, inner)`` block; a partial row contributes its
    ``|x|`` element-wise to a contiguous slice of ``col_out`` and one maximum per trailing
    position to its row. Maxima are exact, so combining these partial results with ``max``
    (the sharded step's ``all_reduce(MAX)``) gives the whole matrix's maxima bit for bit.
    """
    row_len = cols * inner
    n = x.numel()
    pos = 0
    while pos < n:
        e = start + pos
        row, col0 = divmod(e, row_len)
        if col0 == 0 and n - pos >= row_len:
            nrows = (n - pos) // row_len
            block = x.narrow(0, pos, nrows * row_len).view(nrows, cols, inner)
            row_out.narrow(0, row * inner, nrows * inner).copy_(_amax_abs(block, 1).view(-1))
            col_part = _amax_abs(block, 0).view(-1)
            torch.maximum(col_out, col_part, out=col_out)
            pos += nrows * row_len
            continue
        length = min(row_len - col0, n - pos)
        piece = x.narrow(0, pos, length)
        col_slice = col_out.narrow(0, col0, length)
        torch.maximum(col_slice, piece.abs(), out=col_slice)
        row_slice = row_out.narrow(0, row * inner, inner)
        if inner == 1:
            torch.maximum(row_slice, _amax_abs(piece).view(1), out=row_slice)
        else:
            k = torch.arange(col0, col0 + length, device=x.device) % inner
            row_slice.scatter_reduce_(0, k, piece.abs(), reduce="amax", include_self=True)
        pos += length
