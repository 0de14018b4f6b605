"""``--resume`` cannot destroy a run (issue #23). Before: with ``checkpoints/latest`` missing and
complete ``step_*`` present, ``--resume auto`` trained again from step 0, truncated metrics.jsonl and
pruned the old checkpoints; ``--resume`` to an older checkpoint of the same run went on over the
newer ones. Now ``auto`` takes the newest complete checkpoint (and says so), an older one in place
is refused naming the fix, and a directory of only interrupted saves is refused. Tested on the
rank-0 decision itself (``locate_checkpoint``, one process), files' md5 unchanged by refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from _fake_run import RUN_INFO, make_run, md5s, run  # noqa: F401  (run: the fixture)
from merit_ds.train.loop import locate_checkpoint
from merit_ds.train.run_config import UsageError

ONE = SimpleNamespace(rank=0, world=1)


def test_auto_with_latest_missing_takes_the_newest_complete(run, capsys):
    (run / "checkpoints" / "latest").unlink()
    resume_from, load_from = locate_checkpoint("auto", run / "checkpoints", RUN_INFO, ONE)
    assert resume_from == load_from == run / "checkpoints" / "step_00000002"
    assert "latest is missing: resuming from the newest complete checkpoint step_00000002 (of 2)" in capsys.readouterr().out


def test_auto_with_latest_behind_a_newer_complete_checkpoint(run, capsys):
    (run / "checkpoints" / "latest").write_text("step_00000001")  # a crash between rename and pointer move
    resume_from, _ = locate_checkpoint("auto", run / "checkpoints", RUN_INFO, ONE)
    assert resume_from.name == "step_00000002"
    assert "names step_00000001, but step_00000002 is newer and complete" in capsys.readouterr().out


def test_auto_as_before_when_latest_is_the_newest(run, capsys):
    resume_from, _ = locate_checkpoint("auto", run / "checkpoints", RUN_INFO, ONE)
    assert resume_from.name == "step_00000002" and capsys.readouterr().out == ""


def test_auto_in_an_empty_directory_starts_fresh(tmp_path):
    assert locate_checkpoint("auto", tmp_path / "checkpoints", RUN_INFO, ONE) == (None, None)


def test_only_interrupted_saves_are_refused(run):
    root = run / "checkpoints"
    for d in root.glob("step_*"):
        (d / "merit_ds_checkpoint.json").unlink()
    (root / "latest").unlink()
    before = md5s(run)
    with pytest.raises(UsageError, match="holds step_\\* directories but none is complete"):
        locate_checkpoint("auto", root, RUN_INFO, ONE)
    assert md5s(run) == before


def test_resuming_an_older_checkpoint_in_place_is_refused(run, tmp_path):
    older = run / "checkpoints" / "step_00000001"
    before = md5s(run)
    with pytest.raises(UsageError, match="older than this run's newest checkpoint\\(s\\) step_00000002.*new --out"):
        locate_checkpoint(str(older), run / "checkpoints", RUN_INFO, ONE)
    assert md5s(run) == before
    # into another run directory it is fine (a branch)
    resume_from, _ = locate_checkpoint(str(older), tmp_path / "branch" / "checkpoints", RUN_INFO, ONE)
    assert resume_from == older
