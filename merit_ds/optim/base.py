"""What every merit_ds optimizer shares: validation, state dtypes, the non-finite screen, and
the extension point through which the sharding layer takes over flat (ZeRO) partitions.

:class:`ShardableOptimizer` is the base of :class:`~merit_ds.optim.MERIT` and
:class:`~merit_ds.optim.LAMB`. It remembers the parameters each group was built with (a
wrapper such as DeepSpeed ZeRO may later swap them for flat partitions) and, at ``step()``,
asks the registered group resolvers whether a group is something they own. The resolver
(:func:`merit_ds.sharding.resolve_group`) steps such a group with the optimizer's
:attr:`ShardableOptimizer.fragment_rule` (:mod:`merit_ds.optim.fragment_rule`): the math of
one fragment of a parameter, given statistics reduced over all ranks.

Nothing here imports ``torch.distributed``.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

__all__ = ["ShardableOptimizer", "NONFINITE_POLICIES", "validate_adam_hyperparameters", "as_float", "state_dtype"]

NONFINITE_POLICIES = ("skip", "raise", "propagate")

# A resolver looks at a param group at step() time. If the group is something it owns (a
# DeepSpeed flat partition, say) it returns a callable that performs that group's whole step;
# otherwise None. Registered by merit_ds.sharding, which sits above this layer.
GroupResolver = Callable[["ShardableOptimizer", dict], Optional[Callable[[], None]]]


class ShardableOptimizer(Optimizer):
    """Base class: original-parameter bookkeeping and the group-resolver extension point.

    Subclasses set :attr:`fragment_rule` (their sharded math) and implement
    :meth:`_step_group` (their ordinary step of one group of whole tensors).
    """

    #: The optimizer's :class:`~merit_ds.optim.fragment_rule.FragmentRule` (set by subclasses).
    fragment_rule = None
    _group_resolvers: list = []  # shared by every subclass: one sharding layer for all

    def add_param_group(self, param_group: dict) -> None:
        # Validate per-group overrides with the same rules as the defaults.
        if hasattr(self, "defaults"):
            merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
            self._validate_group(merged)
        super().add_param_group(param_group)
        # Remember the parameters each group was built with: a wrapper (DeepSpeed ZeRO) may
        # later swap them for flat partitions, and the sharding layer finds the wrapper's
        # per-parameter records (shapes, fragment addresses) through these originals.
        if not hasattr(self, "_original_params"):
            self._original_params = {}
        group = self.param_groups[-1]
        self._original_params[id(group)] = list(group["params"])

    def _validate_group(self, group: dict) -> None:
        validate_adam_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def original_params(self, group: dict) -> list[Tensor]:
        """The parameters ``group`` held when it was added (before any wrapper replaced them)."""
        try:
            return self._original_params[id(group)]
        except KeyError:
            raise KeyError(f"this param group was not added through {type(self).__name__}.add_param_group") from None

    def is_original(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is one of the parameters the optimizer was constructed with."""
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
        if resolver not in ShardableOptimizer._group_resolvers:
            ShardableOptimizer._group_resolvers.append(resolver)

    def _group_stepper(self, group: dict) -> Optional[Callable[[], None]]:
        for resolver in self._group_resolvers:
            stepper = resolver(self, group)
            if stepper is not None:
                return stepper
        return None

    def _step_group(self, group: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

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
            else:
                self._step_group(group)
        run_group_steppers(sharded)
        return loss


def run_group_steppers(steppers: list) -> None:
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


def validate_adam_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """Raise ``ValueError`` naming the value for an invalid lr, betas, eps or weight decay (the same
    rules whether they come from Python, a DeepSpeed JSON or a command line)."""
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        _require_number(name, value)
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__"):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        _require_number(f"betas[{i}]", b)
    lr_value = as_float(lr)
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


def _require_number(name: str, value) -> None:
    if isinstance(value, Tensor) and value.numel() == 1:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")


def as_float(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def state_dtype(p: Tensor) -> torch.dtype:
    """Low-precision parameters keep fp32 state and arithmetic; fp64 stays fp64 (reference tests)."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def foreach_supported(params: list[Tensor]) -> bool:
    return all(p.device.type in ("cpu", "cuda", "xpu") for p in params)


def init_adam_state(state: dict, p: Tensor) -> None:
    """``step`` (float32 0-d), ``exp_avg``, ``exp_avg_sq``: the keys DeepSpeed's (universal)
    checkpoints expect."""
    state["step"] = torch.tensor(0.0, dtype=torch.float32)
    state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)


def collect_adam_group(optimizer: Optimizer, group: dict, name: str):
    """(params, grads, exp_avgs, exp_avg_sqs, steps) of the group's parameters that have a
    gradient, creating their state on first use."""
    params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients")
        if torch.is_complex(p):
            raise RuntimeError(f"{name} does not support complex parameters")
        state = optimizer.state[p]
        if len(state) == 0:
            init_adam_state(state, p)
        params.append(p)
        grads.append(p.grad)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        steps.append(state["step"])
    return params, grads, exp_avgs, exp_avg_sqs, steps


def finite_filter(params, grads, policy: str, name: str = "MERIT") -> Optional[list[bool]]:
    """Which parameters have all-finite gradients; None when all do or the policy skips the check.

    ``policy="raise"`` raises ``FloatingPointError`` (nothing modified); ``"skip"`` warns and
    returns the mask; ``"propagate"`` checks nothing.
    """
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
            f"{name}: non-finite gradient in {len(bad)} parameter(s) (indices {bad} in their group, "
            f"shapes {shapes}); nothing was modified. Use nonfinite_grads='skip' to skip them."
        )
    return finite


def warn_skipped(name: str, count: int, what: str = "parameter(s)", where: str = "") -> None:
    warnings.warn(
        f"{name}{where}: skipped the step of {count} {what} with non-finite gradients",
        RuntimeWarning,
        stacklevel=5,
    )


def workspace_views(workspace: Optional[dict], like: Tensor) -> tuple[Tensor, Tensor]:
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
