"""``merit-ds export`` cannot destroy anything (issue #23): an ``--out`` that is, contains or lies
inside a run directory, or holds anything but an earlier export, is refused; a checkpoint whose
bytes rotted is refused before it is loaded; every refusal is one line, exit 2, and leaves every
file's md5 unchanged. The run directory is made by hand (a ZeRO-0 checkpoint written through
merit_ds.train.checkpoint's own ``finalize``), so these tests need no DeepSpeed job.

Before these checks, ``export --run R --out R`` exited 0 after deleting R's checkpoints, metrics and
run.json, and a corrupt checkpoint exported garbage weights.
"""

from __future__ import annotations

import json

import pytest

from merit_ds.cli import main as cli
from merit_ds.train import checkpoint as ckpt


from _fake_run import md5s as _md5s, run  # noqa: F401  (the fixture)


def _export(capsys, *args) -> tuple[int, str]:
    code = cli(["export", *map(str, args)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("where", ["run", "parent", "inside", "checkpoints"])
def test_out_that_would_hold_or_sit_in_the_run_is_refused(run, capsys, where):
    out = {"run": run, "parent": run.parent, "inside": run / "export", "checkpoints": run / "checkpoints"}[where]
    before = _md5s(run.parent)
    code, err = _export(capsys, "--run", run, "--out", out)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("merit-ds export: error: --out ")
    assert {"run": "is the run directory itself", "parent": "contains the run directory",
            "inside": "lies inside the run directory", "checkpoints": "lies inside the run directory"}[where] in err
    assert "Nothing was written." in err
    assert _md5s(run.parent) == before


def test_out_holding_other_files_is_refused(run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = _md5s(tmp_path)
    code, err = _export(capsys, "--run", run, "--out", out)
    assert code == 2 and "holds files that are not an earlier merit_ds export" in err
    assert _md5s(tmp_path) == before


def test_corrupt_checkpoint_is_refused_before_loading(run, tmp_path, capsys):
    weights = run / "checkpoints" / ckpt.tag_for(2) / "mp_rank_00_model_states.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, different sha256
    weights.write_bytes(bytes(data))
    before = _md5s(tmp_path)
    code, err = _export(capsys, "--run", run, "--out", tmp_path / "hf")
    assert code == 2 and err.count("\n") == 1
    assert "mp_rank_00_model_states.pt fails its sha256 check" in err
    assert "Export another step (step_00000001: --step N)" in err
    assert _md5s(tmp_path) == before and not (tmp_path / "hf").exists()


def test_export_into_a_new_directory_then_over_the_earlier_export(run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert _export(capsys, "--run", run, "--out", out, "--step", 1)[0] == 0
    meta = json.loads((out / "merit_ds_export.json").read_text())
    assert meta["step"] == 1 and (out / "model.safetensors").is_file()
    assert _export(capsys, "--run", run, "--out", out)[0] == 0  # an earlier export is replaced
    assert json.loads((out / "merit_ds_export.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no temporaries left beside it
    # and the run's own hf_model/ is allowed
    assert _export(capsys, "--run", run, "--out", run / "hf_model")[0] == 0
