"""The GPU smoke test: what must hold, and what it costs, on a CUDA machine (see gpu_smoke.sh).

    bash benchmarks/gpu_smoke.sh            # or: python benchmarks/gpu_smoke.py [--quick]

Sections, each recorded in the results file even when another fails:

1. ``env``: torch / CUDA / GPU / DeepSpeed versions.
2. ``optimizer_equivalence``: on the GPU, MERIT foreach and compiled (torch.compile) against
   MERIT single_tensor, LAMB foreach against LAMB single_tensor, MERIT triton against the CPU
   kernel on CPU copies, one step at a time from identical inputs (max abs difference;
   foreach and triton must be bitwise, compiled within 1e-6).
3. ``optimizer_step``: one step on GPT-2 Small's parameter set (124.4M fp32) on the GPU,
   interleaved rounds: torch AdamW fused and foreach, MERIT foreach, compiled and triton, LAMB
   foreach (median and min..max, ms).
3b. ``segmented_step``: the whole-partition sharded MERIT step -- the Triton kernels (the
   default on GPU partitions) and the torch form (eager, torch.compile'd) -- on one flat
   partition of GPT-2 Small's parameters against DeepSpeed FusedAdam on the same partition
   (median and min..max, ms, effective GB/s), the Triton step against the CPU kernel (bitwise
   expected), the torch form against single-tensor MERIT, and the plans' persistent bytes.
4. ``sharded``: ``tests/zero_worker.py`` over NCCL on all GPUs (ZeRO 1/2/3, fp32 and bf16;
   with one GPU, DeepSpeed still partitions, into one piece): sharded MERIT and LAMB against
   single-device on the GPU (MERIT bitwise, LAMB within 1e-6 relative).
5. ``train``: ``python -m merit_ds.train`` under the deepspeed launcher on all GPUs, the tiny
   and gpt2-small presets, ZeRO-2 bf16, MERIT, a few steps on the built-in corpus: step time,
   tokens/s, MFU and peak memory from the run's metrics, against ``merit-ds plan`` for the card
   found (:func:`plan_gpu`).
6. ``train_stages``: GPT-2 Small for 50 steps at micro-batch 8 and 16 per GPU under ZeRO-1 and
   ZeRO-2 (bf16, MERIT), and ZeRO-2 at micro-batch 16 eager (``--compile off``) against the
   default (compiled on CUDA): tokens/s, MFU, peak memory against the plan's memory for that
   stage and micro-batch (what decides the recipes' ZeRO stage and ``--compile`` default).
7. ``megatron_factory``: merit_ds.megatron's factory on a small megatron-core GPT, distributed
   optimizer off and on, against single-device MERIT per step (within 1e-6), and the distributed
   optimizer saved and restored by megatron-core's checkpoint methods, the next step taken twice
   (skipped without megatron-core; on CPU it builds the model and stops, saying so).

Writes benchmarks/results/gpu_smoke.{json,md} (or --out). Without a CUDA GPU it says so and
exits 0. Never part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]


def section(results: dict, name: str):
    """Decorator: run a section, record its result or its error, never stop the others."""

    def wrap(fn):
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            results[name] = {"ok": True, **fn()}
        except Exception as e:  # noqa: BLE001 - recorded, the smoke test goes on
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            print(results[name]["trace"], flush=True)
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({k: v for k, v in results[name].items() if k != "trace"}, indent=1)[:3000], flush=True)
        return fn

    return wrap


def env_info():
    import torch

    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as e:  # noqa: BLE001
        info["deepspeed"] = f"not importable: {e}"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception as e:  # noqa: BLE001
        info["transformers"] = f"not importable: {e}"
    return info


def optimizer_equivalence(device: str = "cuda", only=None, shapes=None):
    """``device="cpu"`` with ``only`` (case labels) and small ``shapes``: a dry run of this
    section's code."""
    import torch

    from merit_ds import LAMB, MERIT

    dev = torch.device(device)
    shapes = shapes or [(768, 2304), (2304,), (50, 768), (3, 4, 5), (7,), ()]
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [[torch.randn(s, generator=gen) * 1e-3 for s in shapes] for _ in range(3)]
    out = {}
    from merit_ds.optim import segmented_triton

    cases = [("merit_foreach", MERIT, "foreach", "single_tensor", dev),
             ("merit_compiled", MERIT, "compiled", "single_tensor", dev),
             ("lamb_foreach", LAMB, "foreach", "single_tensor", dev)]
    if segmented_triton.available(dev):  # the Triton kernels do the CPU kernel's arithmetic
        cases.append(("merit_triton_vs_cpu_kernel", MERIT, "triton", None, torch.device("cpu")))
    cases = [c for c in cases if only is None or c[0] in only]
    for label, cls, impl, ref_impl, ref_dev in cases:
        a = [b.clone().to(dev).requires_grad_() for b in base]
        r = [b.clone().to(ref_dev).requires_grad_() for b in base]
        opt_a = cls(a, lr=1e-2, weight_decay=0.1, implementation=impl)
        opt_r = cls(r, lr=1e-2, weight_decay=0.1, implementation=ref_impl)
        worst = 0.0
        for g in grads:
            for x, y, gg in zip(a, r, g):  # identical inputs each step
                x.data.copy_(y.data)
                x.grad, y.grad = gg.to(dev), gg.to(ref_dev).clone()
                if opt_r.state[y]:
                    for key in ("exp_avg", "exp_avg_sq"):
                        opt_a.state[x][key].copy_(opt_r.state[y][key])
            opt_a.step()
            opt_r.step()
            worst = max(worst, max((x.cpu() - y.cpu()).abs().max().item() for x, y in zip(a, r)))
        out[label] = worst
    if only is None:
        out["foreach_bitwise"] = out["merit_foreach"] == 0.0 and out["lamb_foreach"] == 0.0
        out["compiled_within_1e-6"] = out["merit_compiled"] <= 1e-6
    if "merit_triton_vs_cpu_kernel" in out:
        out["triton_bitwise_cpu_kernel"] = out["merit_triton_vs_cpu_kernel"] == 0.0
    return out


