"""The sharded MERIT step: local statistics, one ``all_reduce(MAX)``, local apply.

::

    rank r's flat fp32 partition:  |..W1 tail..|====== W2 rows ======|.. b2 ..|..W3 head..|

    1. local    m, v, u = m/(sqrt(v)+eps) + wd*w over the whole partition (element-wise)
                partial row/col maxima of |w|, |u| per matrix fragment, max|w|, max|u| per
                vector fragment, a non-finite-gradient flag per parameter -> stats buffer
                (same layout on every rank, zeros where this rank owns nothing)
    2. collect  all_reduce(buffer, MAX) over the data-parallel group  -- once per step() call
    3. local    per fragment: trust s from the reduced maxima, w -= lr * clip(s*u, -1, 1);
                parameters flagged non-finite on ANY rank are skipped (or raise) on EVERY rank;
                with ``optimizer.track_stats`` on, each fragment's PartialTrustStats (count,
                sum/min/max of s, count of |s*u| > 1) from the very s and u the update uses

Trust-ratio statistics stay local: ``optimizer.partial_stats[(flat, i)]`` holds this rank's
share of parameter ``i`` of the group. Combining them over ranks (a handful of scalars) is
:func:`merit_ds.sharding.stats.reduce_trust_stats`, called by whoever wants the summary, on
diagnostics steps only -- never here, so a ``step()`` keeps its one collective.

Every number is produced by :mod:`merit_ds.optim.formulas` on views of the partition, so the
fp32 result equals single-device MERIT bit for bit (the same element-wise operations on the
same floats; maxima are exact).

``nonfinite_grads="propagate"`` skips the checks: NaN statistics then meet the MAX
all-reduce, whose NaN handling is the backend's (gloo and NCCL need not propagate it), so
ranks may disagree about a NaN parameter where one device would simply produce NaN. Use
``"skip"`` (default) or ``"raise"`` where gradients can be non-finite.

The state lives on the flat partition tensor under MERIT's keys (``exp_avg``,
``exp_avg_sq``, ``step``): that is what DeepSpeed checkpoints and its universal converter
read. ``step`` counts the step() calls in which at least one parameter of the group was
updated (MERIT has no bias correction, so it is bookkeeping only).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from merit_ds.optim import formulas as F
from merit_ds.optim.merit import _as_float
from merit_ds.optim.trust_stats import merge_trust_stats, partial_trust_stats

from . import collective
from .layout import PartitionLayout, matrix_dims

__all__ = ["ShardedGroupStep", "run_sharded_steps"]


@dataclass
class ShardedGroupStep:
    """One param group's flat partition, its layout and the group to reduce over.

    Callable (runs alone); :meth:`run_many` runs several groups of one ``step()`` call with
    a single collective per process group. :class:`~merit_ds.optim.MERIT` calls ``run_many``
    with all sharded groups of a step.
    """

    optimizer: Any
    group: dict
    flat: Tensor
    layout: PartitionLayout
    process_group: Any
    source: str  # "zero1/2", "zero3", "bf16": for error messages
    # phase-1 results
    _grad: Optional[Tensor] = field(default=None, repr=False)
    _new_moments: Optional[tuple] = field(default=None, repr=False)
    _u: Optional[Tensor] = field(default=None, repr=False)
    _stats: Optional[Tensor] = field(default=None, repr=False)

    def __call__(self) -> None:
        run_sharded_steps([self])

    @staticmethod
    def run_many(steps: list["ShardedGroupStep"]) -> None:
        run_sharded_steps(steps)


def run_sharded_steps(steps: list[ShardedGroupStep]) -> None:
    """Run the three phases for all ``steps`` (one collective per distinct process group)."""
    by_group: dict[int, list[ShardedGroupStep]] = {}
    order = []
    for s in steps:
        key = id(s.process_group)
        if key not in by_group:
            by_group[key] = []
            order.append(key)
        by_group[key].append(s)
    for key in order:
        _run_same_group(by_group[key])


def _run_same_group(steps: list[ShardedGroupStep]) -> None:
    total = sum(s.layout.buffer_numel for s in steps)
    dtype = steps[0].flat.dtype
    if dtype != torch.float32 or any(s.flat.dtype != dtype for s in steps):
        raise TypeError(f"MERIT's sharded step expects float32 master partitions, got {[s.flat.dtype for s in steps]}")
    buffer = torch.zeros(total, dtype=dtype, device=steps[0].flat.device)
    base = 0
    for s in steps:
        s._stats = buffer.narrow(0, base, s.layout.buffer_numel)
        base += s.layout.buffer_numel
        _local_statistics(s)

    collective.all_reduce_max(buffer, steps[0].process_group)  # the one collective

    flagged = [_flagged(s) for s in steps]
    for s, bad in zip(steps, flagged):  # decide before touching anything: raise is all-or-nothing
        if bad and s.group["nonfinite_grads"] == "raise":
            shapes = [s.layout.slots[i].shape for i in sorted(bad)]
            for t in steps:
                t._grad = t._u = t._stats = t._new_moments = None
            raise FloatingPointError(
                f"MERIT ({s.source}): non-finite gradient in {len(bad)} parameter(s) (indices {sorted(bad)} in "
                f"their group, shapes {shapes}) on some rank; nothing was modified on any rank. "
                f"Use nonfinite_grads='skip' to skip them."
            )
    for s, bad in zip(steps, flagged):
        _apply(s, bad)
        s._grad = s._u = s._stats = s._new_moments = None


def _state(s: ShardedGroupStep) -> dict:
    state = s.optimizer.state[s.flat]
    if len(state) == 0:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(s.flat, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(s.flat, memory_format=torch.preserve_format)
    return state


def _scratch(s: ShardedGroupStep, count: int) -> list[Tensor]:
    """``count`` partition-sized work buffers, kept across steps.

    Not optimizer state (not checkpointed). Reusing them keeps large allocations off the
    allocator's path on every step, which on CPU costs more than the arithmetic.
    """
    cache = s.optimizer.__dict__.setdefault("_merit_scratch", {})
    hit = cache.get(id(s.flat))
    if hit is None or hit[0] is not s.flat or len(hit[1]) != count:
        hit = (s.flat, [torch.empty_like(s.flat) for _ in range(count)])
        cache[id(s.flat)] = hit
    return hit[1]


def _local_statistics(s: ShardedGroupStep) -> None:
    """Phase 1: u over the partition, partial maxima into the stats buffer, flags."""
    flat, group, layout, buf = s.flat, s.group, s.layout, s._stats
    if flat.grad is None:
        return  # contributes zeros; phase 3 leaves the partition alone
    grad = flat.grad if flat.grad.dtype == flat.dtype else flat.grad.to(flat.dtype)
    beta1, beta2 = group["betas"]
    state = _state(s)
    if group["nonfinite_grads"] == "propagate":  # nothing can be skipped: update in place
        (u_buf,) = _scratch(s, 1)
        F.update_moments_(state["exp_avg"], state["exp_avg_sq"], grad, beta1, beta2)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        s._new_moments = None
    else:  # committed in phase 3, once all ranks agree the gradient is finite
        m_buf, v_buf, u_buf = _scratch(s, 3)
        m, v = F.updated_moments(state["exp_avg"], state["exp_avg_sq"], grad, beta1, beta2, out=(m_buf, v_buf))
        s._new_moments = (m, v)
    s._u = F.update_direction(m, v, flat, group["eps"], group["weight_decay"], out=u_buf)
    s._grad = grad

    for frag in layout.fragments:
        slot = layout.slots[frag.param_index]
        w = flat.narrow(0, frag.partition_offset, frag.numel)
        u = s._u.narrow(0, frag.partition_offset, frag.numel)
        if slot.is_matrix:
            rows, cols, inner = matrix_dims(slot.shape)
            row_w, row_u, col_w, col_u = _matrix_slots(buf, slot.offset, rows, cols, inner)
            F.fragment_maxima_(w, frag.param_start, cols, inner, row_w, col_w)
            F.fragment_maxima_(u, frag.param_start, cols, inner, row_u, col_u)
        else:
            pair = buf.narrow(0, slot.offset, 2)
            torch.maximum(pair, torch.stack([F.tensor_max(w), F.tensor_max(u)]), out=pair)

    # A non-finite gradient element makes that u element NaN (inf/inf or NaN), and a NaN
    # reaches every maximum over it: finite statistics prove finite gradients, so the exact
    # per-fragment check runs only when some statistic is not finite.
    if group["nonfinite_grads"] != "propagate" and not bool(torch.isfinite(buf).all()):
        for frag in layout.fragments:
            g = grad.narrow(0, frag.partition_offset, frag.numel)
            if not bool(torch.isfinite(F.tensor_max(g))):
                buf[layout.slots[frag.param_index].flag] = 1.0


def _matrix_slots(buf: Tensor, offset: int, rows: int, cols: int, inner: int):
    r, c = rows * inner, cols * inner
    return (
        buf.narrow(0, offset, r),
        buf.narrow(0, offset + r, r),
        buf.narrow(0, offset + 2 * r, c),
        buf.narrow(0, offset + 2 * r + c, c),
    )


def _flagged(s: ShardedGroupStep) -> set[int]:
    if s.group["nonfinite_grads"] == "propagate" or not s.layout.slots:
        return set()
    first = s.layout.slots[0].flag
    flags = s._stats.narrow(0, first, len(s.layout.slots))
    if not bool((flags != 0).any()):
        return set()
    return {i for i, f in enumerate(flags.tolist()) if f != 0}


def _apply(s: ShardedGroupStep, bad: set[int]) -> None:
    """Phase 3: commit moments, trust ratios from the reduced maxima, clipped update."""
    flat, group, layout, buf = s.flat, s.group, s.layout, s._stats
    track = bool(getattr(s.optimizer, "track_stats", False))
    if track:  # stepped parameters record afresh below; the others lose their entry
        for i in range(len(layout.slots)):
            s.optimizer.partial_stats.pop((flat, i), None)
    if flat.grad is None or s._u is None:
        return
    state = s.optimizer.state[flat]
    lr = _as_float(group["lr"])
    live = [f for f in layout.fragments if f.param_index not in bad]
    work = None  # a free partition-sized buffer for the full-size trust ratios
    if s._new_moments is not None:  # commit the moments phase 1 computed
        m_new, v_new = s._new_moments
        if not bad:
            state["exp_avg"].copy_(m_new)
            state["exp_avg_sq"].copy_(v_new)
            work = m_new
        else:
            for f in live:
                for key, new in (("exp_avg", m_new), ("exp_avg_sq", v_new)):
                    state[key].narrow(0, f.partition_offset, f.numel).copy_(new.narrow(0, f.partition_offset, f.numel))
    if bad:
        s.optimizer.nonfinite_skips += len(bad)
        warnings.warn(
            f"MERIT ({s.source}): skipped the step of {len(bad)} parameter(s) with non-finite gradients "
            f"(on all ranks)",
            RuntimeWarning,
            stacklevel=5,
        )
    if len(bad) < len(layout.slots) or not layout.slots:
        state["step"] += 1

    maxima_cache: dict[int, tuple] = {}
    pieces: Optional[dict[int, list]] = {} if track else None  # param index -> partial stats
    for frag in live:
        slot = layout.slots[frag.param_index]
        w = flat.narrow(0, frag.partition_offset, frag.numel)
        u = s._u.narrow(0, frag.partition_offset, frag.numel)
        if not slot.is_matrix:
            trust = F.vector_trust_ratio(buf[slot.offset], buf[slot.offset + 1])
            _record(pieces, frag.param_index, trust, u)
            F.apply_update_(w, u, trust, lr)
            continue
        rows, cols, inner = matrix_dims(slot.shape)
        row_w, row_u, col_w, col_u = _matrix_slots(buf, slot.offset, rows, cols, inner)
        if frag.param_index not in maxima_cache:
            # The tensor maxima are the maxima of the row maxima, exactly (as on one device).
            maxima_cache[frag.param_index] = (row_w.max(), row_u.max())
        max_w, max_u = maxima_cache[frag.param_index]
        row_len = cols * inner
        for pos, length, row, col0 in frag.row_pieces():
            wp, up = w.narrow(0, pos, length), u.narrow(0, pos, length)
            if col0 == 0 and length % row_len == 0:  # whole rows: broadcast like one device
                n = length // row_len
                shape3 = (n, cols, inner)
                out = None
                if work is not None:
                    out = work.narrow(0, frag.partition_offset + pos, length).view(shape3)
                trust = F.matrix_trust_ratio(
                    row_w.narrow(0, row * inner, n * inner).view(n, 1, inner),
                    row_u.narrow(0, row * inner, n * inner).view(n, 1, inner),
                    col_w.view(1, cols, inner),
                    col_u.view(1, cols, inner),
                    max_w,
                    max_u,
                    out=out,
                )
                _record(pieces, frag.param_index, trust, up.view(shape3))
                F.apply_update_(wp.view(shape3), up.view(shape3), trust, lr)
            else:  # part of one row: per-element row/column maxima of the slice (all 1-D)
                if inner == 1:
                    rw, ru = row_w.narrow(0, row, 1), row_u.narrow(0, row, 1)
                else:
                    idx = torch.arange(col0, col0 + length, device=flat.device) % inner + row * inner
                    rw, ru = row_w.index_select(0, idx), row_u.index_select(0, idx)
                trust = F.matrix_trust_ratio(
                    rw, ru, col_w.narrow(0, col0, length), col_u.narrow(0, col0, length), max_w, max_u
                )
                _record(pieces, frag.param_index, trust, up)
                F.apply_update_(wp, up, trust, lr)
    if pieces:
        for index, parts in pieces.items():
            s.optimizer.partial_stats[(flat, index)] = parts[0] if len(parts) == 1 else merge_trust_stats(parts)


def _record(pieces: Optional[dict], index: int, trust: Tensor, u: Tensor) -> None:
    """This piece's trust-ratio statistics (before apply_update_ overwrites ``u``)."""
    if pieces is not None:
        pieces.setdefault(index, []).append(partial_trust_stats(trust, u))
