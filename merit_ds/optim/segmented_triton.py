"""MERIT's sharded step over a whole flat partition as Triton kernels: the GPU's fast path.

The same phases and statistics buffer as :mod:`merit_ds.optim.segmented` (whose torch form
stays the portable fallback), but the partition is visited in 2-D tiles, so that the row
and column maxima are reduced inside a tile and reach the buffer with one atomic max per row
and per column entry of the tile, not one scatter per element::

    a matrix W (R x C) whose fragment starts and ends mid-row (ZeRO 1/2 cut it there):

                  col0 = 0        BLOCK_C          2*BLOCK_C        C
        row0    [ . . . . . . x x x | x x x x x x x | x x x x ]   <- first row: the fragment's
                [ x x x x x x x x x | x x x x x x x | x x x x ]      part only (the rest masked)
          ...   [ ...  BLOCK_R rows per tile ...    |           ]
                [ x x x x x . . . . | . . . . . . . | . . . . ]   <- last row: likewise

        tile (row0, col0):  max over its columns -> atomic max into row |w|, row |u| entries
                            max over its rows    -> atomic max into column |w|, column |u| entries
                            any non-finite g     -> atomic max into the parameter's flag

    a vector b (N,): the same, as rows of BLOCK_C elements whose row entries all point at its
    one max|w| / max|u| pair (row stride 0), and no column entries.

Kernels (``segmented_triton_kernels.py``), one launch each, no host sync anywhere:

    statistics(...)   phase 1: u in registers, maxima and flags into the buffer (nothing
                      written to w, m, v)
    (the caller all-reduces the buffer with MAX)
    apply(...)        tensor maxima of each matrix (from its reduced row maxima), then phase 3:
                      per tile the row and column trust ratios (BLOCK_R + BLOCK_C divisions),
                      per element m', v', u recomputed and w -= lr * clip(s * u, -1, 1);
                      w, m, v written unless the parameter is flagged

Each element is read twice (16 bytes each pass: w, g, m, v) and written once (12 bytes): 44
bytes per element per step against 28 for a one-pass Adam, the floor of any exact two-pass
MERIT (the column maxima need the whole matrix before the first update). The persistent
scratch is the tile table (16 int64 per 16 x 256 tile: 1/128 of the partition's fp32 bytes),
the matrix table and two floats per parameter (:meth:`TilePlan.persistent_bytes`), and an
address table per placement of the tensors; there are no partition-sized temporaries.

The tensors are reached through that address table (w, g, m, v data pointers; a tile names
its row): a ZeRO partition is one row, and ``MERIT(implementation="triton")`` on one device
passes the whole param group, one row per parameter, so that one launch per phase covers it.

The arithmetic is the CPU kernel's, operation for operation (explicit FMAs, IEEE ``div_rn`` /
``sqrt_rn``): a step here is bitwise the CPU kernel's step from the same floats. The tests
run these kernels under Triton's interpreter on CPU tensors (``tests/test_optim_segmented_triton.py``)
and compare them bit for bit with the CPU kernel, sharded across ranks as ZeRO cuts them;
the GPU smoke test repeats that comparison on the GPU and times the step against FusedAdam.

Limits: float32 partitions only (the caller uses the torch form otherwise). A matrix of more
than two dimensions has ``K = prod(shape[2:])`` row entries interleaved along each row; its
tiles take one atomic per element for them (correct, slower; language models have none).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import formulas as F
from .trust_stats import PartialTrustStats

__all__ = ["TilePlan", "available", "interpreting", "plan", "statistics", "apply", "kernels", "self_check",
           "TILE_FIELDS"]

# Whether apply(..., track=True) returns the step's trust-ratio statistics (the sharded step
# runs this form on statistics steps only if so).
TRACKS_STATS = True

# One row of the tile table, in this order (the kernels read them by position).
TILE_FIELDS = ("base", "lo", "hi", "nrows", "col0", "row_len", "row_entry", "row_stride", "row_span",
               "col_entry", "col_span", "is_matrix", "flag", "param", "inner", "tensor")
BLOCK_ROWS = 16
BLOCK_COLS = 256
# No contraction beyond the kernels' explicit FMAs (so that they round as the CPU kernel does;
# Triton 3.9 contracts by default). The interpreter ignores launch options.
LAUNCH = dict(enable_fp_fusion=False, num_warps=4)


@functools.lru_cache(maxsize=None)
def _import_error() -> Optional[str]:
    if os.environ.get("MERIT_DS_TRITON", "1") == "0":
        return "MERIT_DS_TRITON=0"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def interpreting() -> bool:
    """Whether this process runs Triton kernels under the interpreter (``TRITON_INTERPRET=1``,
    read by Triton when it is imported and when a kernel is decorated: one mode per process)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device) -> bool:
    """Whether the kernels can run on ``device``: compiled, on a CUDA device; interpreted
    (``TRITON_INTERPRET=1``, the CPU tests' mode, far too slow for training), on CPU tensors.
    ``MERIT_DS_TRITON=0`` says no."""
    device = torch.device(device)
    if _import_error() is not None:
        return False
    if interpreting():
        return device.type == "cpu"
    return device.type == "cuda" and torch.cuda.is_available()


