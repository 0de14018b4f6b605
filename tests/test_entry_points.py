"""The command-line entry points in-process (the fast tier; the slow tier runs them as real
processes): ``python -m merit_ds`` and ``python -m merit_ds.train`` wire the CLI to the exit path,
``python -m merit_ds.run`` reports usage errors and runs a script as ``python SCRIPT`` would."""

import json
import runpy
import sys

import pytest


@pytest.mark.parametrize("argv, via_exit_process", [(["merit-ds", "plan"], False), (["merit-ds", "train"], True)])
def test_python_m_merit_ds_exits_with_the_clis_code(monkeypatch, argv, via_exit_process):
    import merit_ds.cli
    import merit_ds.train.loop

    ended = []
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(merit_ds.cli, "main", lambda: 3)
    monkeypatch.setattr(merit_ds.train.loop, "exit_process", ended.append)
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("merit_ds", run_name="__main__")
    assert exc.value.code == 3
    # a finished training run ends without interpreter teardown (loop.exit_process); other commands exit
    assert ended == ([3] if via_exit_process else [])


def test_python_m_merit_ds_train_ends_through_exit_process(monkeypatch):
    import merit_ds.train.loop

    ended = []
    monkeypatch.setattr(merit_ds.train.loop, "main", lambda: 0)
    monkeypatch.setattr(merit_ds.train.loop, "exit_process", ended.append)
    runpy.run_module("merit_ds.train", run_name="__main__")
    assert ended == [0]


def test_runner_usage_errors(tmp_path, capsys):
    from merit_ds.run import main

    assert main([]) == 2 and capsys.readouterr().err.startswith("usage: python -m merit_ds.run")
    assert main(["--help"]) == 0 and "usage:" in capsys.readouterr().out
    assert main(["-m"]) == 2 and "usage:" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.py")]) == 2
    assert f"no such script: {tmp_path / 'missing.py'}" in capsys.readouterr().err


def test_runner_runs_the_script_as_python_would(tmp_path, monkeypatch):
    """The script sees ``__name__ == "__main__"``, ``sys.argv`` as ``python SCRIPT ARGS`` (the
    deepspeed launcher's ``--local_rank`` right after the script's name) and its folder first on
    ``sys.path``."""
    from merit_ds.run import main

    script = tmp_path / "s" / "train.py"
    script.parent.mkdir()
    record = tmp_path / "seen.json"
    script.write_text("import json, sys\n"
                      f"json.dump({{'name': __name__, 'argv': sys.argv, 'path0': sys.path[0]}}, open({str(record)!r}, 'w'))\n")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["--local_rank=1", str(script), "--lr", "1e-3"]) == 0
    seen = json.loads(record.read_text())
    assert seen == {"name": "__main__", "argv": [str(script), "--local_rank=1", "--lr", "1e-3"],
                    "path0": str(script.parent)}


@pytest.mark.parametrize("ending, closes", [("", True), ("import sys; sys.exit(0)", True), ("import sys; sys.exit()", True),
                                            ("import sys; sys.exit(3)", False), ("raise ValueError('x')", False)])
def test_runner_closes_the_process_group_after_a_normal_finish_only(tmp_path, monkeypatch, ending, closes):
    """A script that ends, or ends with ``sys.exit(0)`` (the usual ``sys.exit(main())``), has its
    process group closed by the runner (merit_ds/run.py: an abort at interpreter exit otherwise);
    a failing one does not (its peers may still wait in a collective)."""
    from merit_ds import run

    calls = []
    monkeypatch.setattr(run, "_close_process_group", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    script = tmp_path / "script.py"
    script.write_text(ending + "\n")
    if ending.startswith("raise"):
        with pytest.raises(ValueError):
            run.main([str(script)])
    elif "exit" in ending:
        with pytest.raises(SystemExit) as exc:
            run.main([str(script)])
        assert exc.value.code in (None, 0, 3)
    else:
        assert run.main([str(script)]) == 0
    assert calls == ([1] if closes else [])
