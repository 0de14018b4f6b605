"""In-process checks of the training loop's pieces that need no launcher: which device every
reduction meets its collective on, checkpoint metadata and universal-copy bookkeeping, fsync of
DeepSpeed's files, the noise scale's checkpointed EMAs, batch-key conflicts in a DeepSpeed JSON.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from merit_ds.sharding import collective
from merit_ds.train import checkpoint as ckpt
from merit_ds.train.batch import BatchConfigError
from merit_ds.train.diagnostics import AttentionLogitProbe, GradientNoiseScale
from merit_ds.train.ds_config import set_batch
from merit_ds.train.trainer import Trainer


class _Attn(torch.nn.Module):
    """What the probe looks for in GPT-2: ``c_attn`` (d -> 3d), ``head_dim``, ``scaling``."""

    def __init__(self, d=4, heads=2):
        super().__init__()
        self.c_attn = torch.nn.Linear(d, 3 * d)
        self.head_dim, self.scaling = d // heads, (d // heads) ** -0.5


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab=8, d=4):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, d)
        self.attn = _Attn(d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, input_ids):
        h = self.wte(input_ids)
        q = self.attn.c_attn(h)[..., :h.size(-1)]
        return types.SimpleNamespace(logits=self.head(h + q))


class _Reached(Exception):
    pass


@pytest.fixture
def sentinel_backend(monkeypatch):
    """A "distributed" process whose backend wants tensors on the meta device: every tensor
    handed to dist.all_reduce is recorded, then the call stops (meta tensors hold no data)."""
    seen = []

    def all_reduce(tensor, op=None, group=None, async_op=False):
        seen.append(tensor.device)
        raise _Reached

    monkeypatch.setattr(collective, "collective_device", lambda group=None: torch.device("meta"))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return seen


def test_every_reduction_meets_the_collective_on_the_backends_device(sentinel_backend):
    """NCCL takes accelerator tensors only: the loss means, the attention-logit max and the noise
    scale's sums are built on the CPU and must be moved to collective_device() first."""
    torch.manual_seed(0)
    model = _TinyLM()
    x = torch.randint(0, 8, (2, 5))
    probe = AttentionLogitProbe(model)
    probe.arm()
    model(input_ids=x)
    model.device = torch.device("cpu")  # what Trainer.evaluate reads of a DeepSpeed engine
    train = types.SimpleNamespace(loss_acc=torch.zeros((), dtype=torch.float64), loss_count=2)
    val = types.SimpleNamespace(engine=model, val_loader=types.SimpleNamespace(batches=lambda: [(x, x)], blocks=2))
    calls = [
        lambda: Trainer.read_loss(train),                             # train loss
        lambda: Trainer.evaluate(val),                                # val loss
        probe.collect,                                                # max attention logit
        lambda: GradientNoiseScale().measure(model, x, x, world=2),   # |G_small|^2 sum
    ]
    for call in calls:
        with pytest.raises(_Reached):
            call()
    assert sentinel_backend == [torch.device("meta")] * len(calls)


