"""The sharded step of any merit_ds optimizer: local statistics, one all-reduce, local apply.

::

    rank r's flat fp32 partition:  |..W1 tail..|====== W2 rows ======|.. b2 ..|..W3 head..|

    1. local    m, v (Adam moments) and u = rule.direction(...) over the whole partition
                (element-wise); per fragment rule.fragment_statistics -> the parameter's
                slot of the stats buffer; a non-finite-gradient flag per parameter
                (same layout on every rank, zeros where this rank owns nothing)
    2. collect  all_reduce(buffer, rule.reduce_op) over the data-parallel group
                -- once per step() call (MERIT: MAX of maxima; LAMB: SUM of float64 sums
                of squares)
    3. local    parameters flagged non-finite on ANY rank are skipped (or raise) on EVERY
                rank (rule.skip_unit: that parameter, or the whole group); the moments are
                committed; per fragment rule.apply_fragment updates w from the reduced
                statistics; with ``optimizer.track_stats`` on, each fragment's
                PartialTrustStats from the very ratio and u the update uses

The optimizer's math lives in its :class:`~merit_ds.optim.fragment_rule.FragmentRule`
(:mod:`merit_ds.optim`); this module, the layouts and the ZeRO adapters are shared by all
optimizers and contain no optimizer's formulas.

Trust-ratio statistics stay local: ``optimizer.partial_stats[(flat, i)]`` holds this rank's
share of parameter ``i`` of the group. Combining them over ranks (a handful of scalars) is
:func:`merit_ds.sharding.stats.reduce_trust_stats`, called by whoever wants the summary, on
diagnostics steps only -- never here, so a ``step()`` keeps its one collective.

MERIT: every number is produced by :mod:`merit_ds.optim.formulas` on views of the
partition, so the fp32 result equals single-device MERIT bit for bit (maxima are exact).
LAMB: u is bitwise the single-device one; the norms differ only by float64 summation order.

``nonfinite_grads="propagate"`` skips the checks: NaN statistics then meet the all-reduce,
whose NaN handling is the backend's (gloo and NCCL need not propagate it through MAX), so
ranks may disagree about a NaN parameter where one device would simply produce NaN. Use
``"skip"`` (default) or ``"raise"`` where gradients can be non-finite.

The state lives on the flat partition tensor under the keys ``exp_avg``, ``exp_avg_sq``,
``step``: that is what DeepSpeed checkpoints and its universal converter read. ``step``
counts the step() calls in which at least one parameter of the group was updated (LAMB's
bias correction uses it; its skip unit is the whole group, so all its parameters agree).
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from merit_ds.optim import formulas as F
from merit_ds.optim.base import as_float, warn_skipped
from merit_ds.optim.trust_stats import merge_trust_stats, partial_trust_stats

from . import collective
from merit_ds.optim.layout import PartitionLayout, StatsLayout, stats_layout

__all__ = ["ShardedGroupStep", "run_sharded_steps"]


@dataclass
class ShardedGroupStep:
    """One param group's flat partition, its layout and the group to reduce over.

    Callable (runs alone); :meth:`run_many` runs several groups of one ``step()`` call with
    a single collective per process group. The optimizer calls ``run_many`` with all
    sharded groups of a step.
    """

    optimizer: Any
    group: dict
    flat: Tensor
    layout: PartitionLayout
    process_group: Any
    source: str  # "zero1/2", "zero3", "bf16", "tensor-parallel": for error messages
    #: The whole parameter ``flat`` views (tensor parallelism without ZeRO): its state and
    #: gradient are the parameter's, as in the optimizer's ordinary step. ``None``: ``flat``
    #: is a ZeRO partition and owns both.
    param: Optional[Tensor] = None
    #: Tensor parallelism: where the local statistics go in the buffer that is all-reduced
    #: over the data- x tensor-parallel ranks (:mod:`merit_ds.optim.tp_layout`).
    exchange: Any = None
    # phase-1 results
    _grad: Optional[Tensor] = field(default=None, repr=False)
    _new_moments: Optional[tuple] = field(default=None, repr=False)
    _u: Optional[Tensor] = field(default=None, repr=False)
    _stats: Optional[Tensor] = field(default=None, repr=False)
    _fused: bool = field(default=False, repr=False)  # this step runs the rule's fused form
    _segmented: Any = field(default=None, repr=False)  # (form, plan) if this step runs a segmented form

    @property
    def rule(self):
        return self.optimizer.fragment_rule

    @property
    def stats_layout(self) -> StatsLayout:
        """The statistics buffer's layout for this group (cached on the optimizer)."""
        cache = self.optimizer.__dict__.setdefault("_merit_stats_layouts", {})
        key = (self.layout.shapes, type(self.rule))
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = stats_layout(self.layout.shapes, self.rule.stats_size)
        return hit

    @property
    def key(self) -> Tensor:
        """The tensor the optimizer's state (and recorded statistics) belong to."""
        return self.flat if self.param is None else self.param

    @property
    def grad(self) -> Optional[Tensor]:
        """The flat gradient (``None`` when the parameter got none)."""
        if self.param is None:
            return self.flat.grad
        g = self.param.grad
        return None if g is None else g.reshape(-1)

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
    rule = steps[0].rule
    if any(s.rule is not rule for s in steps):  # pragma: no cover - one optimizer per step() call
        raise TypeError("sharded steps of one step() call must share one optimizer")
    dtype = steps[0].flat.dtype
    if dtype != torch.float32 or any(s.flat.dtype != dtype for s in steps):
        raise TypeError(
            f"{rule.name}'s sharded step expects float32 master partitions, got {[s.flat.dtype for s in steps]}"
        )
    total = sum(s.stats_layout.buffer_numel for s in steps)
    buffer = torch.zeros(total, dtype=rule.stats_dtype, device=steps[0].flat.device)
    base = 0
    for s in steps:
        s._stats = buffer.narrow(0, base, s.stats_layout.buffer_numel)
        base += s.stats_layout.buffer_numel
        _local_statistics(s)

    if steps[0].exchange is None:
        collective.all_reduce_stats(buffer, rule.reduce_op, steps[0].process_group)  # the one collective
    else:  # tensor parallelism: the same one collective, on the buffer laid out for whole matrices
        _exchange(buffer, [s.exchange for s in steps], rule.reduce_op, steps[0].process_group)

    flagged = [_flagged(s) for s in steps]
    for s, bad in zip(steps, flagged):  # decide before touching anything: raise is all-or-nothing
        if bad and s.group["nonfinite_grads"] == "raise":
            shapes = [s.layout.shapes[i] for i in sorted(bad)]
            for t in steps:
                t._grad = t._u = t._stats = t._new_moments = None
            raise FloatingPointError(
                f"{rule.name} ({s.source}): non-finite gradient in {len(bad)} parameter(s) (indices {sorted(bad)} in "
                f"their group, shapes {shapes}) on some rank; nothing was modified on any rank. "
                f"Use nonfinite_grads='skip' to skip them."
            )
    if rule.skip_unit == "group":  # one param group may run as several steps (TP or megatron pieces)
        bad_groups = {id(s.group) for s, bad in zip(steps, flagged) if bad}
        flagged = [set(range(len(s.layout.shapes))) if id(s.group) in bad_groups else bad
                   for s, bad in zip(steps, flagged)]
    for s, bad in zip(steps, flagged):
        if bad and rule.skip_unit == "group":
            bad = set(range(len(s.layout.shapes)))
        _apply(s, bad)
        s._grad = s._u = s._stats = s._new_moments = None
        s._fused = False
        s._segmented = None


