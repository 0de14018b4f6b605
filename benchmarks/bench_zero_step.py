"""engine.step() time of sharded MERIT and LAMB vs torch Adam under ZeRO-2, 2 CPU ranks.

    python benchmarks/bench_zero_step.py [--layers 6 --embd 384 --steps 10]

Launches itself under torchrun (2 ranks, gloo, DeepSpeed CPU accelerator, 1 thread per
rank). For each optimizer, a GPT-2-shaped model (transformers GPT2LMHeadModel from a config:
vocab 50257, n_layer x n_embd) is wrapped by ``deepspeed.initialize`` with the optimizer as
client optimizer, and ``engine.step()`` is timed alone (forward/backward excluded), median
and min..max over the measured steps, the three engines interleaved step by step in one
run. Also timed: the basic optimizer's own ``step()`` (DeepSpeed's work around it --
gradient norm, bit16 copy, all-gather -- is the same for all), and the statistics buffer
each sharded optimizer all-reduces per step (floats and bytes: MERIT float32 maxima, LAMB
float64 sums of squares), as a fraction of the parameter count (measured, and in theory for
GPT-2 Small / Medium).

Writes benchmarks/results/zero_step.json and zero_step.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def torch_itemsize(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()
REPO = HERE.parent


def gpt2_stats_fraction(n_layer, n_embd, rule, vocab=50257, n_positions=1024):
    """(parameters, stats-buffer entries) for a GPT-2 of this shape (tied head counted once)
    under an optimizer's fragment rule."""
    shapes = [(vocab, n_embd), (n_positions, n_embd), (n_embd,), (n_embd,)]  # wte, wpe, ln_f
    for _ in range(n_layer):
        shapes += [(n_embd,)] * 4  # ln_1, ln_2 weight/bias
        shapes += [(n_embd, 3 * n_embd), (3 * n_embd,), (n_embd, n_embd), (n_embd,)]  # attn (Conv1D)
        shapes += [(n_embd, 4 * n_embd), (4 * n_embd,), (4 * n_embd, n_embd), (n_embd,)]  # mlp
    params = sum(int(__import__("math").prod(s)) for s in shapes)
    floats = sum(rule.stats_size(s) + 1 for s in shapes)  # + 1 non-finite flag per parameter
    return params, floats


