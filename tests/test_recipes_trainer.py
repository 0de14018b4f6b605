"""The trainer alone, in-process, without DeepSpeed or a process group: stand-ins for the engine
(a module with DeepSpeed's checkpoint calls) and the runner (backward, step at the accumulation
boundary). One step equals the optimizer applied by hand to the same micro-batches, evaluation is
the mean validation loss, and save + resume into a fresh trainer continues bitwise."""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from merit_ds.integrations.param_groups import merit_param_groups
from merit_ds.optim import LAMB, MERIT
from merit_ds.train import checkpoint as ckpt
from merit_ds.train.data_source import make_train_loader, make_val_loader
from merit_ds.train.diagnostics import lm_loss
from merit_ds.train.presets import MODEL_PRESETS, gpt2_config
from merit_ds.train.trainer import Trainer

SEQ, BATCH, MICRO = 16, 4, 2  # grad_accum 2 on one rank


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(1)
    rng.integers(0, 256, size=4000, dtype=np.uint16).tofile(d / "train.bin")
    rng.integers(0, 256, size=1000, dtype=np.uint16).tofile(d / "val.bin")
    return d


class Engine(torch.nn.Module):
    """What the trainer uses of DeepSpeed's engine; checkpoints as one torch.save per tag."""

    def __init__(self, model, optimizer):
        super().__init__()
        self.module, self.optimizer, self.device = model, optimizer, torch.device("cpu")

    def forward(self, **kwargs):
        return self.module(**kwargs)

    def get_global_grad_norm(self):
        return None

    def save_checkpoint(self, root, tag, client_state, save_latest):
        path = Path(root) / tag
        path.mkdir(parents=True)
        torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "client": client_state}, path / "state.pt")

    def load_checkpoint(self, root, tag, load_optimizer_states, load_lr_scheduler_states):
        state = torch.load(Path(root) / tag / "state.pt", weights_only=False)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        return str(Path(root) / tag), state["client"]


class Runner:
    """One rank: backward per micro-batch, step + zero_grad at the accumulation boundary."""

    rank, world = 0, 1

    def __init__(self, optimizer, accum):
        self.optimizer, self.accum, self.micro = optimizer, accum, 0

    def micro_context(self):
        return contextlib.nullcontext()

    def backward_step(self, loss):
        (loss / self.accum).backward()
        self.micro += 1
        if self.micro % self.accum == 0:
            self.optimizer.step()
            self.optimizer.zero_grad()


def _model():
    torch.manual_seed(0)
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(gpt2_config(MODEL_PRESETS["tiny"], n_layer=1, n_embd=16, n_head=2, n_positions=SEQ,
                                       vocab_size=256))


OPTIMIZERS = {
    "merit": lambda groups: MERIT(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-6),
    "lamb": lambda groups: LAMB(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-6),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8),
}


def _trainer(data_dir, name, steps=6, warmup=2):
    model = _model()
    opt = OPTIMIZERS[name](merit_param_groups(model, 0.1))
    train = make_train_loader(data_dir, seq_len=SEQ, global_batch=BATCH, micro_batch=MICRO, rank=0, world=1, seed=3)
    val = make_val_loader(data_dir, seq_len=SEQ, eval_sequences=4, micro_batch=MICRO, rank=0, world=1)
    engine = Engine(model, opt)
    trainer = Trainer(engine, Runner(opt, train.grad_accum), opt, name, train, val, steps=steps, warmup=warmup,
                      floor=0.1, tokens_per_step=BATCH * SEQ, zero_stage=0)
    return trainer, model, opt


