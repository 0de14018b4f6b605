"""The trainer: one optimizer step, an evaluation, a checkpoint save, a resume -- over an engine
that is already built -- and the loop over them (:meth:`Trainer.train`: every step, with the
logging, diagnostics, evaluation and checkpoint cadences). No argument parsing (:mod:`.run_config`),
no process-group setup (:mod:`.launcher`), no files other than checkpoints: records go to the
``log`` callable :meth:`Trainer.train` is handed (:class:`.metrics.RunLog`); :mod:`.loop` builds
the parts and :mod:`.finish` does the end of the run.

What it needs from its collaborators, so that a test can hand it stand-ins:

* ``engine``: DeepSpeed's engine (or anything with) ``engine(input_ids=x).logits``, ``.device``,
  ``.module``, ``.train()``/``.eval()``, ``.get_global_grad_norm()``, and for checkpoints
  ``.save_checkpoint`` / ``.load_checkpoint``;
* ``runner`` (:class:`merit_ds.train.launcher.Runner`): ``rank``, ``world``, ``micro_context()``,
  ``backward_step(loss)`` (DeepSpeed steps at the gradient-accumulation boundary);
* ``basic``: the optimizer that steps the weights (verified by :mod:`.optimizers`); it gets the
  warmup-cosine scheduler, and for MERIT/LAMB its ``track_stats`` is switched on for
  diagnostics steps;
* ``train_loader`` / ``val_loader``: :mod:`merit_ds.data` loaders (``next``, ``get_batch``,
  ``grad_accum``, ``state_dict``/``load_state_dict``).

Every method that reduces over ranks (:meth:`train_step`, :meth:`evaluate`, :meth:`save`) is
called by every rank.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from merit_ds.sharding import collective, reduce_trust_stats

from . import checkpoint as ckpt
from .data_source import DataError
from .diagnostics import AttentionLogitProbe, GradientNoiseScale, lm_loss
from .diversity import GradientDiversity
from .metrics import Throughput, compiled_graphs
from .optimizers import records_clip_fraction, records_trust_stats
from .preemption import Preempted, Preemption
from .run_config import UsageError
from .batch_schedule import TokenWarmupCosine
from .schedule import warmup_cosine

__all__ = ["Trainer", "LoopConfig", "CheckpointSaveError"]


class CheckpointSaveError(RuntimeError):
    """Rank 0 could not finalise a checkpoint; raised on every rank with the same message."""


@dataclass(frozen=True)
class LoopConfig:
    """What :meth:`Trainer.train` needs besides the trainer's parts: the cadences, in steps (0:
    never), and where checkpoints go."""

    ckpt_root: Path
    run_info: dict            # what a checkpoint records about the run (:func:`.loop.describe_run`)
    seq_len: int              # tokens per sequence: the throughput counts tokens step by step
    log_every: int            # read the loss and log (below 1: every step)
    diag_every: int           # large-batch diagnostics (also at step 1)
    eval_every: int           # validation loss (not at the last step: the final evaluation follows)
    ckpt_every: int
    keep_last: int
    progress: bool = True     # the step bar on rank 0
    count_graphs: bool = False  # --compile: log the graphs dynamo has compiled so far


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def _eager(on: bool):
    """Run compiled modules eagerly inside (``torch.compiler.set_stance``: no compile, no
    recompile, the compiled code kept for the next call); nothing when ``on`` is false."""
    return torch.compiler.set_stance("force_eager") if on else contextlib.nullcontext()


class _Finaliser:
    """Rank 0's part of a save, :func:`.checkpoint.finalize` + :func:`.checkpoint.prune`, in a
    thread. hashlib and file reads release the GIL, so the hashing overlaps the training steps
    that follow. Non-daemon: an interpreter exiting normally completes the checkpoint first."""

    def __init__(self, ckpt_root: Path, tag: str, run_info: dict, step: int, keep_last: int, start: bool):
        self.path, self.error, self.thread = ckpt_root / tag, None, None
        if start:
            self.thread = threading.Thread(target=self._run, args=(ckpt_root, tag, run_info, step, keep_last),
                                           name=f"merit_ds-finalise-{tag}")
            self.thread.start()

    def _run(self, ckpt_root, tag, run_info, step, keep_last) -> None:
        try:
            ckpt.finalize(ckpt_root, f".tmp-{tag}", tag, run_info, step)
            ckpt.prune(ckpt_root, keep_last)
        except Exception as exc:  # every rank must learn it, not wait in a barrier until killed
            self.error = f"checkpoint {self.path}: finalisation on rank 0 failed: {type(exc).__name__}: {exc}"

    def join(self) -> Optional[str]:
        if self.thread is not None:
            self.thread.join()
        return self.error


class Trainer:
    """Step, evaluate, save, resume. :attr:`step` counts completed optimizer steps."""

    def __init__(self, engine, runner, basic, optimizer: str, train_loader, val_loader, *, steps: int,
                 warmup: int, floor: float, tokens_per_step: int, zero_stage: int, diversity_probe: int = 0,
                 batch_table=None, lr_rule: str = "tokens", lean_loss: bool = False):
        self.engine, self.runner, self.basic = engine, runner, basic
        # the loss inside the engine's forward, chunked over tokens (.lean_loss; the model class was built for it)
        self.lean_loss = lean_loss
        self.train_loader, self.val_loader = train_loader, val_loader
        self.steps, self.tokens_per_step, self.zero_stage = steps, tokens_per_step, zero_stage
        # --batch-schedule (:mod:`.batch_schedule`): every step's global batch, and the lr by tokens
        self.batch_table = batch_table
        self.batch_now: Optional[int] = None  # the batch the engine and loader are set to (None: not yet set)
        if batch_table is not None:
            if batch_table.steps != steps:
                raise ValueError(f"the batch schedule has {batch_table.steps} steps, the run {steps}")
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(basic, TokenWarmupCosine(batch_table, warmup, floor,
                                                                                        lr_rule))
        else:
            self.scheduler = warmup_cosine(basic, warmup, steps, floor)
        self.probe = AttentionLogitProbe(engine.module)
        self.gns = GradientNoiseScale()
        # per-example gradients of up to this many of each rank's sequences per diagnostics step (0: off)
        self.diversity = GradientDiversity(diversity_probe)
        self.trust_stats = records_trust_stats(optimizer)      # MERIT and LAMB record trust ratios
        self.clip_fraction = records_clip_fraction(optimizer)  # only MERIT clips its update
        self.step = 0
        self.saved_step: Optional[int] = None  # the step of the last checkpoint saved or resumed from
        self.loss_acc: Optional[torch.Tensor] = None  # float64 on the device: micro-batch losses since the last read
        self.loss_count = 0
        self._pending: Optional[_Finaliser] = None  # a checkpoint being finalised (rank 0: in a thread)

    # --- one optimizer step ------------------------------------------------------------------------
    def train_step(self, diagnostics: bool = False, read: bool = True) -> dict:
        """Step ``self.step + 1`` over ``grad_accum`` micro-batches; its record for metrics.jsonl.

        No host sync per micro-batch: each micro-batch's loss is added (float64) to an accumulator
        on the device (:attr:`loss_acc`). ``read=False`` (a step between log steps) leaves it
        there and returns only ``step``, ``lr`` and ``tokens``; ``read=True`` (a log step) reads
        it once -- summed over ranks when there are several -- and reports ``loss``, the mean
        train loss over the steps since the last read, and the gradient norm.

        ``diagnostics``: also the max attention logit (first micro-batch), the trust-ratio
        statistics of this very step (MERIT, LAMB) and the gradient noise scale (not ZeRO-3);
        these read values on the host, so call them on log steps."""
        engine, basic, world = self.engine, self.basic, self.runner.world
        step = self.step + 1
        if diagnostics and self.trust_stats:  # statistics of this step only, recorded inside the step
            basic.partial_stats.clear()
            basic.track_stats = True
        lr_now = basic.param_groups[0]["lr"]
        first, max_logit = None, None
        if self.batch_table is not None:
            self.apply_batch(self.batch_table.batch(step))
        probe: list = []  # the first sequences of this rank's share of the step, for the gradient diversity
        want = self.diversity.probe if diagnostics else 0
        accum = self.train_loader.grad_accum
        if self.loss_acc is None or self.loss_acc.device != torch.device(engine.device):
            self.loss_acc = torch.zeros((), dtype=torch.float64, device=engine.device)
        for micro_step in range(accum):
            x, y = next(self.train_loader)
            # asynchronous from pinned memory (the prefetching loader pins on CUDA); a no-op on CPU
            x, y = x.to(engine.device, non_blocking=True), y.to(engine.device, non_blocking=True)
            if first is None:
                first = (x, y)
            if sum(p[0].size(0) for p in probe) < want:
                probe.append((x, y))
            probing = diagnostics and micro_step == 0
            if probing:
                self.probe.arm()
            # The probed forward runs eager under --compile: its hooks read values on the host
            # and guard on `armed`, which would recompile the model for diagnostics steps.
            with self.runner.micro_context(), _eager(probing and self.compiled):
                loss = engine(input_ids=x, targets=y) if self.lean_loss else lm_loss(engine(input_ids=x).logits, y)
                if probing:
                    max_logit = self.probe.collect()
                self.runner.backward_step(loss)
            self.loss_acc += loss.detach().double()  # stays on the device
        self.loss_count += accum
        self.scheduler.step()
        self.step = step
        tokens = (self.batch_table.tokens_before(step + 1) if self.batch_table is not None
                  else step * self.tokens_per_step)
        record = {"step": step, "lr": lr_now, "tokens": tokens, "global_batch": self.train_loader.global_batch}
        if read:
            record["loss"] = self.read_loss()
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
        if diagnostics:
            record["max_attn_logit"] = max_logit
            if self.trust_stats:
                basic.track_stats = False
                summary = reduce_trust_stats(basic)  # 5 scalars per rank; every rank joins
                if summary:
                    if not self.clip_fraction:  # LAMB does not clip: the fraction would always be 0
                        summary.pop("clip_fraction", None)
                    record.update(summary)
            with _eager(self.compiled):  # half micro-batches: new shapes, a recompile under --compile
                noise = self.gns.measure(engine.module, *first, world) if self.zero_stage < 3 else None
            if noise:
                record.update(noise)
            if want:
                with _eager(self.compiled):  # vmap over per-example gradients: never through the compiled graph
                    diversity = self.diversity.measure(engine.module, torch.cat([p[0] for p in probe]),
                                                       torch.cat([p[1] for p in probe]), self.zero_stage)
                # the bound beside the batch this step used (sequences over all ranks)
                record.update(diversity, gdiv_batch=accum * first[0].size(0) * world)
        return record

    @property
    def compiled(self) -> bool:
        """Whether the model is ``torch.compile``d (``engine.compile`` = ``nn.Module.compile``).
        Checked before touching ``torch.compiler``: its first use imports dynamo (seconds)."""
        return getattr(self.engine.module, "_compiled_call_impl", None) is not None

    def apply_batch(self, global_batch: int) -> None:
        """Set the global batch of the next step (between steps only): the loader takes that many
        sequences, the engine accumulates over the matching number of micro-batches (its own
        ``set_train_batch_size``; the micro-batch stays). Also on the first step after a resume:
        the engine and loader are built at the schedule's first batch."""
        if global_batch == self.batch_now:
            return
        self.train_loader.set_global_batch(global_batch)
        self.runner.set_global_batch(global_batch)
        self.batch_now = global_batch

    def read_loss(self) -> float:
        """Mean train loss since the last read (one host sync; one all-reduce with several ranks)."""
        total, count = self.loss_acc, self.loss_count
        if dist.is_initialized() and dist.get_world_size() > 1:
            total = total.clone()
            collective.all_reduce(total)
            count *= dist.get_world_size()
        value = float(total) / count
        self.loss_acc.zero_()
        self.loss_count = 0
        return value

    # --- the loop ----------------------------------------------------------------------------------
    def train(self, config: LoopConfig, meter: Throughput, log: Callable[[dict, int], None],
              preemption: Optional[Preemption] = None) -> None:
        """Steps :attr:`step` + 1 to :attr:`steps` (after a resume: from the checkpoint's step on).

        Every step trains (:meth:`train_step`); on a log step (every ``log_every``, the last one, and
        any step that measures diagnostics, evaluates or checkpoints) the loss is read and the
        step's record -- with the interval's throughput (``meter``), the validation loss on eval
        steps -- goes to ``log(record, step)``; a non-finite loss stops the run there
        (:class:`FloatingPointError` naming the last good checkpoint). Checkpoints are saved in the
        background (:meth:`save`); the last one and the final evaluation are :mod:`.finish`'s.

        ``preemption`` (:mod:`.preemption`): after each step the ranks agree whether a SIGTERM /
        SIGUSR1 arrived; if so the step's checkpoint is saved and made final, and
        :class:`~.preemption.Preempted` is raised on every rank."""
        from tqdm.auto import tqdm

        bar = tqdm(total=self.steps, initial=self.step, disable=self.runner.rank != 0 or not config.progress,
                   unit="step", dynamic_ncols=True, mininterval=1.0)
        self.engine.train()
        meter.restart()  # the first interval starts at the first step
        log_every = max(1, config.log_every)
        for step in range(self.step + 1, self.steps + 1):
            diagnostics = config.diag_every > 0 and (step % config.diag_every == 0 or step == 1)
            evaluating = config.eval_every > 0 and step % config.eval_every == 0 and step != self.steps
            saving = config.ckpt_every > 0 and step % config.ckpt_every == 0
            # read the loss (one host sync) on log steps, and before an eval or a checkpoint so that the
            # interval's throughput does not include them
            read = step % log_every == 0 or step == self.steps or diagnostics or evaluating or saving
            record = self.train_step(diagnostics=diagnostics, read=read)
            meter.steps += 1
            meter.tokens += record["global_batch"] * config.seq_len
            if read:
                record.update(meter.interval())
                if evaluating:
                    started = time.perf_counter()
                    record.update(self.evaluate())
                    record["eval_time_s"] = time.perf_counter() - started  # its share of the run: docs/recipes.md
                if config.count_graphs:  # graphs dynamo compiled so far: flat after warm-up, or something recompiles
                    record["compile_graphs"] = compiled_graphs()
                log(record, step)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", **(
                    {"val": f"{record['val_loss']:.3f}+-{record['val_loss_se']:.3f}"} if "val_loss" in record else {}))
                if not math.isfinite(record["loss"]):
                    root = config.ckpt_root
                    raise FloatingPointError(f"training loss is {record['loss']} at step {step}; last good checkpoint: "
                                             f"{ckpt.latest_checkpoint(root) if root.exists() else None}")
            bar.update(1)
            if saving:
                # rank 0 hashes and finalises in a thread while every rank trains on; its outcome
                # is collected at the next save or finish_save
                self.save(config.ckpt_root, config.run_info, config.keep_last, background=True)
            if evaluating or saving:
                meter.restart()  # eval and checkpoint time is not training throughput
            signum = preemption.requested() if preemption is not None else None
            if signum:
                bar.close()
                path = config.ckpt_root / ckpt.tag_for(step)
                if self.saved_step != step:
                    self.save(config.ckpt_root, config.run_info, config.keep_last)
                self.finish_save()  # metadata, rename, latest: final before the process exits
                raise Preempted(signum, step, path)
        bar.close()

    # --- validation ----------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Loss and perplexity on the fixed validation blocks (:class:`.data_source.ValidationSet`).

        Token-weighted mean over every block of the set, each counted once: per-rank sums of
        token losses and token and block counts, summed over ranks in float64 (one all-reduce).
        Independent of the world size and micro-batch up to float rounding. ``val_blocks`` is the
        number of blocks counted over all ranks (asserted equal to the set's size).

        ``val_loss_se``: the standard error of ``val_loss`` over blocks, ``sqrt(s^2 / n)`` with
        ``s^2`` the sample variance of the blocks' mean losses (blocks have equal length, so
        ``val_loss`` is their mean). Tokens within a block are correlated; blocks are the unit.
        Two runs evaluated on the same set differ by less noise than both SEs together (paired)."""
        engine, val = self.engine, self.val_loader
        engine.eval()
        # loss sum, tokens, blocks, sum of block means, sum of squared block means
        acc = torch.zeros(5, dtype=torch.float64, device=engine.device)
        with torch.no_grad():
            for x, y in val.batches():
                x, y = x.to(engine.device), y.to(engine.device)
                if getattr(self, "lean_loss", False):
                    losses = engine(input_ids=x, targets=y, loss_reduction="none").reshape(-1)
                else:
                    logits = engine(input_ids=x).logits
                    losses = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="none")
                per_block = losses.double().view(x.shape[0], -1).mean(1)
                acc[0] += losses.double().sum()
                acc[1] += losses.numel()
                acc[2] += x.shape[0]
                acc[3] += per_block.sum()
                acc[4] += per_block.square().sum()
        engine.train()
        if dist.is_initialized() and dist.get_world_size() > 1:
            collective.all_reduce(acc)
        total, tokens, blocks, s1, s2 = (float(v) for v in acc.cpu())
        if int(blocks) != val.blocks:
            raise RuntimeError(f"validation counted {int(blocks)} blocks, the set holds {val.blocks}")
        loss = total / tokens
        n = int(blocks)
        var = max(0.0, (s2 - s1 * s1 / n) / (n - 1)) if n > 1 else float("nan")
        return {"val_loss": loss, "val_loss_se": math.sqrt(var / n), "val_ppl": math.exp(min(loss, 50.0)),
                "val_blocks": n}

    # --- checkpoints -----------------------------------------------------------------------------------
    def client_state(self) -> dict:
        """What DeepSpeed's files do not hold: loader position, scheduler, RNG, noise-scale EMAs.

        It lands in rank 0's model-states file: the loader position and scheduler are the same on
        every rank; the RNG state is rank 0's (the recipes use no dropout and a deterministic data
        order, so nothing in the loop draws random numbers)."""
        return {"step": self.step, "loader": self.train_loader.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(), "gns": self.gns.state_dict()}

    def save(self, ckpt_root: Path, run_info: dict, keep_last: int, *, background: bool = False) -> Path:
        """An atomic checkpoint of step :attr:`step` (see :mod:`.checkpoint`); returns its path.

        Every rank writes its DeepSpeed files into ``.tmp-<tag>``; rank 0 then finalises (fsync,
        sha256 of every file, metadata, rename, ``latest``, prune). Hashing reads every byte of
        the checkpoint -- GBs at GPT-2 scale -- so with ``background=True`` rank 0 finalises in a
        thread and every rank returns to training at once: nothing touches the ``.tmp`` files
        until the next save, ``latest`` moves only once the metadata is written, so a crash while
        hashing leaves the previous checkpoint the latest valid one. Rank 0's outcome reaches
        every rank at the next :meth:`save` or at :meth:`finish_save` (the loop calls it at the
        end), as the same :class:`CheckpointSaveError` everywhere."""
        self.finish_save()  # the previous save's files are final before this one starts
        rank, world = self.runner.rank, self.runner.world
        tag = ckpt.tag_for(self.step)
        if rank == 0:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            # a save killed earlier (maybe at another world size) leaves files DeepSpeed would not
            # overwrite, and finalize would checksum them in
            shutil.rmtree(ckpt_root / f".tmp-{tag}", ignore_errors=True)
        if world > 1:
            dist.barrier()
        error = None
        try:
            self.engine.save_checkpoint(str(ckpt_root), tag=f".tmp-{tag}",
                                        client_state={"merit_ds": self.client_state()}, save_latest=False)
        except (OSError, RuntimeError) as exc:  # a full disk, permissions; torch's writer raises RuntimeError
            error = f"rank {rank}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if world > 1:  # every rank's files are written, or every rank learns which one failed
            errors = [None] * world
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e), None)
        if error:
            if rank == 0:
                shutil.rmtree(ckpt_root / f".tmp-{tag}", ignore_errors=True)  # the partial save: its space back
            last = ckpt.latest_checkpoint(ckpt_root) if (ckpt_root / ckpt.LATEST).exists() else None
            raise CheckpointSaveError(
                f"saving step {self.step} to {ckpt_root / tag} failed ({error}); nothing of it was kept and "
                f"{'the last good checkpoint is ' + str(last) if last else 'there is no earlier checkpoint'} "
                "(latest unchanged). Free space on that filesystem (or fix its permissions) and run the same "
                "command again: it resumes from there.")
        self._pending = _Finaliser(ckpt_root, tag, run_info, self.step, keep_last, start=rank == 0)
        self.saved_step = self.step
        if not background:
            self.finish_save()
        return ckpt_root / tag

    def finish_save(self) -> None:
        """Wait for the pending checkpoint's finalisation (collective: every rank calls it);
        raise :class:`CheckpointSaveError` on every rank if rank 0's failed. No-op without one."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        error = pending.join()  # rank 0: the thread's outcome; other ranks: None
        if self.runner.world > 1:
            verdict = [error]
            dist.broadcast_object_list(verdict, src=0)  # instead of a barrier: carries rank 0's outcome
            error = verdict[0]
        if error is not None:
            raise CheckpointSaveError(error)

    def resume(self, load_from: Path, resume_from: Optional[Path] = None) -> int:
        """Load a validated checkpoint (``load_from``: it, or its universal copy); returns the step."""
        resume_from = resume_from or load_from
        load_path, client_state = self.engine.load_checkpoint(str(load_from.parent), tag=load_from.name,
                                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None or "merit_ds" not in (client_state or {}):
            raise UsageError(f"DeepSpeed could not load {load_from}")
        state = client_state["merit_ds"]
        try:
            self.train_loader.load_state_dict(state["loader"])
        except DataError as exc:
            raise UsageError(f"checkpoint {resume_from} does not match the data: {exc}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        if "gns" in state:  # checkpoints written before the noise scale's EMAs were saved lack it
            self.gns.load_state_dict(state["gns"])
        self.step = int(state["step"])
        self.saved_step = self.step
        if self.batch_table is not None:
            # the loader must stand exactly where the schedule's first `step` steps leave it
            want = self.batch_table.sequences_before(self.step + 1)
            if self.train_loader.consumed != want or self.train_loader.micro_step:
                raise UsageError(f"checkpoint {resume_from}: the data loader consumed {self.train_loader.consumed} "
                                 f"sequences in {self.step} steps, the batch schedule takes {want}")
        return self.step
