"""The MERIT optimizer: class, functional entry, reference and fast implementations.

Structure follows ``torch/optim/adamw.py``: :class:`MERIT` validates hyperparameters and holds
state; :func:`merit` is the functional entry that dispatches to :func:`_single_tensor_merit`
(the readable reference), :func:`_multi_tensor_merit` (``torch._foreach`` fast path) or
:func:`_fused_merit` (``torch.compile``-fused, optional). All three call the formulas of
:mod:`merit_ds.optim.formulas` and nothing else does arithmetic.

Sharded training (DeepSpeed ZeRO) hands the optimizer flat 1-D partitions instead of the
model's matrices. This module knows nothing about that; it exposes one extension point,
:meth:`MERIT.register_group_resolver`, through which :mod:`merit_ds.sharding` takes over
the step of such a group. Nothing here imports ``torch.distributed``.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import formulas as F
from .trust_stats import PartialTrustStats, partial_trust_stats

__all__ = ["MERIT", "merit", "MeritStats", "PartialTrustStats", "NONFINITE_POLICIES", "IMPLEMENTATIONS"]

NONFINITE_POLICIES = ("skip", "raise", "propagate")
IMPLEMENTATIONS = ("single_tensor", "foreach", "fused")


class MeritStats(NamedTuple):
    """Per-parameter diagnostics of the last step (0-d tensors; read with ``float()``).

    ``clip_fraction``: fraction of elements where |s*u| > 1 (the update hit the clip).
    ``ratio_min/mean/max``: summary of the element-wise trust ratio s.
    """

    clip_fraction: Tensor
    ratio_min: Tensor
    ratio_mean: Tensor
    ratio_max: Tensor


# A resolver looks at a param group at step() time. If the group is something it owns (a
# DeepSpeed flat partition, say) it returns a callable that performs that group's whole step;
# otherwise None. Registered by merit_ds.sharding, which sits above this layer.
GroupResolver = Callable[["MERIT", dict], Optional[Callable[[], None]]]


class MERIT(Optimizer):
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
            the weights, so its best lr differs from AdamW's (see README).
        betas: :math:`(\beta_1, \beta_2)` (default (0.9, 0.999)), each in [0, 1).
        eps: :math:`\epsilon` added to :math:`\sqrt{v}` (default 1e-6).
        weight_decay: :math:`\lambda`, folded into ``u`` (default 0).
        nonfinite_grads: what a gradient with NaN/Inf does.
            ``"skip"`` (default): that parameter's step is skipped entirely (moments, step
            count and weights unchanged) and counted in :attr:`nonfinite_skips`;
            ``"raise"``: ``FloatingPointError`` before anything is modified;
            ``"propagate"``: no check (fastest; NaN reaches the weights, as in torch.optim).
        implementation: ``None`` (auto: ``"foreach"`` when all tensors are on a supported
            device, else ``"single_tensor"``), ``"single_tensor"``, ``"foreach"`` or
            ``"fused"`` (``torch.compile``d kernels; compiles once per shape class).
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

    _group_resolvers: list[GroupResolver] = []

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
        _validate_hyperparameters(lr, betas, eps, weight_decay)
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

    def add_param_group(self, param_group: dict) -> None:
        # Validate per-group overrides with the same rules as the defaults.
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}} if hasattr(
            self, "defaults"
        ) else param_group
        _validate_hyperparameters(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
        super().add_param_group(param_group)
        # Remember the parameters each group was built with: a wrapper (DeepSpeed ZeRO) may
        # later swap them for flat partitions, and the sharding layer finds the wrapper's
        # per-parameter records (shapes, fragment addresses) through these originals.
        if not hasattr(self, "_original_params"):
            self._original_params = {}
        group = self.param_groups[-1]
        self._original_params[id(group)] = list(group["params"])

    def original_params(self, group: dict) -> list[Tensor]:
        """The parameters ``group`` held when it was added (before any wrapper replaced them)."""
        try:
            return self._original_params[id(group)]
        except KeyError:
            raise KeyError("this param group was not added through MERIT.add_param_group") from None

    def is_original(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is one of the parameters MERIT was constructed with."""
        ids = getattr(self, "_original_ids", None)
        if ids is None or len(ids) != sum(len(v) for v in self._original_params.values()):
            ids = self._original_ids = {id(p) for ps in self._original_params.values() for p in ps}
        return id(tensor) in ids

    def load_state_dict(self, state_dict: dict) -> None:
        # torch rebuilds the group dicts; carry the originals over by position.
        before = [self._original_params.get(id(g)) for g in self.param_groups]
        super().load_state_dict(state_dict)
        self._original_params = {id(g): ps for g, ps in zip(self.param_groups, before) if ps is not None}

    # ---- extension point for the sharding layer -------------------------------------------
    @classmethod
    def register_group_resolver(cls, resolver: GroupResolver) -> None:
        """Let a higher layer (merit_ds.sharding) take over the step of groups it owns."""
        if resolver not in cls._group_resolvers:
            cls._group_resolvers.append(resolver)

    def _group_stepper(self, group: dict) -> Optional[Callable[[], None]]:
        for resolver in self._group_resolvers:
            stepper = resolver(self, group)
            if stepper is not None:
                return stepper
        return None

    # ---- state ---------------------------------------------------------------------------
    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, steps) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MERIT does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError("MERIT does not support complex parameters")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=_state_dtype(p), memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=_state_dtype(p), memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step (``closure`` re-evaluates the loss, as in torch.optim)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sharded = []
        for group in self.param_groups:
            stepper = self._group_stepper(group)
            if stepper is not None:
                sharded.append(stepper)
                continue
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, steps)
            if self.track_stats:  # stepped parameters record afresh; the others lose theirs
                for p in group["params"]:
                    self.partial_stats.pop(p, None)
            beta1, beta2 = group["betas"]
            result = merit(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                lr=_as_float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                nonfinite_grads=group["nonfinite_grads"],
                implementation=group["implementation"],
                stats=self.partial_stats if self.track_stats else None,
                workspace=self._workspace,
            )
            self.nonfinite_skips += result
        _run_group_steppers(sharded)
        return loss


