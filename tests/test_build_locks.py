"""Stale torch-extension build locks are named at start-up (merit_ds/build_locks.py), never removed.

A lock left by a killed build makes torch wait forever, silently, in every later run that needs
that extension (seen in this project's own test runs: DeepSpeed's ``cpu_adam``). The checks
here build fake build roots in both of torch's layouts, age their locks with ``os.utime`` and
assert what is named, that a young lock (a build in progress) is not, and that no file is
touched (md5 before and after). The end-to-end check runs ``python -m merit_ds.run`` on a
one-line script with ``TORCH_EXTENSIONS_DIR`` pointing at such a root.
"""

import hashlib
import io
import os
import subprocess
import sys
import time

import pytest
from _dist import REPO_ROOT

from merit_ds.build_locks import STALE_AFTER_S, first_rank_of_node, stale_build_locks, warn_stale_build_locks


def _lock(path, age_s):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def _md5s(root):
    return {p: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_names_old_locks_in_both_layouts_oldest_first_and_skips_young_ones(tmp_path):
    old_default = _lock(tmp_path / "py311_cpu" / "cpu_adam" / "lock", 3600)  # <root>/<py_acc>/<ext>/lock
    old_env = _lock(tmp_path / "deepspeed_shm_comm" / "lock", 1200)  # TORCH_EXTENSIONS_DIR=<root>: <root>/<ext>/lock
    _lock(tmp_path / "py311_cpu" / "merit_ds_cpu_kernel_abc" / "lock", 30)  # a build in progress
    (tmp_path / "py311_cpu" / "cpu_adam" / "cpu_adam.so").write_bytes(b"\x7fELF")
    found = stale_build_locks(root=tmp_path)
    assert [p for p, _ in found] == [old_default, old_env]
    assert 3590 < found[0][1] < 3700 and 1190 < found[1][1] < 1300
    assert [p for p, _ in stale_build_locks(min_age_s=2000, root=tmp_path)] == [old_default]


def test_warning_names_the_lock_the_extension_and_the_fix_and_removes_nothing(tmp_path, monkeypatch):
    lock = _lock(tmp_path / "cpu_adam" / "lock", 1800)
    (tmp_path / "cpu_adam" / "build.ninja").write_text("rule cxx\n")
    before = _md5s(tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    out = io.StringIO()
    assert warn_stale_build_locks(stream=out) == [lock]
    text = out.getvalue()
    assert text.count("\n") == 1
    assert f"30 min old: {lock}" in text and "'cpu_adam' extension" in text and f"rm {lock}" in text
    assert _md5s(tmp_path) == before  # the lock and the build files are all still there, unchanged


def test_nothing_to_say_without_a_lock_and_a_note_for_a_young_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "absent"))
    out = io.StringIO()
    assert warn_stale_build_locks(stream=out) == [] and out.getvalue() == ""
    young = _lock(tmp_path / "young" / "cpu_adam" / "lock", 5)  # a build in progress, or one just killed
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "young"))
    assert warn_stale_build_locks(stream=out) == []  # not stale: no warning, a note
    note = out.getvalue()
    assert note.startswith("merit_ds: note: ") and f"rm {young}" in note and "'cpu_adam'" in note, note
    assert young.exists() and STALE_AFTER_S > 5


@pytest.mark.parametrize("env, first", [({}, True), ({"LOCAL_RANK": "0"}, True), ({"LOCAL_RANK": "3"}, False),
                                        ({"OMPI_COMM_WORLD_LOCAL_RANK": "1"}, False),
                                        ({"MPI_LOCALRANKID": "0"}, True), ({"SLURM_LOCALID": "2"}, False),
                                        ({"LOCAL_RANK": "0", "SLURM_LOCALID": "2"}, True)])
def test_first_rank_of_node_reads_each_launchers_variable(monkeypatch, env, first):
    for var in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert first_rank_of_node() is first


@pytest.mark.slow  # an interpreter that imports DeepSpeed and transformers
def test_merit_ds_run_names_a_stale_lock_before_the_script_runs(tmp_path):
    lock = _lock(tmp_path / "ext" / "cpu_adam" / "lock", 7200)
    script = tmp_path / "script.py"
    script.write_text("print('script ran')\n")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), HF_HUB_OFFLINE="1")
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, "-m", "merit_ds.run", str(script)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"120 min old: {lock}" in proc.stderr and proc.stdout.strip() == "script ran"
    assert lock.exists()  # (a node's other ranks stay quiet: test_first_rank_of_node_reads_each_launchers_variable)


def test_merit_ds_train_names_a_stale_lock_at_start_up(tmp_path):
    lock = _lock(tmp_path / "ext" / "py311_cpu" / "deepspeed_shm_comm" / "lock", 900)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), HF_HUB_OFFLINE="1")
    env.pop("LOCAL_RANK", None)
    # --tracker bogus: refused right after the check, before DeepSpeed's set-up would build its
    # shared-memory extension in this empty TORCH_EXTENSIONS_DIR (45 s)
    proc = subprocess.run([sys.executable, "-m", "merit_ds.train", "--data", str(tmp_path / "no_data"),
                           "--out", str(tmp_path / "out"), "--tracker", "bogus"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    # the run itself is refused, after the warning; nothing written, the lock kept
    assert proc.returncode == 2 and "unknown tracker 'bogus'" in proc.stderr, proc.stderr[-2000:]
    assert f"15 min old: {lock}" in proc.stderr and "'deepspeed_shm_comm' extension" in proc.stderr
    assert lock.exists() and not (tmp_path / "out").exists()