def optimizer_step(rounds: int):
    import torch

    from bench_optimizer_step import gpt2_small_shapes
    from merit_ds import LAMB, MERIT

    dev = torch.device("cuda")
    shapes = gpt2_small_shapes()
    gen = torch.Generator().manual_seed(0)
    base = [(torch.randn(s, generator=gen) * 0.02).to(dev) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(dev) for s in shapes]

    def fresh():
        ps = [b.clone().requires_grad_() for b in base]
        for p, g in zip(ps, grads):
            p.grad = g
        return ps

    hp = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    cands = {
        "torch AdamW (fused)": torch.optim.AdamW(fresh(), fused=True, **hp).step,
        "torch AdamW (foreach)": torch.optim.AdamW(fresh(), foreach=True, **hp).step,
        "MERIT (foreach)": MERIT(fresh(), implementation="foreach", **hp).step,
        "MERIT (compiled)": MERIT(fresh(), implementation="compiled", **hp).step,
        "LAMB (foreach)": LAMB(fresh(), implementation="foreach", **hp).step,
    }
    from merit_ds.optim import segmented_triton

    if segmented_triton.available(dev):  # opt-in on one device until this row says otherwise
        cands["MERIT (triton)"] = MERIT(fresh(), implementation="triton", **hp).step
    times = {k: [] for k in cands}
    with torch.no_grad():
        for fn in cands.values():
            fn()
            fn()  # warm-up twice: state, compile
        torch.cuda.synchronize()
        for _ in range(rounds):
            for name, fn in cands.items():
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["torch AdamW (fused)"])
    return {name: dict(median_ms=1e3 * statistics.median(t), min_ms=1e3 * min(t), max_ms=1e3 * max(t),
                       vs_adamw_fused=statistics.median(t) / ref) for name, t in times.items()}


