"""Recipe presets: the one source of truth for models and batch sizes; optimizer hyperparameters
come from each optimizer's registration (:mod:`merit_ds.optim.registry`, ``recipe_defaults``),
whose numbers for the built-ins are explained below.

Everything else (``ds_configs/generate.py``, the ``plan`` command, ``launch/`` headers, the
recipe table of docs/recipes.md, the training loop's defaults) reads these tables; nothing is
hand-copied.

Sources, and what is an estimate
--------------------------------
* Models: GPT-2 Small (124M: 12 layers, 768 wide, 12 heads) and Medium (355M: 24 layers, 1024
  wide, 16 heads), context 1024, vocabulary 50257 (Radford et al. 2019) padded to 50304, a
  multiple of 64, for the tensor cores' tile sizes (nanoGPT's choice; the 47 padding ids are
  never produced by the data, whose ids the start-up check bounds). Activation
  ``gelu_pytorch_tanh``: the same tanh approximation as GPT-2's ``gelu_new`` computed by one
  PyTorch kernel, which saves 64 s b h bytes per layer for backward in fp32 against ``gelu_new``'s
  112 (docs/design/field_notes.md; measured by ``merit_ds.train.activations``). Dropout 0 as in
  nanoGPT/Sophia-style pretraining (the GPT-2 lineage the MERIT paper trains in). Attention
  through PyTorch SDPA (``attn_implementation="sdpa"``).
* Optimizer (GPT-2 lineage of the MERIT paper, which follows the Sophia/nanoGPT setup on
  OpenWebText): betas (0.9, 0.95), weight decay 0.1 on matrices only (not on biases,
  LayerNorms), gradient clipping 1.0, linear warmup then cosine decay to a floor of 0.1 x
  peak. Reference batch 480 x 1024 tokens (491,520 tokens/step, ~100k steps for 48B tokens).
* MERIT peak lr: **estimates** for GPT-2 Small/Medium (no GPU sweep has been run by this
  project). MERIT's update is scaled to the size of the weights, so its best lr is not AdamW's:
  a CPU sweep (GPT-2 4x128, KJV text; docs/design/field_notes.md) found MERIT's best lr 1e-2 at batch 16 and
  3e-2 at batch 128, against AdamW's 3e-3/2e-3, and a sharp failure just above the best lr.
  We therefore start from the lineage's AdamW values at batch 480 (6e-4 Small, 3e-4 Medium),
  which sit on the safe side of that cliff; the published MERIT code's README example uses 2e-4.
  Sweep before a 48B-token run (see docs/recipes.md, 'Hyperparameters and where they come from'). The ``tiny`` preset's lr (1e-2 at
  batch 16) is measured (same 4x128 model as the sweep).
* Baselines (``--optimizer lamb|adamw``), same betas, decay grouping, clipping and schedule as
  MERIT so that only the optimizer differs:

  - **AdamW** peak lr at batch 480: Small 6e-4, Medium 3e-4 -- **paper values**: GPT-3's table
    2.1 (Brown et al. 2020: 125M 6e-4, 350M 3e-4 at 0.5M tokens per step), used at exactly this
    batch (480 x 1024) by nanoGPT's ``train_gpt2.py`` config (Small: 6e-4, 2000 warmup steps,
    min lr 6e-5) and by the Sophia paper's AdamW baselines (Liu et al. 2023), the setup the MERIT
    paper follows. eps 1e-8 (PyTorch's and nanoGPT's). Tiny: 3e-3 at batch 16, **measured** by
    the same CPU sweep as MERIT's (docs/design/field_notes.md: AdamW best 3e-3 at batch 16, 2e-3 at 128).
  - **LAMB** peak lr at batch 480: Small 6e-4, Medium 3e-4 -- **ESTIMATES**: the LAMB paper
    (You et al. 2020, BERT) gives no GPT-2 value; its untuned square-root rule (5/(2^3 x 10^3) =
    6.25e-4 at batch 512, 5e-3 at 32k) gives 6.05e-4 at 480, which is the lineage's AdamW
    value; Medium takes the lineage's halving. eps 1e-6 (the LAMB paper's), no trust-ratio clamp
    (Algorithm 2 as published). Tiny: 1e-2 at batch 16, an ESTIMATE (MERIT's measured value:
    both scale each update to the size of the weights; not swept for LAMB).
* Scaling rule with batch size B (sequences): ``lr(B) = lr_ref * (B / B_ref) ** alpha``, alpha per
  optimizer as the CPU study measured it between batch 8 and 64 (docs/study.md, 'The recipes' lr
  rule'): MERIT 0.69 [0.69, 1.02], LAMB 0.85 [0.69, 0.85], AdamW 0.0 [-0.17, 0.17] (95%
  intervals), each excluding the square-root rule's 0.5 (Malladi et al. 2022, the default for an
  optimizer registered without one); extrapolated from a 233k-parameter model to GPT-2, and
  warmup is a fixed share of the token budget (2%: 960M tokens of 48B, i.e. ~1950 steps at
  480 -- the lineage's 2000 -- and ~153 steps at 6144), so it stays the same number of tokens
  whatever the batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from merit_ds.optim import registry
from merit_ds.optim.spec import RecipeDefaults

__all__ = [
    "ModelPreset", "OptimPreset", "MODEL_PRESETS", "BATCH_PRESETS", "optimizer_names", "optimizer_label",
    "TOKEN_BUDGET", "WARMUP_FRACTION", "MIN_LR_RATIO", "scaled_lr", "lr_rule_note", "warmup_steps",
    "get_model_preset", "get_optim_preset", "gpt2_config", "count_parameters",
]

#: The mission's token budget for GPT-2 Small/Medium.
TOKEN_BUDGET = 48_000_000_000

#: Batch presets in sequences: "480, 1k, 2k, 4k, 6k" are exactly these numbers.
BATCH_PRESETS: dict[str, int] = {"480": 480, "1k": 1024, "2k": 2048, "4k": 4096, "6k": 6144}

#: Warmup as a share of the token budget (so it is a fixed number of tokens at any batch).
WARMUP_FRACTION = RecipeDefaults.warmup_fraction  # 0.02
#: Cosine decays from the peak lr to this fraction of it (nanoGPT's min_lr = lr/10).
MIN_LR_RATIO = RecipeDefaults.min_lr_ratio  # 0.1


@dataclass(frozen=True)
class ModelPreset:
    """A GPT-2 shape. ``config_kwargs`` go to ``transformers.GPT2Config``."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    seq_len: int
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    token_vocab: int = 50257  # ids the tokenizer produces; ids in [token_vocab, vocab_size) are padding
    description: str = ""
    #: Validation blocks when --eval-sequences is not given. The recipes': 2048, so that the val
    #: loss's standard error is <= 0.01 nats at GPT-2 scale (per-sequence loss spread ~0.34 nats,
    #: from 128 blocks giving ~0.03: 0.34 / sqrt(2048) = 0.0075), at ~1.4 training steps of compute
    #: per evaluation at batch 480 (0.28% of the run at --eval-every 500; docs/recipes.md).
    eval_sequences: int = 128

    def config_kwargs(self, **overrides) -> dict:
        kw = dict(
            n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head,
            n_positions=self.seq_len, vocab_size=self.vocab_size,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            activation_function="gelu_pytorch_tanh",
            # no KV cache in training: with it every layer saves its k and v a second time
            # (the cache's copies, 8 s b h bytes in fp32); the export switches it back on
            use_cache=False,
            bos_token_id=50256, eos_token_id=50256,
            tie_word_embeddings=True,
        )
        kw.update(overrides)
        if kw["vocab_size"] <= 50256:
            # a reduced vocabulary (the study's remapped ids): GPT-2's end-of-text id is not in it
            # (transformers warns on every build); no bos/eos unless the caller names them
            for key in ("bos_token_id", "eos_token_id"):
                if key not in overrides:
                    kw[key] = None
        return kw

    def with_overrides(self, **overrides) -> "ModelPreset":
        return dataclasses.replace(self, **overrides)

    @property
    def n_params(self) -> int:
        return count_parameters(self.n_layer, self.n_embd, self.seq_len, self.vocab_size)


