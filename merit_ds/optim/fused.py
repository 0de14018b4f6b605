"""MERIT with ``torch.compile``-fused kernels (``implementation="fused"``).

The formulas are the same functions of :mod:`merit_ds.optim.formulas`; ``torch.compile``
(Inductor) fuses each phase's element-wise work and reductions into a few loops, so each
parameter is read about twice per step instead of once per operation:

    phase 1 (per tensor): m, v <- moments (in place); u (not stored); row/col maxima of |w|, |u|
    phase 2 (per tensor): u again from m, v, w; s from the maxima; w <- w - lr*clip(s*u, -1, 1)

The learning rate enters as a 0-d tensor so that a schedule does not recompile (betas, eps and
weight decay are constants of a group and specialise the graph); shapes are
dynamic, so GPT-2's dozen distinct shapes share two compiled graphs per rank (matrix, vector).
Results agree with the reference to rounding (the compiler may contract multiply-adds): the
tests state the tolerance. CPU (C++/OpenMP) and CUDA (Triton) backends both work; the first
step pays the compile (tens of seconds on CPU).
"""

from __future__ import annotations

import functools

import torch

from . import formulas as F


def _phase1_matrix(w, g, m, v, beta1, beta2, eps, wd):
    F.update_moments_(m, v, g, beta1, beta2)
    u = F.update_direction(m, v, w, eps, wd)
    mx = F.matrix_maxima(w, u)
    return mx.row_w, mx.row_u, mx.col_w, mx.col_u


def _phase2_matrix(w, m, v, row_w, row_u, col_w, col_u, lr, eps, wd):
    u = F.update_direction(m, v, w, eps, wd)
    row_ratio, row_zero = F.ratio_and_zero(row_w, row_u)
    col_ratio, col_zero = F.ratio_and_zero(col_w, col_u)
    s = torch.maximum(torch.maximum(row_ratio, col_ratio), row_w.amax() / row_u.amax())
    s = torch.where(row_zero | col_zero, torch.ones_like(s), s)
    w.sub_(torch.clamp(u * s, -1.0, 1.0) * lr)


def _vector_step(w, g, m, v, beta1, beta2, eps, wd, lr):
    F.update_moments_(m, v, g, beta1, beta2)
    u = F.update_direction(m, v, w, eps, wd)
    s = F.vector_trust_ratio(w.abs().amax(), u.abs().amax())
    w.sub_(torch.clamp(u * s, -1.0, 1.0) * lr)


@functools.lru_cache(maxsize=None)
def _compiled():
    opts = dict(dynamic=True, fullgraph=True)
    return (
        torch.compile(_phase1_matrix, **opts),
        torch.compile(_phase2_matrix, **opts),
        torch.compile(_vector_step, **opts),
    )


def fused_merit(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay, stats, workspace=None):
    assert stats is None, "merit() routes statistics steps to the foreach path"
    phase1, phase2, vector_step = _compiled()
    device = params[0].device
    lr_t = torch.tensor(lr, dtype=torch.float32, device=device)
    for param, grad, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        step += 1
        w = param if param.dtype == m.dtype else param.to(m.dtype)
        g = grad if grad.dtype == m.dtype else grad.to(m.dtype)
        if F.is_matrix(w.shape) and w.numel() > 0:
            maxima = phase1(w, g, m, v, beta1, beta2, eps, weight_decay)
            phase2(w, m, v, *maxima, lr_t, eps, weight_decay)
        else:
            vector_step(w, g, m, v, beta1, beta2, eps, weight_decay, lr_t)
        if w is not param:
            param.copy_(w)
