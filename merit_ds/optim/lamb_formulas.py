"""Every LAMB formula, in one place.

LAMB, You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes" (ICLR 2020), Algorithm 2 as published, for a parameter ``w`` (one tensor: a
"layer") with gradient ``g`` at step ``t = 1, 2, ...``::

    m_t   = b1 * m_{t-1} + (1 - b1) * g               # Adam moments (formulas.update_moments_)
    v_t   = b2 * v_{t-1} + (1 - b2) * g * g
    m_hat = m_t / (1 - b1^t) ;  v_hat = v_t / (1 - b2^t)   # bias correction (may be disabled)
    u     = m_hat / (sqrt(v_hat) + eps) + wd * w       # decay folded in before the ratio
    r     = ||w|| / ||u||                              # phi = identity; Euclidean norms
    r     = 1  where ||w|| = 0 or ||u|| = 0
    r     = min(r, max_trust_ratio)                    # only if a clamp is given (default none)
    w     = w - lr * r * u

Every tensor gets its ratio (matrices, biases and norms alike, as in the paper); whether a
tensor decays is the param group's ``weight_decay``. Norms come from sums of squares
accumulated in float64 (:func:`sum_of_squares`): partial sums over pieces of a tensor add up
to the whole tensor's sum up to float64 rounding (~1e-16 relative), which is what lets the
sharded step exchange two numbers per tensor.

Nothing here imports ``torch.distributed``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["bias_corrections", "lamb_direction", "sum_of_squares", "lamb_trust_ratio", "apply_scaled_update_"]


def bias_corrections(step: int, beta1: float, beta2: float, enabled: bool = True) -> tuple[float, float]:
    """``(1 - b1^t, sqrt(1 - b2^t))`` for step ``t`` (``(1, 1)`` when disabled)."""
    if not enabled:
        return 1.0, 1.0
    return 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)


def lamb_direction(
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    param: Tensor,
    eps: float,
    weight_decay: float,
    bias_correction1: float,
    bias_correction2_sqrt: float,
    *,
    out: Optional[Tensor] = None,
) -> Tensor:
    """u = m_hat / (sqrt(v_hat) + eps) + wd * w, with ``sqrt(v_hat) = sqrt(v) / sqrt(1 - b2^t)``
    and ``m_hat = m / (1 - b1^t)``; as a new tensor or into ``out``."""
    denom = exp_avg_sq.sqrt() if out is None else torch.sqrt(exp_avg_sq, out=out)
    denom.div_(bias_correction2_sqrt).add_(eps)
    u = torch.div(exp_avg, denom, out=denom).div_(bias_correction1)
    if weight_decay != 0:
        u.add_(param, alpha=weight_decay)
    return u


def sum_of_squares(x: Tensor, scratch: Optional[Tensor] = None) -> Tensor:
    """sum(x^2) as a float64 0-d tensor (squares rounded in x's dtype, accumulated in float64).

    ``scratch``: a buffer of x's shape and dtype for the squares (saves an allocation).
    """
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    sq = torch.mul(x, x) if scratch is None else torch.mul(x, x, out=scratch)
    return sq.sum(dtype=torch.float64)


def lamb_trust_ratio(
    sum_sq_w: Tensor, sum_sq_u: Tensor, max_trust_ratio: Optional[float], dtype: torch.dtype
) -> Tensor:
    """r = ||w|| / ||u|| (1 where either norm is 0; at most ``max_trust_ratio`` if given),
    computed in float64 and returned as a 0-d tensor of ``dtype``."""
    norm_w, norm_u = sum_sq_w.sqrt(), sum_sq_u.sqrt()
    ratio = torch.where((norm_w == 0) | (norm_u == 0), torch.ones_like(norm_w), norm_w / norm_u)
    if max_trust_ratio is not None:
        ratio = ratio.clamp(max=max_trust_ratio)
    return ratio.to(dtype)


def apply_scaled_update_(param: Tensor, u: Tensor, ratio: Tensor, lr: float) -> None:
    """w -= lr * r * u, in place; ``u`` is overwritten as scratch."""
    u.mul_(ratio)
    param.add_(u, alpha=-lr)