@pytest.mark.parametrize("name", ["merit", "lamb", "adamw"])
def test_train_step_is_the_optimizer_applied_by_hand(data_dir, name):
    trainer, model, opt = _trainer(data_dir, name)
    ref_model = copy.deepcopy(model)
    ref_opt = OPTIMIZERS[name](merit_param_groups(ref_model, 0.1))
    peak = ref_opt.param_groups[0]["lr"]
    for g in ref_opt.param_groups:
        g["lr"] = peak / 2  # warmup 2: the first step runs at lr / 2
    if name != "adamw":  # as on the trainer's diagnostics step (MERIT's statistics step runs its foreach path)
        ref_opt.track_stats = True
    loader = make_train_loader(data_dir, seq_len=SEQ, global_batch=BATCH, micro_batch=MICRO, rank=0, world=1, seed=3)
    losses = []
    for _ in range(2):
        x, y = next(loader)
        loss = lm_loss(ref_model(input_ids=x).logits, y)
        (loss / 2).backward()
        losses.append(float(loss.detach()))
    ref_opt.step()

    record = trainer.train_step(diagnostics=True)
    assert trainer.step == 1 and record["step"] == 1 and record["tokens"] == BATCH * SEQ
    assert record["lr"] == peak / 2 and opt.param_groups[0]["lr"] == peak  # the scheduler moved on to the peak
    assert record["loss"] == sum(losses) / 2
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), n
    assert math.isfinite(record["max_attn_logit"]) and record["gns_b_small"] == 1.0
    keys = {k for k in record if k.startswith("trust_ratio") or k == "clip_fraction"}
    assert keys == {"merit": {"trust_ratio_min", "trust_ratio_mean", "trust_ratio_max", "clip_fraction"},
                    "lamb": {"trust_ratio_min", "trust_ratio_mean", "trust_ratio_max"}, "adamw": set()}[name]
    if name != "adamw":
        assert not opt.track_stats  # switched on for the diagnostics step only
        assert 0 < record["trust_ratio_min"] <= record["trust_ratio_mean"] <= record["trust_ratio_max"]
    plain = trainer.train_step()
    assert "max_attn_logit" not in plain and "trust_ratio_max" not in plain and plain["step"] == 2


def _val_reference(data_dir, model, blocks):
    """Mean token loss over val blocks 0..blocks-1, read straight from val.bin in one forward."""
    tokens = np.fromfile(data_dir / "val.bin", dtype=np.uint16).astype(np.int64)
    rows = torch.from_numpy(np.stack([tokens[b * SEQ: b * SEQ + SEQ + 1] for b in range(blocks)]))
    with torch.no_grad():
        return float(lm_loss(model(input_ids=rows[:, :-1]).logits, rows[:, 1:]))


