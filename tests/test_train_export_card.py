"""The export's model card (merit_ds.train.export._card): its batch and tokens lines, with and
without a batch schedule, checked as exact text. No training run: the card is built from the
dicts a run leaves behind (the checkpoint's ``run`` record, ``run.json``), made here the way
merit_ds.train.loop writes them (the step table from :func:`build_step_table`, through JSON).

Run: 2 ranks x micro-batch 2, sequences of 32 tokens. Expected numbers are worked by hand from
the schedule rules (a step takes the batch the schedule gives at the tokens trained before it):

* ``16@0,64@2e3``: steps before token 2000 start at 0, 512, 1024, 1536 -> steps 1-4 take 16
  sequences, step 5 starts at 2048 -> 64 from then on. Tokens after 5 steps: (4x16 + 64) x 32 =
  4,096; after 6: (4x16 + 2x64) x 32 = 6,144.
* ``ramp:16..64@0..4096`` (quantum gcd(16, 64) = 16, rounded toward 16): 16 at tokens 0, 512,
  1024; 32 at 1536, 2560; 48 at 3584; 64 from 5120 -> steps 1-3 x16, 4-5 x32, 6 x48, 7-8 x64.
  Tokens after 5 steps: (3x16 + 2x32) x 32 = 3,584; after 8: (48 + 64 + 48 + 128) x 32 = 9,216.
* no schedule, global batch 16 = micro-batch 2 x grad-accum 4 x 2 ranks: 512 tokens per step,
  3,072 after 6 steps.
"""

import json

import pytest

from merit_ds.train.batch_schedule import build_step_table, parse_batch_schedule
from merit_ds.train.export import _card

SEQ, MICRO, WORLD = 32, 2, 2


def _meta(global_batch: int, step: int) -> dict:
    """A checkpoint's merit_ds_checkpoint.json, as far as the card reads it."""
    return {"step": step, "run": {
        "model": "tiny", "optimizer": "MERIT", "seq_len": SEQ, "global_batch": global_batch, "micro_batch": MICRO,
        "world": WORLD, "zero_stage": 2, "precision": "fp32", "launcher": "deepspeed",
        "model_config": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": SEQ, "vocab_size": 50304}}}


def _run_json(schedule: str | None, lr_rule: str, steps: int) -> dict:
    """run.json as the training loop writes it (round-tripped through JSON, as read back). With a
    schedule the loop's plan holds the first phase's batch (16), so tokens_per_step (512) and the
    JSON's grad-accum (4) are the first phase's: the card must not use them for the whole run."""
    table = None if schedule is None else build_step_table(parse_batch_schedule(schedule), SEQ, max_steps=steps)
    run_json = {"steps": steps, "lr": 0.01, "warmup": 1, "floor": 0.1,
                "tokens_per_step": 16 * SEQ,
                "batch_schedule": None if table is None else {
                    "spec": table.schedule.spec, "lr_rule": lr_rule, "segments": table.segments,
                    "total_tokens": table.total_tokens},
                "ds_config": {"gradient_accumulation_steps": 4, "gradient_clipping": 1.0,
                              "optimizer": {"type": "MERIT", "params": {"lr": 0.01}}}}
    return json.loads(json.dumps(run_json))


def _lines(card: str, key: str) -> list[str]:
    return [line for line in card.splitlines() if line.startswith(f"| {key} |")]


@pytest.mark.parametrize("schedule, lr_rule, steps, segments, spec, tokens", [
    ("16@0,64@2e3", "tokens", 6, [[1, 4, 16], [5, 2, 64]], "16@0,64@2000", {5: "4,096", 6: "6,144"}),
    ("ramp:16..64@0..4096", "sqrt", 8, [[1, 3, 16], [4, 2, 32], [6, 1, 48], [7, 2, 64]], "ramp:16..64@0..4096",
     {5: "3,584", 8: "9,216"}),
])
def test_card_with_a_batch_schedule(tmp_path, schedule, lr_rule, steps, segments, spec, tokens):
    run_json = _run_json(schedule, lr_rule, steps)
    assert run_json["batch_schedule"]["segments"] == segments  # the hand-worked step table above
    for step, want in tokens.items():
        card = _card(tmp_path, _meta(16, step), run_json, {}, "gpt2", step, None)
        # the canonical spec (sizes and token positions as plain integers), then how it was split
        assert _lines(card, "batch") == [
            f"| batch | schedule {spec} (sequences of 32 tokens; micro-batch 2 x 2 ranks, grad-accum per phase; "
            f"lr {lr_rule}) |"]
        # tokens from the step table, not step x the first (or last) batch
        assert _lines(card, "tokens") == [f"| tokens | {want} ({step} steps) |"]
        assert "tokens per step" not in card


def test_card_without_a_batch_schedule(tmp_path):
    card = _card(tmp_path, _meta(16, 6), _run_json(None, "tokens", 6), {}, "gpt2", 6, None)
    assert _lines(card, "batch") == [
        "| batch | 16 sequences x 32 tokens = 512 tokens per step (micro-batch 2 x grad-accum 4 x 2 ranks) |"]
    assert _lines(card, "tokens") == ["| tokens | 3,072 (6 steps) |"]
    assert "schedule 16" not in card
