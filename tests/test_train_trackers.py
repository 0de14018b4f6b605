"""Trackers: TensorBoard and Weights & Biases (offline) through the same interface, ``--tracker``.

One short single-process training run with ``--tracker tensorboard,wandb`` and
``WANDB_MODE=offline``. The values each tracker stored are read back from its own files, not
through merit_ds: W&B's run log (``run-*.wandb``: LevelDB-log framed protobuf records, read here
with a small independent reader and W&B's own protobuf classes), TensorBoard's event files
(tensorboard's EventAccumulator). Reference: ``metrics.jsonl``.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import glob
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _dist import REPO_ROOT, dist_env
from merit_ds.train.tracking import wandb_init_kwargs

pytest.importorskip("wandb")

ARGS = ["--model", "tiny", "--model-override", "n_layer=2", "--model-override", "n_embd=32",
        "--model-override", "n_head=2", "--seq-len", "32", "--global-batch", "8", "--micro-batch", "2",
        "--zero-stage", "2", "--precision", "fp32", "--eval-every", "2", "--ckpt-every", "0", "--diag-every", "2",
        "--no-progress", "--no-plot", "--no-export", "--steps", "4"]


def wandb_records(path: Path) -> list:
    """Records of a W&B run file: a 7-byte header (":W&B", magic, version), then LevelDB log
    framing in 32 KiB blocks (crc32 4, length 2, type 1: FULL/FIRST/MIDDLE/LAST) around
    serialized ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            chunks.append(buf + chunk)
            buf = b""
    return [pb.Record.FromString(c) for c in chunks]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("trk")
    rng = np.random.default_rng(0)
    rng.integers(0, 512, size=20000).astype("<u2").tofile(d / "train.bin")
    rng.integers(0, 512, size=4000).astype("<u2").tofile(d / "val.bin")
    out = d / "run"
    # W&B's mode is left to the loop's rule, end to end: no WANDB_MODE, no API key, a netrc
    # without a W&B login -> offline (files under OUT/wandb, no network, no prompt)
    env = dist_env({"WANDB_SILENT": "true", "NETRC": str(d / "no-netrc")})
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED"):
        env.pop(key, None)
    r = subprocess.run([sys.executable, "-m", "merit_ds.train", *ARGS, "--tracker", "tensorboard,wandb",
                        "--data", str(d), "--out", str(out)], env=env, cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


def metrics(out: Path) -> dict:
    """step -> every numeric value logged at that step (the final evaluation joins its step)."""
    by_step: dict = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        by_step.setdefault(rec["step"], {}).update({k: v for k, v in rec.items() if k != "step"})
    return by_step


@pytest.mark.slow  # a training-loop process
def test_wandb_offline_logs_every_value(run):
    files = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1  # offline, under OUT/wandb
    records = wandb_records(Path(files[0]))
    history = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            # a key is in .key or, in newer writers, as a path in .nested_key; the step in .step.num
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            step = row.get("_step", rec.history.step.num)
            history[step] = {k: v for k, v in row.items() if not k.startswith("_")}
    want = metrics(run)
    assert sorted(history) == [1, 2, 3, 4]
    assert history == want  # every key, every step, exact floats
    assert {"loss", "lr", "val_loss", "trust_ratio_mean", "grad_norm"} <= set(history[4])
    config = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "config":
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                           for item in rec.config.update})
    run_json = json.loads((run / "run.json").read_text())
    for key in ("global_batch", "micro_batch", "seq_len", "zero_stage", "precision", "steps", "lr"):
        assert config[key] == run_json[key], key
    assert any(rec.WhichOneof("record_type") == "exit" and rec.exit.exit_code == 0 for rec in records)


@pytest.mark.slow  # a training-loop process
def test_tensorboard_logs_the_same_values(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    want = metrics(run)
    (tb,) = [p for p in (run / "tensorboard").iterdir() if p.is_dir()]
    acc = EventAccumulator(str(tb))
    acc.Reload()
    for key in ("loss", "lr", "val_loss", "trust_ratio_mean"):
        got = {e.step: e.value for e in acc.Scalars(key)}
        ref = {s: v[key] for s, v in want.items() if key in v}
        assert sorted(got) == sorted(ref) and len(ref) >= 2, key
        assert all(got[s] == np.float32(ref[s]) for s in ref), key  # TensorBoard stores float32


def test_wandb_mode_choice(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_init_kwargs(tmp_path) == {"dir": str(tmp_path), "mode": "offline"}  # no key: never a prompt
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    assert wandb_init_kwargs(tmp_path) == {"dir": str(tmp_path)}  # `wandb login` done: online
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_init_kwargs(tmp_path) == {"dir": str(tmp_path)}
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's choice, read by wandb itself
    monkeypatch.delenv("WANDB_API_KEY")
    assert wandb_init_kwargs(tmp_path) == {"dir": str(tmp_path)}
