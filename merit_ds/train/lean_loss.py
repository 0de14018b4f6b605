r"""Memory-lean LM loss: the output projection and the cross-entropy, chunked over tokens.

The training loop's loss, ``lm_loss(model(x).logits, y)`` (:func:`.diagnostics.lm_loss`),
materialises the full-vocabulary logits of a micro-batch, an fp32 copy of them, the fp32
log-softmax saved for backward, and in backward two more fp32 tensors of that size (nll_loss's
gradient and log_softmax's). Here the logits never exist for more than ``C`` tokens at a time.

Math (N tokens, hidden states ``h_i`` in R^H, output embedding W in R^{V x H} -- GPT-2 ties it to
``wte`` --, targets ``t_i``; ``M`` = the tokens whose target is not ``ignore_index``, ``n = |M|``)::

    z_i   = W h_i                         (logits, one chunk of C tokens at a time; the input dtype,
                                           upcast to fp32 for everything that follows)
    lse_i = log sum_v exp z_iv            (as m + log sum exp(z - m), m = max_v z_iv)
    L     = (1/n) sum_{i in M} (lse_i - z_{i,t_i})          (reduction "mean"; "sum": no 1/n;
                                                             "none": each l_i, 0 where ignored)

    dL/dz_i = (gamma/n) [i in M] (softmax(z_i) - onehot(t_i))   =: g_i   (gamma = dL_total/dL)
    dL/dh_i = g_i W          dL/dW = sum_i g_i^T h_i

Forward keeps, per token, only ``lse_i`` (fp32); backward recomputes each chunk's logits from the
saved ``h`` and ``W`` (one extra ``C x H x V`` matmul per chunk: the loss's matmul FLOPs go from
3 to 4 x ``2 N H V``), forms ``g`` in place in the fp32 chunk, casts it to the input dtype for the
two matmuls (as the plain path's backward does), writes ``dL/dh`` for the chunk and adds the
chunk's ``g^T h`` into an fp32 ``dL/dW`` accumulator (cast to W's dtype at the end).

Memory (bytes; e = bytes of the input dtype, 2 for bf16, 4 for fp32)::

                               plain lm_loss                      chunked (this module)
    saved for backward         4 N V (fp32 log-softmax)           4 N (lse) + h, W (saved anyway)
    forward transient          e N V logits (+ 4 N V fp32 copy)   (4 + e') C V
    backward transient         8 N V (two fp32 gradients)          (4 + e') C V + 4 V H + e' V H

``e' = e`` for bf16 (the bf16 matmul output next to its fp32 copy; ``g``'s bf16 copy; the chunk's
bf16 ``g^T h`` before it is added to the fp32 accumulator) and ``e' = 0`` for fp32, where the
upcasts are no-ops and the accumulator is the returned gradient itself. GPT-2 Medium, micro-batch
48 x 1024 tokens, V = 50,304, H = 1024, bf16: plain 29.7 GB at the peak (4 N V saved + 8 N V
in backward); chunked, C = 2^26 // V = 1,334 tokens (256 MiB of fp32 logits): 6 C V + 6 V H =
0.71 GB. Measured peaks on CPU (B = 4 x 1,024 tokens, H = 768, V = 50,257; the formulas to the
MiB): ``benchmarks/results/loss_memory.md``.

ZeRO-3: DeepSpeed partitions a parameter outside its module's forward, so ``lm_head.weight`` (tied
to ``wte``) is an empty shard when the transformer has returned. :func:`lean_lm_loss` does not
gather it: it detects a ZeRO-3 parameter (attributes ``ds_id`` and ``ds_status``) and takes the
plain path (``model.lm_head(h)``, which ZeRO-3 gathers, then the fp32 cross-entropy).

Liger Kernel: ``backend="liger"`` (or ``"auto"`` on CUDA tensors when ``liger_kernel`` imports)
calls its fused linear cross-entropy instead. It is GPU-only, not installed here, and UNTESTED on
this repository's CI (CPU); the default is this module's pure-torch path.

torch >= 2.13 also ships ``torch.nn.functional.linear_cross_entropy`` with a chunked path
(``options=torch.nn.LinearCrossEntropyOptions()``); it computes the gradients inside forward and
keeps them until backward. Measured next to this one (``benchmarks/bench_loss_memory.py``): less
memory still (it keeps bf16 gradients), but it returns the loss in the input dtype (bf16: 10.875
where the fp32 loss is 10.976) and ran 1.8-4.7x slower than the plain loss on the CPU measured.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["ChunkedLinearCrossEntropy", "chunked_linear_cross_entropy", "default_chunk_tokens", "lean_lm_loss",
           "is_zero3_partitioned", "LeanLossMixin", "lean_loss_model_class", "CHUNK_LOGIT_ELEMENTS"]

#: fp32 logits of one chunk: at most 2^26 elements = 256 MiB.
CHUNK_LOGIT_ELEMENTS = 2 ** 26


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits stay within 256 MiB: ``max(1, 2^26 // V)``
    (GPT-2's padded 50,304: 1,334 tokens; 50,257: 1,335)."""
    return max(1, CHUNK_LOGIT_ELEMENTS // int(vocab_size))


def _no_autocast(device_type: str):
    # the loss runs in its inputs' dtype, whatever autocast state the caller is in (backward runs
    # outside autocast anyway; forward must agree with it)
    return torch.autocast(device_type=device_type, enabled=False)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs (the plain path's ``logits.float()``); float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(h @ W.T, t)`` without the full logits (module docstring). Arguments of
    :meth:`forward`: ``hidden (..., H)``, ``weight (V, H)``, ``targets (...)`` (int64),
    ``chunk_tokens``, ``ignore_index``, ``reduction`` ("mean" | "sum" | "none"). Returns an fp32
    scalar, or per-token losses of ``targets``' shape for "none" (float64 for float64 inputs,
    which makes ``torch.autograd.gradcheck`` applicable)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, ignore_index: int, reduction: str):
        if hidden.dtype != weight.dtype:
            raise TypeError(f"hidden states ({hidden.dtype}) and the output weight ({weight.dtype}) must share a dtype")
        H = hidden.shape[-1]
        h2 = hidden.reshape(-1, H)
        t = targets.reshape(-1)
        if t.numel() != h2.shape[0]:
            raise ValueError(f"{h2.shape[0]} hidden states but {t.numel()} targets")
        n_tok = h2.shape[0]
        acc = _acc_dtype(hidden.dtype)
        lse = torch.empty(n_tok, dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        per_token = torch.empty(n_tok, dtype=acc, device=hidden.device) if reduction == "none" else None
        with _no_autocast(hidden.device.type):
            for s in range(0, n_tok, chunk_tokens):
                e = min(s + chunk_tokens, n_tok)
                tc = t[s:e]
                z = torch.mm(h2[s:e], weight.t()).to(acc)          # (c, V) fp32; a no-op upcast for fp32
                valid = tc != ignore_index
                target_z = z.gather(1, tc.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
                m = z.amax(dim=1)
                lse_c = z.sub_(m.unsqueeze(1)).exp_().sum(dim=1).log_().add_(m)  # in place: no second (c, V)
                del z
                loss_c = (lse_c - target_z).masked_fill_(~valid, 0.0)
                if per_token is not None:
                    per_token[s:e] = loss_c
                else:
                    total += loss_c.sum(dtype=torch.float64)
                lse[s:e] = lse_c
        n_valid = (t != ignore_index).sum()
        ctx.save_for_backward(hidden, weight, t, lse, n_valid)
        ctx.chunk_tokens, ctx.ignore_index, ctx.reduction = chunk_tokens, ignore_index, reduction
        if reduction == "mean":
            return (total / n_valid).to(acc)   # 0 / 0 = nan when every target is ignored, as F.cross_entropy
        if reduction == "none":
            return per_token.view(targets.shape)
        return total.to(acc)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, t, lse, n_valid = ctx.saved_tensors
        C, ignore_index = ctx.chunk_tokens, ctx.ignore_index
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        H = hidden.shape[-1]
        h2 = hidden.reshape(-1, H)
        n_tok = h2.shape[0]
        acc = lse.dtype
        scale = grad_out.detach().to(acc)
        if ctx.reduction == "mean":
            scale = scale / n_valid
        elif ctx.reduction == "none":
            scale = scale.reshape(-1)  # one factor per token
        grad_h = torch.empty_like(h2) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        with _no_autocast(hidden.device.type):
            for s in range(0, n_tok, C):
                e = min(s + C, n_tok)
                hc, tc = h2[s:e], t[s:e]
                g = torch.mm(hc, weight.t()).to(acc)
                g.sub_(lse[s:e].unsqueeze(1)).exp_()                        # softmax(z), in place
                valid = tc != ignore_index
                w_row = valid.to(acc)
                g.scatter_add_(1, tc.masked_fill(~valid, 0).unsqueeze(1), -w_row.unsqueeze(1))  # - onehot(t)
                g.mul_((w_row * (scale[s:e] if scale.dim() else scale)).unsqueeze(1))  # (gamma / n) [i in M]
                g_low = g.to(weight.dtype)                                   # as the plain backward's cast
                if need_h:
                    torch.mm(g_low, weight, out=grad_h[s:e])
                if need_w:
                    if g_low.dtype == acc:
                        grad_w.addmm_(g_low.t(), hc)
                    else:
                        grad_w += torch.mm(g_low.t(), hc)                    # low precision product, fp32 sum
                del g, g_low
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return (grad_h.view_as(hidden) if need_h else None), grad_w, None, None, None, None


@functools.lru_cache(maxsize=1)
def _liger_loss_class():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # not installed (CPU CI), or a broken install
        return None
    return LigerFusedLinearCrossEntropyLoss


def _liger_loss(hidden, weight, targets, ignore_index, reduction):  # pragma: no cover - GPU only, untested here
    cls = _liger_loss_class()
    out = cls(ignore_index=ignore_index, reduction=reduction)(weight, hidden.reshape(-1, hidden.shape[-1]),
                                                              targets.reshape(-1))
    out = (out[0] if isinstance(out, tuple) else out).float()
    return out.view(targets.shape) if reduction == "none" else out


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 chunk_tokens: Optional[int] = None, *, ignore_index: int = -100,
                                 reduction: str = "mean", backend: str = "torch") -> torch.Tensor:
    """``F.cross_entropy((hidden @ weight.T).float(), targets)`` (flattened), chunked over tokens.

    ``chunk_tokens``: tokens per chunk (default :func:`default_chunk_tokens`). ``reduction``:
    "mean" (over the non-ignored targets), "sum", or "none" (per-token losses, targets' shape,
    0 where ignored; the validation loop's per-block means). ``backend``: "torch" (this module),
    "liger" (Liger Kernel's fused op; CUDA only, untested here) or "auto" (Liger on CUDA tensors
    when it imports, else torch)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if backend not in ("torch", "liger", "auto"):
        raise ValueError(f"backend must be 'torch', 'liger' or 'auto', got {backend!r}")
    use_liger = backend == "liger" or (backend == "auto" and hidden.is_cuda and _liger_loss_class() is not None)
    if use_liger:  # pragma: no cover - GPU only
        if _liger_loss_class() is None or not hidden.is_cuda:
            raise RuntimeError("backend='liger' needs the liger_kernel package and CUDA tensors")
        return _liger_loss(hidden, weight, targets, ignore_index, reduction)
    c = int(chunk_tokens) if chunk_tokens is not None else default_chunk_tokens(weight.shape[0])
    if c <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, c, int(ignore_index), reduction)


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter (it carries ``ds_id`` and ``ds_status``): its data is an empty
    shard outside its module's forward."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def _plain_loss(logits, targets, ignore_index, reduction):
    # as diagnostics.lm_loss (reduction "mean", ignore_index -100)
    out = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index,
                          reduction=reduction)
    return out.view(targets.shape) if reduction == "none" else out


def lean_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                 chunk_tokens: Optional[int] = None, *, ignore_index: int = -100, reduction: str = "mean",
                 backend: str = "torch") -> torch.Tensor:
    """The LM loss of a ``GPT2LMHeadModel``-like module (``.transformer`` returning
    ``last_hidden_state`` after the final LayerNorm, ``.lm_head`` a bias-free Linear) without the
    full logits: what ``lm_loss(model(input_ids=x).logits, y)`` computes, the same value and
    gradients up to float rounding.

    ``model`` is the bare model, not a DeepSpeed engine: called on ``engine.module`` from outside
    the engine it would skip the engine's forward (and its backward prologue, see
    docs/recipes.md, "Memory-lean loss"); run it inside the engine's forward instead, e.g. with
    :func:`lean_loss_model_class`. Under ZeRO-3 (``lm_head.weight`` partitioned) it computes
    ``model.lm_head(h)`` and the plain fp32 cross-entropy (no memory saved, nothing gathered
    by hand)."""
    hidden = model.transformer(input_ids=input_ids, return_dict=True).last_hidden_state
    weight = model.lm_head.weight
    if getattr(model.lm_head, "bias", None) is not None:
        raise ValueError("lean_lm_loss: lm_head has a bias; only a bias-free output projection is supported")
    if is_zero3_partitioned(weight):
        return _plain_loss(model.lm_head(hidden), targets, ignore_index, reduction)
    return chunked_linear_cross_entropy(hidden, weight, targets, chunk_tokens, ignore_index=ignore_index,
                                        reduction=reduction, backend=backend)


class LeanLossMixin:
    """Put before a ``GPT2LMHeadModel``-like class (:func:`lean_loss_model_class`): ``forward(...,
    targets=y)`` returns :func:`lean_lm_loss` (a scalar tensor), so a DeepSpeed engine that wraps
    the model runs its own forward (hooks, backward prologue, autocast) around the lean loss;
    without ``targets`` it is the model's own forward. Same parameters and ``state_dict`` keys as
    the base class (checkpoints and export unchanged)."""

    lean_chunk_tokens: Optional[int] = None

    def forward(self, *args, targets: Optional[torch.Tensor] = None, loss_reduction: str = "mean", **kwargs):
        if targets is None:
            return super().forward(*args, **kwargs)
        input_ids = args[0] if args else kwargs.pop("input_ids")
        if len(args) > 1 or kwargs:
            raise TypeError(f"the lean loss takes input_ids and targets only, got also {len(args) - 1} positional "
                            f"and {sorted(kwargs)} keyword arguments")
        return lean_lm_loss(self, input_ids, targets, self.lean_chunk_tokens, reduction=loss_reduction)


@functools.lru_cache(maxsize=None)
def lean_loss_model_class(base: type) -> type:
    """``Lean<base>``: ``base`` (e.g. ``transformers.GPT2LMHeadModel``) with :class:`LeanLossMixin`."""
    return type(f"Lean{base.__name__}", (LeanLossMixin, base), {"__module__": __name__, "__doc__": LeanLossMixin.__doc__})
