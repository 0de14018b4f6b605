"""The grid: optimizer x global batch x peak lr x seed at one fixed token budget; optionally x batch
schedule (``--schedules``).

``--schedules "const;16@0,64@100000;ramp:16..64@0..100000"``: entries separated by ``;`` (a schedule
itself uses ``,``, ``@``, ``..`` and ``ramp:``, never ``;``). ``const`` stands for the constant-batch
cells of ``--batch-sizes``; every other entry is a ``--batch-schedule`` (one cell per optimizer, lr
and seed; its ``batch`` is the schedule's last phase's batch). All at the same token budget.

``--lrs 1e-3,3e-3`` gives every optimizer the same lrs; ``--lrs "merit=1e-2,3e-2;adamw=1e-3,3e-3"``
gives each its own (an optimizer left out of a per-optimizer spec is an error).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from merit_ds.optim import registry

from .cell import CellSpec

__all__ = ["GridError", "Grid", "parse_list", "parse_lrs", "parse_schedules", "CONST", "DEFAULT_STUDY", "GPU_STUDY"]

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


def parse_lrs(text: str, optimizers: list[str]) -> dict[str, list[float]]:
    """``"1e-3,3e-3"`` (all optimizers) or ``"merit=1e-2,3e-2;adamw=1e-3"`` -> {optimizer: sorted lrs}."""
    text = str(text).strip()
    if not text:
        raise GridError("--lrs is empty: give the peak lrs (e.g. --lrs 1e-3,3e-3), or leave the flag out for the "
                        "preset's grid")
    if "=" not in text:
        lrs = sorted(parse_list(text, float, "lr"))
        out = {o: lrs for o in optimizers}
    else:
        out = {}
        for part in text.split(";"):
            if not part.strip():
                continue
            if "=" not in part:
                raise GridError(f"--lrs {text!r}: write optimizer=lr,lr;optimizer=lr,... for per-optimizer grids")
            name, values = part.split("=", 1)
            name = name.strip()
            if name not in optimizers:
                raise GridError(f"--lrs names {name!r}, which is not in --optimizers {','.join(optimizers)}")
            out[name] = sorted(parse_list(values, float, "lr"))
        missing = [o for o in optimizers if o not in out]
        if missing:
            raise GridError(f"--lrs gives no lr grid for {', '.join(missing)}")
    for o, lrs in out.items():
        if any(lr <= 0 for lr in lrs):
            raise GridError(f"lrs must be positive ({o}: {lrs})")
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
    lrs: dict[str, list[float]]
    seeds: list[int]
    tokens: int
    settings: dict = field(default_factory=dict)  # model, data, seq_len, ... (identical for every cell)
    families: list = field(default_factory=list)  # model families (--family) at settings["params"]; [] = the model as is
    schedules: list = field(default_factory=lambda: [CONST])  # "const" and/or batch schedules

    def lr_at(self, lr: float, batch: int) -> float:
        """With ``settings["lr_ref_batch"]`` the grid's lrs are given at that batch and square-root
        scaled to each batch (one lr per batch, the recipes' rule); otherwise used as they are.
        A schedule cell's peak lr is quoted at its first phase's batch (``--batch-schedule``)."""
        ref = self.settings.get("lr_ref_batch")
        return float(f"{lr * (batch / ref) ** 0.5:.3g}") if ref else lr

    def cells(self) -> list[CellSpec]:
        """Every cell, in a stable order (seed-major so a partial study covers the grid once first)."""
        out = []
        for s in self.seeds:
            for f in self.families or [""]:
                for o in self.optimizers:
                    for sched in self.schedules:
                        if sched == CONST:
                            out += [CellSpec(o, b, self.lr_at(lr, b), s, family=f)
                                    for b in self.batches for lr in self.lrs[o]]
                        else:
                            first = schedule_first_batch(sched)
                            out += [CellSpec(o, schedule_last_batch(sched), self.lr_at(lr, first), s, family=f,
                                             schedule=sched) for lr in self.lrs[o]]
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


def study_grid(preset: str) -> tuple[list[str], dict[str, list[float]]]:
    """The optimizers of a study preset (``"cpu"``, ``"gpu"``) and their default lr grids: every
    registered optimizer whose registration gives one (``OptimizerSpec.study_lrs``), in registry
    order. The built-ins' CPU grids were chosen to bracket each optimum at batches 8 and 128 (pilot
    cells at batch 128, seed 0: MERIT best near 6e-2 and 1.5e-1 far worse; AdamW 1e-2 ~ 2.5e-2; the
    CPU sweep of docs/design/field_notes.md for the small batches); AdamW's 5e-4 and 1e-3 were added
    after the first full run found its best lr at the grid's lower edge (2e-3) at batches 8 and 32
    (docs/study/report.md). The GPU grids bracket the recipes' values."""
    specs = [s for s in registry.specs() if preset in s.study_lrs]
    return [s.name for s in specs], {s.name: list(s.study_lrs[preset]) for s in specs}


_CPU_OPTIMIZERS, _CPU_LRS = study_grid("cpu")
_GPU_OPTIMIZERS, _GPU_LRS = study_grid("gpu")

#: The default study: built-in KJV corpus, 2 CPU cores, ~30 minutes (docs/study.md, 'The default
#: CPU study: what it trains and why').
DEFAULT_STUDY = {
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

#: ``--preset width-depth``: Chen et al.'s question at CPU scale. Three GPT-2 shapes of ~200k non-embedding
#: parameters (wide 1 x 128, base 4 x 64, deep 7 x 48; head dim 16), MERIT and AdamW, batches 8-64, one lr
#: per optimizer square-root scaled from the default study's measured best at batch 8 (MERIT 1.2e-2, AdamW
#: 2e-3: docs/study), gradient diversity on 8 sequences per diagnostics step (n = 8 at every batch).
#: 24 cells at 131,072 tokens: sized for a shared 2-core machine (docs/study.md, 'Width vs depth
#: at large batch (Chen et al. 2018)').
WIDTH_DEPTH_STUDY = dict(DEFAULT_STUDY, optimizers=["merit", "adamw"], batches=[8, 16, 32, 64],
                         lrs={"merit": [1.2e-2], "adamw": [2e-3]}, seeds=[0], tokens=131_072,
                         model_overrides=[], families=["wide", "base", "deep"], params=200_000, head_dim=16,
                         lr_ref_batch=8, diversity_probe=8)

#: The GPU-cluster version (``--preset gpt2-small|gpt2-medium``): the paper's batch sizes and a
#: token budget of 48e9 / ``--budget-divisor``; lrs bracket the presets' values.
GPU_STUDY = {
    "optimizers": _GPU_OPTIMIZERS,
    "batches": [480, 1024, 2048, 4096, 6144],
    "lrs": _GPU_LRS,
    "seeds": [0],
    "tokens": 48_000_000_000,
    "micro_batch": 8,
    "eval_sequences": 256,
    "zero_stage": 2,
}