def test_evaluate_is_the_mean_validation_loss(data_dir):
    """A fixed set, each block once, whatever the micro-batch; asking for more blocks than the
    split holds (62 of 16 tokens in 1000) evaluates the split once, without wrapping."""
    trainer, model, _ = _trainer(data_dir, "adamw")
    for n, micro in [(4, 2), (7, 1), (7, 2), (7, 3), (7, 7), (100, 5)]:
        trainer.val_loader = make_val_loader(data_dir, seq_len=SEQ, eval_sequences=n, micro_batch=micro, rank=0, world=1)
        got = trainer.evaluate()
        blocks = min(n, 999 // SEQ)
        assert got["val_blocks"] == blocks == trainer.val_loader.blocks
        want = _val_reference(data_dir, model, blocks)
        assert got["val_loss"] == pytest.approx(want, rel=1e-6, abs=0), (n, micro)
        assert got["val_ppl"] == pytest.approx(math.exp(want), rel=1e-6)
    assert trainer.val_loader.capped and "holds only 62" in trainer.val_loader.describe()
    assert model.training  # back to training mode


def test_validation_set_splits_blocks_once_over_ranks(data_dir):
    """Every rank's slice, for worlds 1-5 and micro-batches 1-4: together each block exactly once."""
    for world in range(1, 6):
        for micro in range(1, 5):
            ids = [b for r in range(world) for chunk in make_val_loader(
                data_dir, seq_len=SEQ, eval_sequences=7, micro_batch=micro, rank=r, world=world).block_ids()
                for b in chunk.tolist()]
            assert sorted(ids) == list(range(7)), (world, micro)
            assert all(len(c) <= micro for r in range(world) for c in make_val_loader(
                data_dir, seq_len=SEQ, eval_sequences=7, micro_batch=micro, rank=r, world=world).block_ids())


@pytest.mark.slow  # 2 launched ranks
def test_validation_loss_is_the_same_at_world_1_and_2(data_dir):
    """Real ranks (gloo): the val loss at world 2, micro-batch 1-3, equals the one-forward reference."""
    from _dist import TESTS_DIR, launch

    got = launch(TESTS_DIR / "val_worker.py", nprocs=2, args=[str(data_dir)], timeout=120)
    _, model, _ = _trainer(data_dir, "adamw")
    for key in ("7/1", "7/2", "7/3", "100/1", "100/2", "100/3"):
        n = int(key.split("/")[0])
        blocks = min(n, 999 // SEQ)
        assert got[key]["val_blocks"] == blocks
        assert got[key]["val_loss"] == pytest.approx(_val_reference(data_dir, model, blocks), rel=1e-6, abs=0), key


@pytest.mark.parametrize("name", ["lamb", "adamw"])
def test_save_then_resume_in_a_fresh_trainer_continues_bitwise(data_dir, tmp_path, name):
    root, info = tmp_path / "checkpoints", {"optimizer": name, "world": 1, "zero_stage": 0}
    trainer, _, _ = _trainer(data_dir, name)
    want = [trainer.train_step(diagnostics=True) for _ in range(2)]
    saved = trainer.save(root, info, keep_last=1)
    assert saved == root / "step_00000002" and ckpt.latest_checkpoint(root) == saved
    assert ckpt.validate(saved, info)["step"] == 2
    want += [trainer.train_step(diagnostics=True) for _ in range(2)]

    fresh, model, _ = _trainer(data_dir, name)
    assert fresh.resume(saved) == 2 and fresh.step == 2
    got = [fresh.train_step(diagnostics=True) for _ in range(2)]
    assert got == want[2:]


def test_no_host_sync_between_log_steps(data_dir):
    """The loss stays on the device between log steps: no float()/item()/tolist()/bool() from the
    trainer on a non-log step; the read at the log step is the mean loss of the interval."""
    import sys as _sys

    calls = []
    trainer_file = str(Path(__import__("merit_ds.train.trainer", fromlist=["x"]).__file__))
    originals = {name: getattr(torch.Tensor, name) for name in ("__float__", "item", "tolist", "__bool__")}

    def spy(name):
        def wrapped(self, *a, **k):
            if _sys._getframe(1).f_code.co_filename == trainer_file:
                calls.append(name)
            return originals[name](self, *a, **k)
        return wrapped

    trainer, _, _ = _trainer(data_dir, "adamw")
    ref, _, _ = _trainer(data_dir, "adamw")
    per_step = [ref.train_step()["loss"] for _ in range(4)]
    try:
        for name in originals:
            setattr(torch.Tensor, name, spy(name))
        records = [trainer.train_step(read=False) for _ in range(3)]
        assert calls == [], calls  # three steps, six micro-batches: not one host read
        assert trainer.loss_acc.device == trainer.engine.device and trainer.loss_acc.dtype == torch.float64
        last = trainer.train_step(read=True)
        assert calls == ["__float__", "__float__"] or calls.count("__float__") >= 1  # the read (and grad norm)
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    assert all("loss" not in r for r in records) and [r["step"] for r in records] == [1, 2, 3]
    assert last["loss"] == pytest.approx(sum(per_step) / 4, rel=1e-12)
    assert trainer.loss_count == 0 and float(trainer.loss_acc) == 0.0


def test_train_loop_cadences_equal_the_steps_driven_by_hand(data_dir, tmp_path):
    """``Trainer.train`` in-process: which steps it reads and logs (log, diagnostics, eval and
    checkpoint steps, the last one), where it evaluates and saves, and records equal to the same
    ``train_step`` / ``evaluate`` calls made by hand (wall-clock keys aside)."""
    from merit_ds.train.metrics import TIMING_KEYS, Throughput
    from merit_ds.train.trainer import LoopConfig

    root, info = tmp_path / "checkpoints", {"optimizer": "merit", "world": 1, "zero_stage": 0}
    config = LoopConfig(ckpt_root=root, run_info=info, seq_len=SEQ, log_every=2, diag_every=3, eval_every=4,
                        ckpt_every=3, keep_last=5, progress=False)
    trainer, _, _ = _trainer(data_dir, "merit")
    logged = []
    meter = Throughput(1.0, BATCH * SEQ, 1, None, torch.device("cpu"))
    trainer.train(config, meter, lambda record, step: logged.append((step, record)))
    trainer.finish_save()

    ref, _, _ = _trainer(data_dir, "merit")
    want = []
    for step in range(1, 7):  # log steps 2, 4, 6; diagnostics 1, 3, 6; eval 4; checkpoints 3, 6
        record = ref.train_step(diagnostics=step in (1, 3, 6), read=step != 5)
        if step == 4:
            record.update(ref.evaluate())
        if step != 5:
            want.append((step, record))
    assert [(s, {k: v for k, v in r.items() if k not in TIMING_KEYS}) for s, r in logged] == want
    assert all(TIMING_KEYS & r.keys() for _, r in logged)  # every logged step carries its interval's throughput
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003", "step_00000006"]
    assert trainer.step == trainer.saved_step == 6 and meter.total_steps == 6


def test_throughput_and_mfu_by_hand():
    """Step time, tokens/s and MFU of an interval and of the run, with a fake clock."""
    from merit_ds.train.metrics import Throughput
    from merit_ds.train.plan import flops_per_token

    small = MODEL_PRESETS["gpt2-small"]
    fpt = flops_per_token(small, 1024)
    # 6 x (124,475,904 - 1024 x 768 position embedding) + 12 x 12 layers x 768 x 1024
    # = 6 x 123,689,472 + 113,246,208 = 742,136,832 + 113,246,208
    assert fpt == 855_383_040
    now = [100.0]
    meter = Throughput(fpt, 480 * 1024, 8, 989e12, torch.device("cpu"), clock=lambda: now[0])
    meter.steps, now[0] = 4, 102.0          # 4 steps in 2 s
    got = meter.interval()
    assert got["step_time_s"] == 0.5 and got["tokens_per_s"] == 983_040  # 491,520 tokens / 0.5 s
    # 855,383,040 FLOPs/token x 983,040 tokens/s = 8.40876e14 FLOP/s of 8 x 989e12 = 7.912e15: 10.628%
    assert got["mfu"] == pytest.approx(0.10627853, rel=1e-7)
    assert "peak_memory_gib" not in got      # CPU
    now[0] = 110.0                           # an eval: left out
    meter.restart()
    meter.steps, now[0] = 2, 113.0           # 2 steps in 3 s
    meter.interval()
    s = meter.summary()
    # 6 steps in 2 + 3 = 5 s: 0.8333 s each; 6 x 491,520 tokens / 5 s = 589,824 tokens/s
    assert s["train_step_time_s"] == pytest.approx(0.8333333333333334, rel=1e-15)
    assert s["train_tokens_per_s"] == 589_824
    assert "mfu" not in Throughput(fpt, 1, 1, None, torch.device("cpu")).interval()  # no peak known: no MFU


@pytest.mark.slow  # 2 launched ranks
def test_checkpoint_finalisation_error_reaches_every_rank(tmp_path):
    """Rank 0's finalize raises: both ranks raise the same CheckpointSaveError (no rank left in a
    barrier until the launcher kills it)."""
    from _dist import TESTS_DIR, launch

    got = launch(TESTS_DIR / "save_error_worker.py", nprocs=2, args=[str(tmp_path / "ckpt")], timeout=60)
    want = f"checkpoint {tmp_path / 'ckpt' / 'step_00000003'}: finalisation on rank 0 failed: OSError: disk full (simulated)"
    # foreground: save raises; background: save returns, finish_save raises the same on both ranks;
    # then a full disk on rank 1 inside DeepSpeed's save: one line on both ranks, the partial save removed
    full = (f"saving step 4 to {tmp_path / 'ckpt' / 'step_00000004'} failed (rank 1: OSError: [Errno 28] No space "
            "left on device); nothing of it was kept and there is no earlier checkpoint (latest unchanged). Free "
            "space on that filesystem (or fix its permissions) and run the same command again: it resumes from there.")
    assert got["rank0"] == got["rank1"] == "\n".join([want, "returned", want, full, "tmp removed"])


def test_background_finalisation_returns_before_hashing_and_a_crash_keeps_the_previous(data_dir, tmp_path, monkeypatch):
    """save(background=True) returns while rank 0 is still hashing (the hash is held by the test,
    not timed); training continues meanwhile; until the metadata is written ``latest`` names the
    previous checkpoint, which still validates and resumes bitwise (what a crash then leaves);
    once released the manifest holds every file's true sha256 and the new checkpoint resumes
    bitwise too."""
    import hashlib
    import threading

    root, info = tmp_path / "checkpoints", {"optimizer": "adamw", "world": 1, "zero_stage": 0}
    ref, _, _ = _trainer(data_dir, "adamw")
    want = [ref.train_step(diagnostics=True) for _ in range(6)]

    trainer, _, _ = _trainer(data_dir, "adamw")
    got = [trainer.train_step(diagnostics=True) for _ in range(2)]
    first = trainer.save(root, info, keep_last=3, background=True)
    trainer.finish_save()
    assert ckpt.latest_checkpoint(root) == first
    got += [trainer.train_step(diagnostics=True) for _ in range(2)]

    hashing, release, real = threading.Event(), threading.Event(), ckpt.sha256_file

    def held(path):  # only the finaliser's hashing waits; the test's own checks hash normally
        if threading.current_thread().name.startswith("merit_ds-finalise"):
            hashing.set()
            assert release.wait(60)
        return real(path)

    monkeypatch.setattr(ckpt, "sha256_file", held)
    second = trainer.save(root, info, keep_last=3, background=True)
    assert hashing.wait(60)  # save returned and rank 0's thread is hashing
    assert second == root / "step_00000004" and not second.exists() and (root / ".tmp-step_00000004").is_dir()
    assert ckpt.latest_checkpoint(root) == first and ckpt.validate(first, info)["step"] == 2
    got += [trainer.train_step(diagnostics=True) for _ in range(2)]  # training goes on meanwhile
    assert trainer.step == 6 and trainer._pending.thread.is_alive()
    crashed, _, _ = _trainer(data_dir, "adamw")  # a crash now: the resume finds step 2
    assert crashed.resume(ckpt.latest_checkpoint(root)) == 2
    assert [crashed.train_step(diagnostics=True) for _ in range(2)] == want[2:4]

    release.set()
    trainer.finish_save()
    assert ckpt.latest_checkpoint(root) == second and not (root / ".tmp-step_00000004").exists()
    meta = ckpt.validate(second, info)
    assert meta["files"] == {rel: {"bytes": (second / rel).stat().st_size, "mtime_ns": (second / rel).stat().st_mtime_ns,
                                   "sha256": hashlib.sha256((second / rel).read_bytes()).hexdigest()}
                             for rel in ["state.pt"]}
    assert got == want
    fresh, _, _ = _trainer(data_dir, "adamw")
    assert fresh.resume(second) == 4
    assert [fresh.train_step(diagnostics=True) for _ in range(2)] == want[4:]


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize("name", ["merit", "adamw"])
def test_compiled_model_diagnostics_steps_compile_nothing(data_dir, name):
    """``model.compile`` (what ``engine.compile`` does): after one plain step and one evaluation
    have compiled, diagnostics steps (probe hooks armed, half-micro-batch noise-scale passes),
    plain steps and evaluations compile nothing more -- not even once for the diagnostics; the records equal the eager run's
    bitwise (the counting backend runs dynamo's graphs unchanged). Negative control: without
    ``_eager`` the armed probe and the half micro-batches recompile (checked: this test fails)."""
    import torch._dynamo

    graphs = []

    def counting(gm, example_inputs):  # dynamo calls the backend once per graph it compiles
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    diag = [False, True, False, True, True, False, True, True]
    ref, _, _ = _trainer(data_dir, name, steps=8)
    want = [ref.train_step(diagnostics=d) for d in diag[:1]] + [ref.evaluate()]
    want += [ref.train_step(diagnostics=d) for d in diag[1:]] + [ref.evaluate()]

    trainer, model, _ = _trainer(data_dir, name, steps=8)
    model.compile(backend=counting)
    got = [trainer.train_step(diagnostics=d) for d in diag[:1]] + [trainer.evaluate()]
    warm = len(graphs)
    assert warm > 0  # the plain step and the evaluation went through dynamo
    got += [trainer.train_step(diagnostics=d) for d in diag[1:]] + [trainer.evaluate()]
    assert len(graphs) == warm, f"{len(graphs) - warm} graphs compiled after warm-up"
    assert got == want
    torch._dynamo.reset()