def segmented_step(rounds: int, device: str = "cuda", shapes=None, deepspeed_adam: bool = True):
    """MERIT's whole-partition sharded step on one flat fp32 partition holding GPT-2 Small's
    parameters (124.4M, as ZeRO lays out one group at world 1): the Triton kernels (the
    default on GPU partitions, merit_ds/optim/segmented_triton.py) and the torch form
    (merit_ds/optim/segmented.py; eager and torch.compile'd), against DeepSpeed's FusedAdam
    (torch AdamW fused if DeepSpeed's op cannot build) on the same partition, interleaved
    round by round. Also: the Triton step against the CPU kernel on the same floats (bitwise
    expected: the same arithmetic), the torch form against single-tensor MERIT (bitwise
    expected), and the effective bandwidth (MERIT moves 44 bytes per element, Adam 28)."""
    import math

    import torch

    from bench_optimizer_step import gpt2_small_shapes
    from merit_ds import MERIT
    from merit_ds.optim import segmented, segmented_triton
    from merit_ds.optim.merit_fragments import MeritFragmentRule
    from merit_ds.optim.layout import layout_from_offsets, stats_layout

    dev = torch.device(device)  # "cpu" and small shapes: a dry run of this section's code
    shapes = [tuple(s) for s in (shapes or gpt2_small_shapes())]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    offsets, at = [], 0
    for sh in shapes:
        offsets.append(at)
        at += math.prod(sh)
    n = at
    gen = torch.Generator().manual_seed(0)
    w0 = (torch.randn(n, generator=gen) * 0.02).to(dev)
    g = (torch.randn(n, generator=gen) * 1e-3).to(dev)
    hp = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    sl = stats_layout(shapes, MeritFragmentRule().stats_size)
    layout = layout_from_offsets(shapes, offsets, 0, n)
    flag = sl.slots[0].flag
    plan = segmented.plan(shapes, layout.fragments, sl.slots, flag, n, dev)

    def merit_step(form, form_plan, stats_fn=None, apply_fn=None):
        w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
        stats_fn, apply_fn = stats_fn or form.statistics, apply_fn or form.apply

        def step():
            buf = torch.zeros(sl.buffer_numel, device=dev)
            stats_fn(form_plan, w, g, m, v, hp, buf)
            apply_fn(form_plan, w, g, m, v, hp, buf, 1e-3)  # world 1: no all-reduce
        return step, w

    cands, notes = {}, {}
    triton_w = None
    if segmented_triton.available(dev):
        notes["triton_self_check"] = segmented_triton.self_check(dev)
        tplan = segmented_triton.plan(shapes, layout.fragments, sl.slots, flag, dev)
        cands["MERIT Triton kernels (default)"], triton_w = merit_step(segmented_triton, tplan)
        notes["triton_plan_persistent_bytes"] = tplan.persistent_bytes()
    else:
        notes["triton_unavailable"] = segmented_triton._import_error() or f"not on {dev}"
    eager, w_eager = merit_step(segmented, plan)
    cands["MERIT segmented torch form (eager)"] = eager
    try:
        compiled, _ = merit_step(segmented, plan, torch.compile(segmented.statistics), torch.compile(segmented.apply))
        compiled()
        cands["MERIT segmented torch form (torch.compile)"] = compiled
    except Exception as e:  # noqa: BLE001 - recorded, the eager row still runs
        notes["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    adam_w = w0.clone().requires_grad_()
    adam_w.grad = g
    try:
        if not deepspeed_adam:  # the CPU dry run: no JIT build of DeepSpeed's op
            raise ImportError("not asked for")
        from deepspeed.ops.adam import FusedAdam

        adam = FusedAdam([adam_w], lr=1e-3, adam_w_mode=True, **hp)
        adam_name = "DeepSpeed FusedAdam"
    except Exception:  # noqa: BLE001
        adam = torch.optim.AdamW([adam_w], lr=1e-3, fused=dev.type == "cuda", **hp)
        adam_name = "torch AdamW (fused; DeepSpeed FusedAdam unavailable)"
    cands[adam_name] = adam.step

    # correctness, one step from identical inputs (zero moments)
    ref_ps = [w0[o:o + math.prod(sh)].clone().view(sh).requires_grad_() for sh, o in zip(shapes, offsets)]
    for p_, sh, o in zip(ref_ps, shapes, offsets):
        p_.grad = g[o:o + math.prod(sh)].view(sh).clone()
    MERIT(ref_ps, lr=1e-3, implementation="single_tensor", **hp).step()
    eager()
    notes["torch_form_max_abs_diff_vs_single_tensor"] = max(
        float((w_eager[o:o + math.prod(sh)].view(sh) - p_.detach()).abs().max())
        for p_, sh, o in zip(ref_ps, shapes, offsets))
    if triton_w is not None:
        cands["MERIT Triton kernels (default)"]()
        # the CPU kernel on the same floats (single device, whole tensors: MERIT's CPU default)
        cpu_ps = [w0[o:o + math.prod(sh)].cpu().view(sh).clone().requires_grad_() for sh, o in zip(shapes, offsets)]
        for p_, sh, o in zip(cpu_ps, shapes, offsets):
            p_.grad = g[o:o + math.prod(sh)].cpu().view(sh).clone()
        MERIT(cpu_ps, lr=1e-3, **hp).step()
        got = triton_w.cpu()
        diffs = [(got[o:o + math.prod(sh)].view(sh) - p_.detach()).abs().max() for p_, sh, o in zip(cpu_ps, shapes, offsets)]
        notes["triton_max_abs_diff_vs_cpu_kernel"] = max(float(d) for d in diffs)
        notes["triton_bitwise_cpu_kernel"] = all(
            torch.equal(got[o:o + math.prod(sh)].view(sh), p_.detach()) for p_, sh, o in zip(cpu_ps, shapes, offsets))
    times = {k: [] for k in cands}
    with torch.no_grad():
        for fn in cands.values():
            fn()
        sync()
        for _ in range(rounds):
            for name, fn in cands.items():
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times[adam_name])
    moved = {name: (28 if name == adam_name else 44) * n for name in cands}  # bytes per step
    return dict(
        partition_numel=n, plan_persistent_bytes=plan.persistent_bytes(), partition_bytes=4 * n, **notes,
        byte_floor_vs_adam=44 / 28,
        times={name: dict(median_ms=1e3 * statistics.median(t), min_ms=1e3 * min(t), max_ms=1e3 * max(t),
                          vs_adam=statistics.median(t) / ref, gb_per_s=moved[name] / statistics.median(t) / 1e9)
               for name, t in times.items()},
    )


