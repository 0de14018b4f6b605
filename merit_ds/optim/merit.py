"""The MERIT optimizer: class, functional entry, reference and fast implementations.

Structure follows ``torch/optim/adamw.py``: :class:`MERIT` validates hyperparameters and holds
state; :func:`merit` is the functional entry that dispatches to :func:`_single_tensor_merit`
(the readable reference), :func:`_multi_tensor_merit` (``torch._foreach`` fast path) or
:func:`_fused_merit` (``torch.compile``-fused, optional). All three call the formulas of
:mod:`merit_ds.optim.formulas` and nothing else does arithmetic.

Sharded training (DeepSpeed ZeRO) hands the optimizer flat 1-D partitions instead of the
model's matrices. This module knows nothing about that; it exposes one extension point,
:meth:`ShardableOptimizer.register_group_resolver` (:mod:`.base`), through which :mod:`merit_ds.sharding` takes over
the step of such a group. Nothing here imports ``torch.distributed``.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import formulas as F
from .base import (
    NONFINITE_POLICIES,
    ShardableOptimizer,
    as_float,
    collect_adam_group,
    finite_filter,
    foreach_supported,
    state_dtype,
    validate_adam_hyperparameters,
    warn_skipped,
    workspace_views,
)
from .implementation import IMPLEMENTATIONS, resolve_implementation
from .merit_fragments import MeritFragmentRule
from .spec import OptimizerSpec, RecipeDefaults
from .trust_stats import MeritStats, PartialTrustStats, empty_trust_stats, partial_trust_stats

__all__ = ["MERIT", "merit", "MeritStats", "PartialTrustStats", "NONFINITE_POLICIES", "IMPLEMENTATIONS"]

class MERIT(ShardableOptimizer):
    r"""MERIT: Adam moments with max-normalized element-wise trust ratios.

    From "MERIT: Maximum-normalized Element-wise Ratio for Language Model Large-batch
    Training" (ICML 2025). For a parameter :math:`w` with gradient :math:`g`:

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t  \qquad
        v_t  = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \quad \text{(no bias correction)} \\
        u   &= m_t / (\sqrt{v_t} + \epsilon) + \lambda w \quad \text{(decay before the ratios)}

    Matrices (``ndim >= 2``), with :math:`W=|w|`, :math:`U=|u|`, row maxima over dim 1 and
    column maxima over dim 0 (``keepdim``; trailing dims of conv weights are kept):

    .. math::
        s_{ij} = \max\Big(\frac{\max_j W_{ij}}{\max_j U_{ij}},\;
                          \frac{\max_i W_{ij}}{\max_i U_{ij}},\;
                          \frac{\max W}{\max U}\Big),

    and :math:`s_{ij} = 1` wherever any of the four row/column maxima is 0.
    Vectors (``ndim <= 1``): :math:`s = \max W / \max U` (1 if either is 0). Then

    .. math::
        w \leftarrow w - \eta \,\mathrm{clip}(s \odot u, -1, 1).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\eta` (default 1e-3). MERIT's update is scaled to the size of
            the weights, so its best lr differs from AdamW's (see docs/recipes.md, "Hyperparameters and
            where they come from").
        betas: :math:`(\beta_1, \beta_2)` (default (0.9, 0.999)), each in [0, 1).
        eps: :math:`\epsilon` added to :math:`\sqrt{v}` (default 1e-6).
        weight_decay: :math:`\lambda`, folded into ``u`` (default 0).
        nonfinite_grads: what a gradient with NaN/Inf does.
            ``"skip"`` (default): that parameter's step is skipped entirely (moments, step
            count and weights unchanged) and counted in :attr:`nonfinite_skips`;
            ``"raise"``: ``FloatingPointError`` before anything is modified;
            ``"propagate"``: no check (fastest; NaN reaches the weights, as in torch.optim).
        implementation: ``None`` (auto: the fastest correct path for the tensors, see
            :func:`resolve_implementation`: ``"fused"`` for fp32 CPU tensors when the CPU kernel
            builds, else ``"foreach"`` on cpu/cuda/xpu, else ``"single_tensor"``),
            ``"single_tensor"`` (the reference), ``"foreach"``, ``"fused"`` (the device's fused
            kernel: on CPU the two-pass C++/OpenMP kernel of :mod:`.cpu_kernel`, elsewhere
            ``torch.compile``), ``"compiled"`` (``torch.compile``d kernels on any device;
            compiles once per shape class), or ``"triton"`` (MERIT's Triton kernels, the sharded
            GPU step's, over the whole group in one launch per phase: fp32 CUDA tensors; the CPU
            kernel's arithmetic bit for bit; opt-in until timed on a GPU). Under ZeRO the sharded
            step honours it too.
        track_stats: record trust-ratio statistics of each step (costs extra passes; off by
            default; may be switched on and off between steps, e.g. for diagnostics steps).
            :attr:`partial_stats` maps each stepped parameter to its
            :class:`~merit_ds.optim.trust_stats.PartialTrustStats` (mergeable across
            parameters and ranks); :attr:`last_stats` shows them as :class:`MeritStats`.
            Under ZeRO the sharded step records this rank's fragments, keyed
            ``(flat_partition, index_in_group)``; :func:`merit_ds.sharding.reduce_trust_stats`
            combines them (and the unsharded ones) over ranks.

    State per parameter: ``exp_avg`` (m), ``exp_avg_sq`` (v), ``step`` (a float32 0-d
    tensor), the keys DeepSpeed's (universal) checkpoints expect. Parameters in bf16/fp16
    keep their state and all arithmetic in fp32 and are rounded once when written back.
    """

    fragment_rule = MeritFragmentRule()

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        nonfinite_grads: str = "skip",
        implementation: Optional[str] = None,
        track_stats: bool = False,
    ):
        validate_adam_hyperparameters(lr, betas, eps, weight_decay)
        if nonfinite_grads not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_grads must be one of {NONFINITE_POLICIES}, got {nonfinite_grads!r}")
        if implementation is not None and implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            nonfinite_grads=nonfinite_grads,
            implementation=implementation,
        )
        super().__init__(params, defaults)
        self.track_stats = track_stats
        #: Parameters whose step was skipped for a non-finite gradient, counted over the
        #: optimizer's life (not checkpointed).
        self.nonfinite_skips = 0
        #: ``{param: PartialTrustStats}`` of the last step each parameter took while
        #: ``track_stats`` was on (a parameter skipped for a non-finite or missing gradient
        #: loses its entry). Sharded steps key it by ``(flat_partition, index_in_group)``.
        #: Clear it to start a fresh measurement.
        self.partial_stats: dict = {}
        # Scratch buffers of the fast paths, reused across steps; not part of the state.
        self._workspace: dict = {}

    @property
    def last_stats(self) -> dict:
        """``{key: MeritStats}``, a view of :attr:`partial_stats` (under ZeRO: of this rank's
        fragments; use :func:`merit_ds.sharding.reduce_trust_stats` for whole parameters)."""
        return {k: v.to_merit_stats() for k, v in self.partial_stats.items()}

    def _step_group(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = collect_adam_group(self, group, "MERIT")
        if self.track_stats:  # stepped parameters record afresh; the others lose theirs
            for p in group["params"]:
                self.partial_stats.pop(p, None)
        beta1, beta2 = group["betas"]
        self.nonfinite_skips += merit(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            steps,
            lr=as_float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            nonfinite_grads=group["nonfinite_grads"],
            implementation=group["implementation"],
            stats=self.partial_stats if self.track_stats else None,
            workspace=self._workspace,
        )


# ---------------------------------------------------------------------------------------------
# Functional entry
# ---------------------------------------------------------------------------------------------
def merit(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    nonfinite_grads: str = "skip",
    implementation: Optional[str] = None,
    stats: Optional[dict] = None,
    workspace: Optional[dict] = None,
) -> int:
    """Functional MERIT step over lists of tensors (see :class:`MERIT` for the math).

    ``stats``: a dict that receives ``{param: PartialTrustStats}`` for every parameter
    stepped (the CPU kernel records them in its own pass 2, so a statistics step takes the
    same path as any other; the compiled path runs foreach for such a step). Returns the
    number of parameters whose step was skipped for a non-finite gradient.
    """
    if not params:
        return 0
    implementation = resolve_implementation(implementation, params, grads, exp_avgs, exp_avg_sqs)
    if implementation == "cpu_kernel":
        return _cpu_kernel_merit(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, nonfinite_grads=nonfinite_grads, stats=stats,
        )
    if implementation == "triton":
        return _triton_merit(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, nonfinite_grads=nonfinite_grads, stats=stats, workspace=workspace,
        )
    keep = finite_filter(params, grads, nonfinite_grads, "MERIT")
    skipped = 0
    if keep is not None:
        skipped = len(params) - sum(keep)
        if skipped:
            warn_skipped("MERIT", skipped)
            params, grads, exp_avgs, exp_avg_sqs, state_steps = (
                [x for x, k in zip(xs, keep) if k] for xs in (params, grads, exp_avgs, exp_avg_sqs, state_steps)
            )
    if not params:  # every parameter of the group was skipped
        return skipped
    if implementation == "single_tensor":
        fn = _single_tensor_merit
    elif implementation == "foreach":
        fn = _multi_tensor_merit
    elif implementation == "compiled" and stats is not None:
        fn = _multi_tensor_merit  # the compiled kernels do not expose s: a statistics step runs foreach
    elif implementation == "compiled":
        from .fused import fused_merit as fn  # imported lazily: torch.compile is heavy
    else:
        raise ValueError(f"unknown implementation {implementation!r}")
    extra = {"workspace": workspace} if implementation != "single_tensor" else {}
    fn(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        stats=stats,
        **extra,
    )
    return skipped


def _cpu_kernel_merit(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
                      nonfinite_grads, stats=None) -> int:
    """The whole group in one call of the C++ kernel (:func:`.cpu_kernel.step_tensors`): per
    tensor pass 1 (statistics, nothing written), the trust ratios, pass 2 (the update and, with
    ``stats``, the tensor's trust-ratio statistics from the same pass). ``"skip"`` /
    ``"propagate"``: tensor by tensor, so that a tensor that fits in the last-level cache is
    read from DRAM once, not twice; ``"raise"``: pass 1 of every tensor first, so that nothing
    is modified if it raises."""
    from . import cpu_kernel

    bad, recorded = cpu_kernel.step_tensors(
        params, grads, exp_avgs, exp_avg_sqs, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
        nonfinite_grads=nonfinite_grads, track=stats is not None,
    )
    if nonfinite_grads == "raise" and bad:
        raise FloatingPointError(
            f"MERIT: non-finite gradient in {len(bad)} parameter(s) (indices {bad} in their group, shapes "
            f"{[tuple(params[i].shape) for i in bad]}); nothing was modified. Use nonfinite_grads='skip' to skip them."
        )
    skipped = set(bad) if nonfinite_grads == "skip" else set()
    for i, step in enumerate(state_steps):
        if i not in skipped:
            step += 1
    if stats is not None:
        for i, p in enumerate(params):
            if i not in skipped:
                stats[p] = recorded[i]
    if skipped:
        warn_skipped("MERIT", len(skipped))
    return len(skipped)


def _triton_merit(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
                  nonfinite_grads, stats=None, workspace=None) -> int:
    """MERIT's Triton kernels (:mod:`.segmented_triton`) over the whole group, each tensor a
    one-fragment partition of its own: one statistics launch, one read of the non-finite flags
    (the only host sync; none with ``"propagate"``), one tensor-maximum and one apply launch.
    The CPU kernel's arithmetic, so bitwise its step."""
    from .layout import Fragment, stats_layout

    from . import segmented_triton

    device = params[0].device
    why = segmented_triton.self_check(device)
    if why is not None:
        raise ValueError(f"implementation='triton': the Triton kernels failed their self-check on {device} ({why})")
    shapes = [tuple(p.shape) for p in params]
    sl = stats_layout(shapes, MeritFragmentRule().stats_size)
    # The group's tile plan: built once (a Python loop over the tiles, a copy to the device) and
    # kept in the optimizer's workspace (its own: the plan holds per-step buffers).
    plans = workspace.setdefault("triton_plans", {}) if workspace is not None else {}
    key = (tuple(shapes), str(device))
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = segmented_triton.plan(
            shapes, [Fragment(i, shapes[i], 0, p.numel(), 0) for i, p in enumerate(params)], sl.slots,
            sl.slots[0].flag, device, tensor_of=range(len(params)))
    group = dict(betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
    buffer = torch.zeros(sl.buffer_numel, dtype=torch.float32, device=device)
    tensors = [[t.view(-1) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
    flags = nonfinite_grads != "propagate"
    segmented_triton.statistics(plan, *tensors, group, buffer, flags=flags)
    bad = [i for i, f in enumerate(buffer[sl.slots[0].flag:].tolist()) if f] if flags else []
    if nonfinite_grads == "raise" and bad:
        raise FloatingPointError(
            f"MERIT: non-finite gradient in {len(bad)} parameter(s) (indices {bad} in their group, shapes "
            f"{[shapes[i] for i in bad]}); nothing was modified. Use nonfinite_grads='skip' to skip them."
        )
    recorded = segmented_triton.apply(plan, *tensors, group, buffer, lr, honour_flags=flags,
                                      track=stats is not None)
    for i, step in enumerate(state_steps):
        if i not in bad:
            step += 1
            if stats is not None:
                stats[params[i]] = recorded[i] if i in recorded else empty_trust_stats(device)
    if bad:
        warn_skipped("MERIT", len(bad))
    return len(bad)


def _record_stats(stats: Optional[dict], param: Tensor, trust: Tensor, u: Tensor) -> None:
    # before apply_update_ overwrites u: |trust * u| > 1 is what the update clips
    if stats is not None:
        stats[param] = partial_trust_stats(trust, u)


def _trust_ratio(w: Tensor, u: Tensor, scratch: Optional[Tensor] = None) -> Tensor:
    """s for one whole tensor (matrix: element-wise; vector: tensor-level).

    ``scratch`` (shaped like ``w``) receives the full-size ratio of a matrix.
    """
    if F.is_matrix(w.shape):
        mx = F.matrix_maxima(w, u)
        # max over the whole tensor equals the max of its row maxima, exactly.
        return F.matrix_trust_ratio(
            mx.row_w, mx.row_u, mx.col_w, mx.col_u, mx.row_w.max(), mx.row_u.max(), out=scratch
        )
    return F.vector_trust_ratio(F.tensor_max(w), F.tensor_max(u))


# ---------------------------------------------------------------------------------------------
# Reference: one tensor at a time
# ---------------------------------------------------------------------------------------------
def _single_tensor_merit(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay, stats):
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        step += 1
        dtype = state_dtype(param)
        w = param if param.dtype == dtype else param.to(dtype)
        F.update_moments_(exp_avg, exp_avg_sq, grad.to(dtype), beta1, beta2)
        u = F.update_direction(exp_avg, exp_avg_sq, w, eps, weight_decay)
        trust = _trust_ratio(w, u)
        _record_stats(stats, param, trust, u)
        F.apply_update_(w, u, trust, lr)
        if w is not param:
            param.copy_(w)


# ---------------------------------------------------------------------------------------------
# Fast path: torch._foreach for the moments, per-tensor ratios in a reused workspace
# ---------------------------------------------------------------------------------------------
def _multi_tensor_merit(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay, stats, workspace=None
):
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, state_steps])
    for (_device, _dtype), ((dev_params, dev_grads, dev_m, dev_v, dev_steps), _) in grouped.items():
        torch._foreach_add_(dev_steps, 1.0)
        dtype = state_dtype(dev_params[0])
        gs = dev_grads if dev_grads[0].dtype == dtype else [g.to(dtype) for g in dev_grads]
        F.foreach_update_moments_(dev_m, dev_v, gs, beta1, beta2)
        del gs
        low_precision = dev_params[0].dtype != dtype
        for param, m, v in zip(dev_params, dev_m, dev_v):
            w = param.to(dtype) if low_precision else param
            u, scratch = workspace_views(workspace, w)
            F.update_direction(m, v, w, eps, weight_decay, out=u)
            trust = _trust_ratio(w, u, scratch)
            _record_stats(stats, param, trust, u)
            F.apply_update_(w, u, trust, lr)
            if low_precision:
                param.copy_(w)


# ---------------------------------------------------------------------------------------------
# MERIT as merit_ds's registry knows it (merit_ds.optim.registry; the recipe numbers' sources
# are in merit_ds/train/presets.py's docstring)
# ---------------------------------------------------------------------------------------------
def _gpu_scratch_bytes(partition_numel: int) -> float:
    # the Triton step's tile table is its only scratch (~0.03 bytes per partition element)
    from .segmented_triton import estimated_persistent_bytes

    return float(estimated_persistent_bytes(int(partition_numel)))


_LINEAGE_ESTIMATE = "ESTIMATE: lineage AdamW lr at batch 480; sweep before use"

#: The recipes' lr-vs-batch exponent: lr(B) = lr_ref (B / batch_ref) ** exponent. Measured by the CPU
#: study (docs/study/results.csv: best lr at batch 8 and 64 on a sqrt(2)-spaced grid, 3 seeds, a
#: 233k-parameter GPT-2 over 512,000 tokens): 0.69 with 95% interval [0.69, 1.02]; extrapolated from there to
#: GPT-2 Small/Medium at 480-6k (docs/study.md, 'The recipes' lr rule').
_BATCH_EXPONENT = 0.69
_EXPONENT_SOURCE = "measured: CPU study, batch 8 -> 64, alpha 0.69 [0.69, 1.02]; extrapolated beyond"


def _recipe(**kw) -> RecipeDefaults:
    return RecipeDefaults(lr_batch_exponent=_BATCH_EXPONENT, lr_exponent_source=_EXPONENT_SOURCE, **kw)


SPEC = OptimizerSpec(
    name="merit",
    label="MERIT",
    cls=MERIT,
    json_name="MERIT",
    hf_optim="merit",
    recipe_defaults={
        "tiny": _recipe(lr_ref=1e-2, batch_ref=16,
                        lr_source="measured: CPU sweep, GPT-2 4x128 on KJV, batch 16 (docs/design/field_notes.md)"),
        "gpt2-small": _recipe(lr_ref=6e-4, batch_ref=480, lr_source=_LINEAGE_ESTIMATE),
        "gpt2-medium": _recipe(lr_ref=3e-4, batch_ref=480, lr_source=_LINEAGE_ESTIMATE),
    },
    ds_route="json",
    trust_stats=True,
    clips=True,
    gpu_scratch_bytes=_gpu_scratch_bytes,
    study_lrs={"cpu": (6e-3, 1.2e-2, 2.5e-2, 5e-2, 1e-1), "gpu": (3e-4, 6e-4, 1.2e-3, 2.4e-3, 4.8e-3)},
    color="tab:red",
)
