"""issue #21, item 4 ("fail fast"): an exception on one rank (out of memory included) or a hung rank
ends every rank of the job within ``--collective-timeout``, each with one line, instead of leaving
the others waiting in a collective for torch's default (30 minutes for gloo).

The jobs are real: two CPU ranks of ``python -m merit_ds.train`` (a tiny GPT-2, MERIT under ZeRO-2,
gloo), started the way the deepspeed launcher starts them (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` per process) but by the test itself, so that each
rank's exit code, exit time and output are its own. The fault comes from the test hook
``MERIT_DS_TEST_FAIL_AT=RANK:STEP:KIND`` (:func:`merit_ds.train.launcher.fault_from_env`), which
prints the moment it fires (unix time) on that rank's stdout; the ranks' exits are timed from it.
(The deepspeed launcher itself, around a rank killed by SIGKILL, is
``tests/test_recipes_train.py::test_a_dead_peer_rank_is_one_line_on_the_survivor``.)

"One line, no traceback" is asserted as: in each rank's stdout + stderr together exactly one line
contains ``merit_ds.train: error``, it is the last line of that rank's stderr, the word
``Traceback`` appears nowhere, and the exception's own text (e.g. ``injected failure``) appears
only inside that line. The traceback is in the file the line names (``OUT/logs/error_rank<R>.log``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from _dist import REPO_ROOT, dist_env, free_port

from merit_ds.train import checkpoint as ckpt
from merit_ds.train.launcher import TEST_FAULT_ENV, fault_from_env
from merit_ds.train.loop import _peer_failure, main, parse_args
from merit_ds.train.run_config import (COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_MIN, UsageError,
                                       collective_timeout)

TIMEOUT_MIN = 0.5  # --collective-timeout of the jobs below: 30 s
TIMEOUT_S = TIMEOUT_MIN * 60
MARGIN_S = 20  # process exit, a loaded 2-core machine
TINY = ["--model", "tiny", "--model-override", "n_layer=2", "--model-override", "n_embd=32",
        "--model-override", "n_head=2", "--seq-len", "32", "--global-batch", "8", "--micro-batch", "2",
        "--zero-stage", "2", "--precision", "fp32", "--eval-every", "0", "--diag-every", "0", "--ckpt-every", "2",
        "--keep-last", "5", "--steps", "10", "--tracker", "none", "--no-progress", "--no-plot",
        "--collective-timeout", str(TIMEOUT_MIN)]


# --- the flag, the environment variable, the refusals (no process group) --------------------------------------

def test_collective_timeout_flag_env_and_default():
    assert DEFAULT_COLLECTIVE_TIMEOUT_MIN == 10
    assert collective_timeout(None, {}) == timedelta(minutes=10)
    assert collective_timeout("0.5", {}) == timedelta(seconds=30)
    assert collective_timeout("3", {}) == timedelta(minutes=3)
    assert collective_timeout(None, {COLLECTIVE_TIMEOUT_ENV: "2.5"}) == timedelta(seconds=150)
    assert collective_timeout(None, {COLLECTIVE_TIMEOUT_ENV: " "}) == timedelta(minutes=10)  # blank: unset
    assert collective_timeout("1", {COLLECTIVE_TIMEOUT_ENV: "20"}) == timedelta(minutes=1)  # the flag wins
    assert collective_timeout("1", {COLLECTIVE_TIMEOUT_ENV: "bad"}) == timedelta(minutes=1)  # ...and is all that is read
    assert parse_args(["--data", "d", "--out", "o"]).collective_timeout is None
    assert parse_args(["--data", "d", "--out", "o", "--collective-timeout", "0.25"]).collective_timeout == "0.25"


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", "1e400", "0.001", ""])
def test_bad_collective_timeouts_are_refused_naming_flag_or_variable(value):
    with pytest.raises(UsageError) as flag:
        collective_timeout(value, {})
    assert str(flag.value).startswith(f"--collective-timeout must be a positive number of minutes (how long a rank "
                                      f"waits for the others in one collective before the job stops; at least 1 "
                                      f"second, fractions allowed), got {value!r}; pass a number of minutes, e.g. "
                                      f"--collective-timeout 10, or leave the flag out for the default (10). ")
    if value.strip():
        with pytest.raises(UsageError) as env:
            collective_timeout(None, {COLLECTIVE_TIMEOUT_ENV: value})
        assert str(env.value).startswith(f"{COLLECTIVE_TIMEOUT_ENV} (environment) must be a positive number of "
                                         f"minutes")
        assert f"got {value!r}; set it to a number of minutes, e.g. {COLLECTIVE_TIMEOUT_ENV}=10, or unset it" in str(env.value)


@pytest.mark.parametrize("flag,env", [(["--collective-timeout", "0"], {}), (["--collective-timeout", "-2"], {}),
                                      (["--collective-timeout", "ten"], {}), ([], {COLLECTIVE_TIMEOUT_ENV: "0"})])
def test_a_bad_timeout_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys, flag, env):
    """Through ``main``, before any process group or file: exit 2, one line, no traceback, no --out."""
    monkeypatch.delenv(COLLECTIVE_TIMEOUT_ENV, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    assert main(["--model", "tiny", "--data", str(tmp_path / "no-data"), "--out", str(out), "--no-progress",
                 "--tracker", "none", *flag]) == 2
    err = capsys.readouterr().err
    where = "--collective-timeout" if flag else f"{COLLECTIVE_TIMEOUT_ENV} (environment)"
    assert err.startswith(f"merit_ds.train: error: {where} must be a positive number of minutes"), err
    assert err.count("\n") == 1 and "Traceback" not in err and err.rstrip().endswith("Nothing was written.")
    assert not out.exists()


def test_fault_hook_parsing():
    assert fault_from_env({}) is None and fault_from_env({TEST_FAULT_ENV: ""}) is None
    assert fault_from_env({TEST_FAULT_ENV: "1:7:oom"}) == (1, 7, "oom")
    assert fault_from_env({TEST_FAULT_ENV: "0:3:hang"}) == (0, 3, "hang")
    for bad in ("1:7", "a:7:raise", "1:7:explode", "1:-7:raise"):
        with pytest.raises(UsageError, match=re.escape(f"{TEST_FAULT_ENV}={bad!r} (environment, a test hook): "
                                                       "expected RANK:STEP:KIND")):
            fault_from_env({TEST_FAULT_ENV: bad})


def test_what_counts_as_a_peer_failure():
    """The survivors' collectives: gloo when the peer's process is gone, and when it did not answer
    within the timeout; a rank's own errors (out of memory included) are not."""
    import torch

    assert _peer_failure(RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:11151: "
                                      "Connection reset by peer. This is typically caused by a remote worker hanging"))
    assert _peer_failure(RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms for "
                                      "recv operation to complete"))
    assert not _peer_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not _peer_failure(RuntimeError("injected failure (MERIT_DS_TEST_FAIL_AT at step 7)"))