def _exchange(buffer: Tensor, exchanges: list, op: str, process_group) -> None:
    """The statistics all-reduce under tensor parallelism: scatter the local entries to their
    places in the whole-matrix buffer (zeros elsewhere and for :attr:`silent` entries),
    all-reduce that, gather the places back."""
    from merit_ds.optim.tp_layout import combine

    ex = combine(exchanges)
    index = ex.to_global.to(buffer.device)
    source = buffer
    if ex.silent.numel():
        source = buffer.clone()
        source.index_fill_(0, ex.silent.to(buffer.device), 0)
    whole = torch.zeros(ex.global_numel, dtype=buffer.dtype, device=buffer.device)
    whole.index_copy_(0, index, source)
    collective.all_reduce_stats(whole, op, process_group)
    torch.index_select(whole, 0, index, out=buffer)


def _state(s: ShardedGroupStep) -> dict:
    state = s.optimizer.state[s.key]
    if len(state) < 3:  # (megatron-core's init_state_fn may have made the moments, without "step")
        if "step" not in state:
            # a resumed megatron-core checkpoint (TE/Apex installs) restores the moments per piece and
            # the step count only in the param group
            state["step"] = torch.tensor(float(s.group.get("step", 0)), dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(s.key, memory_format=torch.preserve_format)
    return state


def _moments(s: ShardedGroupStep, state: dict) -> tuple[Tensor, Tensor]:
    """(m, v) as flat views of the state (whole parameters keep their shape in the state)."""
    m, v = state["exp_avg"], state["exp_avg_sq"]
    return (m, v) if s.param is None else (m.view(-1), v.view(-1))


def _scratch(s: ShardedGroupStep, count: int) -> list[Tensor]:
    """``count`` partition-sized work buffers, kept across steps.

    Not optimizer state (not checkpointed). Reusing them keeps large allocations off the
    allocator's path on every step, which on CPU costs more than the arithmetic.
    """
    cache = s.optimizer.__dict__.setdefault("_merit_scratch", {})
    hit = cache.get(id(s.key))
    if hit is None or hit[0] is not s.key or len(hit[1]) != count:
        hit = (s.key, [torch.empty_like(s.flat) for _ in range(count)])
        cache[id(s.key)] = hit
    return hit[1]


def segmented_wanted(s: ShardedGroupStep) -> bool:
    """Whether this step runs a whole-partition form (the Triton kernels of
    merit_ds.optim.segmented_triton, else the torch form merit_ds.optim.segmented):
    MERIT on a CUDA partition with the default implementation, "fused" or "triton". There it
    replaces one launch sequence and one host sync per fragment by a fixed number of
    operations over the whole partition, and keeps no partition-sized buffer. On a statistics
    step only the Triton form runs (it counts the trust-ratio statistics; the torch form does
    not: the per-fragment step runs then). (Tests patch this to run it on CPU partitions.)"""
    from merit_ds.optim.merit_fragments import MeritFragmentRule

    return (s.flat.is_cuda and isinstance(s.rule, MeritFragmentRule)
            and s.group.get("implementation") in (None, "fused", "triton"))


def _triton_passes(device, strict: bool = False) -> bool:
    """The kernels' first-use self-check on ``device``: a warning and False where it fails
    (the caller then runs the torch form), or ``strict`` (implementation="triton", asked for
    by name): a ValueError."""
    from merit_ds.optim import segmented_triton

    why = segmented_triton.self_check(device)
    if why is not None and strict:
        raise ValueError(f"implementation='triton': the Triton kernels failed their self-check on {device} ({why})")
    if why is not None:
        warnings.warn(f"MERIT: the Triton kernels failed their self-check on {device} ({why}); the sharded "
                      "step uses the torch form instead (correct, slower). Set MERIT_DS_TRITON=0 to silence this.",
                      RuntimeWarning, stacklevel=3)
    return why is None


def _segmented_plan(s: ShardedGroupStep):
    """(form, plan) of this partition, built once and cached on the optimizer: the Triton
    kernels (merit_ds.optim.segmented_triton) for a float32 partition with the default
    implementation, "fused" or "triton" where Triton runs on its device and passes its
    self-check, else the torch form (merit_ds.optim.segmented; never for "triton", which
    raises instead). Both forms take the same calls."""
    from merit_ds.optim import segmented, segmented_triton

    cache = s.optimizer.__dict__.setdefault("_merit_segmented_plans", {})
    key = (s.flat.data_ptr(), s.flat.device, s.layout)
    hit = cache.get(key)
    if hit is None:
        slots = s.stats_layout.slots
        flag_base = slots[0].flag if slots else 0
        impl = s.group.get("implementation")
        runs = s.flat.dtype == torch.float32 and segmented_triton.available(s.flat.device)
        if impl == "triton" and not runs:
            raise ValueError(f"implementation='triton' cannot step this {s.flat.dtype} partition on {s.flat.device} "
                             f"({segmented_triton._import_error() or 'no Triton there'}): use the default implementation")
        if runs and impl in (None, "fused", "triton") and _triton_passes(s.flat.device, strict=impl == "triton"):
            hit = segmented_triton, segmented_triton.plan(s.layout.shapes, s.layout.fragments, slots, flag_base,
                                                          s.flat.device)
        else:
            hit = segmented, segmented.plan(s.layout.shapes, s.layout.fragments, slots, flag_base,
                                            s.layout.partition_numel, s.flat.device)
        cache[key] = hit
    return hit


def _local_statistics(s: ShardedGroupStep) -> None:
    """Phase 1: u over the partition (or the rule's fused form), partial statistics into the
    stats buffer, flags."""
    flat, group, layout, rule = s.flat, s.group, s.layout, s.rule
    slots = s.stats_layout.slots
    s._fused = False
    grad = s.grad
    if grad is None:
        return  # contributes zeros; phase 3 leaves the partition alone
    grad = grad if grad.dtype == flat.dtype else grad.to(flat.dtype)
    beta1, beta2 = group["betas"]
    state = _state(s)
    m_state, v_state = _moments(s, state)
    step = int(state["step"].item()) + 1  # the step being taken (bias correction)
    s._grad = grad
    s._segmented = None
    if segmented_wanted(s):
        form, plan = _segmented_plan(s)
        if form.TRACKS_STATS or not getattr(s.optimizer, "track_stats", False):
            s._segmented = form, plan
            form.statistics(plan, flat, grad, m_state, v_state, group, s._stats,
                            flags=group["nonfinite_grads"] != "propagate")
            return
    if rule.fused_available(flat, grad, state, group):
        # Fused form: nothing is written before phase 3, so no scratch buffer is needed.
        s._fused = True
        m, v = m_state, v_state
        for frag in layout.fragments:
            slot = slots[frag.param_index]
            sl = lambda t: t.narrow(0, frag.partition_offset, frag.numel)  # noqa: E731
            bad = rule.fused_statistics(
                slot.shape, frag.param_start, sl(flat), sl(grad), sl(m), sl(v), group, step,
                s._stats.narrow(0, slot.offset, slot.size),
            )
            if bad and group["nonfinite_grads"] != "propagate":
                s._stats[slot.flag] = 1.0
        return
    if group["nonfinite_grads"] == "propagate":  # nothing can be skipped: update in place
        (u_buf,) = _scratch(s, 1)
        F.update_moments_(m_state, v_state, grad, beta1, beta2)
        m, v = m_state, v_state
        s._new_moments = None
    else:  # committed in phase 3, once all ranks agree the gradient is finite
        m_buf, v_buf, u_buf = _scratch(s, 3)
        m, v = F.updated_moments(m_state, v_state, grad, beta1, beta2, out=(m_buf, v_buf))
        s._new_moments = (m, v)
    s._u = rule.direction(m, v, flat, group, step, u_buf)

    for frag in layout.fragments:
        slot = slots[frag.param_index]
        rule.fragment_statistics(
            slot.shape,
            frag.param_start,
            flat.narrow(0, frag.partition_offset, frag.numel),
            s._u.narrow(0, frag.partition_offset, frag.numel),
            s._stats.narrow(0, slot.offset, slot.size),
        )

    # A non-finite gradient element makes that u element NaN (inf/inf or NaN), and a NaN
    # reaches every maximum and sum over it: finite statistics prove finite gradients, so
    # the exact per-fragment check runs only when some statistic is not finite.
    if group["nonfinite_grads"] != "propagate" and not bool(torch.isfinite(s._stats).all()):
        for frag in layout.fragments:
            g = grad.narrow(0, frag.partition_offset, frag.numel)
            if not bool(torch.isfinite(F.tensor_max(g))):
                s._stats[slots[frag.param_index].flag] = 1.0


def _flagged(s: ShardedGroupStep) -> set[int]:
    slots = s.stats_layout.slots
    if s.group["nonfinite_grads"] == "propagate" or not slots:
        return set()
    flags = s._stats.narrow(0, slots[0].flag, len(slots))
    if not bool((flags != 0).any()):
        return set()
    return {i for i, f in enumerate(flags.tolist()) if f != 0}


def _apply(s: ShardedGroupStep, bad: set[int]) -> None:
    """Phase 3: commit moments, then the rule's update of every fragment not skipped."""
    flat, group, layout, rule = s.flat, s.group, s.layout, s.rule
    slots = s.stats_layout.slots
    track = bool(getattr(s.optimizer, "track_stats", False))
    if track:  # stepped parameters record afresh below; the others lose their entry
        for i in range(len(slots)):
            s.optimizer.partial_stats.pop((s.key, i), None)
    if s.grad is None or (s._u is None and not s._fused and s._segmented is None):
        return
    state = s.optimizer.state[s.key]
    m_state, v_state = _moments(s, state)
    lr = as_float(group["lr"])
    live = [f for f in layout.fragments if f.param_index not in bad]
    work = None  # a free partition-sized buffer (MERIT writes its full-size ratios there)
    if s._new_moments is not None:  # commit the moments phase 1 computed
        m_new, v_new = s._new_moments
        if not bad:
            m_state.copy_(m_new)
            v_state.copy_(v_new)
            work = m_new
        else:
            for f in live:
                for old, new in ((m_state, m_new), (v_state, v_new)):
                    old.narrow(0, f.partition_offset, f.numel).copy_(new.narrow(0, f.partition_offset, f.numel))
    if bad:
        s.optimizer.nonfinite_skips += len(bad)
        warn_skipped(rule.name, len(bad), where=f" ({s.source}, on all ranks)")
    if len(bad) < len(slots) or not slots:
        # a new tensor, not an in-place add: megatron-core's checkpoint load (without TE/Apex) gives
        # every piece's state ONE shared step tensor, which in-place adds would advance once per piece
        state["step"] = state["step"] + 1
        if s.optimizer.__dict__.get("_merit_pieces_context") is not None:
            # megatron-core's checkpoint with TE/Apex installed saves the step count from the param
            # groups only (as TE's FusedAdam keeps it); _state reads it back (merit_ds/megatron.py).
            # The most steps any piece of the group took: the same whatever order the pieces run in
            group["step"] = max(int(group.get("step", 0)), int(state["step"].item()))
    if s._segmented is not None:  # w, m, v of every element whose parameter is not flagged
        form, plan = s._segmented
        recorded = form.apply(plan, flat, s._grad, m_state, v_state, group, s._stats, lr,
                              honour_flags=group["nonfinite_grads"] != "propagate",
                              **({"track": True} if track else {}))
        if track:  # the parameters stepped here record their statistics
            for index, stats in recorded.items():
                if index not in bad:
                    s.optimizer.partial_stats[(s.key, index)] = stats
        return
    if s._fused:  # the rule's fused form writes w, m, v of the fragments not skipped
        step = int(state["step"].item())
        m, v = m_state, v_state
        for frag in live:
            slot = slots[frag.param_index]
            sl = lambda t: t.narrow(0, frag.partition_offset, frag.numel)  # noqa: E731
            recorded = rule.fused_apply(slot.shape, frag.param_start, sl(flat), sl(s._grad), sl(m), sl(v), group,
                                        step, s._stats.narrow(0, slot.offset, slot.size), lr, track)
            if track:  # at most one fragment per parameter in a partition
                s.optimizer.partial_stats[(s.key, frag.param_index)] = recorded
        return

    pieces: Optional[dict[int, list]] = {} if track else None  # param index -> partial stats
    for frag in live:
        slot = slots[frag.param_index]
        record = None
        if pieces is not None:
            parts = pieces.setdefault(frag.param_index, [])
            record = lambda trust, u, parts=parts: parts.append(partial_trust_stats(trust, u, clipping=rule.clips))  # noqa: E731
        rule.apply_fragment(
            slot.shape,
            frag.param_start,
            flat.narrow(0, frag.partition_offset, frag.numel),
            s._u.narrow(0, frag.partition_offset, frag.numel),
            s._stats.narrow(0, slot.offset, slot.size),
            group=group,
            lr=lr,
            work=None if work is None else work.narrow(0, frag.partition_offset, frag.numel),
            record=record,
        )
    if pieces:
        for index, parts in pieces.items():
            s.optimizer.partial_stats[(s.key, index)] = parts[0] if len(parts) == 1 else merge_trust_stats(parts)
