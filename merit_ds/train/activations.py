"""Activation memory of the actual model, measured: the bytes autograd saves for backward.

:func:`measure_saved_bytes` runs one forward pass and the training loss of a GPT-2 built from a
preset (``transformers.GPT2LMHeadModel``, the loop's model and :func:`.diagnostics.lm_loss`)
under ``torch.autograd.graph.saved_tensors_hooks`` and adds up the distinct storages that are
saved, parameters excluded. It builds the model with 1 and with 2 layers, so one layer's share
and the rest (embeddings, final LayerNorm, logits, the loss's fp32 copies) come out separately:

    per_layer = M(2 layers) - M(1 layer),   rest = M(1 layer) - per_layer

at a small sequence ``s0`` and micro-batch 1. With SDPA and dropout 0 nothing saved grows with
``s^2``, so both parts scale with the tokens of a micro-batch (``b s / s0``); :func:`activation_model`
returns them per token, and ``merit-ds plan`` uses it. Measured on this machine's device (CPU
here): the GPU's SDPA kernel (flash / memory-efficient) saves its output and log-sum-exp like the
CPU one, so the count carries over; it is checked against a direct measurement at a larger
sequence in the tests.

Numbers (fp32, ``s0 = 64``; docs/design/field_notes.md, 'Activation memory of a GPT-2 layer',
measured 112 s b h bytes per layer with ``gelu_new``, 64 with ``gelu_pytorch_tanh``, at
s = 1024): see ``tests/test_plan.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .presets import ModelPreset, gpt2_config

__all__ = ["ActivationModel", "measure_saved_bytes", "activation_model", "MEASURE_SEQ"]

#: The sequence length of the measurement (scaled to the run's; the measurement is linear in it).
MEASURE_SEQ = 64


@dataclass(frozen=True)
class ActivationModel:
    """Saved bytes per token: one transformer layer's, and everything else's."""

    per_layer_per_token: float
    rest_per_token: float
    dtype: str
    seq: int

    def bytes(self, n_layer: int, tokens: int) -> float:
        return tokens * (n_layer * self.per_layer_per_token + self.rest_per_token)


def measure_saved_bytes(preset: ModelPreset, *, n_layer: int, seq: int, batch: int = 1,
                        dtype: torch.dtype = torch.float32, **overrides) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for one forward + loss."""
    from transformers import GPT2LMHeadModel

    from .diagnostics import lm_loss

    torch.manual_seed(0)
    cfg = gpt2_config(preset, n_layer=n_layer, n_positions=max(seq, preset.seq_len), **overrides)
    model = GPT2LMHeadModel(cfg).to(dtype)
    model.train()
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in param_storages:
            seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        return t

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, preset.vocab_size, (batch, seq + 1), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model(input_ids=x[:, :-1]).logits, x[:, 1:])
    del loss
    return sum(seen.values())


@functools.lru_cache(maxsize=None)
def _measure(preset: ModelPreset, dtype_name: str, seq: int) -> ActivationModel:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    one = measure_saved_bytes(preset, n_layer=1, seq=seq, dtype=dtype)
    two = measure_saved_bytes(preset, n_layer=2, seq=seq, dtype=dtype)
    per_layer = two - one
    return ActivationModel(per_layer / seq, (one - per_layer) / seq, dtype_name, seq)


def activation_model(preset: ModelPreset, precision: str = "bf16", seq: int = MEASURE_SEQ) -> ActivationModel:
    """The measured per-token activation bytes of ``preset`` in ``precision`` (cached per process)."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    # the layer count does not enter the measurement (1 and 2 layers are built)
    return _measure(preset.with_overrides(n_layer=1), precision, seq)
