"""One optimizer step on the GPT-2 Small parameter set: merit_ds MERIT (its default, the fused
CPU kernel, and foreach) and LAMB vs torch AdamW and DeepSpeed's CPU Adam vs a naive
per-parameter MERIT loop, measured side by side in one process.

    .venv/bin/python benchmarks/bench_optimizer_step.py [--rounds 7] [--only adamw cpu_adam merit ...]

Writes benchmarks/results/optimizer_step.{json,md}; docs/optimizer.md ("Speed") quotes the .md.
Each optimizer gets its own copy of the 124.4M fp32 parameters (HF GPT-2 shapes) and the same
random gradients; the first step (state allocation) is a warm-up and not timed. The
candidates are interleaved: every round times each candidate once, in turn, so a change in
machine load hits all of them alike; the table gives the median and the min..max over the
rounds, and the ratios to torch AdamW and to DeepSpeedCPUAdam (of the medians and of the best
rounds), for those of the two that were timed. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from merit_ds import LAMB, MERIT

# HF GPT-2 Small (n_layer 12, n_embd 768, vocab 50257, n_positions 1024): shapes of
# GPT2LMHeadModel.parameters() (the LM head is tied to wte, so it is not a separate tensor).
def gpt2_small_shapes(n_layer=12, d=768, vocab=50257, n_pos=1024):
    shapes = [(vocab, d), (n_pos, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def naive_merit_step(params, state, lr, beta1, beta2, eps, wd):
    """MERIT written the straightforward way, one parameter at a time (the published code's
    style): every intermediate allocated, abs() materialised, maxima via torch.max."""
    for p in params:
        g = p.grad
        st = state.setdefault(p, {})
        if not st:
            st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
        m, v = st["m"], st["v"]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        u = m / (v.sqrt() + eps) + wd * p
        W, U = p.abs(), u.abs()
        if p.dim() >= 2:
            rw, ru = torch.max(W, dim=1, keepdim=True)[0], torch.max(U, dim=1, keepdim=True)[0]
            cw, cu = torch.max(W, dim=0, keepdim=True)[0], torch.max(U, dim=0, keepdim=True)[0]
            s = torch.max(rw / ru, cw / cu)
            s = torch.max(s, W.max() / U.max())
            s = torch.where((rw == 0) | (ru == 0) | (cw == 0) | (cu == 0), torch.ones_like(s), s)
        else:
            s = W.max() / U.max() if (W.max() > 0 and U.max() > 0) else torch.ones(())
        p.sub_(lr * torch.clamp(s * u, -1, 1))


def interleaved(candidates: dict, rounds: int) -> dict:
    """{name: [seconds per round]}: one warm-up call each, then ``rounds`` rounds that time
    every candidate once, in turn."""
    for fn in candidates.values():
        fn()  # warm-up: allocates state (and compiles, for the fused path)
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", nargs="*", default=None,
                    help="candidates to time (keys below; default: all but the single_tensor references and "
                         "compiled). Each holds its own 124M parameters and state (~1.5-2 GB).")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "optimizer_step"))
    args = ap.parse_args()

    shapes = gpt2_small_shapes()
    n_params = sum(torch.Size(s).numel() for s in shapes)
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]

    def fresh():
        ps = [b.clone().requires_grad_() for b in base]
        for p, g in zip(ps, grads):
            p.grad = g
        return ps

    hp = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def cpu_adam(ps):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # the ZeRO-Offload optimizer; JIT-builds once

        return DeepSpeedCPUAdam(ps, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, adamw_mode=True)

    def naive(ps):
        state = {}
        return lambda: naive_merit_step(ps, state, 1e-3, 0.9, 0.95, 1e-8, 0.1)

    def merit_per_tensor(ps):
        """The same kernel driven tensor by tensor from Python (pass 1, ratio tables, pass 2 per
        tensor: how MERIT stepped before the one-call group step), to measure that call's worth."""
        from merit_ds.optim import cpu_kernel

        group = dict(betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"])
        state = [(p.detach().view(-1), p.grad.view(-1), torch.zeros(p.numel()), torch.zeros(p.numel())) for p in ps]

        def step():
            for p, (w, g, m, v) in zip(ps, state):
                slot = torch.zeros(MERIT.fragment_rule.stats_size(p.shape))
                if not cpu_kernel.fragment_statistics(p.shape, 0, w, g, m, v, group, slot):
                    cpu_kernel.fragment_apply(p.shape, 0, w, g, m, v, group, cpu_kernel.ratio_tables(p.shape, slot),
                                              hp["lr"])
        return step

    makers = {  # key: (label, build(params) -> step callable)
        "adamw": ("torch AdamW (foreach)", lambda ps: torch.optim.AdamW(ps, foreach=True, **hp).step),
        "cpu_adam": ("DeepSpeedCPUAdam (ZeRO-Offload's Adam)", lambda ps: cpu_adam(ps).step),
        "merit": ("merit_ds MERIT default (fused CPU kernel)", lambda ps: MERIT(ps, **hp).step),
        # nonfinite_grads="raise" makes the kernel run pass 1 of every tensor before any pass 2
        # (the order the default "skip" no longer needs): the cost of reading each tensor twice
        # from DRAM, where the default reads the cache-sized ones once.
        "merit_two_sweeps": ("merit_ds MERIT kernel, nonfinite_grads='raise' (all passes 1, then all passes 2)",
                             lambda ps: MERIT(ps, nonfinite_grads="raise", **hp).step),
        "merit_per_tensor": ("merit_ds MERIT kernel driven per tensor from Python (before the one-call step)",
                             merit_per_tensor),
        "merit_foreach": ("merit_ds MERIT (foreach)", lambda ps: MERIT(ps, implementation="foreach", **hp).step),
        "merit_compiled": ("merit_ds MERIT (compiled)", lambda ps: MERIT(ps, implementation="compiled", **hp).step),
        "merit_single": ("merit_ds MERIT (single_tensor)", lambda ps: MERIT(ps, implementation="single_tensor", **hp).step),
        "lamb": ("merit_ds LAMB (foreach)", lambda ps: LAMB(ps, **hp).step),
        "lamb_single": ("merit_ds LAMB (single_tensor)", lambda ps: LAMB(ps, implementation="single_tensor", **hp).step),
        "naive": ("naive per-parameter MERIT", naive),
    }
    keys = args.only or ["adamw", "cpu_adam", "merit", "merit_per_tensor", "merit_foreach", "lamb", "naive"]
    unknown = sorted(set(keys) - set(makers))
    if unknown:
        ap.error(f"unknown candidates {unknown}; choose from {sorted(makers)}")
    candidates = {makers[k][0]: makers[k][1](fresh()) for k in keys}

    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} (1 min)", flush=True)
    with torch.no_grad():
        times = interleaved(candidates, args.rounds)
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} (1 min)", flush=True)
    results = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "times_s": t}
               for name, t in times.items()}
    # ratio columns: against torch AdamW and against DeepSpeedCPUAdam, for whichever was timed
    # (leaving AdamW out saves its 1.5 GB of parameters and state on a machine short of memory)
    refs = [(k, makers[k][0]) for k in ("adamw", "cpu_adam") if k in keys]
    lines = [
        f"One optimizer step, GPT-2 Small parameter set ({n_params / 1e6:.1f}M fp32 params, {len(shapes)} tensors), "
        f"{args.rounds} interleaved rounds; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after.",
        "",
        "| optimizer | median step (s) | min..max (s) |"
        + "".join(f" vs {label} (medians) | vs {label} (best rounds) |" for _, label in refs),
        "| --- | ---: | ---: |" + " ---: | ---: |" * len(refs),
    ]
    for name, r in results.items():
        cells = []
        for key, label in refs:
            r[f"vs_{key}"] = r["median_s"] / results[label]["median_s"]
            r[f"vs_{key}_best"] = r["min_s"] / results[label]["min_s"]
            cells.append(f" {r[f'vs_{key}']:.2f}x | {r[f'vs_{key}_best']:.2f}x |")
        lines.append(f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f}..{r['max_s']:.3f} |" + "".join(cells))
    print("\n".join(lines))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"n_params": n_params, "threads": torch.get_num_threads(), "rounds": args.rounds,
                   "load_before": load_before, "load_after": load_after, "results": results}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