def sharded(ngpu: int):
    configs = ["z1_fp32", "z2_fp32", "z3_fp32", "z1_bf16", "z2_bf16", "z3_bf16", "bf16opt", "z2_groups", "z3_offload"]
    out = {}
    for optimizer in ("merit", "lamb"):
        with tempfile.TemporaryDirectory() as d:
            result = Path(d) / "r.json"
            env = dict(os.environ, MERIT_TEST_RESULT=str(result),
                       PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
            env.pop("DS_ACCELERATOR", None)
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ngpu}", "--master_port=29631",
                   str(REPO / "tests" / "zero_worker.py"), "--backend", "nccl", "--optimizer", optimizer,
                   "--configs", *configs]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"{optimizer}: rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            res = json.loads(result.read_text())["configs"]
        key = "max_diff" if optimizer == "merit" else "max_rel_diff"
        out[optimizer] = {name: r.get(key, r.get("error")) for name, r in res.items()}
        out[f"{optimizer}_pass"] = all(isinstance(v, float) and v <= (0.0 if optimizer == "merit" else 1e-6)
                                       for v in out[optimizer].values())
    return out


def plan_gpu(name: str, mem_bytes: int):
    """The ``merit-ds plan --gpu`` key of a CUDA device (``torch.cuda.get_device_name`` and its
    total memory), or None for a card the planner does not list."""
    from merit_ds.train.plan import GPUS

    n, gib = name.upper(), mem_bytes / 1024**3
    key = None
    if "H200" in n:
        key = "h200"
    elif "H100" in n:
        key = "h100-pcie" if "PCIE" in n else "h100"
    elif "A100" in n:
        key = "a100-40gb" if gib < 60 else "a100"
    return key if key in GPUS else None


def _this_gpu():
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA device"
    name = torch.cuda.get_device_name(0)
    key = plan_gpu(name, torch.cuda.get_device_properties(0).total_memory)
    return key, name


