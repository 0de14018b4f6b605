"""The training loop as users start it: deepspeed launcher, accelerate launch, two "nodes" on
loopback, SIGKILL + resume, and bad input. Real multi-process CPU runs of a tiny GPT-2
(2 layers x 32 wide, sequences of 32 tokens, batch 8 = micro 2 x grad-accum 2 x 2 ranks),
MERIT under ZeRO-2, fp32.

Equality is exact (``==`` on the logged float losses): on CPU in fp32 every run below does the
same arithmetic in the same order (same data blocks, same ranks, gloo reductions in a fixed
order), so a resumed or differently launched run that is correct reproduces every bit.
"""

from __future__ import annotations

import hashlib
import re
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _dist import REPO_ROOT, dist_env, free_port

from merit_ds.train.metrics import TIMING_KEYS

pytestmark = pytest.mark.slow  # the training loop under deepspeed / torchrun / accelerate / mpirun

BIN = Path(sys.executable).parent
STEPS = 12
TINY = ["--model", "tiny", "--model-override", "n_layer=2", "--model-override", "n_embd=32",
        "--model-override", "n_head=2", "--seq-len", "32", "--global-batch", "8", "--micro-batch", "2",
        "--zero-stage", "2", "--precision", "fp32", "--eval-every", "4", "--ckpt-every", "4", "--keep-last", "2",
        "--diag-every", "4", "--tracker", "none", "--no-progress", "--no-plot"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """nanoGPT-style train.bin/val.bin: a noisy order-1 chain over 256 token ids (learnable)."""
    d = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    nxt = rng.integers(0, 256, size=256)

    def chain(n):
        t = np.empty(n, dtype=np.uint16)
        t[0] = 0
        noise, jumps = rng.random(n), rng.integers(0, 256, size=n)
        for i in range(1, n):
            t[i] = nxt[t[i - 1]] if noise[i] < 0.8 else jumps[i]
        return t

    chain(60_000).tofile(d / "train.bin")
    chain(8_000).tofile(d / "val.bin")
    return d


def _args(data: Path, out: Path, *extra) -> list[str]:
    return [*TINY, "--steps", str(STEPS), "--data", str(data), "--out", str(out), *extra]


def deepspeed_cmd(args, *, port, launcher_args=()) -> list[str]:
    return [str(BIN / "deepspeed"), *launcher_args, "--master_port", str(port), "--module", "merit_ds.train", *args]


def run(cmd, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=dist_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def losses(out: Path) -> dict:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = {r["step"]: r["loss"] for r in recs if "loss" in r}
    val = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    return {"train": train, "val": val, "records": recs}


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """Uninterrupted run: deepspeed launcher, 2 ranks on one node."""
    from merit_ds.integrations.deepspeed_shm import stale_buffers

    out = tmp_path_factory.mktemp("reference") / "run"
    port = free_port()
    r = run(deepspeed_cmd(_args(data_dir, out), port=port, launcher_args=["--num_gpus", "2"]))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the loop released DeepSpeed's /dev/shm all-reduce buffers (DeepSpeed leaves 66 MiB per rank)
    assert stale_buffers(port) == []
    assert "batch: micro_batch 2 x grad_accum 2 x world 2 = global batch 8 sequences" in r.stdout
    assert "DeepSpeedZeroOptimizer -> MERIT verified stepping" in r.stdout
    # the start banner says where the run computes (a CPU run on a GPU node is visible at a glance)
    assert re.search(r"^device: cpu \(1 threads per rank\); backend gloo; fp32; world 2; ZeRO 2; "
                     r"micro-batch 2 x accumulation 2; loss plain$", r.stdout, re.M), r.stdout[:3000]
    return out


def test_deepspeed_launcher_two_ranks(reference):
    m = losses(reference)
    assert sorted(m["train"]) == list(range(1, STEPS + 1))
    assert all(np.isfinite(v) for v in m["train"].values())
    assert sorted(m["val"]) == [4, 8, 12]
    assert m["train"][STEPS] < m["train"][1]  # sanity only; the equalities below are the tests
    # throughput per log step (every step here), tokens/s = tokens per step / step time; the run's in the final record
    for r in (r for r in m["records"] if "loss" in r):
        assert r["step_time_s"] > 0 and r["tokens_per_s"] == pytest.approx(8 * 32 / r["step_time_s"])
    assert m["records"][-1]["train_tokens_per_s"] > 0 and "val_blocks" in m["records"][-1]
    diag = [r for r in m["records"] if "max_attn_logit" in r]
    assert [r["step"] for r in diag] == [1, 4, 8, 12]
    for r in diag:  # GNS from B_small = 1 (half a micro-batch) and B_big = 2 x 2 sequences
        assert (r["gns_b_small"], r["gns_b_big"]) == (1.0, 4.0) and np.isfinite(r["gns_b_noise"])
        # trust ratios from the sharded step (ZeRO-2), reduced over the two ranks
        assert 0 < r["trust_ratio_min"] <= r["trust_ratio_mean"] <= r["trust_ratio_max"]
        assert 0 <= r["clip_fraction"] <= 1
    ck = reference / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000012"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000008", "step_00000012"]  # keep-last 2
    assert not list(ck.glob(".tmp-*"))
    meta = json.loads((ck / "step_00000012" / "merit_ds_checkpoint.json").read_text())
    assert meta["run"]["world"] == 2 and meta["run"]["zero_stage"] == 2
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(meta["files"])


def _step_reached(proc, out: Path, step: int, *, checkpoint: bool = False, timeout: float = 240):
    """Poll the run in ``out`` until its metrics record a training step >= ``step`` (and, with
    ``checkpoint``, ``latest`` exists); the step reached, or None if ``proc`` ended or time ran out."""
    metrics, deadline = out / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and (not checkpoint or (out / "checkpoints" / "latest").exists()):
            done = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"loss"' in x]
            if done and max(done) >= step:
                return max(done)
        time.sleep(0.02)
    return None


def test_sigkill_mid_run_then_resume_continues_the_same_losses(reference, data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = deepspeed_cmd(_args(data_dir, out), port=free_port(), launcher_args=["--num_gpus", "2"])
    proc = subprocess.Popen(cmd, env=dist_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        killed_after = _step_reached(proc, out, 6)
        if killed_after is not None:
            os.killpg(proc.pid, signal.SIGKILL)  # launcher and both ranks, no chance to clean up
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_after is not None and killed_after < STEPS, "the run was not killed mid-way"
    latest = (out / "checkpoints" / "latest").read_text()
    resumed_at = int(latest.split("_")[1])
    assert resumed_at <= killed_after

    r = run(deepspeed_cmd(_args(data_dir, out), port=free_port(), launcher_args=["--num_gpus", "2"]))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / latest} at step {resumed_at}" in r.stdout
    # the restart did not re-read the unchanged token shards (their sizes and mtimes were recorded)
    assert re.search(r"^data: \d+ shards unchanged .* --verify full re-reads them$", r.stdout, re.M), r.stdout[:3000]
    got, want = losses(out), losses(reference)
    assert got["train"] == want["train"]  # bitwise, every step, including the ones redone after the kill
    assert got["val"] == want["val"]
    # the noise scale's EMAs travel in the checkpoint: b_noise after the resume is the uninterrupted one's
    gns = lambda m: {r["step"]: r["gns_b_noise"] for r in m["records"] if "gns_b_noise" in r}  # noqa: E731
    assert sorted(gns(got)) == [1, 4, 8, 12] and gns(got) == gns(want)
    steps_logged = [rec["step"] for rec in got["records"] if "loss" in rec]
    assert steps_logged == list(range(1, STEPS + 1))  # records after the checkpoint were replaced, not duplicated
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_sigterm_saves_the_current_step_then_resume_is_bitwise_the_uninterrupted_run(reference, data_dir, tmp_path):
    """Preemption (merit_ds/train/preemption.py): SIGTERM to every process of the job (what SLURM
    sends a job step) mid-run: both ranks stop after the same step, save it (a complete checkpoint,
    ``latest`` on it), exit 143 with one line saying how to resume; the resumed run's every loss,
    validation loss, noise-scale estimate and final weights are bitwise the uninterrupted run's."""
    import torch

    out = tmp_path / "run"
    cmd = deepspeed_cmd(_args(data_dir, out), port=free_port(), launcher_args=["--num_gpus", "2"])
    proc = subprocess.Popen(cmd, env=dist_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        signalled_after = _step_reached(proc, out, 5)
        if signalled_after is not None:
            os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert signalled_after is not None, "the run ended before it could be signalled"
    assert proc.returncode != 0, "a preempted run must not look finished"
    stopped = [line for line in stderr.splitlines() if "merit_ds.train: stopped by SIGTERM after step" in line]
    assert len(stopped) == 1, stderr[-3000:]
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert signalled_after <= step < STEPS  # the step in flight was finished, then saved
    ck = out / "checkpoints"
    assert (ck / "latest").read_text() == f"step_{step:08d}"
    assert (ck / f"step_{step:08d}" / "merit_ds_checkpoint.json").is_file() and not list(ck.glob(".tmp-*"))
    assert "--resume auto" in stopped[0]

    r = run(deepspeed_cmd(_args(data_dir, out), port=free_port(), launcher_args=["--num_gpus", "2"]))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {ck / f'step_{step:08d}'} at step {step}" in r.stdout
    got, want = losses(out), losses(reference)
    assert got["train"] == want["train"] and got["val"] == want["val"]  # bitwise, every step
    gns = lambda m: {r["step"]: r["gns_b_noise"] for r in m["records"] if "gns_b_noise" in r}  # noqa: E731
    assert gns(got) == gns(want)
    assert [rec["step"] for rec in got["records"] if "loss" in rec] == list(range(1, STEPS + 1))
    final = "step_00000012/mp_rank_00_model_states.pt"
    a, b = _load(ck / final)["module"], _load(reference / "checkpoints" / final)["module"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_dead_peer_rank_is_one_line_on_the_survivor(data_dir, tmp_path):
    """issue #23: rank 1 killed (SIGKILL: out of memory, a lost node) mid-run; rank 0, waiting for it in
    a collective, prints one line saying so instead of gloo's traceback, and exits non-zero; the
    checkpoint saved before is intact."""
    import psutil

    out = tmp_path / "run"
    cmd = deepspeed_cmd(_args(data_dir, out, "--steps", "40", "--ckpt-every", "2"), port=free_port(),
                        launcher_args=["--num_gpus", "2"])
    proc = subprocess.Popen(cmd, env=dist_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    killed = False
    try:
        if _step_reached(proc, out, 3, checkpoint=True) is not None:
            rank1 = [c for c in psutil.Process(proc.pid).children(recursive=True)
                     if "--local_rank=1" in " ".join(c.cmdline())]
            assert rank1, "rank 1 not found"
            rank1[0].kill()
            killed = True
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert killed
    assert proc.returncode != 0
    lines = [x for x in (stdout + stderr).splitlines() if "another rank stopped" in x]
    assert len(lines) == 1 and lines[0].startswith("merit_ds.train: error (rank 0): another rank stopped while this one "
                                                   "waited for it in a collective ("), stdout[-2000:] + stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    from merit_ds.train import checkpoint as ckpt

    assert ckpt.validate(latest, json.loads((latest / ckpt.META).read_text())["run"])["step"] >= 2


def test_accelerate_launch_two_ranks_matches_deepspeed_launcher(reference, data_dir, tmp_path):
    out = tmp_path / "run"
    yaml = tmp_path / "accelerate.yaml"
    yaml.write_text("\n".join([
        "compute_environment: LOCAL_MACHINE", "distributed_type: DEEPSPEED",
        "deepspeed_config:", f"  deepspeed_config_file: {REPO_ROOT / 'ds_configs' / 'zero2_fp32.json'}",
        "  zero3_init_flag: false", "num_machines: 1", "num_processes: 2", "machine_rank: 0",
        "main_process_ip: 127.0.0.1", f"main_process_port: {free_port()}", "use_cpu: true", ""]))
    r = run([str(BIN / "accelerate"), "launch", "--config_file", str(yaml), "-m", "merit_ds.train",
             *_args(data_dir, out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "launcher accelerate, 2 ranks, ZeRO 2" in r.stdout
    got, want = losses(out), losses(reference)
    assert got["train"] == want["train"] and got["val"] == want["val"]


def test_two_nodes_on_loopback_match_one_node(reference, data_dir, tmp_path):
    """Two deepspeed launcher invocations, --no_ssh, node ranks 0 and 1, one process each."""
    out = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    port = free_port()
    procs = [subprocess.Popen(
        deepspeed_cmd(_args(data_dir, out), port=port, launcher_args=[
            "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(k), "--master_addr", "127.0.0.1"]),
        env=dist_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for k in (0, 1)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "2 ranks" in outputs[0]
    got, want = losses(out), losses(reference)
    assert got["train"] == want["train"] and got["val"] == want["val"]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI's mpirun is not installed")
def test_mpirun_two_ranks_matches_deepspeed_launcher(reference, data_dir, tmp_path):
    """OpenMPI starts the ranks; deepspeed.init_distributed discovers rank/world through mpi4py."""
    out = tmp_path / "run"
    env = dist_env()
    fwd = [x for k in ("PYTHONPATH", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "OMP_NUM_THREADS") if k in env
           for x in ("-x", k)]
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    r = run(["mpirun", *root, "--oversubscribe", "-np", "2", *fwd, sys.executable, "-m", "merit_ds.train",
             *_args(data_dir, out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "launcher deepspeed, 2 ranks, ZeRO 2" in r.stdout
    got, want = losses(out), losses(reference)
    assert got["train"] == want["train"] and got["val"] == want["val"]


# ---------------------------------------------------------------------------------------------
# bad input: a clear error, exit code 2, nothing written or overwritten

def single(args) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "merit_ds.train", *args], timeout=180)


def test_batch_not_divisible_by_world(data_dir, tmp_path):
    out = tmp_path / "run"
    args = [a if a != "8" else "7" for a in _args(data_dir, out)]  # global batch 7 on 2 ranks
    args[args.index("--micro-batch") + 1] = "1"
    r = run(deepspeed_cmd(args, port=free_port(), launcher_args=["--num_gpus", "2"]))
    assert r.returncode != 0
    assert "global batch 7 sequences is not divisible by the data-parallel world size 2" in r.stderr + r.stdout
    assert not out.exists()


def test_token_budget_smaller_than_one_step(data_dir, tmp_path):
    out = tmp_path / "run"
    args = [a for a in _args(data_dir, out)]
    i = args.index("--steps")
    args[i:i + 2] = ["--tokens", "255"]  # one step is 8 x 32 = 256 tokens
    r = single(args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "token budget 255 is smaller than one optimizer step (8 sequences x 32 tokens = 256 tokens)" in r.stderr
    assert not out.exists()


def _copy_reference(reference, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def test_corrupt_checkpoint_is_refused_and_kept(reference, data_dir, tmp_path):
    out = _copy_reference(reference, tmp_path)
    victim = out / "checkpoints" / "step_00000012" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size, one flipped byte
    victim.write_bytes(bytes(blob))
    before = snapshot(out)
    r = single(_args(data_dir, out, "--steps", "16"))
    assert r.returncode == 2
    assert "corrupt checkpoint" in r.stderr and "zero_pp_rank_1_mp_rank_00_optim_states.pt fails its sha256 check" in r.stderr
    assert snapshot(out) == before


def test_checkpoint_metadata_with_only_its_format_is_refused_and_kept(reference, data_dir, tmp_path):
    """Malformed metadata is a clear error on every rank (2 ranks: rank 0 checks, all exit)."""
    out = _copy_reference(reference, tmp_path)
    meta = out / "checkpoints" / "step_00000012" / "merit_ds_checkpoint.json"
    meta.write_text(json.dumps({"format": json.loads(meta.read_text())["format"]}))
    before = snapshot(out)
    port = free_port()
    r = run(deepspeed_cmd(_args(data_dir, out, "--steps", "16"), port=port, launcher_args=["--num_gpus", "2"]))
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert f"corrupt checkpoint {out / 'checkpoints' / 'step_00000012'}: {meta} is malformed" in err, err[-3000:]
    assert "merit_ds.train: error (rank 1): corrupt checkpoint" in err  # the peer got the same verdict
    assert "Traceback" not in err
    assert snapshot(out) == before
    from merit_ds.integrations.deepspeed_shm import stale_buffers

    assert stale_buffers(port) == []  # an error exit releases DeepSpeed's /dev/shm segments too (issue #23)


def test_batch_keys_of_the_ds_config_against_the_command_line(data_dir, tmp_path):
    out = tmp_path / "run"
    args = _args(data_dir, out, "--ds-config", str(REPO_ROOT / "ds_configs" / "tiny_b16_zero2_fp32.json"))
    args[args.index("--global-batch") + 1] = "32"
    r = single(args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "merit_ds.train: error: DeepSpeed config has train_batch_size=16 but the batch plan needs 32" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("change,message", [
    (["--global-batch", "16"], "incompatible checkpoint .* global_batch=8, this run has global_batch=16"),
    (["--model-override", "n_layer=3"], "incompatible checkpoint .* model_config="),
    (["--steps", "16"], "incompatible checkpoint .* schedule="),
    (["--precision", "bf16"], "incompatible checkpoint .* precision='fp32', this run has precision='bf16'"),
    (["--optimizer", "lamb"], "incompatible checkpoint .* optimizer='merit', this run has optimizer='lamb'"),
])
def test_incompatible_checkpoint_is_refused_and_kept(reference, data_dir, tmp_path, change, message):
    import re

    out = _copy_reference(reference, tmp_path)
    before = snapshot(out)
    args = _args(data_dir, out)
    if change[0] in args and change[0] != "--model-override":
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += change
    r = single(args)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(message, r.stderr), r.stderr[-2000:]
    assert snapshot(out) == before


def test_resume_never_refuses_to_overwrite(reference, data_dir, tmp_path):
    out = _copy_reference(reference, tmp_path)
    before = snapshot(out)
    r = single(_args(data_dir, out, "--resume", "never", "--zero-stage", "0"))
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    assert snapshot(out) == before


def test_single_process_cli_activation_checkpointing_is_exact(reference, data_dir, tmp_path):
    """`merit-ds train` without a launcher (world of one); activation checkpointing recomputes the
    same forward, so the losses are bitwise those of the plain run.

    Also the trust-ratio diagnostic two ways at step 1 (same initial weights): MERIT's
    ``track_stats`` here (ZeRO 0, 1 rank: whole parameters) and in the ZeRO-2 2-rank reference
    (recorded by the sharded step per fragment, combined by reduce_trust_stats); gradients are
    averaged in another order, hence 1e-5 relative (the exact cross-rank equality on identical
    inputs is tested in test_zero_step_simulated.py and test_zero_deepspeed.py)."""
    runs, records = {}, {}
    for name, extra in (("plain", []), ("ckpt", ["--activation-checkpointing"])):
        out = tmp_path / name
        args = [*TINY, "--steps", "3", "--data", str(data_dir), "--out", str(out), "--zero-stage", "0", *extra]
        r = run([sys.executable, "-m", "merit_ds", "train", *args], timeout=180)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "launcher deepspeed, 1 ranks, ZeRO 0" in r.stdout
        runs[name] = losses(out)["train"]
        records[name] = losses(out)["records"]
    assert sorted(runs["plain"]) == [1, 2, 3]
    assert runs["plain"] == runs["ckpt"]
    mine = next(r for r in records["plain"] if r["step"] == 1)
    zero2 = next(r for r in losses(reference)["records"] if r["step"] == 1)
    for key in ("trust_ratio_min", "trust_ratio_mean", "trust_ratio_max"):
        assert zero2[key] == pytest.approx(mine[key], rel=1e-5), key
    assert 0 < mine["trust_ratio_min"] < mine["trust_ratio_mean"] < mine["trust_ratio_max"]
    assert zero2["clip_fraction"] == pytest.approx(mine["clip_fraction"], abs=1e-6)


def test_resume_on_another_world_size_through_universal_checkpoint(reference, data_dir, tmp_path):
    """Saved by 2 ranks at step 8, resumed by 1 process: DeepSpeed's universal conversion, made
    once into OUT/checkpoints/universal, re-shards the fp32 weights and MERIT's moments exactly;
    the sampler continues at the same global block. Step 9 sees the same weights and the same
    micro-batches (2 ranks x 2 micro-batches of 2 = 1 rank x 4), so its loss is bitwise the
    reference's; later steps average gradients in another order (last-bit differences that MERIT
    may amplify), compared at 1e-4 relative."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    ck = out / "checkpoints"
    (ck / "latest").write_text("step_00000008")
    shutil.rmtree(ck / "step_00000012")
    # left by a save of step 12 killed in a 3-rank run: must not end up in the new step 12
    stale = ck / ".tmp-step_00000012"
    stale.mkdir()
    (stale / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"stale")
    # a universal copy of another step_00000008 (a tag reused after resuming an earlier step)
    (ck / "universal" / "step_00000008" / "zero").mkdir(parents=True)
    (ck / "universal" / "step_00000008" / "merit_ds_universal_source.json").write_text('{"meta_sha256": "0"}')
    source = snapshot(ck / "step_00000008")
    r = single(_args(data_dir, out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world size 2 -> 1: resuming through the universal checkpoint" in r.stdout
    made_from = json.loads((ck / "universal" / "step_00000008" / "merit_ds_universal_source.json").read_text())
    assert made_from["meta_sha256"] == hashlib.sha256((ck / "step_00000008" / "merit_ds_checkpoint.json").read_bytes()).hexdigest()
    files = json.loads((ck / "step_00000012" / "merit_ds_checkpoint.json").read_text())["files"]
    assert not any("zero_pp_rank_1" in f or "zero_pp_rank_2" in f for f in files), sorted(files)
    assert snapshot(ck / "step_00000008") == source  # the source checkpoint was only read
    got, want = losses(out)["train"], losses(reference)["train"]
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[9] == want[9]
    for step in (10, 11, 12):
        assert got[step] == pytest.approx(want[step], rel=1e-4)


def test_missing_data_and_wrong_optimizer_are_clear_errors(data_dir, tmp_path):
    out = tmp_path / "run"
    r = single(_args(tmp_path / "no-such-data", out))
    assert r.returncode == 2 and "merit_ds.train: error: data:" in r.stderr and "not found" in r.stderr
    cfg = json.loads((REPO_ROOT / "ds_configs" / "zero2_fp32.json").read_text())
    cfg["optimizer"]["type"] = "AdamW"
    (tmp_path / "adamw.json").write_text(json.dumps(cfg))
    r = single(_args(data_dir, out, "--ds-config", str(tmp_path / "adamw.json")))
    assert r.returncode == 2 and "names optimizer 'AdamW' (adamw) but --optimizer is merit: pass --optimizer adamw" in r.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# the baselines: --optimizer lamb | adamw

def _load(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def _tensors(obj, prefix="") -> dict:
    """Every tensor in a nested checkpoint object, by path."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for k, v in items:
        out.update(_tensors(v, f"{prefix}/{k}"))
    return out


def _reference_first_step(data_dir: Path, optimizer: str, lr: float):
    """merit_ds.LAMB / torch.optim.AdamW applied once to the loop's initial model (seed 1234) on the
    loop's first batch (8 sequences, one micro-batch), with the loop's decay grouping."""
    import torch
    from transformers import GPT2LMHeadModel

    from merit_ds.integrations.param_groups import merit_param_groups
    from merit_ds.optim import LAMB
    from merit_ds.train.data_source import make_train_loader
    from merit_ds.train.diagnostics import lm_loss
    from merit_ds.train.presets import MODEL_PRESETS, gpt2_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run with one thread (dist_env): the same matmul splits
    try:
        torch.manual_seed(1234)
        model = GPT2LMHeadModel(gpt2_config(MODEL_PRESETS["tiny"], n_layer=2, n_embd=32, n_head=2, n_positions=32))
        loader = make_train_loader(data_dir, seq_len=32, global_batch=8, micro_batch=8, rank=0, world=1, seed=1234)
        x, y = next(loader)
        lm_loss(model(input_ids=x).logits, y).backward()
        groups = merit_param_groups(model, 0.1)
        if optimizer == "lamb":
            opt = LAMB(groups, lr=lr, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, track_stats=True)
        else:
            opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.state_dict(), opt


@pytest.mark.parametrize("optimizer", ["lamb", "adamw"])
def test_loop_takes_exactly_the_step_of_the_baseline(data_dir, tmp_path, optimizer):
    """One process, ZeRO-2 (LAMB through merit_ds's sharded step, AdamW = torch.optim.AdamW on a
    flat partition), no gradient clipping: the weights after step 1 are bitwise those of the
    optimizer applied to the same model and batch; LAMB's trust-ratio diagnostics are the
    reference's; AdamW has none (and no clip fraction for LAMB)."""
    import torch

    from merit_ds.optim.trust_stats import merge_trust_stats, summarize_trust_stats
    from merit_ds.train.ds_config import make_ds_config

    cfg = make_ds_config(2, "fp32", optimizer=optimizer)  # names ShardedLAMB / AdamW, no lr: the preset's
    assert cfg["optimizer"]["params"]["eps"] == {"lamb": 1e-6, "adamw": 1e-8}[optimizer]
    cfg["gradient_clipping"] = 0.0
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    args = _args(data_dir, out, "--steps", "1", "--micro-batch", "8", "--ckpt-every", "1", "--optimizer", optimizer,
                 "--ds-config", str(tmp_path / "ds.json"))
    r = single(args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    label = {"lamb": "LAMB", "adamw": "torch.optim.AdamW"}[optimizer]
    assert f"optimizer: DeepSpeedZeroOptimizer -> {label} verified stepping" in r.stdout
    # the JSON has no lr: the preset's (LAMB 1e-2, AdamW 3e-3 at batch 16, scaled to 8 by their measured
    # exponents, 0.85 and 0), and the banner says so
    lr = {"lamb": 1e-2 * 0.5 ** 0.85, "adamw": 3e-3}[optimizer]
    assert f"peak lr {lr:.4g} (preset tiny/{optimizer}: " in r.stdout
    rec = next(x for x in losses(out)["records"] if x["step"] == 1)
    assert rec["lr"] == lr  # --steps 1: no warmup, the peak
    want, ref = _reference_first_step(data_dir, optimizer, rec["lr"])
    got = _load(out / "checkpoints" / "step_00000001" / "mp_rank_00_model_states.pt")["module"]
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    moved = max(float((want[n] - w0).abs().max()) for n, w0 in _initial_weights().items())
    assert moved > 1e-4  # the step did something (the comparison has teeth)
    assert "max_attn_logit" in rec and "gns_b_noise" in rec and "grad_norm" in rec
    if optimizer == "lamb":
        stats = summarize_trust_stats(merge_trust_stats(ref.partial_stats.values()))
        assert rec["trust_ratio_min"] == stats["trust_ratio_min"] and rec["trust_ratio_max"] == stats["trust_ratio_max"]
        assert rec["trust_ratio_mean"] == pytest.approx(stats["trust_ratio_mean"], rel=1e-12)
        assert 0 < rec["trust_ratio_min"] < rec["trust_ratio_max"]
        assert "clip_fraction" not in rec
    else:
        assert not any(k.startswith("trust_ratio") or k == "clip_fraction" for k in rec)


def _initial_weights() -> dict:
    import torch
    from transformers import GPT2LMHeadModel

    from merit_ds.train.presets import MODEL_PRESETS, gpt2_config

    torch.manual_seed(1234)
    return GPT2LMHeadModel(gpt2_config(MODEL_PRESETS["tiny"], n_layer=2, n_embd=32, n_head=2, n_positions=32)).state_dict()


BASELINE = ("--steps", "4", "--ckpt-every", "2", "--eval-every", "2", "--diag-every", "2", "--keep-last", "3")
_baseline_runs: dict = {}


def baseline_reference(optimizer: str, data_dir: Path, tmp_path_factory) -> Path:
    """4 steps of the baseline, deepspeed launcher, 2 ranks, ZeRO-2 (made once per module)."""
    if optimizer not in _baseline_runs:
        out = tmp_path_factory.mktemp(f"baseline-{optimizer}") / "run"
        r = run(deepspeed_cmd(_args(data_dir, out, *BASELINE, "--optimizer", optimizer), port=free_port(),
                              launcher_args=["--num_gpus", "2"]))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        _baseline_runs[optimizer] = out
    return _baseline_runs[optimizer]


@pytest.mark.parametrize("optimizer", ["lamb", "adamw"])
def test_baseline_resume_is_bitwise_the_uninterrupted_run(data_dir, tmp_path, tmp_path_factory, optimizer):
    """ZeRO-2, 2 ranks: 4 steps uninterrupted vs. the same run resumed from its step-2 checkpoint:
    every loss, validation loss and diagnostic, and every tensor of the final checkpoint (weights,
    the ZeRO-partitioned moments and step counts) bitwise equal."""
    import torch

    full, resumed = baseline_reference(optimizer, data_dir, tmp_path_factory), tmp_path / "resumed"
    extra = (*BASELINE, "--optimizer", optimizer)
    shutil.copytree(full, resumed)
    ck = resumed / "checkpoints"
    (ck / "latest").write_text("step_00000002")
    shutil.rmtree(ck / "step_00000004")
    r = run(deepspeed_cmd(_args(data_dir, resumed, *extra), port=free_port(), launcher_args=["--num_gpus", "2"]))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {ck / 'step_00000002'} at step 2" in r.stdout
    got, want = losses(resumed), losses(full)
    assert sorted(got["train"]) == [1, 2, 3, 4] and got["train"] == want["train"] and got["val"] == want["val"]
    strip = lambda recs: [{k: v for k, v in x.items() if k not in TIMING_KEYS} for x in recs]  # noqa: E731
    assert strip(got["records"]) == strip(want["records"])
    diag4 = next(x for x in got["records"] if x["step"] == 4 and "max_attn_logit" in x)
    assert ("trust_ratio_max" in diag4) == (optimizer == "lamb") and "gns_b_noise" in diag4
    meta = json.loads((ck / "step_00000004" / "merit_ds_checkpoint.json").read_text())
    assert meta["run"]["optimizer"] == optimizer and meta["run"]["world"] == 2
    names = sorted(f for f in meta["files"] if f.endswith(".pt"))
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in names
    for f in names:
        a = _tensors(_load(full / "checkpoints" / "step_00000004" / f))
        b = _tensors(_load(ck / "step_00000004" / f))
        assert sorted(a) == sorted(b) and a, f
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)
        if "optim_states" in f:
            assert any(k.endswith("exp_avg_sq") for k in a), sorted(a)[:10]


@pytest.mark.parametrize("optimizer", ["lamb", "adamw"])
def test_baseline_under_accelerate_launch_matches_deepspeed_launcher(data_dir, tmp_path, tmp_path_factory, optimizer):
    """`accelerate launch` with a DeepSpeed JSON naming the baseline ("ShardedLAMB": a client LAMB
    handed to accelerator.prepare; "AdamW": DeepSpeed's own behind DummyOptim): bitwise the deepspeed
    launcher's losses and diagnostics."""
    from merit_ds.train.ds_config import make_ds_config

    want = losses(baseline_reference(optimizer, data_dir, tmp_path_factory))
    (tmp_path / "ds.json").write_text(json.dumps(make_ds_config(2, "fp32", optimizer=optimizer)))
    out = tmp_path / "run"
    yaml = tmp_path / "accelerate.yaml"
    yaml.write_text("\n".join([
        "compute_environment: LOCAL_MACHINE", "distributed_type: DEEPSPEED",
        "deepspeed_config:", f"  deepspeed_config_file: {tmp_path / 'ds.json'}",
        "  zero3_init_flag: false", "num_machines: 1", "num_processes: 2", "machine_rank: 0",
        "main_process_ip: 127.0.0.1", f"main_process_port: {free_port()}", "use_cpu: true", ""]))
    r = run([str(BIN / "accelerate"), "launch", "--config_file", str(yaml), "-m", "merit_ds.train",
             *_args(data_dir, out, *BASELINE, "--optimizer", optimizer)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "launcher accelerate, 2 ranks, ZeRO 2" in r.stdout
    label = {"lamb": "LAMB", "adamw": "torch.optim.AdamW"}[optimizer]
    assert f"-> {label} verified stepping" in r.stdout
    got = losses(out)
    strip = lambda recs: [{k: v for k, v in x.items() if k not in TIMING_KEYS} for x in recs]  # noqa: E731
    assert got["train"] == want["train"] and got["val"] == want["val"]
    assert strip(got["records"]) == strip(want["records"])


@pytest.mark.parametrize("optimizer,extra,stepping", [
    ("adamw", ["--offload"], "DeepSpeedZeroOptimizer -> deepspeed DeepSpeedCPUAdam (AdamW mode) verified stepping"),
    ("lamb", ["--zero-stage", "3"], "DeepSpeedZeroOptimizer_Stage3 -> LAMB verified stepping"),
])
def test_baseline_offload_and_zero3(data_dir, tmp_path, optimizer, extra, stepping):
    """AdamW under ZeRO-Offload is DeepSpeed's CPU Adam in AdamW mode (the fast correct choice on
    the host); LAMB under ZeRO-3 has a sharding layout per sub-group and reports its trust ratios."""
    out = tmp_path / "run"
    r = single(_args(data_dir, out, "--steps", "2", "--diag-every", "2", *extra, "--optimizer", optimizer))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert stepping in r.stdout
    recs = [x for x in losses(out)["records"] if "max_attn_logit" in x]
    assert [x["step"] for x in recs] == [1, 2] and all(np.isfinite(x["loss"]) for x in recs)
    assert all(("trust_ratio_max" in x) == (optimizer == "lamb") for x in recs)


@pytest.mark.slow
def test_lean_loss_trains_like_the_plain_loss(data_dir, tmp_path):
    """--loss lean (the CUDA default: output projection + cross-entropy chunked over tokens, inside
    the engine's forward) against --loss plain (the CPU default), one process, 4 steps, ZeRO-2 fp32:
    every logged train and validation loss within 1e-5 relative (fp32 sums in another order)."""
    got = {}
    for loss in ("plain", "lean"):
        out = tmp_path / loss
        r = single(_args(data_dir, out, "--steps", "4", "--eval-every", "2", "--loss", loss))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert re.search(rf"^device: cpu .*; loss {loss}$", r.stdout, re.M), r.stdout[:2000]
        got[loss] = losses(out)
    for kind in ("train", "val"):
        assert got["lean"][kind].keys() == got["plain"][kind].keys() and got["plain"][kind]
        for step, want in got["plain"][kind].items():
            assert got["lean"][kind][step] == pytest.approx(want, rel=1e-5), (kind, step)


def test_recipe_stage_zero1_bf16_resumes_bitwise_exports_and_changes_world(data_dir, tmp_path):
    """The recipes' engine (ds_configs/gpt2-*_zero1_bf16.json: ZeRO-1, bf16, gradients accumulated
    in fp32), which DeepSpeed runs as its BF16_Optimizer, in the loop on 2 ranks: the start banner
    and the stepping check name it; a resume from step 2 is bitwise the uninterrupted 4 steps
    (losses, validation, diagnostics, every tensor of the final checkpoint); the export holds the
    fp32 master weights, bitwise those of DeepSpeed's universal conversion of the same checkpoint
    (the negative control: DeepSpeed's zero_to_fp32 refuses BF16_Optimizer checkpoints); one
    process resumes the 2-rank checkpoint through the universal copy."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from merit_ds.train.checkpoint import universal_copy
    from merit_ds.train.ds_config import make_ds_config

    recipe = json.loads((REPO_ROOT / "ds_configs" / "gpt2-small_b480_zero1_bf16.json").read_text())
    cfg = make_ds_config(1, "bf16")
    assert cfg["zero_optimization"] == recipe["zero_optimization"] and cfg["data_types"] == recipe["data_types"]
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    i, j = TINY.index("--zero-stage"), TINY.index("--precision")
    args = [a for n, a in enumerate(TINY) if n not in (i, i + 1, j, j + 1)]  # the JSON sets stage and precision
    extra = (*BASELINE, "--ds-config", str(tmp_path / "ds.json"))

    def train(out, *more, ranks=2):
        cmd = [*args, "--data", str(data_dir), "--out", str(out), *extra, *more]
        if ranks == 1:
            return single(cmd)
        return run(deepspeed_cmd(cmd, port=free_port(), launcher_args=["--num_gpus", str(ranks)]))

    full = tmp_path / "full"
    r = train(full)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "optimizer: BF16_Optimizer -> MERIT verified stepping" in r.stdout
    assert re.search(r"^device: cpu .*; bf16; world 2; ZeRO 1; micro-batch 2 x accumulation 2", r.stdout, re.M)
    step4 = full / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in step4.glob("*optim_states.pt")) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    diag = [x for x in losses(full)["records"] if "trust_ratio_max" in x]
    assert [x["step"] for x in diag] == [1, 2, 4]  # the first step, then every --diag-every

    # export: fp32 master weights, bitwise DeepSpeed's universal conversion of the same checkpoint
    with pytest.raises(ValueError, match="is not a zero checkpoint"):
        get_fp32_state_dict_from_zero_checkpoint(str(step4.parent), tag=step4.name)
    exported = load_file(str(full / "hf_model" / "model.safetensors"))
    uni = universal_copy(step4, tmp_path / "universal")
    matrices_split = 0
    for name, t in exported.items():
        want = torch.load(uni / "zero" / name / "fp32.pt", weights_only=False)
        want = want["param"] if isinstance(want, dict) else want
        assert t.dtype == torch.float32 and torch.equal(t, want.view(t.shape)), name
        matrices_split += t.dim() == 2
    assert matrices_split >= 4
    bf16_module = _load(step4 / "mp_rank_00_model_states.pt")["module"]
    # some matrix really is cut between the two ranks' partitions
    maps = [_load(step4 / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]["param_slice_mappings"]
            for r in (0, 1)]
    both = {n for g in maps[0] for n in g} & {n for g in maps[1] for n in g}
    assert any(bf16_module[n].dim() == 2 for n in both), both

    # resume from step 2: bitwise the uninterrupted run
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("hf_model"))
    ck = resumed / "checkpoints"
    (ck / "latest").write_text("step_00000002")
    shutil.rmtree(ck / "step_00000004")
    r = train(resumed)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {ck / 'step_00000002'} at step 2" in r.stdout
    got, want = losses(resumed), losses(full)
    strip = lambda recs: [{k: v for k, v in x.items() if k not in TIMING_KEYS} for x in recs]  # noqa: E731
    assert sorted(got["train"]) == [1, 2, 3, 4] and strip(got["records"]) == strip(want["records"])
    for f in sorted(p.name for p in step4.glob("*.pt")):
        a, b = _tensors(_load(step4 / f)), _tensors(_load(ck / "step_00000004" / f))
        assert sorted(a) == sorted(b) and a, f
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)

    # one process resumes the 2-rank checkpoint through DeepSpeed's universal format
    one = tmp_path / "one"
    shutil.copytree(full, one, ignore=shutil.ignore_patterns("hf_model"))
    (one / "checkpoints" / "latest").write_text("step_00000002")
    shutil.rmtree(one / "checkpoints" / "step_00000004")
    r = train(one, ranks=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world size 2 -> 1: resuming through the universal checkpoint" in r.stdout
    assert losses(one)["train"][3] == pytest.approx(want["train"][3], rel=1e-2)  # bf16: not bitwise
