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

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "MatrixMaxima",
    "update_moments_",
    "update_direction",
    "matrix_maxima",
    "tensor_max",
    "ratio_and_zero",
    "matrix_trust_ratio",
    "vector_trust_ratio",
    "apply_update_",
    "is_matrix",
]


class MatrixMaxima(NamedTuple):
    """Row / column maxima of |w| and |u| for one matrix (shapes in the module docstring)."""

    row_w: Tensor
    row_u: Tensor
    col_w: Tensor
    col_u: Tensor


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


def update_direction(
    exp_avg: Tensor, exp_avg_sq: Tensor, param: Tensor, eps: float, weight_decay: float, out: Tensor | None = None
) -> Tensor:
    """u = m / (sqrt(v) + eps) + wd * w, into ``out`` (a scratch buffer) or a new tensor."""
    denom = exp_avg_sq.sqrt() if out is None else torch.sqrt(exp_avg_sq, out=out)
    u = torch.div(exp_avg, denom.add_(eps), out=denom)
    if weight_decay != 0:
        u.add_(param, alpha=weight_decay)
    return u


def matrix_maxima(w: Tensor, u: Tensor, scratch: Tensor | None = None) -> MatrixMaxima:
    """Row maxima over dim 1 and column maxima over dim 0 of |w| and |u| (keepdim).

    ``scratch`` (same shape) receives |w| then |u|, so that nothing full-size is allocated.
    ``amax`` propagates NaN, so a non-finite u shows up in every statistic.
    """
    abs_w = torch.abs(w, out=scratch) if scratch is not None else w.abs()
    row_w, col_w = abs_w.amax(1, keepdim=True), abs_w.amax(0, keepdim=True)
    abs_u = torch.abs(u, out=scratch) if scratch is not None else u.abs()
    row_u, col_u = abs_u.amax(1, keepdim=True), abs_u.amax(0, keepdim=True)
    return MatrixMaxima(row_w, row_u, col_w, col_u)


def tensor_max(x: Tensor) -> Tensor:
    """max |x| over the whole tensor (0 for an empty tensor: the identity of max |.|)."""
    if x.numel() == 0:
        return x.new_zeros(())
    return x.abs().amax()


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
    out: Tensor | None = None,
) -> Tensor:
    """Element-wise trust ratio s of a matrix from its row/column/tensor maxima.

    The arguments broadcast against each other: (R,1,*rest) rows with (1,C,*rest) columns give
    the full (R,C,*rest) ratio; the sharded step passes the per-element gathered maxima of a
    slice instead (all 1-D of the slice's length) and gets the same floats. ``out`` may be a
    scratch buffer of the full shape.
    """
    row_ratio, row_zero = ratio_and_zero(row_w, row_u)
    col_ratio, col_zero = ratio_and_zero(col_w, col_u)
    s = torch.maximum(row_ratio, col_ratio) if out is None else torch.maximum(row_ratio, col_ratio, out=out)
    # Clamp below by the tensor-level ratio. Where max_w or max_u is 0 every row is masked
    # below, so a nan/inf here never survives.
    s = s.clamp_(min=max_w / max_u)
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
