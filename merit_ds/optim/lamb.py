"""The LAMB optimizer: class, functional entry, reference and foreach implementations.

Structure follows :mod:`merit_ds.optim.merit` (and ``torch/optim/adamw.py``): :class:`LAMB`
validates hyperparameters and holds state; :func:`lamb` dispatches to
:func:`_single_tensor_lamb` (the readable reference) or :func:`_multi_tensor_lamb`
(``torch._foreach`` moments, per-tensor norms in a reused workspace). Both call the formulas
of :mod:`merit_ds.optim.lamb_formulas` and :mod:`merit_ds.optim.formulas` (the Adam moments)
and nothing else does arithmetic; they are bitwise equal.

Under DeepSpeed ZeRO, :mod:`merit_ds.sharding` steps LAMB's flat partitions with
:class:`~merit_ds.optim.lamb_fragments.LambFragmentRule`: per-fragment partial sums of
squares (float64), one ``all_reduce(SUM)`` per ``step()`` call. DeepSpeed's own ``Lamb``
(FusedLamb) computes its ratios per *partition* under ZeRO instead, which is not LAMB.
Nothing here imports ``torch.distributed``.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import formulas as F
from . import lamb_formulas as L
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
from .lamb_fragments import LambFragmentRule
from .spec import OptimizerSpec, RecipeDefaults, parse_bool, parse_optional_float
from .trust_stats import partial_trust_stats

__all__ = ["LAMB", "lamb"]

IMPLEMENTATIONS = ("single_tensor", "foreach")


class LAMB(ShardableOptimizer):
    r"""LAMB: Adam directions scaled per tensor by the trust ratio :math:`\|w\| / \|u\|`.

    You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"
    (ICLR 2020), Algorithm 2 as published. For a parameter :math:`w` with gradient
    :math:`g` at step :math:`t`:

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \qquad
        v_t  = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat m &= m_t / (1-\beta_1^t) \qquad \hat v = v_t / (1-\beta_2^t) \\
        u &= \hat m / (\sqrt{\hat v} + \epsilon) + \lambda w \\
        r &= \|w\|_2 / \|u\|_2 \quad (1 \text{ if either norm is } 0;\
             \min(r, r_{\max}) \text{ if } r_{\max} \text{ is given}) \\
        w &\leftarrow w - \eta\, r\, u

    Variant choices, stated: :math:`\phi` is the identity (no clamp of :math:`\|w\|`); every
    tensor gets its own ratio (matrices, biases, norms alike); decay is per param group
    (pass a no-decay group for biases and norms, as :mod:`merit_ds.integrations.param_groups`
    does); the norms are accumulated in float64.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\eta` (default 1e-3).
        betas: :math:`(\beta_1, \beta_2)` (default (0.9, 0.999)), each in [0, 1).
        eps: :math:`\epsilon` added to :math:`\sqrt{\hat v}` (default 1e-6, the paper's).
        weight_decay: :math:`\lambda`, folded into ``u`` (default 0).
        max_trust_ratio: clamp :math:`r_{\max}` of the ratio, or ``None`` (default, as
            published). DeepSpeed's FusedLamb uses 10.
        bias_correction: divide the moments by :math:`1-\beta^t` (default ``True``, as
            published).
        nonfinite_grads: ``"skip"`` (default): if any gradient of a param group is NaN/Inf,
            the whole group's step is skipped (moments, step counts and weights unchanged;
            all parameters of a group keep one step count, which bias correction needs; under
            ZeRO-3 with ``sub_group_size`` the unit is the sub-group) and
            :attr:`nonfinite_skips` counts the skipped parameters; ``"raise"``:
            ``FloatingPointError`` before anything is modified; ``"propagate"``: no check.
        implementation: ``None`` (auto: ``"foreach"`` on cpu/cuda/xpu), ``"single_tensor"``
            or ``"foreach"``.
        track_stats: record each stepped parameter's trust ratio as
            :class:`~merit_ds.optim.trust_stats.PartialTrustStats` in :attr:`partial_stats`
            (clip count 0: LAMB does not clip), as :class:`~merit_ds.optim.MERIT` does.

    State per parameter: ``exp_avg``, ``exp_avg_sq``, ``step`` (float32 0-d): the keys
    DeepSpeed's (universal) checkpoints expect. Low-precision parameters keep fp32 state and
    arithmetic and are rounded once when written back.
    """

    fragment_rule = LambFragmentRule()

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        max_trust_ratio: Optional[float] = None,
        bias_correction: bool = True,
        nonfinite_grads: str = "skip",
        implementation: Optional[str] = None,
        track_stats: bool = False,
    ):
        validate_adam_hyperparameters(lr, betas, eps, weight_decay)
        _validate_max_trust_ratio(max_trust_ratio)
        if nonfinite_grads not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_grads must be one of {NONFINITE_POLICIES}, got {nonfinite_grads!r}")
        if implementation is not None and implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            max_trust_ratio=max_trust_ratio,
            bias_correction=bool(bias_correction),
            nonfinite_grads=nonfinite_grads,
            implementation=implementation,
        )
        super().__init__(params, defaults)
        self.track_stats = track_stats
        #: Parameters whose step was skipped for a non-finite gradient (not checkpointed).
        self.nonfinite_skips = 0
        #: ``{param: PartialTrustStats}`` of the last tracked step (sharded: keyed
        #: ``(flat_partition, index_in_group)``), as for MERIT.
        self.partial_stats: dict = {}
        self._workspace: dict = {}

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        _validate_max_trust_ratio(group.get("max_trust_ratio"))

    def _step_group(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = collect_adam_group(self, group, "LAMB")
        if self.track_stats:
            for p in group["params"]:
                self.partial_stats.pop(p, None)
        beta1, beta2 = group["betas"]
        self.nonfinite_skips += lamb(
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
            max_trust_ratio=group["max_trust_ratio"],
            bias_correction=group["bias_correction"],
            nonfinite_grads=group["nonfinite_grads"],
            implementation=group["implementation"],
            stats=self.partial_stats if self.track_stats else None,
            workspace=self._workspace,
        )


def _validate_max_trust_ratio(value) -> None:
    if value is not None and not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"Invalid max_trust_ratio: {value!r} (must be None or finite and > 0)")


# ---------------------------------------------------------------------------------------------
# Functional entry
# ---------------------------------------------------------------------------------------------
def lamb(
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
    max_trust_ratio: Optional[float] = None,
    bias_correction: bool = True,
    nonfinite_grads: str = "skip",
    implementation: Optional[str] = None,
    stats: Optional[dict] = None,
    workspace: Optional[dict] = None,
) -> int:
    """Functional LAMB step over lists of tensors (see :class:`LAMB` for the math).

    The lists form one unit for ``nonfinite_grads="skip"``: a non-finite gradient in any of
    them skips them all. Returns the number of parameters skipped.
    """
    if implementation is None:
        implementation = "foreach" if foreach_supported(params) else "single_tensor"
    if not params:
        return 0
    keep = finite_filter(params, grads, nonfinite_grads, "LAMB")
    if keep is not None:  # some gradient is non-finite and the policy is "skip"
        warn_skipped("LAMB", len(params), "parameter(s) of a param group, one or more")
        return len(params)
    kw = dict(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, max_trust_ratio=max_trust_ratio,
        bias_correction=bias_correction, stats=stats,
    )
    if implementation == "single_tensor":
        _single_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kw)
    elif implementation == "foreach":
        _multi_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, state_steps, workspace=workspace, **kw)
    else:
        raise ValueError(f"unknown implementation {implementation!r}")
    return 0


def _record_stats(stats: Optional[dict], param: Tensor, ratio: Tensor, u: Tensor) -> None:
    if stats is not None:
        stats[param] = partial_trust_stats(ratio, u, clipping=False)


# ---------------------------------------------------------------------------------------------
# Reference: one tensor at a time
# ---------------------------------------------------------------------------------------------
def _single_tensor_lamb(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay, max_trust_ratio,
    bias_correction, stats
):
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        step += 1
        dtype = state_dtype(param)
        w = param if param.dtype == dtype else param.to(dtype)
        F.update_moments_(exp_avg, exp_avg_sq, grad.to(dtype), beta1, beta2)
        bc1, bc2_sqrt = L.bias_corrections(int(step.item()), beta1, beta2, bias_correction)
        u = L.lamb_direction(exp_avg, exp_avg_sq, w, eps, weight_decay, bc1, bc2_sqrt)
        ratio = L.lamb_trust_ratio(L.sum_of_squares(w), L.sum_of_squares(u), max_trust_ratio, dtype)
        _record_stats(stats, param, ratio, u)
        L.apply_scaled_update_(w, u, ratio, lr)
        if w is not param:
            param.copy_(w)


# ---------------------------------------------------------------------------------------------
# Fast path: torch._foreach for the moments, per-tensor norms in a reused workspace
# ---------------------------------------------------------------------------------------------
def _multi_tensor_lamb(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay, max_trust_ratio,
    bias_correction, stats, workspace=None
):
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, state_steps])
    for (_device, _dtype), ((dev_params, dev_grads, dev_m, dev_v, dev_steps), _) in grouped.items():
        torch._foreach_add_(dev_steps, 1.0)
        dtype = state_dtype(dev_params[0])
        gs = dev_grads if dev_grads[0].dtype == dtype else [g.to(dtype) for g in dev_grads]
        F.foreach_update_moments_(dev_m, dev_v, gs, beta1, beta2)
        del gs
        low_precision = dev_params[0].dtype != dtype
        for param, m, v, step in zip(dev_params, dev_m, dev_v, dev_steps):
            w = param.to(dtype) if low_precision else param
            u, scratch = workspace_views(workspace, w)
            bc1, bc2_sqrt = L.bias_corrections(int(step.item()), beta1, beta2, bias_correction)
            L.lamb_direction(m, v, w, eps, weight_decay, bc1, bc2_sqrt, out=u)
            ratio = L.lamb_trust_ratio(L.sum_of_squares(w, scratch), L.sum_of_squares(u, scratch), max_trust_ratio, dtype)
            _record_stats(stats, param, ratio, u)
            L.apply_scaled_update_(w, u, ratio, lr)
            if low_precision:
                param.copy_(w)


# ---------------------------------------------------------------------------------------------
# LAMB as merit_ds's registry knows it (merit_ds.optim.registry; the recipe numbers' sources are
# in merit_ds/train/presets.py's docstring)
# ---------------------------------------------------------------------------------------------
_SQRT_RULE = ("ESTIMATE: LAMB paper's sqrt rule (6.25e-4 at batch 512) ~ lineage AdamW lr at batch 480; "
              "sweep before use")

#: The recipes' lr-vs-batch exponent: lr(B) = lr_ref (B / batch_ref) ** exponent. Measured by the CPU
#: study (docs/study/results.csv: best lr at batch 8 and 64 on a sqrt(2)-spaced grid, 3 seeds, a
#: 233k-parameter GPT-2 over 512,000 tokens): 0.85 with 95% interval [0.69, 0.85]; extrapolated from there to
#: GPT-2 Small/Medium at 480-6k (docs/study.md, 'The recipes' lr rule').
_BATCH_EXPONENT = 0.85
_EXPONENT_SOURCE = "measured: CPU study, batch 8 -> 64, alpha 0.85 [0.69, 0.85]; extrapolated beyond"


def _recipe(**kw) -> RecipeDefaults:
    return RecipeDefaults(lr_batch_exponent=_BATCH_EXPONENT, lr_exponent_source=_EXPONENT_SOURCE, **kw)


SPEC = OptimizerSpec(
    name="lamb",
    label="LAMB",
    cls=LAMB,
    # not "Lamb"/"lamb": DeepSpeed maps any case of that name to its own FusedLamb
    json_name="ShardedLAMB",
    # matches the JSON name and cannot collide with a future transformers "lamb"
    hf_optim="sharded_lamb",
    hf_optim_args={"max_trust_ratio": parse_optional_float, "bias_correction": parse_bool},
    recipe_defaults={
        "tiny": _recipe(lr_ref=1e-2, batch_ref=16,
                        lr_source="ESTIMATE: MERIT's measured CPU lr at batch 16 (not swept for LAMB)"),
        "gpt2-small": _recipe(lr_ref=6e-4, batch_ref=480, lr_source=_SQRT_RULE),
        "gpt2-medium": _recipe(lr_ref=3e-4, batch_ref=480, lr_source=_SQRT_RULE.replace("6.25e-4", "6.25e-4 / 2")),
    },
    client_kwargs=("lr", "betas", "eps", "weight_decay", "max_trust_ratio", "bias_correction", "nonfinite_grads",
                   "implementation"),
    # the loop builds LAMB itself from the config's params (nothing registered under the JSON name needed)
    ds_route="client",
    trust_stats=True,
    # the sharded step keeps three partition-sized fp32 work buffers
    gpu_scratch_bytes=lambda partition_numel: 3 * 4 * float(partition_numel),
    study_lrs={"cpu": (6e-3, 1.2e-2, 2.5e-2, 5e-2, 1e-1), "gpu": (3e-4, 6e-4, 1.2e-3, 2.4e-3, 4.8e-3)},
    color="tab:green",
)
