"""One warning when MERIT's (LAMB's) decayed group holds normalization weights (issue #23): on the
plain ``accelerator.prepare`` path and through ``deepspeed.initialize``, where no grouping of
merit_ds's is involved. The classic cause: a hand-written no-decay list
``["bias", "LayerNorm.weight"]``, which misses GPT-2's ``ln_1``/``ln_2``/``ln_f``. Negative
control: HF's grouping (merit_param_groups) warns about nothing."""

from __future__ import annotations

import warnings

import pytest
import torch

from merit_ds import MERIT
from merit_ds.integrations import param_groups
from merit_ds.integrations.param_groups import merit_param_groups, warn_decayed_norms


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=8, vocab_size=16,
                                      bos_token_id=None, eos_token_id=None))


def _accelerate_example_groups(model):
    no_decay = ["bias", "LayerNorm.weight"]  # the usual hand-written list
    return [{"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
             "weight_decay": 0.1},
            {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)],
             "weight_decay": 0.0}]


@pytest.fixture(autouse=True)
def _fresh():
    param_groups._warned.clear()


def test_names_the_decayed_norm_weights_once():
    model = _gpt2()
    groups = [(0.1, [p for n, p in model.named_parameters() if not n.endswith("bias")])]
    with pytest.warns(UserWarning, match=r"MERIT \(here\): weight decay > 0 on normalization weights "
                                         r"transformer.h.0.ln_1.weight, transformer.h.0.ln_2.weight, "
                                         r"transformer.ln_f.weight;"):
        assert warn_decayed_norms(model, groups, "MERIT", "here") == [
            "transformer.h.0.ln_1.weight", "transformer.h.0.ln_2.weight", "transformer.ln_f.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_decayed_norms(model, groups, "MERIT", "here")  # once per model, optimizer and path
        model2 = _gpt2()
        good = [(g.get("weight_decay", 0.0), g["params"]) for g in merit_param_groups(model2, 0.1)]
        assert warn_decayed_norms(model2, good, "MERIT", "here") == []  # HF's grouping: nothing to say


def test_plain_accelerator_prepare_warns():
    from accelerate import Accelerator

    model = _gpt2()
    opt = MERIT(_accelerate_example_groups(model), lr=1e-3)
    accelerator = Accelerator(cpu=True)
    with pytest.warns(UserWarning, match=r"MERIT \(accelerator.prepare\): weight decay > 0 on normalization weights "
                                         r"transformer.h.0.ln_1.weight"):
        accelerator.prepare(model, opt)


def test_deepspeed_initialize_warns_for_a_json_named_merit_with_one_flat_list():
    """The JSON path with model.parameters() (a generator: read here, then passed on as a list)."""
    import deepspeed

    from merit_ds.integrations.deepspeed import _warn_decayed_norms
    import inspect

    model = _gpt2()
    cfg = {"optimizer": {"type": "MERIT", "params": {"lr": 1e-3, "weight_decay": 0.1}}}
    sig = inspect.signature(deepspeed.initialize)
    with pytest.warns(UserWarning, match=r"MERIT \(deepspeed.initialize\): weight decay > 0 on normalization"):
        args, kwargs = _warn_decayed_norms(sig, (), dict(model=model, model_parameters=model.parameters()), cfg)
    passed = inspect.signature(deepspeed.initialize).bind_partial(*args, **kwargs).arguments["model_parameters"]
    assert isinstance(passed, list) and len(passed) == len(list(model.parameters()))
