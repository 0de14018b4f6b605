"""What DeepSpeed sends per optimizer step at each ZeRO stage, measured, against the planner.

``comm_volume_worker.py`` runs one step of a small MLP under DeepSpeed on 2 CPU ranks (gloo) at
ZeRO 0-3, fp32 and bf16 (the data types merit_ds's configs write: bf16 accumulates in fp32 from
ZeRO-1 on, where ZeRO-1 becomes DeepSpeed's BF16_Optimizer), 1 and 3 micro-batches per step, and
records every collective the step issues (operation, dtype, message bytes). The bytes a rank
sends on a ring must equal ``merit_ds.train.plan.comm_bytes_per_step`` exactly: that is what
``merit-ds plan`` prints per stage and what the recipes' ZeRO stage is chosen by.

Negative control: the model the planner had before this measurement (reduce-scatter instead of
all-reduce at ZeRO-1/2, parameters gathered twice per micro-batch at ZeRO-3) is off at every
stage but 0.
"""

from __future__ import annotations

import pytest

from _dist import TESTS_DIR, launch

pytestmark = pytest.mark.slow  # one 2-rank DeepSpeed job, ~30 s

CONFIGS = ["z0_fp32", "z1_fp32", "z2_fp32", "z3_fp32", "z0_bf16", "z1_bf16", "z2_bf16", "z3_bf16", "z2_bf16_reduce"]


@pytest.fixture(scope="module")
def measured() -> dict:
    out = launch(TESTS_DIR / "comm_volume_worker.py", 2, ["--configs", ",".join(CONFIGS), "--grad-accum", "1", "3"],
                 timeout=400)
    out.pop("_log_tail", None)
    return out


def _former_model(n, world, stage, k, b):
    f = (world - 1) / world
    return {0: 2.0, 1: 2.0, 2: k + 1.0, 3: 3.0 * k}[stage] * f * n * b


def test_deepspeed_sends_what_the_planner_counts(measured):
    from merit_ds.train.plan import comm_bytes_per_step

    wrappers = {}
    for name in CONFIGS:
        for k in ("1", "3"):
            m = measured[name][k]
            n, world, stage, b = m["n_params"], m["world"], m["stage"], m["elem_bytes"]
            assert world == 2 and m["grad_accum"] == int(k)
            if name == "z2_bf16_reduce":  # each slice reduced to its owner: (k + 1) f Psi b
                want = (int(k) + 1) * 0.5 * n * b
            else:
                want = comm_bytes_per_step(n, world, stage, int(k), precision=m["precision"])
            assert m["sent_zero_bytes"] == want, (name, k, m["ops"])
            if stage > 0 and name != "z2_bf16_reduce":
                assert m["sent_zero_bytes"] != _former_model(n, world, stage, int(k), b), (name, k)
            wrappers[name] = m["optimizer_wrapper"]
            # the gradients travel in the compute dtype, even where they accumulate in fp32
            assert all(op.endswith(f"[{'bfloat16' if b == 2 else 'float32'}]") for op in m["ops"]), m["ops"]
    # which DeepSpeed optimizer ran (the recipes: ZeRO-1 in bf16 is BF16_Optimizer)
    assert wrappers["z1_bf16"] == "BF16_Optimizer" and wrappers["z0_bf16"] == "FP16_UnfusedOptimizer"
    assert wrappers["z2_bf16"] == "DeepSpeedZeroOptimizer" and wrappers["z3_bf16"] == "DeepSpeedZeroOptimizer_Stage3"
    # the shapes behind the counts, read off the calls: ZeRO-1 one all-reduce + the gather at any k;
    # ZeRO-2 one all-reduce per micro-batch; ZeRO-3 one gather and one reduce-scatter per micro-batch
    z1, z2, z3 = measured["z1_bf16"]["3"]["ops"], measured["z2_bf16"]["3"]["ops"], measured["z3_bf16"]["3"]["ops"]
    assert z1["all_reduce[bfloat16]"]["calls"] == 1 and z2["all_reduce[bfloat16]"]["calls"] == 3
    assert z3["reduce_scatter_tensor[bfloat16]"]["calls"] == 3 and z3["all_gather_into_tensor[bfloat16]"]["calls"] == 3


def test_merits_statistics_are_one_small_exchange_at_every_sharded_stage(measured):
    """Inside the optimizer's step: nothing without ZeRO (whole matrices), and at ZeRO 1-3 the same
    bytes whatever the stage, precision or accumulation (fp32 maxima of rows and columns)."""
    inside = {(name, k): measured[name][k]["sent_optimizer_bytes"] for name in CONFIGS for k in ("1", "3")}
    assert inside[("z0_fp32", "1")] == inside[("z0_bf16", "3")] == 0
    sharded = {v for (name, _), v in inside.items() if not name.startswith("z0")}
    assert len(sharded) == 1 and 0 < sharded.pop() < 0.05 * measured["z1_fp32"]["1"]["sent_zero_bytes"]