#: An optimizer's hyperparameters for a model preset at its reference batch (sequences): the
#: registry's :class:`~merit_ds.optim.spec.RecipeDefaults` (``lr_source`` is printed in the banner).
OptimPreset = RecipeDefaults


MODEL_PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset("tiny", n_layer=4, n_embd=128, n_head=4, seq_len=128,
                        description="CPU demo/test model (7.2M params, 6.4M of them the embedding)"),
    "gpt2-small": ModelPreset("gpt2-small", n_layer=12, n_embd=768, n_head=12, seq_len=1024,
                              description="GPT-2 Small, 124M", eval_sequences=2048),
    "gpt2-medium": ModelPreset("gpt2-medium", n_layer=24, n_embd=1024, n_head=16, seq_len=1024,
                               description="GPT-2 Medium, 355M", eval_sequences=2048),
}

def optimizer_names() -> tuple[str, ...]:
    """``--optimizer`` choices (the registry's, in registration order; the first is the default)."""
    return registry.names()


def optimizer_label(name: str) -> str:
    """How the banner, the plots and the docs name optimizer ``name`` (``"merit"`` -> ``"MERIT"``)."""
    spec = registry.find(name)
    return spec.label if spec is not None else name


def get_model_preset(name: str) -> ModelPreset:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}") from None