def test_collective_all_reduce_single_rank_gloo(tmp_path):
    """The helper on a real (one-rank gloo) group: the result lands in the caller's tensor."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        t = torch.tensor([1.5, -2.0], dtype=torch.float64)
        calls = collective.counter.calls
        assert collective.all_reduce(t, dist.ReduceOp.MAX) is t
        assert t.tolist() == [1.5, -2.0]
        assert collective.counter.calls == calls  # not counted as the step's statistics all-reduce
    finally:
        dist.destroy_process_group()


def test_noise_scale_emas_round_trip():
    torch.manual_seed(0)
    model, x = _TinyLM(), torch.randint(0, 8, (4, 5))
    whole = GradientNoiseScale()
    for _ in range(3):
        want = whole.measure(model, x, x, world=1)
    first, second = GradientNoiseScale(), GradientNoiseScale()
    first.measure(model, x, x, world=1)
    first.measure(model, x, x, world=1)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))  # survives a checkpoint
    got = second.measure(model, x, x, world=1)
    assert got == want
    assert (second.s_ema, second.g2_ema) == (whole.s_ema, whole.g2_ema)


def test_set_batch_conflict_is_a_batch_config_error():
    with pytest.raises(BatchConfigError, match="train_batch_size=16 but the batch plan needs 32"):
        set_batch({"train_batch_size": 16}, 32, 4, 4)


RUN = {"model_config": {"n_layer": 2}, "seq_len": 32, "global_batch": 8, "precision": "fp32", "zero_stage": 2,
       "schedule": {"steps": 4}, "world": 2}


def _checkpoint(root: Path, step=4, weights=b"weights") -> Path:
    tmp = root / f".tmp-{ckpt.tag_for(step)}"
    tmp.mkdir(parents=True)
    (tmp / "mp_rank_00_model_states.pt").write_bytes(weights)
    (tmp / "zero").mkdir()
    (tmp / "zero" / "part.pt").write_bytes(b"moments")
    return ckpt.finalize(root, tmp.name, ckpt.tag_for(step), RUN, step)


@pytest.mark.parametrize("meta", [
    {"format": ckpt.FORMAT},                                                   # nothing but the format
    {"format": ckpt.FORMAT, "files": [], "run": RUN},                          # files not a mapping
    {"format": ckpt.FORMAT, "files": {"mp_rank_00_model_states.pt": {}}, "run": RUN},  # no size
    {"format": ckpt.FORMAT, "files": {}, "run": None},                         # run not a mapping
])
def test_malformed_metadata_is_a_checkpoint_error(tmp_path, meta):
    path = _checkpoint(tmp_path)
    (path / ckpt.META).write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match=f"corrupt checkpoint {path}: .*{ckpt.META} is malformed"):
        ckpt.validate(path, RUN)


def test_finalize_fsyncs_every_file(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(ckpt, "fsync_file", lambda p: synced.append(Path(p).name))
    path = _checkpoint(tmp_path)
    assert sorted(synced) == ["mp_rank_00_model_states.pt", "part.pt"]
    assert ckpt.validate(path, RUN)["step"] == 4


def test_universal_copy_is_remade_when_the_source_checkpoint_changed(tmp_path, monkeypatch):
    """A universal copy is reused only for the very checkpoint it was converted from."""
    conversions = []

    def fake_convert(cmd, **kw):
        out = Path(cmd[cmd.index("--output_folder") + 1])
        out.mkdir(parents=True)
        (out / "zero").mkdir()
        (out / "source.txt").write_text((Path(cmd[cmd.index("--input_folder") + 1]) / ckpt.META).read_text())
        conversions.append(out)
        return types.SimpleNamespace(returncode=0, stderr="")

    import subprocess

    monkeypatch.setattr(subprocess, "run", fake_convert)
    root = tmp_path / "checkpoints"
    source = _checkpoint(root)
    first = ckpt.universal_copy(source, root / "universal")
    assert ckpt.universal_copy(source, root / "universal") == first and len(conversions) == 1  # made once
    # the same tag saved again from another trajectory (e.g. after resuming an earlier step)
    import shutil

    shutil.rmtree(source)
    source = _checkpoint(root, weights=b"other weights")
    again = ckpt.universal_copy(source, root / "universal")
    assert again == first and len(conversions) == 2
    assert (again / "source.txt").read_text() == (source / ckpt.META).read_text()
    # a copy without the record (made before it existed) is not trusted either
    (again / ckpt.UNIVERSAL_SOURCE).unlink()
    ckpt.universal_copy(source, root / "universal")
    assert len(conversions) == 3


def test_checkpoint_records_the_optimizer_and_older_ones_count_as_merit(tmp_path):
    path = _checkpoint(tmp_path)  # RUN has no "optimizer": a checkpoint from before --optimizer existed
    assert ckpt.validate(path, dict(RUN, optimizer="merit"))["step"] == 4
    with pytest.raises(ckpt.CheckpointError, match="trained with optimizer='merit', this run has optimizer='adamw'"):
        ckpt.validate(path, dict(RUN, optimizer="adamw"))
    lamb = ckpt.finalize(tmp_path / "lamb", *_tmp_dir(tmp_path / "lamb"), dict(RUN, optimizer="lamb"), 4)
    assert ckpt.validate(lamb, dict(RUN, optimizer="lamb"))["run"]["optimizer"] == "lamb"
    with pytest.raises(ckpt.CheckpointError, match="trained with optimizer='lamb', this run has optimizer='merit'"):
        ckpt.validate(lamb, dict(RUN, optimizer="merit"))


def _tmp_dir(root: Path):
    tmp = root / ".tmp-step_00000004"
    tmp.mkdir(parents=True)
    (tmp / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    return tmp.name, "step_00000004"
