"""MERIT's sharded step over a whole flat partition at once: segmented maxima, no host sync.

The per-fragment sharded step (:mod:`merit_ds.sharding.step`) walks the fragments of a
partition one by one: on a GPU that is many small kernel launches and one host sync per
fragment. This module does the same math in a fixed number of element-wise, gather and
``scatter_reduce`` operations over the whole partition, in chunks of ``chunk`` elements:

    phase 1  statistics(plan, w, g, m, v, group, buffer)
               per element: m', v', u (registers of the chunk, nothing written to w, m, v);
               scatter_reduce(amax) of |w| and |u| into the row, column (matrices) or tensor
               (vectors) entries of the statistics buffer, and of "g not finite" into the
               parameter's flag -- the buffer layout of merit_ds.optim.layout
    (the caller all-reduces the buffer with MAX, as for the per-fragment step)
    phase 3  apply(plan, w, g, m, v, group, buffer, lr)
               per element: m', v', u recomputed; the row / column / tensor maxima gathered;
               s and the update with the formulas' operations; w, m, v written where the
               element's parameter is not flagged (and not padding)

Nothing is written before phase 3, as in the CPU kernel, so no partition-sized buffer is kept:
the persistent scratch is the plan's tables (``SegmentedPlan.persistent_bytes``: a few
integers per fragment and 24 bytes per matrix row, 2.8 MB for GPT-2 Small against its 498 MB
of fp32 parameters). The temporaries live for one chunk: about twenty chunk-sized tensors,
int64 indices included (estimated at 160 bytes per element); the default chunk is 1/64 of the
partition (at least 65,536 elements), so they stay near 2.5 bytes per partition element,
under one fp32 partition (``transient_bytes``); pass ``chunk`` to trade launches for memory. No operation reads a value
back to the host, so a CUDA step is queued without waiting (``nonfinite_grads="raise"`` needs
the flags on the host and is the caller's business).

The arithmetic is the formulas' (:mod:`merit_ds.optim.formulas`) on gathered maxima, so the
result equals the per-fragment sharded step and single-device MERIT; the tests compare it on
CPU with the single-tensor reference (``tests/test_optim_segmented.py``). It is written in
torch operations so that the same code runs, and is tested, on CPU; on CUDA it is meant to
be wrapped by ``torch.compile`` (one fused kernel per phase and chunk). It has not been timed
on a GPU yet (``benchmarks/gpu_smoke.py`` has the row for it). On CUDA partitions the sharded
step (:mod:`merit_ds.sharding.step`, ``segmented_wanted``) runs the Triton kernels of
:mod:`merit_ds.optim.segmented_triton` instead, the same phases with per-tile reductions; this
torch form is their fallback (no triton, or a failed self-check) and their self-check's
reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from . import formulas as F

__all__ = ["SegmentedPlan", "plan", "statistics", "apply", "DEFAULT_CHUNK"]

# Whether apply(..., track=True) returns the step's trust-ratio statistics (the sharded step
# runs this form on statistics steps only if so).
TRACKS_STATS = False

# Elements per chunk, by default: 1/CHUNKS_PER_PARTITION of the partition (at least
# MIN_CHUNK). The temporaries of a chunk (int64 indices, gathered maxima, m', v', u, s, masks)
# are about TEMP_BYTES_PER_ELEMENT per element, so 64 chunks keep them at ~2.5 bytes per
# partition element: under one fp32 partition (4 bytes per element), as the issue asks.
CHUNKS_PER_PARTITION = 64
MIN_CHUNK = 1 << 16
TEMP_BYTES_PER_ELEMENT = 160
DEFAULT_CHUNK = None


def default_chunk(partition_numel: int) -> int:
    return max(MIN_CHUNK, -(-partition_numel // CHUNKS_PER_PARTITION))


def transient_bytes(partition_numel: int) -> int:
    """Estimated peak bytes of one chunk's temporaries at the default chunk size."""
    return TEMP_BYTES_PER_ELEMENT * min(partition_numel, default_chunk(partition_numel))


