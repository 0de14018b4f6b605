"""What the diagnostics and evaluation cadences cost, as a fraction of training time at batch 480.

    python benchmarks/bench_diag_cost.py [--rounds 7]

One rank's share of the batch-480 recipes (``ds_configs/gpt2-*_b480_*``: 32 GPUs, micro-batch
15, grad_accum 1, so 15 sequences per rank per step) and of the fixed validation set (128
blocks / 32 ranks = 4 per rank), on the ``tiny`` preset (4 layers x 128, sequences of 128) with
MERIT, in one process on CPU (the :class:`merit_ds.train.trainer.Trainer` with in-process
stand-ins for the engine and runner, as in ``tests/test_recipes_trainer.py``). Timed, the
candidates interleaved round by round:

* ``plain``: a training step (15 sequences forward + backward, MERIT step);
* ``diag``: a diagnostics step (the same, plus the armed attention-logit probe, MERIT's trust
  statistics and the gradient noise scale's two half-micro-batch forward/backward passes);
* ``diag_no_diversity``: the same without the gradient-diversity probe (``--diversity-probe 0``);
  ``diag`` uses the loop's default probe (:data:`DIVERSITY_PROBE` sequences, per-example
  gradients through ``torch.func``);
* ``eval``: :meth:`Trainer.evaluate` over the rank's 4 validation blocks.

The overhead of the cadences, as a fraction of the plain training time they interrupt::

    (diag - plain) / (diag_every x plain) + eval / (eval_every x plain)

for the loop's defaults and the launch scripts' cadences. What CPU cannot show: the noise
scale's all-reduce of a full gradient vector (one DDP-sized all-reduce per diagnostics step,
network-bound across nodes) and GPU kernel launch overheads; the ratios of compute are those of
the model's FLOPs on either device. Writes benchmarks/results/diag_cost.json and diag_cost.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PER_RANK, MICRO, VAL_PER_RANK = 15, 15, 4  # batch 480 on 32 ranks; 128 val blocks / 32 ranks
DIVERSITY_PROBE = 8  # merit_ds.train's --diversity-probe default (tests/test_diversity.py checks they agree)
CADENCES = {"loop defaults (--diag-every 100, --eval-every 50)": (100, 50),
            "former defaults (--diag-every 10, --eval-every 50)": (10, 50),
            "launch/*.sh (--diag-every 100, --eval-every 500)": (100, 500),
            "launch/multi_node_deepspeed.sh (--diag-every 100, --eval-every 200)": (100, 200)}


class Engine:
    def __init__(self, model):
        self.module, self.device = model, __import__("torch").device("cpu")

    def __call__(self, **kw):
        return self.module(**kw)

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    def get_global_grad_norm(self):
        return None


class Runner:
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
            self.optimizer.zero_grad(set_to_none=True)


def build(data_dir: Path):
    import torch
    from transformers import GPT2LMHeadModel

    from merit_ds.integrations.param_groups import merit_param_groups
    from merit_ds.optim import MERIT
    from merit_ds.train.data_source import make_train_loader, make_val_loader
    from merit_ds.train.presets import MODEL_PRESETS, gpt2_config
    from merit_ds.train.trainer import Trainer

    preset = MODEL_PRESETS["tiny"]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(preset, n_positions=preset.seq_len, vocab_size=256))
    opt = MERIT(merit_param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-6)
    train = make_train_loader(data_dir, seq_len=preset.seq_len, global_batch=PER_RANK, micro_batch=MICRO, rank=0,
                              world=1, seed=0)
    val = make_val_loader(data_dir, seq_len=preset.seq_len, eval_sequences=VAL_PER_RANK, micro_batch=MICRO, rank=0,
                          world=1)
    trainer = Trainer(Engine(model), Runner(opt, train.grad_accum), opt, "merit", train, val, steps=10 ** 6,
                      warmup=10, floor=0.1, tokens_per_step=PER_RANK * preset.seq_len, zero_stage=0,
                      diversity_probe=DIVERSITY_PROBE)
    return trainer, preset, sum(p.numel() for p in model.parameters())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one rank's share of a core)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        rng = np.random.default_rng(0)
        rng.integers(0, 256, size=400_000, dtype=np.uint16).tofile(data / "train.bin")
        rng.integers(0, 256, size=20_000, dtype=np.uint16).tofile(data / "val.bin")
        trainer, preset, n_params = build(data)
        def diag(probe):
            trainer.diversity.probe = probe
            try:
                return trainer.train_step(diagnostics=True)
            finally:
                trainer.diversity.probe = DIVERSITY_PROBE

        candidates = {"plain": lambda: trainer.train_step(diagnostics=False),
                      "diag": lambda: diag(DIVERSITY_PROBE),
                      "diag_no_diversity": lambda: diag(0),
                      "eval": trainer.evaluate}
        for fn in candidates.values():  # warm-up: allocator, first-call costs
            fn()
        times = {k: [] for k in candidates}
        load = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            for name, fn in candidates.items():  # interleaved: the machine's load hits all alike
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
            load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    extra = med["diag"] - med["plain"]
    fractions = {label: extra / (d * med["plain"]) + med["eval"] / (e * med["plain"])
                 for label, (d, e) in CADENCES.items()}
    # the diversity probe alone, and the cadences' cost without it
    div_extra = med["diag"] - med["diag_no_diversity"]
    bounds = {label: (med["diag_no_diversity"] - med["plain"]) / (d * med["plain"]) + med["eval"] / (e * med["plain"])
              for label, (d, e) in CADENCES.items()}
    result = {"model": f"tiny ({preset.n_layer} layers x {preset.n_embd}, seq {preset.seq_len}, {n_params:,} params, "
                       f"vocab 256)", "per_rank_sequences": PER_RANK, "micro_batch": MICRO,
              "val_blocks_per_rank": VAL_PER_RANK, "rounds": args.rounds, "threads": args.threads,
              "seconds": {k: {"median": med[k], "min": min(v), "max": max(v)} for k, v in times.items()},
              "diag_extra_over_plain": extra / med["plain"], "eval_over_plain": med["eval"] / med["plain"],
              "overhead_fraction": fractions,
              "diversity_probe": DIVERSITY_PROBE, "diversity_extra_over_plain": div_extra / med["plain"],
              "overhead_fraction_without_diversity": bounds, "load_avg_1min": {"min": min(load), "max": max(load)},
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diag_cost.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Diagnostics and eval cost at batch 480 (one rank's share, {result['model']})", "",
             f"{args.rounds} interleaved rounds, {args.threads} thread(s); load average (1 min) "
             f"{min(load):.1f}..{max(load):.1f} on {result['machine']}", "",
             "| step | median s | min..max s |", "|---|---|---|"]
    lines += [f"| {k} | {med[k]:.4f} | {min(v):.4f}..{max(v):.4f} |" for k, v in times.items()]
    lines += ["", f"diagnostics step: +{extra / med['plain']:.1%} of a plain step, of which the gradient-diversity "
                  f"probe ({DIVERSITY_PROBE} sequences) {div_extra / med['plain']:.1%}; evaluation: "
                  f"{med['eval'] / med['plain']:.1%} of a plain step", "",
              "| cadence | overhead (fraction of training time) | without the diversity probe |", "|---|---|---|"]
    lines += [f"| {label} | {f:.2%} | {bounds[label]:.2%} |" for label, f in fractions.items()]
    (out / "diag_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
