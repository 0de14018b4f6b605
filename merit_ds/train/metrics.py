"""What the loop measures and where its records go: the throughput/MFU meter (:class:`Throughput`,
:func:`peak_flops`), dynamo's graph count under ``--compile`` (:func:`compiled_graphs`), the
wall-clock keys of ``metrics.jsonl`` (:data:`TIMING_KEYS`) and the record sink (:class:`RunLog`:
``metrics.jsonl`` and the trackers, rank 0)."""

from __future__ import annotations

import time
from typing import Optional

import torch

from .plan import GPUS, flops_per_token
from .tracking import MetricsLog

__all__ = ["TIMING_KEYS", "RunLog", "Throughput", "compiled_graphs", "peak_flops"]

#: Wall-clock keys of metrics.jsonl (they differ between otherwise identical runs).
TIMING_KEYS = frozenset({"step_time_s", "tokens_per_s", "mfu", "peak_memory_gib",
                         "train_step_time_s", "train_tokens_per_s", "train_mfu", "eval_time_s"})


class RunLog:
    """The records of a run: appended to ``metrics.jsonl`` and sent to the trackers (their numeric
    values), by rank 0 only; on other ranks every call is a no-op, so every rank can call it."""

    def __init__(self, metrics: MetricsLog, trackers=(), rank: int = 0):
        self.metrics, self.trackers, self.rank = metrics, list(trackers), rank

    def __call__(self, record: dict, step: int) -> None:
        if self.rank == 0:
            self.metrics.write(record)
            for t in self.trackers:
                t.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=step)

    def read(self) -> list[dict]:
        """Every record written so far (``metrics.jsonl``, read back)."""
        return self.metrics.read()

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()


def compiled_graphs() -> int:
    """Graphs ``torch.compile`` has compiled in this process (recompiles included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def peak_flops(tflops: Optional[float], device) -> Optional[float]:
    """Peak dense FLOP/s of one device for MFU: ``--peak-tflops``, else the GPU's bf16 datasheet
    value by name (:data:`.plan.GPUS`), else ``None`` (CPU: no MFU)."""
    if tflops:
        return float(tflops) * 1e12
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, gpu in (("h200", "h200"), ("h100 pcie", "h100-pcie"), ("h100", "h100"), ("a100", "a100")):
        if key in name:
            return GPUS[gpu]["peak_flops"]
    return None


class Throughput:
    """Step time, tokens/s, MFU and peak memory per log interval, and over the whole run.

    An interval runs from the previous read (the loss read is the host sync that makes the wall
    time include the device's work) to this one; eval and checkpoint time are left out
    (:meth:`restart`). MFU = model FLOPs per token (:func:`.plan.flops_per_token`, attention
    included) x tokens/s / (ranks x peak FLOP/s per device)."""

    def __init__(self, flops_per_tok: float, tokens_per_step: int, world: int, peak: Optional[float], device,
                 clock=time.perf_counter):
        self.flops_per_tok, self.tokens_per_step, self.world, self.peak = flops_per_tok, tokens_per_step, world, peak
        self.cuda = torch.device(device).type == "cuda"
        self.device, self.clock = device, clock
        self.total_steps, self.total_time, self.total_tokens = 0, 0.0, 0
        self.restart()

    @classmethod
    def for_run(cls, rc, world: int, peak_tflops: Optional[float], device) -> "Throughput":
        """The meter for a run (:class:`.run_config.RunConfig`): FLOPs per token of the model it
        trains, with its shape overrides (``--model-override``, ``--family``)."""
        shape = {k: v for k, v in rc.overrides.items() if k in ("n_layer", "n_embd", "n_head", "vocab_size")}
        return cls(flops_per_token(rc.preset.with_overrides(seq_len=rc.seq_len, **shape), rc.seq_len),
                   rc.plan.tokens_per_step, world, peak_flops(peak_tflops, device), device)

    def restart(self) -> None:
        self.steps, self.t0 = 0, self.clock()
        self.tokens = 0  # tokens of the interval's steps, when the caller counts them (batch schedules)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def interval(self) -> dict:
        elapsed = self.clock() - self.t0
        steps = max(self.steps, 1)
        self.total_steps += self.steps
        self.total_time += elapsed
        self.total_tokens += self.tokens
        out = self._rates(elapsed, steps, self.tokens)
        if self.cuda:
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 1024 ** 3
        self.restart()
        return out

    def _rates(self, elapsed: float, steps: int, tokens: int = 0) -> dict:
        step_time = elapsed / steps
        if tokens:  # counted by the caller: steps of different sizes (batch schedule)
            tokens_per_s = tokens / elapsed if elapsed > 0 else float("inf")
        else:
            tokens_per_s = self.tokens_per_step / step_time if step_time > 0 else float("inf")
        out = {"step_time_s": step_time, "tokens_per_s": tokens_per_s}
        if self.peak:
            out["mfu"] = self.flops_per_tok * tokens_per_s / (self.world * self.peak)
        return out

    def summary(self) -> dict:
        if self.total_steps == 0:
            return {}
        return {f"train_{k}": v for k, v in self._rates(self.total_time, self.total_steps, self.total_tokens).items()}