# --- real 2-rank jobs -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """nanoGPT-style train.bin/val.bin over 256 token ids."""
    d = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    rng.integers(0, 256, size=40_000, dtype=np.uint16).tofile(d / "train.bin")
    rng.integers(0, 256, size=4_000, dtype=np.uint16).tofile(d / "val.bin")
    return d


class Job:
    """``world`` ranks of ``python -m merit_ds.train``, each its own process group (session), output
    files and exit time."""

    def __init__(self, tmp_path: Path, name: str, args: list[str], fault: str, world: int = 2):
        self.port, self.world, self.logs = free_port(), world, tmp_path / name
        self.logs.mkdir()
        self.procs, self.ended = [], [None] * world
        for rank in range(world):
            env = dist_env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                            "LOCAL_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.port),
                            TEST_FAULT_ENV: fault})
            env.pop(COLLECTIVE_TIMEOUT_ENV, None)
            with open(self.logs / f"rank{rank}.out", "w") as out, open(self.logs / f"rank{rank}.err", "w") as err:
                self.procs.append(subprocess.Popen([sys.executable, "-m", "merit_ds.train", *args], env=env,
                                                   cwd=REPO_ROOT, stdout=out, stderr=err, start_new_session=True))
        self.started = time.time()

    def wait(self, ranks, deadline_s: float) -> None:
        """Until the given ranks have exited (their exit times recorded), or ``deadline_s`` from the start."""
        while time.time() < self.started + deadline_s:
            for r in ranks:
                if self.ended[r] is None and self.procs[r].poll() is not None:
                    self.ended[r] = time.time()
            if all(self.ended[r] is not None for r in ranks):
                return
            time.sleep(0.05)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def out(self, rank: int) -> str:
        return (self.logs / f"rank{rank}.out").read_text()

    def err(self, rank: int) -> str:
        return (self.logs / f"rank{rank}.err").read_text()

    def fault_time(self, rank: int) -> float:
        m = re.search(rf"^{TEST_FAULT_ENV}: rank {rank} \w+ at step \d+, unix time ([\d.]+)$", self.out(rank), re.M)
        assert m, f"rank {rank} never reached its fault:\n{self.out(rank)[-2000:]}\n{self.err(rank)[-3000:]}"
        return float(m.group(1))

    def one_error_line(self, rank: int, *own_text: str) -> str:
        """The rank's one line (see the module docstring for what is asserted)."""
        out, err = self.out(rank), self.err(rank)
        lines = [x for x in (out + err).splitlines() if "merit_ds.train: error" in x]
        assert len(lines) == 1, f"rank {rank}: {lines}\n{out[-2000:]}\n{err[-3000:]}"
        assert err.rstrip().splitlines()[-1] == lines[0], err[-3000:]
        assert "Traceback" not in out and "Traceback" not in err, err[-3000:]
        for text in own_text:
            assert (out + err).count(text) == 1 and text in lines[0], (text, err[-3000:])
        return lines[0]


