"""``python -m merit_ds.run``: unmodified scripts train with MERIT / ShardedLAMB.

Each path is run for real (CPU): an HF Trainer script with ``--optim merit`` under
``python -m merit_ds.run`` and under ``accelerate launch -m merit_ds.run`` (2 ranks); a
DeepSpeed script whose JSON names MERIT (or ShardedLAMB), with no ``import merit_ds``, under
``deepspeed --module merit_ds.run`` (2 ranks: the launcher's ``--local_rank`` is passed
through) and ``torchrun -m merit_ds.run``. The same scripts run plainly, by the same launcher,
fail for the reason the runner removes (negative controls: the Trainer's "invalid choice:
'merit'", DeepSpeed's "... is not a supported DeepSpeed Optimizer").
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _dist import REPO_ROOT, TESTS_DIR, dist_env, free_port

pytestmark = pytest.mark.slow  # user scripts under the deepspeed / torchrun / accelerate launchers

HF_SCRIPT = TESTS_DIR / "_runner_hf_script.py"
DS_SCRIPT = TESTS_DIR / "_runner_ds_script.py"
HF_ARGS = ["--optim", "merit", "--learning_rate", "0.01", "--max_steps", "2", "--per_device_train_batch_size", "2",
           "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true"]


def _run(cmd, tmp_path, timeout=300, env=None):
    result = tmp_path / "result.json"
    result.unlink(missing_ok=True)
    proc = subprocess.run(cmd, env=dist_env({"MERIT_TEST_RESULT": str(result), **(env or {})}), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return proc, (json.loads(result.read_text()) if result.exists() else None)


def test_hf_script_with_optim_merit_unmodified(tmp_path):
    proc, res = _run([sys.executable, "-m", "merit_ds.run", str(HF_SCRIPT), "--output_dir", str(tmp_path / "o"),
                      *HF_ARGS], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert res["optimizer"] == "merit_ds.optim.merit.MERIT"
    assert res["steps"] == [2.0] and res["groups"] == 2  # both steps taken; HF's decay / no-decay groups
    # negative control: the same script run plainly rejects --optim merit
    plain, res = _run([sys.executable, str(HF_SCRIPT), "--output_dir", str(tmp_path / "p"), *HF_ARGS], tmp_path)
    assert plain.returncode != 0 and res is None
    assert "argument --optim: invalid choice: 'merit'" in plain.stderr, plain.stderr[-3000:]


def test_hf_script_with_optim_merit_under_accelerate_launch(tmp_path):
    """``accelerate launch -m merit_ds.run SCRIPT --optim merit``: 2 CPU ranks (DDP over gloo)."""
    accelerate = Path(sys.executable).with_name("accelerate")

    def launch(*target):  # a fresh main-process port per job
        return [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                *target]

    cpu = {"ACCELERATE_USE_CPU": "1"}
    proc, res = _run(launch("-m", "merit_ds.run", str(HF_SCRIPT), "--output_dir", str(tmp_path / "o"), *HF_ARGS),
                     tmp_path, env=cpu)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert res["optimizer"] == "merit_ds.optim.merit.MERIT"
    assert res["steps"] == [2.0] and res["groups"] == 2 and res["world_size"] == 2
    # negative control: the same launcher running the script directly rejects --optim merit
    proc, res = _run(launch(str(HF_SCRIPT), "--output_dir", str(tmp_path / "p"), *HF_ARGS), tmp_path, env=cpu)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and res is None, out[-3000:]
    assert "argument --optim: invalid choice: 'merit'" in out, out[-3000:]


def _ds_config(tmp_path, name):
    cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
           "optimizer": {"type": name, "params": {"lr": 0.01}}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("name, launcher", [("MERIT", "deepspeed"), ("ShardedLAMB", "torchrun")])
def test_deepspeed_script_naming_the_optimizer_in_json_unmodified(tmp_path, name, launcher):
    cfg = _ds_config(tmp_path, name)

    ports = []

    def launcher_cmd(*target):  # a fresh master port per job
        ports.append(free_port())
        if launcher == "deepspeed":
            ds = Path(sys.executable).with_name("deepspeed")
            return [sys.executable, str(ds), "--num_gpus", "2", "--master_port", str(ports[-1]), *target]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={ports[-1]}",
                *target]

    runner = ["--module", "merit_ds.run"] if launcher == "deepspeed" else ["-m", "merit_ds.run"]
    proc, res = _run(launcher_cmd(*runner, str(DS_SCRIPT), str(cfg)), tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    from merit_ds.integrations.deepspeed_shm import stale_buffers

    assert stale_buffers(ports[-1]) == []  # the runner released DeepSpeed's /dev/shm segments (issue #23)
    assert res["optimizer"] == {"MERIT": "MERIT", "ShardedLAMB": "LAMB"}[name]
    assert res["sharded_partitions"] >= 1 and res["steps"] == [2.0]  # the exact sharded step ran, twice
    # negative control: the same launcher running the script directly (no runner, so no import merit_ds)
    # gets as far as deepspeed.initialize and fails there because DeepSpeed cannot resolve the name
    proc, res = _run(launcher_cmd(str(DS_SCRIPT), str(cfg)), tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and res is None, out[-3000:]
    assert f"{name} is not a supported DeepSpeed Optimizer" in out, out[-3000:]


@pytest.mark.parametrize("stage", [2, 3])
def test_hf_script_under_torchrun_with_two_cpu_ranks_and_deepspeed(tmp_path, stage):
    """issue #23: ``torchrun -m merit_ds.run script.py --deepspeed cfg.json`` with 2 CPU ranks and no
    ``--use_cpu`` (as a GPU recipe is written): the runner tells Accelerate the ranks are CPU ranks,
    so the Trainer sees world size 2, trains with MERIT under ZeRO and evaluates (gather_for_metrics
    over gloo). Negative control: the same run with ACCELERATE_USE_CPU=false fails DeepSpeed's batch
    check, each rank thinking it is alone."""
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                               "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                               "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}))
    args = [a for a in HF_ARGS if a not in ("--use_cpu", "true")]

    def torchrun(env=None):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "merit_ds.run", str(HF_SCRIPT), "--output_dir", str(tmp_path / "o"), *args, "--deepspeed",
               str(cfg), "--eval_strategy", "steps", "--eval_steps", "1"]
        return _run(cmd, tmp_path, env=env)

    proc, res = torchrun()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert res["world_size"] == 2 and res["steps"] == [2.0] and res["eval_loss"] > 0
    assert res["wrapped"] == "MERIT"  # under DeepSpeed's ZeRO wrapper
    proc, res = torchrun(env={"ACCELERATE_USE_CPU": "false"})  # set by the caller: left alone
    assert proc.returncode != 0 and "train_batch_size is not equal to micro_batch_per_gpu" in proc.stdout + proc.stderr


def test_usage_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "merit_ds.run", str(tmp_path / "missing.py")], cwd=REPO_ROOT,
                          capture_output=True, text=True, env=dist_env(), timeout=120)
    assert proc.returncode == 2 and "no such script" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "merit_ds.run"], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=dist_env(), timeout=120)
    assert proc.returncode == 2


def test_runner_reports_a_misspelled_or_unknown_json_key_before_deepspeed_builds(tmp_path):
    """Under the runner, a script's deepspeed.initialize checks a config naming MERIT in any case
    (merit_ds is imported): one MeritConfigError naming the fix, raised before any process group
    exists (a single process, no launcher). Disarmed, the same script reaches DeepSpeed."""
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, json, torch, deepspeed\n"
        "cfg = json.loads(sys.argv[1])\n"
        "deepspeed.initialize(model=torch.nn.Linear(2, 2), config=cfg)\n"
    )
    base = {"train_batch_size": 2, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    cases = [({"type": "merit", "params": {}}, 'write "type": "MERIT", not "merit"'),
             ({"type": "MERIT", "params": {"adam_w_mode": True}}, "does not accept params key 'adam_w_mode'")]
    for optimizer, message in cases:
        cfg = json.dumps(dict(base, optimizer=optimizer))
        proc = subprocess.run([sys.executable, "-m", "merit_ds.run", str(script), cfg], cwd=REPO_ROOT,
                              capture_output=True, text=True, env=dist_env(), timeout=180)
        assert proc.returncode != 0 and "MeritConfigError" in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
        # refused before DeepSpeed's own initialize was entered: no frame of it in the traceback
        assert "deepspeed/__init__.py" not in proc.stdout + proc.stderr
    # disarmed: the same script reaches DeepSpeed, which builds and then fails inside MERIT(**params)
    proc = subprocess.run([sys.executable, "-m", "merit_ds.run", str(script), cfg], cwd=REPO_ROOT, capture_output=True,
                          text=True, env=dist_env({"MERIT_DS_NO_DEEPSPEED_CHECK": "1"}), timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "MeritConfigError" not in out
    assert "deepspeed/runtime/engine.py" in out and "unexpected keyword argument 'adam_w_mode'" in out, out[-2000:]