def _plan_totals(model: str, batch: int, ngpu: int, micro: int, gpu: str) -> dict:
    """``{stage: planned GiB per GPU}`` of ``merit-ds plan --json`` at this micro-batch."""
    plan = subprocess.run([sys.executable, "-m", "merit_ds", "plan", "--model", model, "--batch", str(batch),
                           "--nodes", "1", "--gpus-per-node", str(ngpu), "--gpu", gpu, "--precision", "bf16",
                           "--micro-batch", str(micro), "--json"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    if plan.returncode != 0:
        return {"error": plan.stderr[-800:]}
    return {int(s["stage"]): s["total_gib"] for s in json.loads(plan.stdout)["stages"] if not s.get("offload")}


def _launcher():
    ds = Path(sys.executable).with_name("deepspeed")
    return [str(ds)] if ds.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def _run_metrics(run: Path) -> dict:
    """Medians over the logged steps after the first (which compiles and allocates)."""
    out = {}
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        train_rows = [r for r in rows if "loss" in r]
        out["steps_logged"] = len(train_rows)
        for key in ("step_time_s", "tokens_per_s", "mfu", "peak_memory_gib", "loss"):
            vals = [r[key] for r in train_rows[1:] if key in r]
            if vals:
                out[key] = statistics.median(vals)
                if key in ("tokens_per_s", "step_time_s"):
                    out[key + "_range"] = [min(vals), max(vals)]
    return out


def train_stages(ngpu: int, steps: int = 50, *, model: str = "gpt2-small", micros=(8, 16), stages=(1, 2),
                 precision: str = "bf16", data: Path = None, extra=()):
    """GPT-2 Small at each (ZeRO stage, micro-batch) and, at the largest micro-batch under
    ZeRO-2, eager against the default ``--compile``: measured tokens/s, MFU and peak memory
    beside the plan's memory for the card found. (Tests dry-run it on CPU with the tiny preset.)"""
    work = Path(tempfile.mkdtemp(prefix="merit_gpu_stages_"))
    if data is None:
        data = work / "data"
        subprocess.run([sys.executable, "-m", "merit_ds.data", "prepare", "--input", "kjv", "--out", str(data)], check=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    gpu, card = _this_gpu()
    out = {"card": card, "plan_gpu": gpu, "runs": []}
    if gpu is None:
        out["plan_note"] = f"{card}: not a card merit_ds.train.plan.GPUS lists; no plan comparison"
    variants = [(stage, micro, "auto") for stage in stages for micro in micros] + [(2, max(micros), "off")]
    for stage, micro, compile_ in variants:
        run = work / f"z{stage}_m{micro}_compile_{compile_}"
        batch = micro * ngpu
        cmd = [*_launcher(), "--num_gpus", str(ngpu), "--module", "merit_ds.train", "--model", model, "--data",
               str(data), "--out", str(run), "--steps", str(steps), "--global-batch", str(batch), "--micro-batch",
               str(micro), "--zero-stage", str(stage), "--precision", precision, "--optimizer", "merit",
               "--compile", compile_, "--eval-every", "0", "--ckpt-every", "0", "--diag-every", "0", "--no-progress",
               *extra]
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                              text=True, timeout=1200)
        entry = {"stage": stage, "micro_batch": micro, "compile": compile_, "rc": proc.returncode,
                 "wall_s": round(time.perf_counter() - started, 1), **_run_metrics(run)}
        if proc.returncode != 0:
            entry["tail"] = proc.stdout[-1000:] + proc.stderr[-2000:]
        if gpu is not None:
            planned = _plan_totals(model, batch, ngpu, micro, gpu)
            entry["plan_gib"] = planned.get(stage, planned.get("error"))
            if isinstance(entry["plan_gib"], float) and "peak_memory_gib" in entry:
                entry["measured_over_plan"] = entry["peak_memory_gib"] / entry["plan_gib"]
        out["runs"].append(entry)
    out["pass"] = all(r["rc"] == 0 for r in out["runs"])
    return out


def megatron_factory(device: str = "cuda", steps: int = 2):
    """merit_ds.megatron's factory on a small megatron-core GPT (TP 1, DP 1), with
    ``use_distributed_optimizer`` off (FP32Optimizer: whole parameters) and on (DistributedOptimizer:
    fp32 pieces from its range map), each step against single-device MERIT (functional, own
    moments) on the same weights and gradients (``main_grad``). megatron-core's forward and DDP
    need CUDA: on CPU the section builds the model and stops there, saying so (the tests dry-run it)."""
    import torch
    import torch.distributed as dist

    try:
        from megatron.core import parallel_state as ps
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer import TransformerConfig
    except ImportError as e:
        return {"skipped": f"megatron-core is not installed ({e}); pip install -e '.[megatron]'"}
    from merit_ds.megatron import get_megatron_merit_optimizer
    from merit_ds.optim import merit

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1)
    out = {}
    for dist_opt in (False, True):
        torch.manual_seed(0)
        cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, hidden_dropout=0.0,
                                attention_dropout=0.0, use_cpu_initialization=True, bf16=False)
        model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=128,
                         max_sequence_length=32)
        if device != "cuda":
            return {"skipped": "megatron-core's forward and DDP allocate on CUDA; the model was built on the CPU "
                               f"({sum(p.numel() for p in model.parameters())} parameters), nothing stepped"}
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
        model = model.cuda()
        ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=dist_opt,
                                                                         grad_reduce_in_fp32=True), module=model)
        ocfg = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                               adam_eps=1e-8, use_distributed_optimizer=dist_opt, clip_grad=0.0, bf16=False)
        opt = get_megatron_merit_optimizer(ocfg, [ddp])
        inner = opt.optimizer
        groups = [(g, inner.original_params(g)) for g in inner.param_groups]
        ref_state, diffs = {}, []
        for step in range(steps):
            ddp.zero_grad_buffer()
            opt.zero_grad()
            tokens = torch.randint(0, 128, (2, 32), device="cuda")
            pos = torch.arange(32, device="cuda").expand(2, 32)
            model(tokens, pos, attention_mask=None, labels=tokens).mean().backward()
            ddp.finish_grad_sync()
            expected = {}
            for g, params in groups:
                ws = [p.detach().float().clone() for p in params]
                gs = [p.main_grad.detach().float().clone() for p in params]
                for p in params:
                    ref_state.setdefault(p, (torch.zeros(p.shape, device="cuda"), torch.zeros(p.shape, device="cuda"),
                                             torch.tensor(0.0)))
                merit(ws, gs, [ref_state[p][0] for p in params], [ref_state[p][1] for p in params],
                      [ref_state[p][2] for p in params], lr=float(g["lr"]), beta1=g["betas"][0], beta2=g["betas"][1],
                      eps=g["eps"], weight_decay=g["weight_decay"])
                expected.update(zip(params, ws))
            opt.step()
            diffs.append(max((p.detach().float() - w).abs().max().item() for p, w in expected.items()))
        out["distributed_optimizer" if dist_opt else "fp32_optimizer"] = {
            "inner": type(inner).__name__, "wrapper": type(opt).__name__, "max_abs_diff_per_step": diffs}
        if dist_opt:
            out["distributed_optimizer"]["resume"] = _megatron_resume(opt, ddp, model, steps)
    out["pass"] = (all(max(v["max_abs_diff_per_step"]) <= 1e-6 for v in out.values() if isinstance(v, dict))
                   and out["distributed_optimizer"]["resume"]["pass"])
    return out


