"""The grid: optimizer x global batch x peak lr x seed at one fixed token budget; optionally x batch
schedule (``--schedules``).

``--schedules "const;16@0,64@100000;ramp:16..64@0..100000"``: entries separated by ``;`` (a schedule
itself uses ``,``, ``@``, ``..`` and ``ramp:``, never ``;``). ``const`` stands for the constant-batch
cells of ``--batch-sizes``; every other entry is a ``--batch-schedule`` (one cell per optimizer, lr
and seed; its ``batch`` is the schedule's last phase's batch). All at the same token budget.

``--lrs 1e-3,3e-3`` gives every optimizer the same lrs; ``--lrs "merit=1e-2,3e-2;adamw=1e-3,3e-3"``
gives each its own (an optimizer left out of a per-optimizer spec is an error);
``--lrs "merit@8=6e-3,1.2e-2;merit@64=2.5e-2,5e-2;adamw=1e-3"`` gives an optimizer its own grid at
each batch (``opt=`` is then the grid of the batches without an ``opt@B=`` entry).

Every cell of a grid that compares batch sizes (two or more ``--batch-sizes``) must get at least
:data:`MIN_STEPS` optimizer steps (:func:`check_min_steps`): a cell with fewer mostly measures how
many steps it had, not the optimizer (issue #24: the first default study gave batch 128 32 steps).
``--allow-short-cells`` runs such a grid anyway. A short grid of one batch size (a smoke test, a
plugin check) makes no claim across batch sizes: it runs, with a warning. Every report of a table
with a short cell carries a warning block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from merit_ds.optim import registry

from .cell import CellSpec

__all__ = ["GridError", "Grid", "parse_list", "parse_lrs", "parse_schedules", "CONST", "DEFAULT_STUDY", "CPU_QUICK_STUDY",
           "GPU_STUDY", "MIN_STEPS", "cell_steps", "short_cells", "check_min_steps"]

#: The fewest optimizer steps a cell may get without ``--allow-short-cells``.
MIN_STEPS = 100

#: The schedules-axis entry for the constant-batch cells of --batch-sizes.
CONST = "const"


class GridError(ValueError):
    """A grid that cannot be run (bad flags, or a budget other than the one already in --out)."""


def parse_list(text: str, kind=float, name: str = "value") -> list:
    try:
        values = [kind(v) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise GridError(f"cannot read {name}s from {text!r}") from None
    if not values:
        raise GridError(f"no {name}s in {text!r}")
    if len(set(values)) != len(values):
        raise GridError(f"repeated {name} in {text!r}")
    return values


def parse_lrs(text: str, optimizers: list[str], batches: list[int] | None = None) -> dict:
    """``"1e-3,3e-3"`` (all optimizers), ``"merit=1e-2,3e-2;adamw=1e-3"`` (per optimizer) or with
    per-batch entries ``"merit@8=6e-3,1.2e-2;merit@64=2.5e-2;adamw=1e-3"`` -> {optimizer: sorted lrs},
    or {optimizer: {batch: sorted lrs}} for an optimizer with ``@B`` entries (``batches``: the grid's
    batches, each of which must then get a grid, from its ``@B`` entry or the optimizer's plain one)."""
    text = str(text).strip()
    if not text:
        raise GridError("--lrs is empty: give the peak lrs (e.g. --lrs 1e-3,3e-3), or leave the flag out for the "
                        "preset's grid")
    if "=" not in text:
        lrs = sorted(parse_list(text, float, "lr"))
        out = {o: lrs for o in optimizers}
    else:
        plain, per_batch = {}, {}
        for part in text.split(";"):
            if not part.strip():
                continue
            if "=" not in part:
                raise GridError(f"--lrs {text!r}: write optimizer=lr,lr;optimizer@batch=lr,... for per-optimizer grids")
            name, values = part.split("=", 1)
            name = name.strip()
            batch = None
            if "@" in name:
                name, b = name.split("@", 1)
                try:
                    batch = int(b)
                except ValueError:
                    raise GridError(f"--lrs entry {part.strip()!r}: the batch after '@' must be an integer") from None
            if name not in optimizers:
                raise GridError(f"--lrs names {name!r}, which is not in --optimizers {','.join(optimizers)}")
            lrs = sorted(parse_list(values, float, "lr"))
            if batch is None:
                plain[name] = lrs
            else:
                if batches is not None and batch not in batches:
                    raise GridError(f"--lrs {name}@{batch}: batch {batch} is not in --batch-sizes "
                                    f"{','.join(map(str, batches))}")
                per_batch.setdefault(name, {})[batch] = lrs
        out = {}
        for o in optimizers:
            if o in per_batch:
                grid = dict(per_batch[o])
                for b in batches or []:
                    if b not in grid:
                        if o not in plain:
                            raise GridError(f"--lrs gives {o} no lr grid at batch {b} (add {o}@{b}=... or {o}=...)")
                        grid[b] = plain[o]
                out[o] = dict(sorted(grid.items()))
            elif o in plain:
                out[o] = plain[o]
        missing = [o for o in optimizers if o not in out]
        if missing:
            raise GridError(f"--lrs gives no lr grid for {', '.join(missing)}")
    for o, v in out.items():
        every = [lr for lrs in (v.values() if isinstance(v, dict) else [v]) for lr in lrs]
        if any(lr <= 0 for lr in every):
            raise GridError(f"lrs must be positive ({o}: {every})")
    return out


def parse_schedules(text: str) -> list[str]:
    """``"const;16@0,64@1e5;ramp:16..64@0..1e5"`` -> ``["const", "16@0,64@100000", "ramp:16..64@0..100000"]``
    (each schedule in its canonical form; repeats and bad schedules are errors)."""
    from merit_ds.train.batch_schedule import BatchScheduleError, parse_batch_schedule

    out = []
    for item in str(text).split(";"):
        item = item.strip()
        if not item:
            continue
        if item == CONST:
            spec = CONST
        else:
            try:
                spec = parse_batch_schedule(item).spec
            except BatchScheduleError as exc:
                raise GridError(f"--schedules entry {item!r}: {exc} (entries are separated by ';', "
                                f"'{CONST}' is the constant batches of --batch-sizes)") from None
        if spec in out:
            raise GridError(f"--schedules {text!r} repeats {spec!r}")
        out.append(spec)
    if not out:
        raise GridError(f"no schedules in --schedules {text!r}")
    return out


def schedule_last_batch(spec: str) -> int:
    from merit_ds.train.batch_schedule import parse_batch_schedule

    last = parse_batch_schedule(spec).phases[-1]
    return last.end_batch if last.ramp else last.batch


def schedule_first_batch(spec: str) -> int:
    from merit_ds.train.batch_schedule import parse_batch_schedule

    return parse_batch_schedule(spec).phases[0].batch


@dataclass
class Grid:
    optimizers: list[str]
    batches: list[int]
    lrs: dict  # {optimizer: [lrs]} (every batch) or {optimizer: {batch: [lrs]}}
    seeds: list[int]
    tokens: int
    settings: dict = field(default_factory=dict)  # model, data, seq_len, ... (identical for every cell)
    families: list = field(default_factory=list)  # model families (--family) at settings["params"]; [] = the model as is
    schedules: list = field(default_factory=lambda: [CONST])  # "const" and/or batch schedules

    def lr_at(self, lr: float, batch: int) -> float:
        """With ``settings["lr_ref_batch"]`` the grid's lrs are given at that batch and square-root
        scaled to each batch (one lr per batch; the width-depth study's rule, not the recipes' measured
        exponents); otherwise used as they are.
        A schedule cell's peak lr is quoted at its first phase's batch (``--batch-schedule``)."""
        ref = self.settings.get("lr_ref_batch")
        return float(f"{lr * (batch / ref) ** 0.5:.3g}") if ref else lr

    def lrs_for(self, optimizer: str, batch: int) -> list[float]:
        """The lr grid of ``optimizer`` at ``batch`` (before :meth:`lr_at`)."""
        v = self.lrs[optimizer]
        if isinstance(v, dict):
            if batch not in v:
                raise GridError(f"no lr grid for {optimizer} at batch {batch} (its grids: batches "
                                f"{', '.join(map(str, sorted(v))) or 'none'}): give one with --add-lrs "
                                f"\"{optimizer}@{batch}=lr,lr,...\" or --lrs")
            return list(v[batch])
        return list(v)

    def cells(self) -> list[CellSpec]:
        """Every cell, in a stable order (seed-major so a partial study covers the grid once first)."""
        out = []
        for s in self.seeds:
            for f in self.families or [""]:
                for o in self.optimizers:
                    for sched in self.schedules:
                        if sched == CONST:
                            out += [CellSpec(o, b, self.lr_at(lr, b), s, family=f)
                                    for b in self.batches for lr in self.lrs_for(o, b)]
                        else:
                            first = schedule_first_batch(sched)
                            out += [CellSpec(o, schedule_last_batch(sched), self.lr_at(lr, first), s, family=f,
                                             schedule=sched) for lr in self.lrs_for(o, first)]
        return out

    def check(self) -> None:
        for o in self.optimizers:
            if registry.find(o) is None:
                raise GridError(f"unknown optimizer {o!r}: choose from {', '.join(registry.names())}")
        for sched in self.schedules:
            if sched != CONST:
                parse_schedules(sched)
        if any(b <= 0 for b in self.batches):
            raise GridError(f"batch sizes must be positive: {self.batches}")
        for o in self.optimizers:
            if o not in self.lrs:
                raise GridError(f"no lr grid for {o}")
            if isinstance(self.lrs[o], dict):
                if self.settings.get("lr_ref_batch"):
                    raise GridError(f"--lr-ref-batch scales one lr grid to every batch; {o} has a grid per batch")
                for b in self.batches:
                    self.lrs_for(o, b)
                for sched in self.schedules:
                    if sched != CONST:
                        self.lrs_for(o, schedule_first_batch(sched))
        if self.families:
            from merit_ds.train.families import FamilyError, solve_shape

            if not self.settings.get("params"):
                raise GridError("--families needs --params (non-embedding parameters of every family)")
            for f in self.families:
                try:
                    solve_shape(f, self.settings["params"], head_dim=int(self.settings.get("head_dim") or 64))
                except FamilyError as exc:
                    raise GridError(str(exc)) from None
        seq = int(self.settings.get("seq_len") or 0)
        if seq and self.tokens < max(self.batches) * seq:
            raise GridError(f"--tokens {self.tokens} is less than one step of the largest batch "
                            f"({max(self.batches)} x {seq})")


def cell_steps(cell: CellSpec, tokens: int, seq_len: int) -> int:
    """Optimizer steps of ``cell`` at a budget of ``tokens`` (what the training loop's plan gives:
    ``ceil(tokens / (batch x seq_len))``, or the batch schedule's step table)."""
    if cell.schedule == CONST:
        return -(-int(tokens) // (int(cell.batch) * int(seq_len)))
    from merit_ds.train.batch_schedule import build_step_table, parse_batch_schedule

    return build_step_table(parse_batch_schedule(cell.schedule), int(seq_len), token_budget=int(tokens)).steps


def short_cells(grid: "Grid", min_steps: int = MIN_STEPS) -> list[tuple[CellSpec, int]]:
    """``(cell, steps)`` of every cell of ``grid`` with fewer than ``min_steps`` steps, fewest first."""
    seq = int(grid.settings.get("seq_len") or 0)
    if not seq:
        return []
    out = [(c, cell_steps(c, grid.tokens, seq)) for c in grid.cells()]
    return sorted(((c, n) for c, n in out if n < min_steps), key=lambda cn: (cn[1], cn[0].key))


def check_min_steps(grid: "Grid", min_steps: int = MIN_STEPS, *, gpu: bool = False) -> list:
    """:class:`GridError` naming the shortest cell, its steps and the fix when any cell of ``grid``
    gets fewer than ``min_steps`` optimizer steps and the grid compares batch sizes (two or more
    constant batches); for a grid of one batch size, the short cells (the caller warns)."""
    short = short_cells(grid, min_steps)
    if not short or len(set(grid.batches)) < 2:
        return short
    cell, steps = short[0]
    seq = int(grid.settings["seq_len"])
    need = min_steps * max(grid.batches) * seq
    more = f" (and {len(short) - 1} more cell(s) under {min_steps})" if len(short) > 1 else ""
    divisor = f", --budget-divisor {int(48e9 // need)} or less" if gpu else ""
    raise GridError(f"cell {cell.key} gets {steps} optimizer steps at {grid.tokens:,} tokens (batch {cell.batch} x "
                    f"{seq} tokens per step), fewer than {min_steps}{more}: so few steps mostly measure the number of "
                    f"steps, not the optimizer. Fix: --tokens {need} or more ({min_steps} steps at batch "
                    f"{max(grid.batches)}){divisor}, or smaller --batch-sizes; or pass --allow-short-cells to run it "
                    f"anyway (its report then warns)")


def study_grid(preset: str) -> tuple[list[str], dict[str, list[float]]]:
    """The optimizers of a study preset (``"cpu"``, ``"gpu"``) and their default lr grids: every
    registered optimizer whose registration gives one (``OptimizerSpec.study_lrs``), in registry
    order. The built-ins' CPU grids were chosen to bracket each optimum at batches 8 and 128 (pilot
    cells at batch 128, seed 0: MERIT best near 6e-2 and 1.5e-1 far worse; AdamW 1e-2 ~ 2.5e-2; the
    CPU sweep of docs/design/field_notes.md for the small batches); AdamW's 5e-4 and 1e-3 were added
    after the first full run found its best lr at the grid's lower edge (2e-3) at batches 8 and 32
    (docs/study/report.md). The GPU grids hold the recipes' values under both the measured exponents
    and the square-root rule, but for LAMB's GPT-2 Small lr at 6k (docs/study.md, 'The recipes' lr rule')."""
    specs = [s for s in registry.specs() if preset in s.study_lrs]
    return [s.name for s in specs], {s.name: list(s.study_lrs[preset]) for s in specs}


_CPU_OPTIMIZERS, _CPU_LRS = study_grid("cpu")
_GPU_OPTIMIZERS, _GPU_LRS = study_grid("gpu")

#: ``--preset cpu-quick``: the first default study (96 cells, ~35 min on 2 cores; its results are
#: docs/study's until the new default's run replaces them, and docs/schedules and docs/width_depth
#: ran on its settings). Step-starved by design of its budget: 262,144 tokens give batch 128 only 32
#: steps, so it runs only with --allow-short-cells (docs/study.md, 'The quick CPU study').
CPU_QUICK_STUDY = {
    "optimizers": _CPU_OPTIMIZERS,
    "batches": [8, 32, 128],
    "lrs": _CPU_LRS,
    "seeds": [0, 1],
    "tokens": 262_144,
    "model": "tiny",
    "model_overrides": ["n_layer=2", "n_embd=64", "n_head=2"],
    "vocab": 2048,
    "seq_len": 64,
    "micro_batch": 32,
    "eval_sequences": 128,
    # ZeRO-0 (DeepSpeed engine, no partitioning): at world 1 the ZeRO stages compute the same step, and
    # MERIT/LAMB under ZeRO-1 at world 1 on CPU took 1-3 s per step without diagnostics (vs 0.03 s
    # for AdamW under ZeRO-1 and MERIT under ZeRO-0): docs/study.md, 'The default CPU study: what it
    # trains and why'
    "zero_stage": 0,
}

#: The default CPU study (issue #24), the paper's regime scaled down: batch 8 -> 64 (ratio 8; the
#: paper's 480 -> 6k is 12.8), 512,000 tokens per cell = 250 steps at batch 64 and 2,000 at 8, sequences
#: of 32 (the same GPT-2 2 x 64 over 2,048 ids as cpu-quick, whose measured optima centre the lr
#: grids), MERIT, LAMB, AdamW with 4 lrs per (optimizer, batch) a factor 2 apart, 3 seeds (paired:
#: a seed fixes the initial weights and the data order for every optimizer, lr and batch), 72 cells.
#: Validation: 5,120 sequences of 32 (163,840 tokens) of a 15% val split at the end of each cell
#: (standard error <= 0.01 nats, measured), the first 256 of them for the 20-point curve.
#: Timed and sized in docs/study.md, 'The default CPU study'.
DEFAULT_STUDY = {
    "optimizers": _CPU_OPTIMIZERS,
    "batches": [8, 64],
    "lrs": dict(_CPU_LRS,
                # centred on cpu-quick's measured optima (docs/study/report.md: MERIT 1.2e-2 at 8, 5e-2 at
                # 32 and 128; LAMB 2.5e-2 / 5e-2 / 5e-2; AdamW 2e-3 / 2e-3 / 5e-3), one factor-2 step up
                # from batch 8 to 64 (the sqrt rule would give 2.8x)
                merit={8: [6e-3, 1.2e-2, 2.5e-2, 5e-2], 64: [1.2e-2, 2.5e-2, 5e-2, 1e-1]},
                lamb={8: [6e-3, 1.2e-2, 2.5e-2, 5e-2], 64: [1.2e-2, 2.5e-2, 5e-2, 1e-1]},
                adamw={8: [1e-3, 2e-3, 4e-3, 8e-3], 64: [2e-3, 4e-3, 8e-3, 1.6e-2]}),
    "seeds": [0, 1, 2],
    "tokens": 512_000,
    "model": "tiny",
    "model_overrides": ["n_layer=2", "n_embd=64", "n_head=2"],
    "vocab": 2048,
    "seq_len": 32,
    "micro_batch": 32,
    "eval_sequences": 5120,
    "curve_eval_sequences": 256,
    "val_fraction": 0.15,
    "zero_stage": 0,
}

#: ``--preset width-depth``: Chen et al.'s question at CPU scale. Three GPT-2 shapes of ~200k non-embedding
#: parameters (wide 1 x 128, base 4 x 64, deep 7 x 48; head dim 16), MERIT and AdamW, batches 8-64, one lr
#: per optimizer square-root scaled from the cpu-quick study's measured best at batch 8 (MERIT 1.2e-2, AdamW
#: 2e-3: docs/study), gradient diversity on 8 sequences per diagnostics step (n = 8 at every batch).
#: 24 cells at 409,600 tokens (100 optimizer steps at batch 64; ~20 min on 2 cores: docs/study.md,
#: 'Width vs depth at large batch (Chen et al. 2018)').
WIDTH_DEPTH_STUDY = dict(CPU_QUICK_STUDY, optimizers=["merit", "adamw"], batches=[8, 16, 32, 64],
                         lrs={"merit": [1.2e-2], "adamw": [2e-3]}, seeds=[0], tokens=409_600,
                         model_overrides=[], families=["wide", "base", "deep"], params=200_000, head_dim=16,
                         lr_ref_batch=8, diversity_probe=8)

#: The GPU-cluster version (``--preset gpt2-small|gpt2-medium``): the paper's batch sizes and a
#: token budget of 48e9 / ``--budget-divisor``; lrs hold the presets' values (see study_grid).
GPU_STUDY = {
    "optimizers": _GPU_OPTIMIZERS,
    "batches": [480, 1024, 2048, 4096, 6144],
    "lrs": _GPU_LRS,
    "seeds": [0],
    "tokens": 48_000_000_000,
    "micro_batch": 8,
    "eval_sequences": 256,
    "zero_stage": 1,  # the recipes' engine (bf16: DeepSpeed's BF16_Optimizer), so the study measures what they run
}
