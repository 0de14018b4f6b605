"""Batch-size schedules: the global batch as a function of the tokens trained so far.

Syntax (``--batch-schedule``): comma-separated phases, each starting at a token position::

    16@0,64@200000                 16 sequences from token 0, 64 from token 200,000
    ramp:16..128@0..500000         linear ramp from 16 (token 0) to 128 (token 500,000), then 128
    16@0,ramp:16..64@1e5..3e5,128@6e5   phases and ramps mixed

Sizes are what ``--global-batch`` accepts (an integer or a preset: ``1k`` = 1024, ...); token
positions are integers, or scientific notation that is an integer (``2e5``). The first phase
starts at token 0; positions strictly increase; a ramp ends at or before the next phase starts.

Rules (all integer arithmetic, so every rank and every resume computes the same sequence):

* **Which batch a step takes.** The schedule's value at the number of tokens trained *before* the
  step: a step that starts before a phase boundary keeps the old batch even if it crosses it.
* **Ramp rounding.** Inside a ramp the exact value ``B0 + (B1 - B0) (t - T0) / (T1 - T0)`` is
  rounded toward ``B0`` to a multiple of the ramp's quantum ``q = gcd(B0, B1)``: the batch moves
  to the next level only once the line reaches it, both ends are hit exactly, and the levels do
  not depend on the world size (so a run resumed on another number of ranks takes the same
  sequence). Every level is a multiple of ``micro_batch x world`` iff ``q`` is; checked.
* **Length.** With a token budget the run takes steps until the tokens trained reach it (never
  cut short, as with a constant batch); with ``--steps N``, N steps of the schedule.
* **Learning rate** (:class:`TokenWarmupCosine`): the warmup-cosine schedule is a function of
  tokens, not steps: warmup ends at the tokens of the warmup's last step, the cosine runs to the
  tokens of the last step. With a constant batch this is the step schedule exactly (same
  rationals, so the same floats). ``lr_rule="sqrt"`` also multiplies by ``sqrt(B_t / B_0)``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

__all__ = ["BatchScheduleError", "Phase", "BatchSchedule", "StepTable", "parse_batch_schedule", "build_step_table",
           "TokenWarmupCosine", "LR_RULES", "warmup_steps_by_tokens"]

#: How the lr responds to a batch change: ``tokens`` (default: the token-based schedule alone, as
#: GPT-3 did across its batch ramp) or ``sqrt`` (also scaled by sqrt(B_t / B_0), the square-root
#: rule the recipes use between batch sizes).
LR_RULES = ("tokens", "sqrt")


class BatchScheduleError(ValueError):
    """A batch schedule that cannot be parsed or trained."""


@dataclass(frozen=True)
class Phase:
    start: int              # token position where the phase begins
    batch: int              # constant batch, or the ramp's first batch
    end: Optional[int] = None        # ramps: token position where the ramp reaches end_batch
    end_batch: Optional[int] = None  # ramps: the last batch

    @property
    def ramp(self) -> bool:
        return self.end is not None

    @property
    def quantum(self) -> int:
        return math.gcd(self.batch, self.end_batch) if self.ramp else self.batch

    def spec(self) -> str:
        return (f"ramp:{self.batch}..{self.end_batch}@{self.start}..{self.end}" if self.ramp
                else f"{self.batch}@{self.start}")

    def batch_at(self, tokens: int) -> int:
        if not self.ramp or tokens >= self.end:
            return self.end_batch if self.ramp else self.batch
        q, span = self.quantum, self.end - self.start
        num = (self.end_batch - self.batch) * (tokens - self.start)
        # exact value B0 + num / span, rounded toward B0 to a multiple of q
        levels = num // (span * q) if num >= 0 else -((-num) // (span * q))
        return self.batch + levels * q


@dataclass(frozen=True)
class BatchSchedule:
    phases: tuple

    @property
    def spec(self) -> str:
        """Canonical text (sizes and positions as plain integers): what checkpoints record."""
        return ",".join(p.spec() for p in self.phases)

    @property
    def first_batch(self) -> int:
        return self.phases[0].batch

    @property
    def quantum(self) -> int:
        """What every batch the schedule takes is a multiple of (the gcd of its phases' quanta):
        the unit a micro-batch x world must divide for one micro-batch to serve the whole run."""
        return math.gcd(*(p.quantum for p in self.phases))

    def batches(self) -> list[int]:
        """Every batch the schedule can take (ramp levels included)."""
        out = set()
        for p in self.phases:
            if p.ramp:
                lo, hi = sorted((p.batch, p.end_batch))
                out.update(range(lo, hi + 1, p.quantum))
            else:
                out.add(p.batch)
        return sorted(out)

    def batch_at(self, tokens: int) -> int:
        phase = self.phases[0]
        for p in self.phases:
            if p.start <= tokens:
                phase = p
        return phase.batch_at(tokens)

    def check_divisible(self, unit: int, micro_batch: int, world: int) -> None:
        """Every batch the schedule takes must split into micro-batches over the ranks."""
        for p in self.phases:
            if p.quantum % unit:
                what = (f"ramp {p.spec()} moves in steps of gcd({p.batch}, {p.end_batch}) = {p.quantum} sequences"
                        if p.ramp else f"phase {p.spec()} has a global batch of {p.batch} sequences")
                raise BatchScheduleError(
                    f"batch schedule: {what}, not a multiple of micro_batch {micro_batch} x world {world} = {unit}: "
                    f"every step's batch must be; use sizes that are multiples of {unit} (or a smaller --micro-batch)")


_TOKEN = re.compile(r"^\d+$|^\d+(\.\d+)?[eE]\+?\d+$")


def _tokens(text: str, where: str) -> int:
    text = text.strip()
    if not _TOKEN.match(text):
        raise BatchScheduleError(f"batch schedule {where}: token position {text!r} is not a non-negative integer "
                                 f"(write 200000 or 2e5; no k/M suffixes: sizes use them for 1024s)")
    value = float(text) if ("e" in text.lower()) else int(text)
    if value != int(value):
        raise BatchScheduleError(f"batch schedule {where}: token position {text!r} is not an integer")
    return int(value)


def _size(text: str, where: str) -> int:
    from .presets import parse_batch

    try:
        return parse_batch(text.strip())
    except ValueError as exc:
        raise BatchScheduleError(f"batch schedule {where}: {exc}") from None


def parse_batch_schedule(text: str) -> BatchSchedule:
    """``"16@0,64@200000"`` / ``"ramp:16..128@0..500000"`` (see the module docstring)."""
    text = str(text or "").strip()
    if not text:
        raise BatchScheduleError("batch schedule is empty: write e.g. 16@0,64@200000 or ramp:16..128@0..500000")
    phases = []
    for raw in text.split(","):
        item = raw.strip()
        where = f"{text!r}, phase {item!r}"
        if item.startswith("ramp:"):
            m = re.fullmatch(r"ramp:([^.@]+)\.\.([^.@]+)@([^@]+?)\.\.([^@]+)", item)
            if not m:
                raise BatchScheduleError(f"batch schedule {where}: a ramp is ramp:B0..B1@T0..T1, "
                                         f"e.g. ramp:16..128@0..500000")
            b0, b1 = _size(m.group(1), where), _size(m.group(2), where)
            t0, t1 = _tokens(m.group(3), where), _tokens(m.group(4), where)
            if t1 <= t0:
                raise BatchScheduleError(f"batch schedule {where}: the ramp must end after it starts ({t0} .. {t1})")
            if b0 == b1:
                raise BatchScheduleError(f"batch schedule {where}: a ramp from {b0} to {b1} is a constant phase: "
                                         f"write {b0}@{t0}")
            phases.append(Phase(t0, b0, t1, b1))
        else:
            if item.count("@") != 1:
                raise BatchScheduleError(f"batch schedule {where}: a phase is SIZE@TOKEN (e.g. 64@200000), "
                                         f"a ramp ramp:B0..B1@T0..T1")
            size, tok = item.split("@")
            phases.append(Phase(_tokens(tok, where), _size(size, where)))
    if phases[0].start != 0:
        raise BatchScheduleError(f"batch schedule {text!r}: the first phase must start at token 0 "
                                 f"(it starts at {phases[0].start})")
    for prev, nxt in zip(phases, phases[1:]):
        if nxt.start <= prev.start:
            raise BatchScheduleError(f"batch schedule {text!r}: token positions must increase: "
                                     f"{nxt.spec()} starts at {nxt.start}, not after {prev.spec()} ({prev.start})")
        if prev.ramp and nxt.start < prev.end:
            raise BatchScheduleError(f"batch schedule {text!r}: {nxt.spec()} starts at {nxt.start}, before the ramp "
                                     f"{prev.spec()} ends ({prev.end})")
    return BatchSchedule(tuple(phases))


@dataclass(frozen=True)
class StepTable:
    """The run's steps under a schedule, run-length encoded: ``segments[i] = (first_step, steps, batch)``
    (steps counted from 1) and the tokens trained before each segment (``starts``)."""

    schedule: BatchSchedule
    seq_len: int
    segments: tuple     # (first step, number of steps, global batch)
    starts: tuple       # tokens trained before each segment's first step

    @property
    def steps(self) -> int:
        first, n, _ = self.segments[-1]
        return first + n - 1

    @property
    def total_tokens(self) -> int:
        return self.tokens_before(self.steps + 1)

    def _segment(self, step: int) -> int:
        if not 1 <= step <= self.steps + 1:
            raise IndexError(f"step {step} outside 1 .. {self.steps}")
        lo = 0
        for i, (first, _, _) in enumerate(self.segments):
            if first <= step:
                lo = i
        return lo

    def batch(self, step: int) -> int:
        """Global batch (sequences) of optimizer step ``step`` (1-based)."""
        if not 1 <= step <= self.steps:
            raise IndexError(f"step {step} outside 1 .. {self.steps}")
        return self.segments[self._segment(step)][2]

    def tokens_before(self, step: int) -> int:
        """Tokens trained by steps ``1 .. step - 1``."""
        if step == self.steps + 1:
            first, n, b = self.segments[-1]
            return self.starts[-1] + n * b * self.seq_len
        i = self._segment(step)
        first, _, b = self.segments[i]
        return self.starts[i] + (step - first) * b * self.seq_len

    def sequences_before(self, step: int) -> int:
        return self.tokens_before(step) // self.seq_len

    def phases(self) -> list[dict]:
        """The schedule's phases with the steps each takes (for the banner): constant phases and
        ramps; a ramp lists its levels."""
        out = []
        bounds = [p.start for p in self.schedule.phases[1:]] + [None]
        for p, stop in zip(self.schedule.phases, bounds):
            segs = [(s, n, b) for (s, n, b), t in zip(self.segments, self.starts)
                    if t >= p.start and (stop is None or t < stop)]
            if segs:
                out.append({"phase": p.spec(), "first_step": segs[0][0], "steps": sum(n for _, n, _ in segs),
                            "levels": [(b, n) for _, n, b in segs]})
        return out


def build_step_table(schedule: BatchSchedule, seq_len: int, *, token_budget: Optional[int] = None,
                     max_steps: Optional[int] = None) -> StepTable:
    """Steps of a run: until ``token_budget`` tokens are reached, or ``max_steps`` steps."""
    if (token_budget is None) == (max_steps is None):
        raise BatchScheduleError("give exactly one of a token budget or a number of steps")
    if seq_len <= 0:
        raise BatchScheduleError(f"sequence length must be positive, got {seq_len}")
    if max_steps is not None and max_steps <= 0:
        raise BatchScheduleError(f"steps must be a positive integer, got {max_steps!r}")
    if token_budget is not None and token_budget <= 0:
        raise BatchScheduleError(f"token budget must be positive, got {token_budget}")
    segments, starts = [], []
    tokens, step = 0, 0
    # Walk segment by segment: within a constant stretch the batch cannot change before the next
    # boundary (a phase start, or the token where a ramp reaches its next level), so a whole
    # stretch is one division, not a loop over its steps.
    while (token_budget is None or tokens < token_budget) and (max_steps is None or step < max_steps):
        b = schedule.batch_at(tokens)
        per = b * seq_len
        nxt = _next_change(schedule, tokens)
        limits = []
        if nxt is not None:
            limits.append(-(-(nxt - tokens) // per))            # steps until a step starts at/after nxt
        if token_budget is not None:
            limits.append(-(-(token_budget - tokens) // per))   # steps until the budget is reached
        if max_steps is not None:
            limits.append(max_steps - step)
        n = max(1, min(limits))
        if segments and segments[-1][2] == b:
            first, m, _ = segments[-1]
            segments[-1] = (first, m + n, b)
        else:
            segments.append((step + 1, n, b))
            starts.append(tokens)
        step += n
        tokens += n * per
    return StepTable(schedule, seq_len, tuple(segments), tuple(starts))


def warmup_steps_by_tokens(table: StepTable, fraction: float) -> int:
    """Warmup as a share of the tokens: the first step whose end reaches ``fraction`` of the run's
    tokens (at least 1 when there is more than one step). With a constant batch this is
    ``ceil(fraction x steps)``, the constant-batch rule (:func:`.presets.warmup_steps`)."""
    import bisect

    if table.steps <= 1:
        return 0
    target = fraction * table.total_tokens
    return max(1, bisect.bisect_left(range(table.steps + 1), target, key=lambda k: table.tokens_before(k + 1)))


def _next_change(schedule: BatchSchedule, tokens: int) -> Optional[int]:
    """The smallest token position > ``tokens`` where the schedule's value may change."""
    cands = [p.start for p in schedule.phases if p.start > tokens]
    for p in schedule.phases:
        if p.ramp and p.start <= tokens < p.end:
            now = p.batch_at(tokens)
            target = now + (p.quantum if p.end_batch > p.batch else -p.quantum)
            # first t with batch_at(t) == target: |B1-B0| (t - T0) >= |target - B0| * span
            span, k = p.end - p.start, abs(target - p.batch)
            t = p.start + -(-(k * span) // abs(p.end_batch - p.batch))
            cands.append(min(max(t, tokens + 1), p.end))
    return min(cands) if cands else None


class TokenWarmupCosine:
    """LambdaLR factor by tokens under a batch schedule (picklable; see the module docstring).

    ``factor(t)`` for the step that starts after ``t`` completed steps, with ``a`` = tokens before
    it, ``b`` = tokens after it, ``W`` = tokens of the first ``warmup`` steps, ``N`` = all tokens::

        b / W                                                  t < warmup
        floor + (1 - floor) (1 + cos(pi min(1, (a - W) / max(1, N - W)))) / 2

    With a constant batch B these are (t+1)B / (wB) and (t-w)B / ((S-w)B): the very rationals of
    :class:`.schedule.WarmupCosine`, so the same floats. ``lr_rule="sqrt"`` multiplies by
    ``sqrt(B_t / B_1)`` (B_1: the first step's batch, the one the peak lr is quoted at)."""

    def __init__(self, table: StepTable, warmup: int, floor: float, lr_rule: str = "tokens"):
        if lr_rule not in LR_RULES:
            raise ValueError(f"lr rule must be one of {LR_RULES}, got {lr_rule!r}")
        if not 0 <= warmup <= table.steps:
            raise ValueError(f"warmup must be in [0, steps={table.steps}], got {warmup}")
        if not 0 <= floor <= 1:
            raise ValueError(f"floor must be in [0, 1], got {floor}")
        self.segments, self.starts, self.seq_len = list(table.segments), list(table.starts), table.seq_len
        self.steps, self.warmup, self.floor, self.lr_rule = table.steps, warmup, floor, lr_rule
        self.warmup_tokens = table.tokens_before(warmup + 1)
        self.total_tokens = table.total_tokens

    def _table(self) -> StepTable:
        return StepTable(None, self.seq_len, tuple(self.segments), tuple(self.starts))

    def __call__(self, t: int) -> float:
        table = self._table()
        step = min(t + 1, self.steps)  # LambdaLR also evaluates after the last step
        a = table.tokens_before(step) if t < self.steps else self.total_tokens
        b = a + table.batch(step) * self.seq_len
        if t < self.warmup:
            factor = b / self.warmup_tokens
        else:
            progress = min(1.0, (a - self.warmup_tokens) / max(1, self.total_tokens - self.warmup_tokens))
            factor = self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.lr_rule == "sqrt":
            factor *= math.sqrt(table.batch(step) / self.segments[0][2])
        return factor