def _megatron_resume(opt, ddp, model, steps_done: int) -> dict:
    """The real DistributedOptimizer saved (``state_dict`` + ``get_parameter_state_dp_reshardable``,
    serialized), one step taken, its optimizer state dropped as in a fresh process, restored
    (``load_state_dict`` + ``load_parameter_state_from_dp_reshardable``, the ``dp_reshardable``
    format) and the same step (same tokens) taken again: the weights must match (CUDA's embedding
    backward may reorder a sum: tolerance 1e-5) and every piece and param group count
    ``steps_done + 1`` steps. The weights come back with the state only because this run is
    data-parallel 1 and fp32 (megatron-core's fp32 pieces are views of the model's parameters);
    a Megatron-LM resume loads the model's weights from its own checkpoint. tests/test_megatron.py
    runs the same round trip bitwise on CPU, on a stand-in object, into a new optimizer."""
    import io

    import torch

    chained = getattr(opt, "chained_optimizers", [opt])
    assert len(chained) == 1, f"one DistributedOptimizer expected, got {len(chained)}"
    dopt = chained[0]
    tokens = torch.randint(0, 128, (2, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(7))
    pos = torch.arange(32, device="cuda").expand(2, 32)

    def one_step():
        ddp.zero_grad_buffer()
        opt.zero_grad()
        model(tokens, pos, attention_mask=None, labels=tokens).mean().backward()
        ddp.finish_grad_sync()
        opt.step()

    buf = io.BytesIO()
    torch.save({"optimizer": dopt.state_dict(), "param_state": dopt.get_parameter_state_dp_reshardable()}, buf)
    one_step()
    after = [p.detach().clone() for p in model.parameters()]
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    for key, per_dtype in ckpt["param_state"].items():
        if isinstance(key, int):  # a grad buffer: {dtype: [bucket: [element]]}
            for buckets in per_dtype.values():
                for bucket in buckets:
                    for elem in bucket:
                        elem.setdefault("padding", False)  # what sharded_state_dict marks
    dopt.optimizer.state.clear()  # a fresh process: no moments, no step counts until the load
    dopt.load_state_dict(ckpt["optimizer"])
    dopt.load_parameter_state_from_dp_reshardable(ckpt["param_state"])
    one_step()
    diff = max((p.detach() - a).abs().max().item() for p, a in zip(model.parameters(), after))
    piece_steps = sorted({float(st["step"]) for st in dopt.optimizer.state.values()})
    group_steps = sorted({g.get("step") for g in dopt.optimizer.param_groups if g["params"]})
    return {"max_abs_diff_after_resume": diff, "piece_steps": piece_steps, "group_steps": group_steps,
            "pass": diff <= 1e-5 and piece_steps == [float(steps_done + 1)] and group_steps == [steps_done + 1]}


def train(ngpu: int, steps: int):
    """The training loop on the GPU(s): reads the run's metrics.jsonl."""
    out = {}
    work = Path(tempfile.mkdtemp(prefix="merit_gpu_smoke_"))
    data = work / "data"
    subprocess.run([sys.executable, "-m", "merit_ds.data", "prepare", "--input", "kjv", "--out", str(data)], check=True, cwd=REPO,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    launcher = _launcher()
    gpu, card = _this_gpu()
    for model, batch in (("tiny", 32), ("gpt2-small", 8 * ngpu)):
        run = work / model
        cmd = [*launcher, "--num_gpus", str(ngpu), "--module", "merit_ds.train", "--model", model, "--data", str(data),
               "--out", str(run), "--steps", str(steps), "--global-batch", str(batch), "--zero-stage", "1",
               "--precision", "bf16", "--optimizer", "merit"]  # the recipes' engine (BF16_Optimizer)
        proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                              timeout=900)
        entry = {"rc": proc.returncode, "cmd": " ".join(cmd[len(launcher):])}
        if proc.returncode != 0:
            entry["tail"] = (proc.stdout[-1500:] + proc.stderr[-2500:])
        entry.update(_run_metrics(run))
        if gpu is None:
            entry["plan"] = f"{card}: not a card merit_ds.train.plan.GPUS lists; no plan comparison"
        else:
            plan = subprocess.run([sys.executable, "-m", "merit_ds", "plan", "--model", model, "--batch", str(batch),
                                   "--nodes", "1", "--gpus-per-node", str(ngpu), "--gpu", gpu, "--precision", "bf16"],
                                  cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                                  timeout=300)
            entry["plan"] = plan.stdout[-1500:] if plan.returncode == 0 else f"plan failed: {plan.stderr[-800:]}"
        out[model] = entry
    out["pass"] = all(v["rc"] == 0 for v in out.values() if isinstance(v, dict))
    return out


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    env = results.get("env", {})
    lines = ["# GPU smoke test", "", f"`bash benchmarks/gpu_smoke.sh` on {', '.join(env.get('gpus', []))} "
             f"(torch {env.get('torch')}, CUDA {env.get('cuda')}, DeepSpeed {env.get('deepspeed')}).", ""]
    for name, r in results.items():
        if name == "env":
            continue
        lines.append(f"## {name}: {'ok' if r.get('ok') else 'FAILED'} ({r.get('seconds')} s)")
        lines.append("")
        if not r.get("ok"):
            lines += ["```", r.get("error", "")[:1500], "```", ""]
            continue
        if name == "optimizer_step":
            lines += ["| optimizer | median (ms) | min..max (ms) | vs AdamW fused |", "| --- | ---: | ---: | ---: |"]
            for k, v in r.items():
                if isinstance(v, dict):
                    lines.append(f"| {k} | {v['median_ms']:.2f} | {v['min_ms']:.2f}..{v['max_ms']:.2f} | "
                                 f"{v['vs_adamw_fused']:.2f}x |")
        elif name == "train_stages":
            lines += [f"card: {r.get('card')} (plan: --gpu {r.get('plan_gpu')})", "",
                      "| ZeRO | micro-batch | compile | tokens/s (median, min..max) | MFU | peak GiB | plan GiB | measured / plan |",
                      "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
            for e in r.get("runs", []):
                tps, rng = e.get("tokens_per_s"), e.get("tokens_per_s_range")
                tps_s = f"{tps:,.0f} ({rng[0]:,.0f}..{rng[1]:,.0f})" if tps is not None and rng else ("FAILED" if e["rc"] else "-")
                fmt = lambda k, f: f.format(e[k]) if isinstance(e.get(k), (int, float)) else "-"  # noqa: E731
                lines.append(f"| {e['stage']} | {e['micro_batch']} | {e['compile']} | {tps_s} | {fmt('mfu', '{:.3f}')} | "
                             f"{fmt('peak_memory_gib', '{:.1f}')} | {fmt('plan_gib', '{:.1f}')} | {fmt('measured_over_plan', '{:.2f}')} |")
        elif name == "segmented_step":
            lines += ["| step on one partition | median (ms) | min..max (ms) | vs Adam | effective GB/s |",
                      "| --- | ---: | ---: | ---: | ---: |"]
            for k, v in r["times"].items():
                lines.append(f"| {k} | {v['median_ms']:.2f} | {v['min_ms']:.2f}..{v['max_ms']:.2f} | "
                             f"{v['vs_adam']:.2f}x | {v['gb_per_s']:.0f} |")
            lines += ["", "```", json.dumps({k: v for k, v in r.items() if k not in ("ok", "seconds", "times")},
                                            indent=1, default=str)[:3000], "```"]
        else:
            lines += ["```", json.dumps({k: v for k, v in r.items() if k not in ("ok", "seconds")}, indent=1,
                                        default=str)[:4000], "```"]
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results" / "gpu_smoke"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--stage-steps", type=int, default=50, help="steps of each train_stages run (default 50)")
    ap.add_argument("--only", nargs="*", help="sections to run (default: all)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to do.")
        return 0
    ngpu = torch.cuda.device_count()
    results: dict = {}
    wanted = set(args.only or ["env", "optimizer_equivalence", "optimizer_step", "segmented_step", "sharded", "train",
                               "train_stages", "megatron_factory"])
    todo = [("env", env_info), ("optimizer_equivalence", optimizer_equivalence),
            ("optimizer_step", lambda: optimizer_step(args.rounds)),
            ("segmented_step", lambda: segmented_step(args.rounds)), ("sharded", lambda: sharded(ngpu)),
            ("train", lambda: train(ngpu, args.steps)), ("train_stages", lambda: train_stages(ngpu, args.stage_steps)),
            ("megatron_factory", megatron_factory)]
    for name, fn in todo:
        if name in wanted:
            section(results, name)(fn)
            write(results, Path(args.out))  # after every section: a killed run keeps what it had
    failed = [k for k, v in results.items() if not v.get("ok")]
    print(f"gpu_smoke: wrote {args.out}.md; failed sections: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
