"""Gradient diversity (Yin et al. 2018; Chen et al. 2018, "The Effect of Network Width on the
Performance of Large-batch Training"), measured from per-example gradients.

Over ``n`` examples with per-example gradients ``g_i`` (here: the gradient of one sequence's mean
token loss)::

    Delta = sum_i ||g_i||^2 / ||sum_i g_i||^2          (1/n <= Delta; large when the g_i disagree)
    bound = n * Delta                                    (sequences)

Chen et al.: a batch up to about ``n * Delta`` loses little progress per example (with ``n`` the
examples the diversity was computed over; their analysis uses the whole training set). Because
``E sum ||g_i||^2 = n (|G|^2 + tr S)`` and ``E ||sum g_i||^2 = n^2 |G|^2 + n tr S`` (``G`` the mean
gradient, ``S`` the per-example covariance), ``n * Delta ~ n (1 + B) / (n + B)`` with ``B = tr S /
|G|^2`` the simple noise scale: **measured on a probe of n examples the bound cannot exceed about
n**, and tends to ``1 + B`` only when ``n >> B``. So the record also carries the same two sums'
unbiased extrapolation to a large data set, ``bound_data = (n - 1) S / (T - S)`` (``S = sum ||g_i||^2``,
``T = ||sum g_i||^2``; NaN when ``T <= S``: the probe cannot resolve the mean gradient).

How it is computed, and why it is exact under ZeRO and data parallelism:

* **Per-example gradients** with ``torch.func``: ``vmap(grad(loss))`` over a stateless copy of the
  model's *structure* (built once on the ``meta`` device: no memory) called through
  ``functional_call`` with the model's own parameter and buffer tensors, ``chunk`` examples per
  vmap (memory: ``chunk`` x parameters in fp32). Nothing of the engine's module runs: no
  DeepSpeed hook, no ``.grad`` written, no mode switch, no random number drawn (the copy is in
  eval mode and vmap runs with ``randomness="error"``: a random op would raise, not draw).
* **ZeRO-3** partitions every parameter between forward passes (``p`` is empty on a rank): the
  full tensors are gathered with ``deepspeed.zero.GatheredParameters(modifier_rank=None)`` (read-
  only; an all-gather every rank joins) and used inside the context only. ZeRO 0/1/2 keep the
  full (working-precision) parameters in the module: they are used as they are.
  Parameters are read in fp32 (a bf16 run's module weights are upcast for the probe).
* **Ranks**: each rank's probe is the first ``min(probe, sequences per rank per step)`` sequences
  of its own share of this step's batch, so the ranks' examples are distinct (the sampler gives
  ranks disjoint blocks). ``S``, the probe count and the summed gradient vector ``sum_i g_i`` are
  all-reduced with SUM: ``n`` = the probe count summed over ranks, and Delta is exactly the
  single-process value on the union of the ranks' examples (up to float summation order).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from merit_ds.sharding import collective

__all__ = ["GradientDiversity", "per_example_stats", "diversity_from_sums"]


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """The model's structure on the meta device (no storage), in eval mode; parameters come from
    ``functional_call``. Hugging Face models are rebuilt from their config (tied weights tied)."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"gradient diversity needs a Hugging Face model (with .config), got {type(model).__name__}")
    with torch.device("meta"):
        skel = type(model)(config)
    return skel.eval()


def diversity_from_sums(sq_sum: float, sum_sq: float, n: int) -> dict:
    """``sq_sum = sum_i ||g_i||^2``, ``sum_sq = ||sum_i g_i||^2`` over ``n`` examples -> the record."""
    delta = sq_sum / sum_sq if sum_sq > 0 else math.inf
    data = (n - 1) * sq_sum / (sum_sq - sq_sum) if n > 1 and sum_sq > sq_sum else math.nan
    return {"gdiv_delta": delta, "gdiv_n": n, "gdiv_bound": n * delta, "gdiv_bound_data": data}


def per_example_stats(skeleton: torch.nn.Module, params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor,
                      chunk: int) -> tuple[torch.Tensor, dict]:
    """``(sum_i ||g_i||^2 as a float64 scalar, {name: sum_i g_i})`` over the rows of ``x``/``y``."""
    from torch.func import functional_call, grad, vmap

    def loss(p, xi, yi):
        logits = functional_call(skeleton, (p, buffers), args=(), kwargs={"input_ids": xi[None]}).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), yi.reshape(-1))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0), randomness="error")
    sq = torch.zeros((), dtype=torch.float64, device=x.device)
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for start in range(0, x.size(0), chunk):
        grads = per_example(params, x[start:start + chunk], y[start:start + chunk])
        for name, g in grads.items():
            sq += g.double().pow(2).sum()
            total[name] += g.sum(0)
    return sq, total


class GradientDiversity:
    """Measures Delta on up to ``probe`` sequences per rank (see the module docstring)."""

    def __init__(self, probe: int, chunk: int = 4):
        if probe < 0 or chunk < 1:
            raise ValueError(f"gradient diversity: probe must be >= 0 and chunk >= 1, got {probe}, {chunk}")
        self.probe, self.chunk = int(probe), int(chunk)
        self._skel: Optional[torch.nn.Module] = None

    def measure(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, zero_stage: int) -> Optional[dict]:
        """Every rank calls it (collectives) with its own probe sequences ``x``, targets ``y``."""
        if self.probe == 0:
            return None
        x, y = x[:self.probe], y[:self.probe]
        if self._skel is None:
            self._skel = _skeleton(model)
        named = [(n, p) for n, p in model.named_parameters()]
        if zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
        else:
            import contextlib

            gather = contextlib.nullcontext()
        with gather, torch.no_grad():
            params = {n: p.detach().float() for n, p in named if p.requires_grad}
            frozen = {n: p.detach().float() for n, p in named if not p.requires_grad}
            buffers = {**frozen, **{n: b for n, b in model.named_buffers()}}
            with torch.enable_grad():
                sq, total = per_example_stats(self._skel, params, buffers, x, y, self.chunk)
        flat = torch.cat([t.reshape(-1) for t in total.values()])
        counts = torch.stack([sq, torch.tensor(float(x.size(0)), dtype=torch.float64, device=sq.device)])
        if _dist_ready():
            collective.all_reduce(counts, dist.ReduceOp.SUM)
            collective.all_reduce(flat, dist.ReduceOp.SUM)
        sum_sq = float(flat.double().pow(2).sum())
        return diversity_from_sums(float(counts[0]), sum_sq, int(round(float(counts[1]))))


def plot_diversity(records: list[dict], path) -> Optional[object]:
    """The batch bound n*Delta (and its large-data extrapolation) per diagnostics step, beside the
    global batch the step used; None when no record carries the diversity."""
    pts = [r for r in records if r.get("gdiv_bound") is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    steps = [r["step"] for r in pts]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(steps, [r["gdiv_bound"] for r in pts], "o-", label=f"n x Delta (n = {pts[-1]['gdiv_n']} probe sequences)")
    data = [(r["step"], r["gdiv_bound_data"]) for r in pts if r.get("gdiv_bound_data") is not None
            and math.isfinite(r["gdiv_bound_data"]) and r["gdiv_bound_data"] > 0]
    if data:
        ax.plot(*zip(*data), "s:", label="extrapolated to a large data set, (n-1)S/(T-S)")
    ax.plot(steps, [r["gdiv_batch"] for r in pts], "k--", label="global batch used")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("sequences")
    ax.set_title("Gradient diversity: batch bound vs batch used", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
