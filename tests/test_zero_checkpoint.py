"""Checkpoints of sharded MERIT and LAMB: exact resume, and re-sharding through DeepSpeed's
universal format (LAMB's bias correction also checks that the step count survives it).

One save launch at world 2 (ZeRO 1, 2, 3): save after 2 steps, continue to 4 (uninterrupted),
reload into a fresh engine and continue: weights equal the uninterrupted run bit for bit.
Then ``python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state`` converts the
ZeRO 2 and 3 checkpoints, which resume at world 1 and 3: weights and moments (``exp_avg``,
``exp_avg_sq``) load bit for bit; each of two further steps matches the world-2 run to 2e-6 (the
averaged gradient is summed in another order at another world size, so not bitwise), and every
partition's step count is 4. ZeRO-3's universal load gives all sub-groups' states one shared step
tensor; a step that advanced it in place counted it once per sub-group, and LAMB's second resumed
steps were off (6e-5 and 1.3e-3, measured before merit_ds/sharding/step.py made a new tensor:
docs/zero-sharding.md, "Checkpoints").
"""

import subprocess
import sys

import pytest

from _dist import TESTS_DIR, dist_env, launch

pytestmark = pytest.mark.slow  # ZeRO checkpoints saved and resumed by launched ranks

WORKER = TESTS_DIR / "zero_ckpt_worker.py"


@pytest.fixture(scope="module", params=["merit", "lamb"])
def saved(tmp_path_factory, request):
    d = tmp_path_factory.mktemp(f"{request.param}_ckpt")
    res = launch(WORKER, 2, ["--mode", "save", "--dir", str(d), "--stages", "1", "2", "3", "--optimizer", request.param],
                 timeout=400)
    return d, res, request.param


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_save_load_resumes_exactly(saved, stage):
    _, res, _ = saved
    r = res["stages"][f"z{stage}"]
    assert r["moved"] > 1e-3  # the steps after the save did change the weights
    assert r["load_diff"] == 0.0 and r["moments_diff"] == 0.0
    assert r["resume_diff"] == 0.0


@pytest.fixture(scope="module")
def universal(saved):
    d, _, optimizer = saved
    for stage in (2, 3):
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(d / f"z{stage}"),
               "--output_folder", str(d / f"z{stage}_universal"), "--inject_missing_state"]
        proc = subprocess.run(cmd, env=dist_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return d, optimizer


@pytest.mark.parametrize("world", [1, 3])
def test_universal_checkpoint_resumes_at_other_world_sizes(universal, world):
    d, optimizer = universal
    res = launch(WORKER, world, ["--mode", "universal", "--dir", str(d), "--stages", "2", "3", "--optimizer", optimizer],
                 timeout=400)
    assert res["world"] == world
    for stage in ("z2", "z3"):
        r = res["stages"][stage]
        assert r["load_diff"] == 0.0 and r["moments_diff"] == 0.0, r
        assert r["moved"] > 1e-3
        assert r["step_diff"] < 2e-6 and r["step2_diff"] < 2e-6, r
        assert r["step_counts"] == [4.0], r  # every partition counts the 2 saved + 2 resumed steps