def _md5s(ckpt_root: Path) -> dict:
    return {str(p.relative_to(ckpt_root)): hashlib.md5(p.read_bytes()).hexdigest()
            for d in ckpt.complete_checkpoints(ckpt_root) for p in sorted(d.rglob("*")) if p.is_file()}


def _report(name: str, job: Job, fault_rank: int) -> str:
    t = job.fault_time(fault_rank)
    line = (f"{name}: fault on rank {fault_rank} at +{t - job.started:.1f} s; " +
            ", ".join(f"rank {r} exit {job.procs[r].returncode} {job.ended[r] - t:+.2f} s after it"
                      for r in range(job.world) if job.ended[r] is not None))
    print(line)
    return line


@pytest.mark.slow  # two 2-rank training jobs
def test_an_exception_on_one_rank_ends_every_rank_at_once_with_one_line_each(data_dir, tmp_path):
    """Phase 1: rank 1 raises a RuntimeError in step 5 (checkpoints of steps 2 and 4 saved). Phase 2:
    the same command resumes, and rank 0 runs out of memory (torch.OutOfMemoryError, as CUDA raises
    it) in step 7 (step 6 saved). Each time: the failing rank says what and where, names the last
    good checkpoint and how to resume, the other rank names the same checkpoint; both exit non-zero
    within the timeout (in fact at once: gloo sees the failed rank's sockets close); the checkpoint
    files saved before phase 2's failure are byte for byte what they were."""
    from merit_ds.integrations.deepspeed_shm import stale_buffers

    out = tmp_path / "run"
    root = out / "checkpoints"
    args = [*TINY, "--data", str(data_dir), "--out", str(out)]
    timings = []

    job = Job(tmp_path, "phase1", args, "1:5:raise")
    try:
        job.wait([0, 1], deadline_s=400)
    finally:
        job.kill()
    t = job.fault_time(1)
    timings.append(_report("raise", job, 1))
    assert [p.returncode for p in job.procs] == [3, 1], timings[-1]
    assert all(job.ended[r] - t < TIMEOUT_S + MARGIN_S for r in (0, 1)), timings[-1]
    line = job.one_error_line(1, "injected failure")
    m = re.fullmatch(r"merit_ds\.train: error \(rank 1 of 2\): RuntimeError: injected failure \(MERIT_DS_TEST_FAIL_AT "
                     r"at step 5\); last good checkpoint: (\S+)\. Run the same command again to resume from it "
                     r"\(--resume auto\)\. Stack trace: (\S+)\.", line)
    assert m, line
    # rank 0 finalises a save in the background: step 4's may still have been hashing when rank 1 failed
    assert m.group(1) in (str(root / "step_00000002"), str(root / "step_00000004")), line
    log = Path(m.group(2))
    assert log == out / "logs" / "error_rank1.log"
    assert "Traceback (most recent call last)" in log.read_text()
    assert "RuntimeError: injected failure (MERIT_DS_TEST_FAIL_AT at step 5)" in log.read_text()
    peer = job.one_error_line(0)
    assert peer.startswith("merit_ds.train: error (rank 0): another rank stopped while this one waited for it in a "
                           "collective ("), peer
    assert (f"see that rank's output for why. Checkpoints already saved are intact; last good checkpoint: "
            f"{root / 'step_00000004'}. Run the same command again to resume from it (--resume auto).") in peer
    assert stale_buffers(job.port) == []  # both ranks released DeepSpeed's /dev/shm segment
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000004", "step_00000002"]
    before = _md5s(root)
    assert sorted(before) == [f"{d}/{f}" for d in ("step_00000002", "step_00000004") for f in sorted(
        [ckpt.META, "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "zero_pp_rank_1_mp_rank_00_optim_states.pt"])]

    job = Job(tmp_path, "phase2", args, "0:7:oom")
    try:
        job.wait([0, 1], deadline_s=400)
    finally:
        job.kill()
    t = job.fault_time(0)
    timings.append(_report("oom", job, 0))
    assert f"resumed from {root / 'step_00000004'} at step 4" in job.out(0)
    assert [p.returncode for p in job.procs] == [1, 3], timings[-1]
    assert all(job.ended[r] - t < TIMEOUT_S + MARGIN_S for r in (0, 1)), timings
    assert max(job.ended) - job.started < DEFAULT_COLLECTIVE_TIMEOUT_MIN * 60 / 2  # well under the default
    line = job.one_error_line(0, "CUDA out of memory")
    last = root / "step_00000006"  # rank 0 completes its own pending save before it reports
    assert line == (f"merit_ds.train: error (rank 0 of 2): OutOfMemoryError: CUDA out of memory. Tried to allocate "
                    f"2.00 GiB (injected by MERIT_DS_TEST_FAIL_AT at step 7); last good checkpoint: {last}. Out of "
                    f"memory: a smaller --micro-batch keeps the global batch (more gradient accumulation); "
                    f"--activation-checkpointing saves more. Run the same command again to resume from it "
                    f"(--resume auto). Stack trace: {out / 'logs' / 'error_rank0.log'}."), line
    assert "torch.OutOfMemoryError: CUDA out of memory" in (out / "logs" / "error_rank0.log").read_text()
    peer = job.one_error_line(1)
    assert peer.startswith("merit_ds.train: error (rank 1): another rank stopped while this one waited for it in a "
                           "collective ("), peer
    assert f"last good checkpoint: {last}. Run the same command again" in peer
    assert stale_buffers(job.port) == []

    after = _md5s(root)
    assert {k: after.get(k) for k in before} == before  # the checkpoints saved before the failure: unchanged
    for d in ckpt.complete_checkpoints(root):  # and each still matches the sha256s recorded when it was saved
        ckpt.validate(d, json.loads((d / ckpt.META).read_text())["run"])
    assert (root / "latest").read_text() == "step_00000006"


@pytest.mark.slow  # a 2-rank training job that waits out a 30 s collective timeout
def test_a_hung_rank_ends_the_others_at_the_collective_timeout(data_dir, tmp_path):
    """Rank 1 hangs in step 3 (sleeps forever, as a rank stuck in a kernel would); rank 0, waiting
    for it in ZeRO's gradient all-reduce, stops after --collective-timeout (0.5 min), not torch's
    30 minutes, with one line naming the last good checkpoint, exit 3. The hung rank is still there
    (nothing reaches it): the test kills it, as the launcher or the scheduler would."""
    from merit_ds.integrations.deepspeed_shm import buffer_path

    out = tmp_path / "run"
    job = Job(tmp_path, "hang", [*TINY, "--data", str(data_dir), "--out", str(out)], "1:3:hang")
    try:
        job.wait([0], deadline_s=400)
        hung_alive = job.procs[1].poll() is None
    finally:
        job.kill()
    t = job.fault_time(1)
    timing = _report("hang", job, 1)
    assert job.procs[0].returncode == 3, timing
    waited = job.ended[0] - t
    # rank 0 may have entered the all-reduce a little before rank 1 hung
    assert TIMEOUT_S - 5 < waited < TIMEOUT_S + MARGIN_S, timing
    assert hung_alive, "the hung rank should still have been running"
    line = job.one_error_line(0)
    assert line.startswith("merit_ds.train: error (rank 0): another rank stopped while this one waited for it in a "
                           "collective ("), line
    assert "Timed out waiting 30000ms" in line
    assert (f"last good checkpoint: {out / 'checkpoints' / 'step_00000002'}. Run the same command again to resume "
            f"from it (--resume auto). Stack trace: {out / 'logs' / 'error_rank0.log'}.") in line
    assert "allreduce" in (out / "logs" / "error_rank0.log").read_text()  # it waited in ZeRO's gradient reduction
    assert not buffer_path(0, addr="127.0.0.1", port=str(job.port)).exists()  # rank 0 released its /dev/shm segment