# Triton's interpreter patches triton.language module-wide for the length of a launch, so
# interpreted launches from several threads (the tests' simulated ranks) must take turns.
_interpreter_lock = threading.Lock()


def _launching(device: torch.device):
    """Around a launch: the interpreter's lock, or the tensors' CUDA device (Triton launches on
    the current device, whichever device the pointers belong to)."""
    if interpreting():
        return _interpreter_lock
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def kernels():
    """The kernels module (imported at first use: importing triton costs time)."""
    from . import segmented_triton_kernels

    return segmented_triton_kernels


@dataclass
class TilePlan:
    """The tables of one partition, on its device: tiles (int64 [T, len(TILE_FIELDS)]),
    matrices (int64 [M, 3]: parameter, first row entry, rows) and the per-parameter tensor
    maxima (float32 [2 * P]; vectors keep (0, 1))."""

    tiles: Tensor
    matrices: Tensor
    tensor_max: Tensor
    block_rows: int
    block_cols: int
    params: tuple  # the parameters with elements in this partition
    addresses: dict = field(default_factory=dict, repr=False)  # address tables by data pointers

    def persistent_bytes(self) -> int:
        """Memory the plan keeps across steps, in bytes."""
        return sum(t.numel() * t.element_size() for t in (self.tiles, self.matrices, self.tensor_max))


def plan(shapes: Sequence[tuple], fragments, slots, flag_base: int, device, block_rows: int = BLOCK_ROWS,
         block_cols: int = BLOCK_COLS, tensor_of: Optional[Sequence[int]] = None) -> TilePlan:
    """The tile plan of a partition (``fragments``: merit_ds.optim.layout.Fragment, this
    rank's; ``slots``: ParamSlots per parameter, offsets relative to the buffer).
    ``tensor_of``: per fragment, which of the tensors passed to :func:`statistics` /
    :func:`apply` holds it (its ``partition_offset`` is then an offset in that tensor);
    default: all in one flat partition."""
    tiles, matrices = [], set()
    tensor_of = tensor_of if tensor_of is not None else [0] * len(fragments)
    for f, tensor in zip(fragments, tensor_of):
        if f.numel == 0:
            continue
        slot = slots[f.param_index]
        if F.is_matrix(slot.shape):
            rows, cols, inner = F.matrix_dims(slot.shape)
            row_len = cols * inner  # the elements of one row; also its statistics' column entries
            matrices.add((f.param_index, slot.offset, rows * inner))
            fixed = dict(row_stride=inner, row_span=rows * inner, col_span=row_len, is_matrix=1, inner=inner)
        else:  # a vector, laid out as rows of block_cols elements
            rows = inner = 1
            row_len = block_cols
            fixed = dict(row_stride=0, row_span=1, col_span=0, is_matrix=0, inner=1)
        first_row = f.param_start // row_len
        last_row = (f.param_start + f.numel - 1) // row_len
        for r0 in range(first_row, last_row + 1, block_rows):
            for c0 in range(0, row_len, block_cols):
                t = dict(base=f.partition_offset - f.param_start + r0 * row_len, lo=f.partition_offset,
                         hi=f.partition_offset + f.numel, nrows=min(block_rows, last_row + 1 - r0), col0=c0,
                         row_len=row_len, row_entry=slot.offset + r0 * fixed["row_stride"],
                         col_entry=slot.offset + 2 * rows * inner + c0 if fixed["is_matrix"] else slot.offset,
                         flag=flag_base + f.param_index, param=f.param_index, tensor=tensor, **fixed)
                tiles.append([t[k] for k in TILE_FIELDS])
    tensor_max = torch.zeros(2 * len(slots), dtype=torch.float32)
    tensor_max[1::2] = 1.0  # vectors: floor 0/1 = 0, so their own ratio decides
    return TilePlan(
        tiles=torch.tensor(tiles, dtype=torch.int64).reshape(-1, len(TILE_FIELDS)).to(device),
        matrices=torch.tensor(sorted(matrices), dtype=torch.int64).reshape(-1, 3).to(device),
        tensor_max=tensor_max.to(device), block_rows=block_rows, block_cols=block_cols,
        params=tuple(sorted({f.param_index for f in fragments if f.numel})),
    )


