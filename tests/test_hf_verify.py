"""In-process checks of the verification helper and the decay grouping (no processes launched)."""

import pytest
import torch

from _hf_common import tiny_gpt2
from merit_ds import MERIT
from merit_ds.integrations.param_groups import DecaySplitError, decay_parameter_names, merit_param_groups
from merit_ds.integrations.verify import NotMeritError, assert_merit_is_stepping, decay_groups, unwrap_optimizer


def test_param_groups_are_trainers_grouping():
    from transformers import Trainer

    model = tiny_gpt2()
    names = set(Trainer.get_decay_parameter_names(None, model))
    assert decay_parameter_names(model) == names
    decay, no_decay = merit_param_groups(model, 0.1)
    by_id = {id(p): n for n, p in model.named_parameters()}
    # named_parameters() lists the tied lm_head.weight once, as transformer.wte.weight
    assert {by_id[id(p)] for p in decay["params"]} == names & set(by_id.values()) and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    assert all(by_id[id(p)].endswith("bias") or ".ln_" in by_id[id(p)] for p in no_decay["params"])
    # no weight_decay given: the decay group inherits the optimizer's (the JSON's) value
    assert "weight_decay" not in merit_param_groups(model)[0]


def test_verify_accepts_merit_with_split_decay():
    model = tiny_gpt2()
    opt = MERIT(merit_param_groups(model, 0.1), lr=1e-2)
    assert assert_merit_is_stepping(opt, model) is opt
    assert unwrap_optimizer(opt) is opt
    assert [wd for wd, _ in decay_groups(opt)] == [0.1, 0.0]


def test_verify_refuses_other_optimizers_and_flat_decay():
    model = tiny_gpt2()
    with pytest.raises(NotMeritError, match="AdamW"):
        assert_merit_is_stepping(torch.optim.AdamW(model.parameters()), model)
    flat = MERIT(model.parameters(), lr=1e-2, weight_decay=0.1)
    with pytest.raises(DecaySplitError, match="ln_1.weight"):
        assert_merit_is_stepping(flat, model)
    assert_merit_is_stepping(MERIT(model.parameters(), lr=1e-2), model)  # no decay at all: fine


def test_verify_unwraps_wrappers():
    class Wrapper:  # Accelerate's AcceleratedOptimizer / DeepSpeedEngine hold the next in .optimizer
        def __init__(self, inner):
            self.optimizer = inner

    model = tiny_gpt2()
    opt = MERIT(merit_param_groups(model, 0.1), lr=1e-2)
    assert unwrap_optimizer(Wrapper(Wrapper(opt))) is opt
    with pytest.raises(NotMeritError, match="Wrapper -> Wrapper -> SGD"):
        assert_merit_is_stepping(Wrapper(Wrapper(torch.optim.SGD(model.parameters(), lr=0.1))))