def _run_group_steppers(steppers: list) -> None:
    """Run the steppers resolvers returned; those exposing the same ``run_many`` run together.

    The sharded step uses this to issue one collective for all groups of a ``step()`` call
    (DeepSpeed's BF16_Optimizer steps every group in one call).
    """
    batches: dict = {}
    for stepper in steppers:
        key = getattr(stepper, "run_many", None)
        if key is None:
            stepper()
        else:
            batches.setdefault(key, []).append(stepper)
    for run_many, batch in batches.items():
        run_many(batch)


def _validate_hyperparameters(lr, betas, eps, weight_decay) -> None:
    lr_value = _as_float(lr)
    if not math.isfinite(lr_value) or lr_value < 0.0:
        raise ValueError(f"Invalid learning rate: {lr!r} (must be finite and >= 0)")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not (0.0 <= float(b) < 1.0):
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r} (must be in [0, 1))")
    if not math.isfinite(float(eps)) or eps < 0.0:
        raise ValueError(f"Invalid epsilon value: {eps!r} (must be finite and >= 0)")
    if not math.isfinite(float(weight_decay)) or weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (must be finite and >= 0)")


def _as_float(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _state_dtype(p: Tensor) -> torch.dtype:
    # Low-precision parameters keep fp32 moments; fp64 stays fp64 (reference tests).
    return torch.float64 if p.dtype == torch.float64 else torch.float32


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
    stepped (with ``implementation="fused"`` such a step runs the foreach path). Returns the
    number of parameters whose step was skipped for a non-finite gradient.
    """
    if implementation is None:
        implementation = "foreach" if _foreach_supported(params) else "single_tensor"
    if not params:
        return 0
    keep = _finite_filter(params, grads, nonfinite_grads)
    skipped = 0
    if keep is not None:
        skipped = len(params) - sum(keep)
        if skipped:
            params, grads, exp_avgs, exp_avg_sqs, state_steps = (
                [x for x, k in zip(xs, keep) if k] for xs in (params, grads, exp_avgs, exp_avg_sqs, state_steps)
            )
    if not params:  # every parameter of the group was skipped
        return skipped
    if implementation == "single_tensor":
        fn = _single_tensor_merit
    elif implementation == "foreach":
        fn = _multi_tensor_merit
    elif implementation == "fused" and stats is not None:
        fn = _multi_tensor_merit  # the compiled kernels do not expose s: a statistics step runs foreach
    elif implementation == "fused":
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


def _foreach_supported(params: list[Tensor]) -> bool:
    return all(p.device.type in ("cpu", "cuda", "xpu") for p in params)


def _finite_filter(params, grads, policy: str) -> Optional[list[bool]]:
    """Which parameters have all-finite gradients; None when the policy skips the check."""
    if policy == "propagate" or not grads:
        return None
    # Screen: a sum propagates NaN and +-Inf (Inf - Inf is NaN), costs one read-only pass
    # (an order of magnitude cheaper than an inf-norm or isfinite() on CPU), and needs one
    # host sync for the whole group. A finite gradient whose sum overflows is a false
    # suspect, cleared by the exact check below, which runs only on suspects.
    sums = torch.stack([g.sum(dtype=torch.float32).to(grads[0].device) for g in grads])
    suspects = (~torch.isfinite(sums)).nonzero().flatten().tolist()
    if not suspects:
        return None
    finite = [True] * len(grads)
    for i in suspects:
        finite[i] = bool(torch.isfinite(grads[i]).all())
    if all(finite):
        return None
    if policy == "raise":
        bad = [i for i, f in enumerate(finite) if not f]
        shapes = [tuple(params[i].shape) for i in bad]
        raise FloatingPointError(
            f"MERIT: non-finite gradient in {len(bad)} parameter(s) (indices {bad} in their group, "
            f"shapes {shapes}); nothing was modified. Use nonfinite_grads='skip' to skip them."
        )
    warnings.warn(
        f"MERIT: skipped the step of {finite.count(False)} parameter(s) with non-finite gradients",
        RuntimeWarning,
        stacklevel=4,
    )
    return finite


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
        dtype = _state_dtype(param)
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
def _workspace_views(workspace: Optional[dict], like: Tensor) -> tuple[Tensor, Tensor]:
    """Two scratch tensors shaped like ``like``, carved from buffers reused across steps.

    On CPU a fresh full-size tensor costs more (page faults) than the arithmetic done in it,
    so the fast path computes u and |.|/s into two buffers sized for the largest parameter
    (about 2x the largest tensor, e.g. 300 MB for GPT-2 Small's embedding in fp32).
    """
    n = like.numel()
    if workspace is None:
        return torch.empty_like(like), torch.empty_like(like)
    key = (like.device, like.dtype)
    buf = workspace.get(key)
    if buf is None or buf.shape[1] < n:
        buf = torch.empty((2, n), dtype=like.dtype, device=like.device)
        workspace[key] = buf
    return buf[0, :n].view(like.shape), buf[1, :n].view(like.shape)


def _multi_tensor_merit(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay, stats, workspace=None
):
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, state_steps])
    for (_device, _dtype), ((dev_params, dev_grads, dev_m, dev_v, dev_steps), _) in grouped.items():
        torch._foreach_add_(dev_steps, 1.0)
        dtype = _state_dtype(dev_params[0])
        gs = dev_grads if dev_grads[0].dtype == dtype else [g.to(dtype) for g in dev_grads]
        # The same operations as formulas.update_moments_, so each element rounds the same.
        torch._foreach_mul_(dev_m, beta1)
        torch._foreach_add_(dev_m, gs, alpha=1 - beta1)
        torch._foreach_mul_(dev_v, beta2)
        torch._foreach_addcmul_(dev_v, gs, gs, value=1 - beta2)
        del gs
        low_precision = dev_params[0].dtype != dtype
        for param, m, v in zip(dev_params, dev_m, dev_v):
            w = param.to(dtype) if low_precision else param
            u, scratch = _workspace_views(workspace, w)
            F.update_direction(m, v, w, eps, weight_decay, out=u)
            trust = _trust_ratio(w, u, scratch)
            _record_stats(stats, param, trust, u)
            F.apply_update_(w, u, trust, lr)
            if low_precision:
                param.copy_(w)