@dataclass
class SegmentedPlan:
    """Per-fragment tables of one partition (int64, on the partition's device)."""

    offsets: Tensor  # partition offset of each fragment
    ends: Tensor  # partition offset + numel
    param_start: Tensor
    row_len: Tensor  # C*K for matrices, 1 for vectors
    inner: Tensor  # K (1 for vectors)
    row_base: Tensor  # buffer index of the row |w| entry of row 0 (vectors: the max |w| entry)
    row_span: Tensor  # distance from a row |w| entry to its row |u| entry (R*K; vectors 1)
    col_base: Tensor  # buffer index of column |w| entry 0 (vectors: the max |w| entry)
    col_span: Tensor  # C*K (vectors 1)
    is_matrix: Tensor  # bool
    param: Tensor  # parameter index (its flag is flag_base + param)
    flag_base: int
    n_params: int
    # per buffer entry of a matrix's row |w| table: the parameter, for the tensor maxima
    entry_param: Tensor
    entry_index: Tensor
    entry_row_span: Tensor  # R*K of that matrix: its row |u| entry is this much further
    partition_numel: int

    def persistent_bytes(self) -> int:
        """Memory the plan keeps across steps (its tables), in bytes."""
        tensors = [getattr(self, k) for k in self.__dataclass_fields__ if isinstance(getattr(self, k), Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


def plan(shapes: Sequence[tuple], fragments, slots, flag_base: int, partition_numel: int, device) -> SegmentedPlan:
    """The tables for a partition: ``fragments`` (merit_ds.optim.layout.Fragment, ordered by
    offset), ``slots`` (ParamSlots per parameter, offsets relative to the buffer)."""
    cols = {k: [] for k in ("offsets", "ends", "param_start", "row_len", "inner", "row_base", "row_span", "col_base",
                            "col_span", "is_matrix", "param")}
    for f in fragments:
        slot = slots[f.param_index]
        cols["offsets"].append(f.partition_offset)
        cols["ends"].append(f.partition_offset + f.numel)
        cols["param_start"].append(f.param_start)
        cols["param"].append(f.param_index)
        if F.is_matrix(slot.shape):
            rows, c, k = F.matrix_dims(slot.shape)
            r, cc = rows * k, c * k
            vals = dict(row_len=cc, inner=k, row_base=slot.offset, row_span=r, col_base=slot.offset + 2 * r,
                        col_span=cc, is_matrix=True)
        else:
            vals = dict(row_len=1, inner=1, row_base=slot.offset, row_span=1, col_base=slot.offset, col_span=1,
                        is_matrix=False)
        for k2, v in vals.items():
            cols[k2].append(v)
    entry_param, entry_index, entry_row_span = [], [], []
    for i, slot in enumerate(slots):
        if F.is_matrix(slot.shape):
            rows, _, k = F.matrix_dims(slot.shape)
            entry_param += [i] * (rows * k)
            entry_index += range(slot.offset, slot.offset + rows * k)
            entry_row_span += [rows * k] * (rows * k)
    t = {k: torch.tensor(v, dtype=torch.bool if k == "is_matrix" else torch.int64, device=device)
         for k, v in cols.items()}
    return SegmentedPlan(
        **t, flag_base=flag_base, n_params=len(slots),
        entry_param=torch.tensor(entry_param, dtype=torch.int64, device=device),
        entry_index=torch.tensor(entry_index, dtype=torch.int64, device=device),
        entry_row_span=torch.tensor(entry_row_span, dtype=torch.int64, device=device),
        partition_numel=partition_numel,
    )


def _chunks(n: int, chunk):
    chunk = chunk or default_chunk(n)
    for a in range(0, n, chunk):
        yield a, min(n, a + chunk)


def _indices(p: SegmentedPlan, a: int, b: int, device):
    """For elements [a, b) of the partition: (valid, fragment, row |w| index, column |w| index)."""
    e = torch.arange(a, b, device=device)
    frag = torch.searchsorted(p.ends, e, right=True).clamp_(max=max(len(p.ends) - 1, 0))
    valid = (e >= p.offsets[frag]) & (e < p.ends[frag])
    # element index inside its parameter (0 for padding, so that every index stays in range)
    pos = torch.where(valid, p.param_start[frag] + (e - p.offsets[frag]), 0)
    row_len, inner = p.row_len[frag], p.inner[frag]
    row = torch.div(pos, row_len, rounding_mode="floor")
    o = pos - row * row_len
    mat = p.is_matrix[frag]
    row_idx = torch.where(mat, p.row_base[frag] + row * inner + o % inner, p.row_base[frag])
    col_idx = torch.where(mat, p.col_base[frag] + o, p.col_base[frag])
    return valid, frag, row_idx, col_idx


def _direction(w, g, m, v, group):
    beta1, beta2 = group["betas"]
    m_new, v_new = F.updated_moments(m, v, g, beta1, beta2)
    u = F.update_direction(m_new, v_new, w, group["eps"], group["weight_decay"])
    return m_new, v_new, u


def statistics(p: SegmentedPlan, w: Tensor, g: Tensor, m: Tensor, v: Tensor, group: dict, buffer: Tensor,
               chunk: int = DEFAULT_CHUNK, flags: bool = True) -> None:
    """Phase 1: this partition's maxima and (``flags``) non-finite flags combined (max) into
    ``buffer``."""
    if len(p.ends) == 0:
        return
    for a, b in _chunks(p.partition_numel, chunk):
        valid, frag, row_idx, col_idx = _indices(p, a, b, w.device)
        ws, gs = w[a:b], g[a:b]
        _, _, u = _direction(ws, gs, m[a:b], v[a:b], group)
        zero = torch.zeros((), dtype=buffer.dtype, device=buffer.device)
        aw = torch.where(valid, ws.abs(), zero)  # padding contributes 0, the identity of max|x|
        au = torch.where(valid, u.abs(), zero)
        span_r, span_c = p.row_span[frag], p.col_span[frag]
        buffer.scatter_reduce_(0, row_idx, aw, "amax")
        buffer.scatter_reduce_(0, row_idx + span_r, au, "amax")
        buffer.scatter_reduce_(0, col_idx, aw, "amax")
        buffer.scatter_reduce_(0, col_idx + span_c, au, "amax")
        if flags:
            bad = (valid & ~torch.isfinite(gs)).to(buffer.dtype)
            buffer.scatter_reduce_(0, p.flag_base + p.param[frag], bad, "amax")


def apply(p: SegmentedPlan, w: Tensor, g: Tensor, m: Tensor, v: Tensor, group: dict, buffer: Tensor, lr: float,
          chunk: int = DEFAULT_CHUNK, honour_flags: bool = True) -> None:
    """Phase 3: w, m, v of every element whose parameter is not flagged, from the reduced
    ``buffer``. The trust ratio is the formulas' (matrix_trust_ratio / vector_trust_ratio)
    on gathered maxima."""
    if len(p.ends) == 0:
        return
    # tensor maxima of every matrix: the maxima of its reduced row maxima (exact), per parameter
    tmax_w = torch.zeros(p.n_params, dtype=buffer.dtype, device=buffer.device)
    tmax_u = torch.zeros_like(tmax_w)
    if p.entry_index.numel():
        tmax_w.scatter_reduce_(0, p.entry_param, buffer[p.entry_index], "amax")
        tmax_u.scatter_reduce_(0, p.entry_param, buffer[p.entry_index + p.entry_row_span], "amax")
    for a, b in _chunks(p.partition_numel, chunk):
        valid, frag, row_idx, col_idx = _indices(p, a, b, w.device)
        ws, gs, ms, vs = w[a:b], g[a:b], m[a:b], v[a:b]
        m_new, v_new, u = _direction(ws, gs, ms, vs, group)
        span_r, span_c = p.row_span[frag], p.col_span[frag]
        rw, ru = buffer[row_idx], buffer[row_idx + span_r]
        cw, cu = buffer[col_idx], buffer[col_idx + span_c]
        param = p.param[frag]
        mat = p.is_matrix[frag]
        # vectors: their one |w| / |u| pair is both "row" and "column" and the floor
        max_w = torch.where(mat, tmax_w[param], rw)
        max_u = torch.where(mat, tmax_u[param], ru)
        row_ratio, row_zero = F.ratio_and_zero(rw, ru)
        col_ratio, col_zero = F.ratio_and_zero(cw, cu)
        floor = max_w / max_u
        s = torch.maximum(torch.maximum(row_ratio, floor), torch.maximum(col_ratio, floor))
        s = torch.where(row_zero | col_zero, torch.ones_like(s), s)
        w_new = ws.clone()
        F.apply_update_(w_new, u, s, lr)
        keep = valid
        if honour_flags:
            keep = keep & (buffer[p.flag_base + param] == 0)
        ws.copy_(torch.where(keep, w_new, ws))
        ms.copy_(torch.where(keep, m_new, ms))
        vs.copy_(torch.where(keep, v_new, vs))