def get_optim_preset(name: str, optimizer: str = "merit") -> OptimPreset:
    """The hyperparameters of ``optimizer`` (any registered name) for model preset ``name``."""
    spec = registry.get(optimizer)
    if name not in spec.recipe_defaults:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(spec.recipe_defaults)}")
    return spec.recipe_defaults[name]


def parse_batch(batch) -> int:
    """'6k' -> 6144, '480' -> 480, 1000 -> 1000 (any positive integer is allowed)."""
    if isinstance(batch, int):
        value = batch
    elif str(batch) in BATCH_PRESETS:
        value = BATCH_PRESETS[str(batch)]
    else:
        try:
            value = int(batch)
        except ValueError:
            raise ValueError(f"global batch {batch!r} is neither an integer nor one of the presets "
                             f"{ {k: v for k, v in BATCH_PRESETS.items()} }") from None
    if value <= 0:
        raise ValueError(f"global batch must be a positive number of sequences, got {value}")
    return value


def scaled_lr(optim: OptimPreset, global_batch: int) -> float:
    """The preset's lr at another batch: ``lr_ref * (B / B_ref) ** lr_batch_exponent`` (0.5: the
    square-root rule; the built-ins carry the CPU study's measured exponents)."""
    return optim.lr_ref * (global_batch / optim.batch_ref) ** optim.lr_batch_exponent


def lr_rule_note(optim: OptimPreset) -> str:
    """How :func:`scaled_lr` scales, in words (banner, ``merit-ds plan``)."""
    e = optim.lr_batch_exponent
    return "sqrt-scaled" if e == 0.5 else ("the same at every batch" if e == 0 else f"scaled as batch^{e:g}")


def warmup_steps(total_steps: int, fraction: float = WARMUP_FRACTION) -> int:
    """Warmup is a fixed share of the run (hence of the token budget): ceil(fraction * steps)."""
    return max(1, math.ceil(fraction * total_steps)) if total_steps > 1 else 0


def count_parameters(n_layer: int, n_embd: int, n_positions: int, vocab_size: int) -> int:
    """Parameters of HF's GPT2LMHeadModel with tied embeddings.

    wte V*d + wpe P*d + per layer (ln_1 2d, c_attn 3d^2+3d, attn c_proj d^2+d, ln_2 2d,
    c_fc 4d^2+4d, mlp c_proj 4d^2+d = 12d^2+13d) + ln_f 2d. GPT-2 Small: 124,439,808 at
    vocabulary 50257, 124,475,904 at the presets' 50304.
    """
    d = n_embd
    return vocab_size * d + n_positions * d + n_layer * (12 * d * d + 13 * d) + 2 * d


def gpt2_config(preset: ModelPreset, **overrides):
    """A ``transformers.GPT2Config`` for the preset, SDPA attention."""
    from transformers import GPT2Config

    return GPT2Config(**preset.config_kwargs(**overrides), attn_implementation="sdpa")