def estimated_persistent_bytes(partition_numel: int) -> int:
    """What :meth:`TilePlan.persistent_bytes` comes to for a partition of this many elements:
    its tile table (one row per BLOCK_ROWS x BLOCK_COLS elements; partial tiles at fragment
    edges add ~0.2% for GPT-2 Small). The matrix table and two floats per parameter are not
    counted (kilobytes). For ``merit-ds plan``."""
    return len(TILE_FIELDS) * 8 * -(-int(partition_numel) // (BLOCK_ROWS * BLOCK_COLS))


def _hyper(group: dict) -> tuple:
    beta1, beta2 = group["betas"]
    # rounded to float32 by the launch, as the CPU kernel rounds its doubles (make_hyper)
    return beta1, beta2, 1.0 - beta1, 1.0 - beta2, group["eps"], group["weight_decay"]


def _check(tensors: Sequence[Tensor]) -> None:
    dev = tensors[0].device
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device != dev:
            raise ValueError("segmented_triton: w, g, m, v and the buffer must be contiguous float32 tensors on one "
                             f"device (got {t.dtype}, contiguous={t.is_contiguous()}, {t.device})")


def _as_list(x) -> list:
    return [x] if isinstance(x, Tensor) else list(x)


def _addresses(p: "TilePlan", w, g, m, v, buffer: Tensor) -> Tensor:
    """The address table (int64 [tensors, 4]: data pointers of w, g, m, v per tensor) on the
    device, checked, and cached on the plan by the addresses themselves (the same addresses
    make the same table, whichever tensors hold them now), so that a step whose tensors sit
    where they sat before copies nothing to the device; a new placement costs one copy from
    pinned memory that does not wait for the GPU."""
    ws, gs, ms, vs = (_as_list(x) for x in (w, g, m, v))
    if not len(ws) == len(gs) == len(ms) == len(vs):
        raise ValueError("segmented_triton: w, g, m, v must be as many tensors each")
    for quad in zip(ws, gs, ms, vs):
        _check((*quad, buffer))
        if len({t.numel() for t in quad}) != 1:
            raise ValueError("segmented_triton: w, g, m, v of one tensor must have the same number of elements")
    key = tuple(t.data_ptr() for quad in zip(ws, gs, ms, vs) for t in quad)
    entry = p.addresses.pop(key, None)
    if entry is None:
        host = torch.tensor(key, dtype=torch.int64).view(-1, 4)
        if buffer.device.type == "cuda":  # pinned, so that the copy does not wait for the GPU
            host = host.pin_memory()
        entry = (host, host.to(buffer.device, non_blocking=True))  # the host copy lives as long
    p.addresses[key] = entry  # most recently used last
    while len(p.addresses) > 8:
        p.addresses.pop(next(iter(p.addresses)))
    return entry[1]


def statistics(p: TilePlan, w: Tensor, g: Tensor, m: Tensor, v: Tensor, group: dict, buffer: Tensor,
               flags: bool = True) -> None:
    """Phase 1: this partition's maxima and (``flags``) non-finite flags combined (max) into
    ``buffer``, which must start at the group's first statistics entry. ``w``, ``g``, ``m``,
    ``v``: the flat partition's tensors, or lists of tensors (the plan's ``tensor_of``)."""
    addresses = _addresses(p, w, g, m, v, buffer)
    if p.tiles.shape[0] == 0:
        return
    k = kernels()
    with _launching(buffer.device):
        k.statistics_kernel[(p.tiles.shape[0],)](
            addresses, buffer, p.tiles, *_hyper(group),
            FLAGS=flags, NF=len(TILE_FIELDS), BLOCK_R=p.block_rows, BLOCK_C=p.block_cols, **LAUNCH,
        )


def apply(p: TilePlan, w: Tensor, g: Tensor, m: Tensor, v: Tensor, group: dict, buffer: Tensor, lr: float,
          honour_flags: bool = True, track: bool = False) -> Optional[dict]:
    """Phase 3: w, m, v of every element whose parameter is not flagged (``honour_flags``),
    from the reduced ``buffer``. ``track``: also return ``{parameter index:
    PartialTrustStats}`` of the elements this partition updated, for every parameter it holds
    (device tensors, nothing read back; a flagged parameter's entry counts 0 elements)."""
    addresses = _addresses(p, w, g, m, v, buffer)
    if p.tiles.shape[0] == 0:
        return {} if track else None
    n_params = p.tensor_max.numel() // 2
    dev = buffer.device
    if track:
        acc = (torch.zeros(n_params, dtype=torch.int64, device=dev), torch.zeros(n_params, dtype=torch.float64, device=dev),
               torch.full((n_params,), math.inf, device=dev), torch.full((n_params,), -math.inf, device=dev),
               torch.zeros(n_params, dtype=torch.int64, device=dev))
    else:
        acc = (p.tensor_max,) * 5  # not touched (TRACK off)
    k = kernels()
    with _launching(buffer.device):
        if p.matrices.shape[0]:
            k.tensor_max_kernel[(p.matrices.shape[0],)](buffer, p.tensor_max, p.matrices, BLOCK=1024, **LAUNCH)
        k.apply_kernel[(p.tiles.shape[0],)](
            addresses, buffer, p.tensor_max, p.tiles, *acc, *_hyper(group), -float(lr),
            HONOUR_FLAGS=honour_flags, TRACK=track, NF=len(TILE_FIELDS), BLOCK_R=p.block_rows,
            BLOCK_C=p.block_cols, **LAUNCH,
        )
    if not track:
        return None
    count, ratio_sum, lo, hi, clipped = acc
    return {i: PartialTrustStats(count[i], ratio_sum[i], lo[i], hi[i], clipped[i]) for i in p.params}


_checked: dict = {}


def self_check(device) -> Optional[str]:
    """Run the kernels once on ``device`` against the torch form (:mod:`.segmented`) on a small
    partition that cuts a matrix mid-row, once per device and process. ``None`` if they agree
    within float32 rounding (the two differ only in FMA contraction), else why not: the
    sharded step then uses the torch form and warns (``implementation="triton"`` raises
    instead). This guards a machine whose Triton
    cannot compile or launch these kernels; it costs one compilation (cached on disk by
    Triton) and a few milliseconds."""
    key = str(torch.device(device))
    if key not in _checked:
        _checked[key] = _run_self_check(torch.device(device))
    return _checked[key]


def _run_self_check(device) -> Optional[str]:
    from . import segmented
    from .layout import layout_from_offsets, stats_layout

    shapes = [(5, 300), (7,), (3, 4, 2)]
    offsets, total = [0, 1500, 1507], 1531
    sl = stats_layout(shapes, F.stats_size)
    layout = layout_from_offsets(shapes, offsets, 700, total - 700)  # from the middle of row 2
    gen = torch.Generator().manual_seed(0)
    w, g, m = (torch.randn(layout.partition_numel, generator=gen).to(device) for _ in range(3))
    v = torch.rand(layout.partition_numel, generator=gen).to(device)
    group = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    flag_base = sl.slots[0].flag
    results = []
    try:
        for form in ("triton", "torch"):
            ws, ms, vs, buf = w.clone(), m.clone(), v.clone(), torch.zeros(sl.buffer_numel, device=device)
            if form == "triton":  # the statistics-step variant: both kernels compile and launch
                p = plan(shapes, layout.fragments, sl.slots, flag_base, device)
                statistics(p, ws, g, ms, vs, group, buf)
                counted = apply(p, ws, g, ms, vs, group, buf, 1e-3, track=True)
                if sum(int(st.count) for st in counted.values()) != layout.partition_numel:
                    return "the Triton step's statistics did not count every element"
            else:
                p = segmented.plan(shapes, layout.fragments, sl.slots, flag_base, layout.partition_numel, device)
                segmented.statistics(p, ws, g, ms, vs, group, buf)
                segmented.apply(p, ws, g, ms, vs, group, buf, 1e-3)
            results.append((ws, ms, vs, buf))
        for name, a, b in zip(("w", "m", "v", "statistics"), *results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m_, n=name: f"{n}: {m_}")
        if torch.equal(results[0][0], w):
            return "the Triton step left the weights unchanged"
    except Exception as e:  # noqa: BLE001 - any failure means: do not use these kernels here
        return f"{type(e).__name__}: {str(e)[:500]}"
    return None
