"""Large-batch diagnostics, cheap enough to run every N steps.

* **Max attention logit**: ``max_{h, i >= j} q_i . k_j / sqrt(d_head)`` over heads and causal
  positions of the first sequence of a micro-batch, max over layers and ranks. MERIT was
  designed to keep it bounded (max-norm trust ratios); a value climbing steadily into the
  hundreds is the classic sign of a too-large lr or batch (attention entropy collapse).
  With SDPA the logits are never materialised, so a forward hook on each block's ``c_attn``
  recomputes them from q and k, only when armed.
* **Trust ratios** of the step: min / mean / max of the element-wise ratio s over all elements,
  and the fraction of elements whose update s*u hit the [-1, 1] clip. MERIT's ``track_stats``
  is switched on for the diagnostics step only; the optimizer records them from the very s and
  u its update uses -- under ZeRO inside the sharded step, per fragment each rank owns -- and
  :func:`merit_ds.sharding.reduce_trust_stats` combines them: 5 scalars per rank, one
  ``all_gather``, no weights or moments gathered.
* **Gradient noise scale** (McCandlish et al. 2018, "An Empirical Model of Large-Batch
  Training", appendix A.1): from gradients of two batch sizes B_small < B_big of the same data,

      |G|^2 ~= (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
      S     ~= (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)
      B_noise = S / |G|^2      (sequences; the critical batch is of this order)

  Each rank splits one micro-batch in two halves (B_small = micro/2) and computes both
  halves' gradients with an extra forward/backward (``torch.autograd.grad``: the engine's
  ``.grad`` buffers are untouched); G_big is their mean over halves and ranks
  (B_big = micro x world). S and |G|^2 are averaged with an EMA before dividing, as the paper
  advises. A global batch far above B_noise buys little per token: the batch is too large.
  Not available under ZeRO-3 (parameters are partitioned between forward passes).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from merit_ds.sharding import collective

__all__ = ["AttentionLogitProbe", "GradientNoiseScale", "lm_loss"]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if _dist_ready():
        collective.all_reduce(t, op)  # on the backend's device (NCCL: the accelerator)
    return t


class AttentionLogitProbe:
    """Forward hooks on GPT-2 attention input projections; armed for one forward at a time."""

    def __init__(self, model: torch.nn.Module):
        self.armed = False
        self.value = float("-inf")
        self.handles = []
        for module in model.modules():
            if hasattr(module, "c_attn") and hasattr(module, "head_dim") and hasattr(module, "scaling"):
                self.handles.append(module.c_attn.register_forward_hook(self._hook(module)))
        if not self.handles:
            raise ValueError("no GPT-2 attention module (c_attn) found to probe")

    def _hook(self, attn):
        def hook(_module, _inputs, output):
            if not self.armed:
                return
            with torch.no_grad():
                x = output[0].detach().float()  # first sequence: (s, 3d)
                d = x.size(-1) // 3
                q, k = x[:, :d], x[:, d:2 * d]
                s = x.size(0)
                q = q.view(s, -1, attn.head_dim).transpose(0, 1)
                k = k.view(s, -1, attn.head_dim).transpose(0, 1)
                logits = (q @ k.transpose(-1, -2)) * attn.scaling
                causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
                self.value = max(self.value, float(logits.masked_fill(~causal, float("-inf")).max()))
        return hook

    def arm(self) -> None:
        self.armed, self.value = True, float("-inf")

    def collect(self) -> float:
        """Disarm and return the max over layers and ranks (collective when distributed)."""
        self.armed = False
        t = torch.tensor([self.value], dtype=torch.float64)
        return float(_all_reduce(t, dist.ReduceOp.MAX)[0])


class GradientNoiseScale:
    """McCandlish et al. 2018 estimator (see module docstring), EMA-smoothed."""

    def __init__(self, ema: float = 0.9):
        self.ema = ema
        self.s_ema: Optional[float] = None
        self.g2_ema: Optional[float] = None

    def state_dict(self) -> dict:
        """The EMAs (identical on every rank: built from all-reduced sums); checkpointed so
        that a resumed run reports the same ``gns_b_noise`` as an uninterrupted one."""
        return {"ema": self.ema, "s_ema": self.s_ema, "g2_ema": self.g2_ema}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.s_ema, self.g2_ema = state["ema"], state["s_ema"], state["g2_ema"]

    def measure(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, world: int) -> Optional[dict]:
        if x.size(0) < 2:
            return None
        params = [p for p in model.parameters() if p.requires_grad]
        if any(p.numel() == 0 for p in params):  # ZeRO-3: partitioned
            return None
        half = x.size(0) // 2
        sq_small = torch.zeros(1, dtype=torch.float64)
        big = None
        for sl in (slice(0, half), slice(half, 2 * half)):
            loss = lm_loss(model(input_ids=x[sl]).logits, y[sl])
            grads = torch.autograd.grad(loss, params)
            flat = torch.cat([g.detach().float().reshape(-1) for g in grads])
            sq_small += float(flat.double().pow(2).sum())
            big = flat if big is None else big + flat
        sq_small = _all_reduce(sq_small, dist.ReduceOp.SUM) / (2 * world)
        big = _all_reduce(big, dist.ReduceOp.SUM) / (2 * world)
        sq_big = float(big.double().pow(2).sum())
        b_small, b_big = float(half), float(2 * half * world)
        g2 = (b_big * sq_big - b_small * float(sq_small)) / (b_big - b_small)
        s = (float(sq_small) - sq_big) / (1 / b_small - 1 / b_big)
        self.s_ema = s if self.s_ema is None else self.ema * self.s_ema + (1 - self.ema) * s
        self.g2_ema = g2 if self.g2_ema is None else self.ema * self.g2_ema + (1 - self.ema) * g2
        b_noise = self.s_ema / self.g2_ema if self.g2_ema and self.g2_ema > 0 else math.nan
        return {"gns_b_noise": b_noise, "gns_trace_cov": s, "gns_grad_sq": g2, "gns_b_small": b_small, "gns_b_big": b_big}
