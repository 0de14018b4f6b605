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


# ---- the Trainer guard's decisions, on a stand-in Trainer (no DeepSpeed started) ---------------
def _fake_trainer(config, *, optimizer=None, cls_and_kwargs=None, optim="adamw_torch"):
    from types import SimpleNamespace

    plugin = SimpleNamespace(hf_ds_config=SimpleNamespace(config=config))
    return SimpleNamespace(
        accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
        optimizer=optimizer, optimizer_cls_and_kwargs=cls_and_kwargs, args=SimpleNamespace(optim=optim),
    )


def _guard(trainer):
    from merit_ds.integrations.hf_trainer import _guarded_deepspeed_init

    def original(*a, **k):
        raise AssertionError("the guard let this through")

    return _guarded_deepspeed_init(original, trainer, 10)


ZERO2 = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}


def test_guard_refuses_what_the_trainer_would_silently_change():
    from merit_ds.integrations.hf_trainer import DroppedOptimizerError, OffloadSwapError

    model = tiny_gpt2()
    with pytest.raises(DroppedOptimizerError):
        _guard(_fake_trainer(ZERO2, optimizer=MERIT(model.parameters())))
    offload = {**ZERO2, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(OffloadSwapError):
        _guard(_fake_trainer(offload, cls_and_kwargs=(MERIT, {})))
    with pytest.raises(OffloadSwapError):
        _guard(_fake_trainer(offload, optim="merit"))
    adamw_json = {**ZERO2, "optimizer": {"type": "AdamW", "params": {}}}
    with pytest.raises(ValueError, match="'AdamW'.*optimizer_cls_and_kwargs"):
        _guard(_fake_trainer(adamw_json, cls_and_kwargs=(MERIT, {"lr": 1e-2})))
    with pytest.raises(ValueError, match="'AdamW'.*optim=merit"):
        _guard(_fake_trainer(adamw_json, optim="merit"))
    merit_json = {**ZERO2, "optimizer": {"type": "MERIT", "params": {}}}
    with pytest.raises(ValueError, match="kwargs"):
        _guard(_fake_trainer(merit_json, cls_and_kwargs=(MERIT, {"lr": 1e-2})))
    from merit_ds.integrations.deepspeed import MeritConfigError

    with pytest.raises(MeritConfigError):  # the JSON path runs check_config
        _guard(_fake_trainer({"zero_optimization": {"stage": 2}, "optimizer": {"type": "MERIT"}}))


def test_guard_leaves_non_merit_runs_alone():
    from merit_ds.integrations.hf_trainer import _guarded_deepspeed_init

    sentinel = (object(), object())
    trainer = _fake_trainer({**ZERO2, "optimizer": {"type": "AdamW"}}, optimizer=torch.optim.SGD(tiny_gpt2().parameters(), lr=1))
    assert _guarded_deepspeed_init(lambda *a, **k: sentinel, trainer, 10) == sentinel


# ---- LAMB: the same checks, the expected class named --------------------------------------------
def test_verify_expects_the_asked_for_class():
    from merit_ds import LAMB

    model = tiny_gpt2()
    lamb = LAMB(merit_param_groups(model, 0.1), lr=1e-2)
    assert assert_merit_is_stepping(lamb, model, expected=LAMB) is lamb
    with pytest.raises(NotMeritError, match="LAMB.*not merit_ds.MERIT"):
        assert_merit_is_stepping(lamb, model)  # MERIT expected by default
    with pytest.raises(NotMeritError, match="MERIT.*not merit_ds.LAMB"):
        assert_merit_is_stepping(MERIT(merit_param_groups(model, 0.1)), model, expected=LAMB)
    with pytest.raises(DecaySplitError, match="ln_1.weight"):
        assert_merit_is_stepping(LAMB(model.parameters(), weight_decay=0.1), model, expected=LAMB)


def test_guard_protects_lamb_too():
    from merit_ds import LAMB
    from merit_ds.integrations.deepspeed import MeritConfigError
    from merit_ds.integrations.hf_trainer import DroppedOptimizerError, OffloadSwapError

    model = tiny_gpt2()
    with pytest.raises(DroppedOptimizerError, match=r"LAMB\(\.\.\.\).*'ShardedLAMB'"):
        _guard(_fake_trainer(ZERO2, optimizer=LAMB(model.parameters())))
    offload = {**ZERO2, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(OffloadSwapError, match="not LAMB"):
        _guard(_fake_trainer(offload, cls_and_kwargs=(LAMB, {})))
    with pytest.raises(OffloadSwapError, match="not LAMB"):
        _guard(_fake_trainer(offload, optim="sharded_lamb"))
    merit_json = {**ZERO2, "optimizer": {"type": "MERIT", "params": {}}}
    with pytest.raises(ValueError, match="'MERIT'.*asked for LAMB.*optim=sharded_lamb"):
        _guard(_fake_trainer(merit_json, optim="sharded_lamb"))
    lamb_json = {**ZERO2, "optimizer": {"type": "ShardedLAMB", "params": {}}}
    with pytest.raises(ValueError, match="kwargs"):
        _guard(_fake_trainer(lamb_json, cls_and_kwargs=(LAMB, {"lr": 1e-2})))
    with pytest.raises(MeritConfigError, match="FusedLamb"):  # DeepSpeed's lamb: explained, not run
        _guard(_fake_trainer({**ZERO2, "optimizer": {"type": "Lamb"}}, optim="sharded_lamb"))
    with pytest.raises(MeritConfigError, match="zero_allow_untested_optimizer"):
        _guard(_fake_trainer({"zero_optimization": {"stage": 2}, "optimizer": {"type": "ShardedLAMB"}}))


def test_guard_lets_json_named_offload_through_without_force_key():
    # DeepSpeed enforces zero_force_ds_cpu_optimizer for client optimizers only and the Trainer
    # passes DummyOptim for a JSON-named optimizer: nothing is swapped, nothing to refuse.
    from types import SimpleNamespace

    from merit_ds.integrations.hf_trainer import _guarded_deepspeed_init

    for name in ("MERIT", "ShardedLAMB"):
        cfg = {**ZERO2, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
               "optimizer": {"type": name, "params": {}}}
        trainer = _fake_trainer(cfg)
        trainer.model = tiny_gpt2()
        trainer.get_decay_parameter_names = lambda model: []
        dummy = SimpleNamespace(params=None)
        assert _guarded_deepspeed_init(lambda *a, **k: (dummy, None), trainer, 10) == (dummy, None)
        assert isinstance(dummy.params, list)  # the Trainer's groups were handed over