def worker(args):
    import warnings

    import torch
    import torch.distributed as dist

    import deepspeed
    import merit_ds
    from merit_ds.sharding import collective
    from transformers import GPT2Config, GPT2LMHeadModel

    warnings.filterwarnings("ignore")
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.embd, n_head=max(1, args.embd // 64), n_positions=args.seq,
                     vocab_size=50257)
    runs = {}
    for name in ("adam", "merit", "lamb"):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg)
        if name == "adam" and args.offload:  # what ZeRO-Offload runs for Adam: DeepSpeed's CPU kernel
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(model.parameters(), lr=1e-4, weight_decay=0.0)
        elif name == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=0.0)
        elif name == "merit":
            opt = merit_ds.MERIT(model.parameters(), lr=1e-4, weight_decay=0.1)
        else:
            opt = merit_ds.LAMB(model.parameters(), lr=1e-4, weight_decay=0.1)
        ds_cfg = {
            "train_micro_batch_size_per_gpu": args.micro,
            "gradient_accumulation_steps": 1,
            "train_batch_size": args.micro * world,
            "zero_optimization": {"stage": 2, **({"offload_optimizer": {"device": "cpu"}} if args.offload else {})},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
        run = dict(engine=engine, model=model, inner=[], outer=[], floats=0)
        real_step = opt.step

        def timed(*a, _real=real_step, _run=run, **k):
            t0 = time.perf_counter()
            out = _real(*a, **k)
            _run["inner"].append(time.perf_counter() - t0)
            return out

        opt.step = timed
        runs[name] = run
    # Interleave the engines step by step, so that load from other processes on the
    # machine hits both alike.
    for step in range(args.warmup + args.steps):
        g = torch.Generator().manual_seed(step * 10 + rank)
        x = torch.randint(0, 50257, (args.micro, args.seq), generator=g)
        for name, run in runs.items():
            engine = run["engine"]
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            dist.barrier()
            c0, n0 = collective.counter.floats, collective.counter.calls
            t0 = time.perf_counter()
            engine.step()
            dist.barrier()
            if step >= args.warmup:
                run["outer"].append(time.perf_counter() - t0)
                run["floats"] = collective.counter.floats - c0
                run["calls"] = collective.counter.calls - n0
    results = {}
    for name, run in runs.items():
        inner = run["inner"][args.warmup:]
        results[name] = dict(
            engine_step_median_s=statistics.median(run["outer"]),
            engine_step_min_s=min(run["outer"]),
            engine_step_max_s=max(run["outer"]),
            optimizer_step_median_s=statistics.median(inner),
            optimizer_step_min_s=min(inner),
            optimizer_step_max_s=max(inner),
            params=sum(p.numel() for p in run["model"].parameters()),
            stats_floats_per_step=run["floats"],
            stats_all_reduces_per_step=run.get("calls", 0),
        )
    if rank == 0:
        with open(os.environ["BENCH_RESULT"], "w") as f:
            json.dump(dict(world=world, results=results), f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--embd", type=int, default=384)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--offload", action="store_true",
                    help="ZeRO-Offload the optimizer (Adam is then DeepSpeedCPUAdam, MERIT its CPU kernel)")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stem = "zero_step_offload" if args.offload else "zero_step"
    raw = out / f"{stem}.raw.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", BENCH_RESULT=str(raw))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", __file__,
           "--worker", *sys.argv[1:]]
    print("running:", " ".join(cmd), flush=True)
    load_before = os.getloadavg()[0]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL if not os.environ.get("BENCH_VERBOSE") else None)
    load_after = os.getloadavg()[0]
    data = json.loads(raw.read_text())
    raw.unlink()
    r = data["results"]
    from merit_ds import LAMB, MERIT

    rules = {"merit": MERIT.fragment_rule, "lamb": LAMB.fragment_rule}
    bytes_per = {k: torch_itemsize(rule.stats_dtype) for k, rule in rules.items()}
    for k in rules:
        r[k]["engine_step_ratio"] = r[k]["engine_step_median_s"] / r["adam"]["engine_step_median_s"]
        r[k]["optimizer_step_ratio"] = r[k]["optimizer_step_median_s"] / r["adam"]["optimizer_step_median_s"]
        r[k]["stats_bytes_per_step"] = r[k]["stats_floats_per_step"] * bytes_per[k]
        r[k]["stats_buffer_fraction"] = r[k]["stats_floats_per_step"] / r[k]["params"]
    shapes = {"GPT-2 Small": (12, 768), "GPT-2 Medium": (24, 1024)}
    theory = {(model, k): gpt2_stats_fraction(*shape, rules[k]) for model, shape in shapes.items() for k in rules}
    summary = dict(
        setup=dict(ranks=2, device="cpu (gloo)", zero_stage=2, adam="DeepSpeedCPUAdam" if args.offload else "torch Adam", precision="fp32", threads_per_rank=1, **{k: v for k, v in vars(args).items() if k != "worker"}),
        params=r["merit"]["params"],
        results=r,
        load_average_1min=dict(before=load_before, after=load_after, cores=os.cpu_count()),
        theory={f"{m} {k}": dict(params=p, stats_entries=f, bytes=f * bytes_per[k], fraction=f / p)
                for (m, k), (p, f) in theory.items()},
    )
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))

    def cell(d, key):
        return f"{d[key + '_median_s'] * 1e3:.1f} ms ({d[key + '_min_s'] * 1e3:.0f}..{d[key + '_max_s'] * 1e3:.0f})"

    adam_name = "DeepSpeedCPUAdam" if args.offload else "torch Adam"
    md = [
        f"# Sharded MERIT and LAMB vs {adam_name}: engine.step() under ZeRO-2{' with CPU offload' if args.offload else ''}",
        "",
        f"Produced by `python benchmarks/bench_zero_step.py {' '.join(sys.argv[1:])}`: 2 CPU ranks (gloo), 1 thread each, "
        f"fp32, GPT-2-shaped model ({args.layers} layers x {args.embd}, vocab 50257, {r['merit']['params'] / 1e6:.1f}M params), "
        f"micro-batch {args.micro} x {args.seq} tokens, median (min..max) of {args.steps} steps after {args.warmup} "
        "warm-up steps, the three engines interleaved step by step. "
        + ("DeepSpeedCPUAdam (what ZeRO-Offload runs for Adam) is the baseline; MERIT runs its CPU kernel. "
           if args.offload else "torch.optim.Adam (default implementation) is the client-optimizer baseline. ") +
        f"Machine load (1-min average) {load_before:.1f} before / {load_after:.1f} after on {os.cpu_count()} cores: "
        "absolute times are inflated by other processes; the ratios are the numbers to read.",
        "",
        f"| | {adam_name} | MERIT (sharded) | LAMB (sharded) | MERIT / Adam | LAMB / Adam |",
        "|---|---|---|---|---|---|",
        f"| engine.step() | {cell(r['adam'], 'engine_step')} | {cell(r['merit'], 'engine_step')} | "
        f"{cell(r['lamb'], 'engine_step')} | {r['merit']['engine_step_ratio']:.2f}x | {r['lamb']['engine_step_ratio']:.2f}x |",
        f"| basic optimizer step() | {cell(r['adam'], 'optimizer_step')} | {cell(r['merit'], 'optimizer_step')} | "
        f"{cell(r['lamb'], 'optimizer_step')} | {r['merit']['optimizer_step_ratio']:.2f}x | "
        f"{r['lamb']['optimizer_step_ratio']:.2f}x |",
        "",
        "Statistics all-reduced per step (measured):",
        "",
        "| optimizer | all-reduces per step | entries | bytes | fraction of parameters |",
        "|---|---|---|---|---|",
    ]
    for k, label in (("merit", "MERIT (MAX, float32)"), ("lamb", "LAMB (SUM, float64)")):
        md.append(f"| {label} | {r[k]['stats_all_reduces_per_step']} | {r[k]['stats_floats_per_step']:.0f} | "
                  f"{r[k]['stats_bytes_per_step'] / 1e3:.1f} kB | {100 * r[k]['stats_buffer_fraction']:.4f}% |")
    md += [
        "",
        "| model (theory: MERIT 2*(rows+cols) per matrix, 2 per vector; LAMB 2 per tensor; 1 flag each) | optimizer | "
        "parameters | stats entries | bytes | fraction |",
        "|---|---|---|---|---|---|",
    ]
    for (m, k), (p, f) in theory.items():
        md.append(f"| {m} | {k.upper()} | {p / 1e6:.1f}M | {f / 1e3:.1f}k | {f * bytes_per[k] / 1e3:.0f} kB | {100 * f / p:.4f}% |")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
