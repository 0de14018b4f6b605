"""Worker for test_zero_deepspeed.py: several ZeRO configs in one process group.

``--optimizer merit|lamb`` picks the optimizer under test (the same harness serves both; the
reference is that optimizer's functional single_tensor step). For every config: build a
tiny model with odd sizes, wrap a client optimizer with
``deepspeed.initialize``, and hook ``MERIT.step`` (called by DeepSpeed once per group /
sub-group / all groups). Around each call the hook

- gathers every rank's flat fp32 partition and gradient (``all_gather``, test-side) and
  rebuilds the full tensors from DeepSpeed's own records (ZeRO 1/2:
  ``round_robin_bit16_offsets``; BF16_Optimizer: contiguous ``bf16_groups``; ZeRO 3:
  ``partition_numel`` pieces) -- independently of merit_ds's layout code;
- runs single-device MERIT (functional; the same arithmetic as the sharded step: single_tensor
  for the foreach path, the CPU kernel for its fused form and, on CUDA partitions, for the
  Triton kernels, on CPU copies) on exactly those full weights and averaged gradient, with its
  own moments, and compares with the sharded result (atol=rtol=0);
- counts ``torch.distributed.all_reduce`` calls inside the step (must be exactly 1, with
  ``track_stats`` on);
- compares the trust-ratio summary the sharded step recorded per fragment, combined over
  ranks by ``reduce_trust_stats`` (outside the step), with the reference's own statistics:
  min, max and clipped count exactly, mean to 1e-6 relative;
- at the first call, runs the naive MERIT on the flat partition as one vector (negative
  control) and records how far it lands from the correct update.

Outside the hook it checks ``deepspeed.utils.safe_get_full_fp32_param`` against the same
reference (where DeepSpeed's mapping is valid), that some matrix is split mid-row and some
rank owns none of some parameter, and (config ``full_batch``) the distance to a true
full-batch single-process run after one step.

Usage: ``zero_worker.py --configs NAME [NAME ...]``; result JSON at $MERIT_TEST_RESULT.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

import deepspeed
import merit_ds
from merit_ds.optim import LAMB, MERIT, lamb, merge_trust_stats, merit, summarize_trust_stats
from merit_ds.sharding import collective, reduce_trust_stats

warnings.filterwarnings("ignore")
HP = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
VOCAB, STEPS, MICRO = 13, 3, 2
OPTIMIZERS = {"merit": (MERIT, merit), "lamb": (LAMB, lamb)}
OPT_CLS, OPT_FN = MERIT, merit  # set from --optimizer


def _ran_triton(opt) -> bool:
    """Whether the sharded step just ran MERIT's Triton kernels (read from the form it
    recorded, not decided again here): they do the CPU kernel's arithmetic."""
    plans = opt.__dict__.get("_merit_segmented_plans", {}).values()
    return any(form.__name__.endswith("segmented_triton") for form, _ in plans)


def functional_step(params, grads, exp_avgs, exp_avg_sqs, steps, grp, cpu_kernel_reference=False, **extra):
    """The optimizer's functional single-device step with ``grp``'s hyperparameters;
    ``cpu_kernel_reference``: on CPU copies with the CPU kernel (where the sharded step ran
    the Triton kernels), written back."""
    if cpu_kernel_reference:
        tensors = [params, grads, exp_avgs, exp_avg_sqs, steps]
        on_cpu = [[t.detach().cpu().clone() for t in ts] for ts in tensors]
        out = functional_step(*on_cpu, {**grp, "implementation": None}, **extra)
        with torch.no_grad():
            for ts, cs in zip(tensors, on_cpu):
                for t, c in zip(ts, cs):
                    t.copy_(c)
        return out
    # The same path as the sharded step: the CPU kernel where the group resolves to it (the
    # default for fp32 on CPU; kernel vs kernel is bitwise), else the single_tensor reference
    # (bitwise equal to the foreach path the sharded step then runs).
    impl = grp["implementation"]
    kw = dict(lr=float(grp["lr"]), beta1=grp["betas"][0], beta2=grp["betas"][1], eps=grp["eps"],
              weight_decay=grp["weight_decay"], implementation="single_tensor" if impl == "foreach" else impl, **extra)
    if OPT_CLS is LAMB:
        kw.update(max_trust_ratio=grp["max_trust_ratio"], bias_correction=grp["bias_correction"])
    return OPT_FN(params, grads, exp_avgs, exp_avg_sqs, steps, **kw)

CONFIGS = {
    # name: (stage, precision, extras)
    "z1_fp32": dict(stage=1, dtype="fp32"),
    "z2_fp32": dict(stage=2, dtype="fp32", full_batch=True),
    "z3_fp32": dict(stage=3, dtype="fp32"),
    "z1_bf16": dict(stage=1, dtype="bf16"),
    "z2_bf16": dict(stage=2, dtype="bf16"),
    "z3_bf16": dict(stage=3, dtype="bf16"),
    "bf16opt": dict(stage=1, dtype="bf16", grad_accum_fp32=True),
    "z1_fp16": dict(stage=1, dtype="fp16", overflow_at=1),
    # no ZeRO: DeepSpeed's FP16_UnfusedOptimizer hands MERIT same-shaped fp32 copies
    "z0_bf16": dict(stage=0, dtype="bf16", unsharded=True),
    "z0_fp16": dict(stage=0, dtype="fp16", unsharded=True),
    "z2_fp16": dict(stage=2, dtype="fp16", overflow_at=1),
    "z3_fp16": dict(stage=3, dtype="fp16", overflow_at=1),
    "z2_rr": dict(stage=2, dtype="fp32", round_robin=True),
    "z2_align": dict(stage=2, dtype="bf16", parameter_alignment=True),
    "z3_subgroups": dict(stage=3, dtype="fp32", sub_group_size=100),
    "z1_offload": dict(stage=1, dtype="fp32", offload=True),
    "z2_offload_rr": dict(stage=2, dtype="fp32", offload=True, round_robin=True),
    "z3_offload": dict(stage=3, dtype="fp32", offload=True),
    "z3_offload_param": dict(stage=3, dtype="fp32", offload=True, offload_param=True),
    "z3_offload_param_bf16": dict(stage=3, dtype="bf16", offload=True, offload_param=True),
    "z2_groups": dict(stage=2, dtype="fp32", two_groups=True),
    "bf16opt_groups": dict(stage=1, dtype="bf16", grad_accum_fp32=True, two_groups=True),
    # what the bf16 recipes run (issue 12): ZeRO 2/3 accumulate gradients in an fp32 partition
    "z2_bf16_acc32": dict(stage=2, dtype="bf16", grad_accum_fp32=True),
    "z2_bf16_acc32_offload": dict(stage=2, dtype="bf16", grad_accum_fp32=True, offload=True),
    "z3_bf16_acc32": dict(stage=3, dtype="bf16", grad_accum_fp32=True),
    "z3_groups": dict(stage=3, dtype="bf16", two_groups=True),
    "z2_bf16_offload": dict(stage=2, dtype="bf16", offload=True),
    "z2_attach": dict(stage=2, dtype="fp32", attach=True),
    # one NaN in one gradient element on one rank; with bf16 "check_grad_overflow": false
    # DeepSpeed does not skip the step itself, so MERIT must skip that parameter on every
    # rank (its policy "skip")
    "z2_bf16_nan": dict(stage=2, dtype="bf16", nan_at=1),
    # the materialised path (implementation="foreach") instead of the default CPU kernel
    "z2_foreach": dict(stage=2, dtype="fp32", implementation="foreach"),
    "z3_foreach": dict(stage=3, dtype="bf16", implementation="foreach"),
    "z2_foreach_nan": dict(stage=2, dtype="bf16", nan_at=1, implementation="foreach"),
    # track_stats off (the others have it on): MERIT's fused form without statistics
    "z2_kernel": dict(stage=2, dtype="fp32", track_stats=False),
    "z3_kernel_offload": dict(stage=3, dtype="fp32", offload=True, track_stats=False),
    "z2_kernel_rr": dict(stage=2, dtype="bf16", round_robin=True, track_stats=False),
    "z2_kernel_nan": dict(stage=2, dtype="bf16", nan_at=1, track_stats=False),
}


class Tiny(nn.Module):
    """Odd sizes so that flat partitions cut matrices mid-row; 1- and 2-element vectors
    that ZeRO-3 splits leave some rank without."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 9)
        self.l1 = nn.Linear(9, 11)
        self.l2 = nn.Linear(11, 7)
        self.head = nn.Linear(7, VOCAB, bias=False)
        self.gate = nn.Parameter(torch.tensor([1.0, 0.5]))
        self.scale = nn.Parameter(torch.tensor([1.25]))  # ZeRO 3: only rank 0 holds it

    def forward(self, x, y):
        h = torch.tanh(self.l1(self.emb(x)))
        h = torch.tanh(self.l2(h)) * self.gate[0] + self.gate[1]
        logits = self.head(h).float() * self.scale.float()
        return nn.functional.cross_entropy(logits.view(-1, VOCAB), y.view(-1))


DEVICE = torch.device("cpu")  # where batches and collectives live: cuda:<local rank> with --backend nccl


def batch(step, rank, world, micro=MICRO):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randint(0, VOCAB, (micro, 5), generator=g)
    return x.to(DEVICE), ((x * 3 + 1) % VOCAB).to(DEVICE)


def ds_config(cfg, world):
    zero = {"stage": cfg["stage"]}
    if cfg.get("round_robin"):
        zero["round_robin_gradients"] = True
    if cfg.get("parameter_alignment"):
        zero["parameter_alignment"] = True
    if cfg.get("sub_group_size"):
        zero["sub_group_size"] = cfg["sub_group_size"]
    if cfg.get("offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.get("offload_param"):  # ZeRO-3 parameter offload (ZeRO-Infinity to CPU)
        zero["offload_param"] = {"device": "cpu"}
    if cfg["stage"] == 3:
        zero["stage3_param_persistence_threshold"] = 0
    c = {
        "train_batch_size": MICRO * world,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    if cfg["dtype"] == "bf16":
        c["bf16"] = {"enabled": True}
        if cfg.get("nan_at") is not None:
            c["bf16"]["check_grad_overflow"] = False  # let the NaN reach the optimizer
        if cfg.get("grad_accum_fp32"):
            c["data_types"] = {"grad_accum_dtype": "fp32"}
    if cfg["dtype"] == "fp16":
        c["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 2}
    return c


def gather_flat(t):
    t = t.to(DEVICE)  # an offloaded (CPU) partition meets NCCL on the GPU
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


class Oracle:
    """Full tensors from gathered flat partitions, using DeepSpeed's records only."""

    def __init__(self, engine):
        self.zo = engine.optimizer
        self.kind = type(self.zo).__name__

    def partitions(self):
        zo = self.zo
        if self.kind == "DeepSpeedZeroOptimizer_Stage3":
            return list(zo.fp32_partitioned_groups_flat)
        if self.kind == "BF16_Optimizer":
            return list(zo.fp32_groups_flat_partition)
        return list(zo.single_partition_of_fp32_groups)

    def params_of(self, index):
        zo = self.zo
        if self.kind == "DeepSpeedZeroOptimizer_Stage3":
            return list(zo.fp16_groups[index])
        if self.kind == "BF16_Optimizer":
            return list(zo.bf16_groups[index])
        return list(zo.bit16_groups[index])

    def full(self, index, gathered):
        """{param: full fp32 tensor} of partition ``index`` from all ranks' flats."""
        zo, out = self.zo, {}
        if self.kind == "DeepSpeedZeroOptimizer_Stage3":
            off = 0
            for p in zo.fp16_groups[index]:
                pn = p.partition_numel()
                full = torch.cat([g[off : off + pn] for g in gathered])[: p.ds_numel]
                out[p] = full.view(p.ds_shape).clone()
                off += pn
            return out
        flat = torch.cat(gathered)
        if self.kind == "BF16_Optimizer":
            off = 0
            for p in zo.bf16_groups[index]:
                out[p] = flat[off : off + p.numel()].view(p.shape).clone()
                off += p.numel()
            return out
        for p, off in zip(zo.round_robin_bit16_groups[index], zo.round_robin_bit16_offsets[index]):
            out[p] = flat[off : off + p.numel()].view(p.shape).clone()
        return out

    def index_of(self, flat):
        return next(i for i, t in enumerate(self.partitions()) if t is flat)


def run_config(name, cfg, rank, world):
    if cfg["dtype"] == "fp16":
        # DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has fp16 kernels for this CPU
        # (AVX512-FP16/AMX); torch runs fp16 on any CPU, slowly. The loss-scaling logic under
        # test does not depend on the hardware.
        from deepspeed.accelerator import get_accelerator

        get_accelerator().is_fp16_supported = lambda: True
    torch.manual_seed(0)
    model = Tiny()
    if cfg.get("two_groups"):
        mats = [p for p in model.parameters() if p.dim() >= 2]
        vecs = [p for p in model.parameters() if p.dim() < 2]
        params = [{"params": mats}, {"params": vecs, "weight_decay": 0.0, "lr": 0.03}]
    else:
        params = model.parameters()
    opt = OPT_CLS(params, **HP, implementation=cfg.get("implementation"))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(cfg, world))
    if cfg.get("unsharded"):  # ordinary MERIT step on each fp32 master copy, no collective
        c0 = collective.counter.calls
        masters = [p for g in opt.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in masters]
        for step in range(STEPS):
            x, y = batch(step, rank, world)
            engine.backward(engine(x, y))
            engine.step()
        return {
            "wrapper": type(engine.optimizer).__name__,
            "master_shapes_match": [tuple(p.shape) for p in masters] == [tuple(p.shape) for p in model.parameters()],
            "moved": max((p - b).abs().max().item() for p, b in zip(masters, before)),
            "stats_all_reduces": collective.counter.calls - c0,
            "sharded_groups": len(opt.__dict__.get("_merit_layouts", {})),
        }
    if cfg.get("attach"):
        merit_ds.attach(opt, engine)  # explicit: layout from the ZeRO optimizer's own records
    oracle = Oracle(engine)
    ref_state = {}  # param -> (exp_avg, exp_avg_sq, step) of the single-device reference
    hp_of = {}  # param -> its group's hyperparameters
    for g in opt.param_groups:
        for p in opt.original_params(g):
            hp_of[p] = g
    res = dict(max_diff=0.0, max_rel_diff=0.0, compared=0, allreduce_per_step=[], naive_diff=None, calls=0, trust_checked=0,
               trust_exact=True, trust_mean_rel=0.0)
    real_step = opt.step
    opt.track_stats = cfg.get("track_stats", True)

    def hooked_step(*a, **k):
        active = [(opt.param_groups.index(g) if False else None, g["params"][0]) for g in opt.param_groups if g["params"]]
        before = {}
        for _, flat in active:
            i = oracle.index_of(flat)
            w = oracle.full(i, gather_flat(flat.detach()))
            gr = oracle.full(i, gather_flat(flat.grad.detach().to(torch.float32)))
            before[i] = (w, gr)
        if res["naive_diff"] is None:
            naive = []
            for _, flat in active:
                x = flat.detach().clone()
                m, v = torch.zeros_like(x), torch.zeros_like(x)
                grp = next(g for g in opt.param_groups if g["params"] and g["params"][0] is flat)
                functional_step([x], [flat.grad.float()], [m], [v], [torch.tensor(0.0)], grp)
                naive.append((flat, x))
        calls = [0]
        orig_all_reduce = dist.all_reduce

        def counting_all_reduce(*aa, **kk):
            calls[0] += 1
            return orig_all_reduce(*aa, **kk)

        c0 = collective.counter.calls
        opt.partial_stats.clear()
        dist.all_reduce = counting_all_reduce
        try:
            out = real_step(*a, **k)
        finally:
            dist.all_reduce = orig_all_reduce
        summary = reduce_trust_stats(opt)  # outside the step: 5 scalars per rank
        ref_stats = {}
        res["allreduce_per_step"].append([calls[0], collective.counter.calls - c0])
        res["calls"] += 1
        if res["naive_diff"] is None:
            d = max((x - flat.detach()).abs().max().item() for flat, x in naive)
            t = torch.tensor(d, device=DEVICE)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            res["naive_diff"] = t.item()
        for _, flat in active:
            i = oracle.index_of(flat)
            after = oracle.full(i, gather_flat(flat.detach()))
            w_before, g_full = before[i]
            ps = list(w_before)
            for p in ps:
                w = w_before[p]
                ref_state.setdefault(p, (torch.zeros_like(w), torch.zeros_like(w), torch.tensor(0.0)))
            # MERIT's unit is the parameter; LAMB's (non-finite skip, one step count) the group:
            # one functional call over the partition's parameters, as single-device LAMB steps a group
            units = [[p] for p in ps] if OPT_CLS is MERIT else [ps]
            for unit in units:
                grp = hp_of[unit[0]]
                functional_step([w_before[p] for p in unit], [g_full[p] for p in unit], [ref_state[p][0] for p in unit],
                                [ref_state[p][1] for p in unit], [ref_state[p][2] for p in unit], grp,
                                cpu_kernel_reference=_ran_triton(opt),
                                nonfinite_grads=grp["nonfinite_grads"], stats=ref_stats if opt.track_stats else None)
            for p in ps:
                w = w_before[p]
                diff = (w - after[p]).abs().max().item() if w.numel() else 0.0
                rel = ((w - after[p]).abs() / w.abs().clamp_min(1e-6)).max().item() if w.numel() else 0.0
                if math.isnan(diff):  # max() would silently drop a NaN
                    diff = rel = float("inf")
                res["max_diff"] = max(res["max_diff"], diff)
                res["max_rel_diff"] = max(res["max_rel_diff"], rel)
                if diff > 0 and os.environ.get("MERIT_DEBUG"):
                    print("DIFF", rank, tuple(w.shape), diff, (w - after[p]).abs().view(-1).nonzero().view(-1).tolist()[:20], flush=True)
                res["compared"] += 1
        want = summarize_trust_stats(merge_trust_stats(ref_stats.values()))
        res["trust_checked"] += 1
        if want is None and summary is None:  # nothing stepped anywhere (LAMB skipped a whole group): agree
            pass
        else:
            tol = 0.0 if OPT_CLS is MERIT else 1e-6  # LAMB: ratios from float64 sums in another order
            exact = want is not None and summary is not None and all(
                abs(summary[k] - want[k]) <= tol * abs(want[k]) for k in ("trust_ratio_min", "trust_ratio_max", "clip_fraction"))
            res["trust_exact"] = res["trust_exact"] and exact
            if exact:
                rel = abs(summary["trust_ratio_mean"] - want["trust_ratio_mean"]) / abs(want["trust_ratio_mean"])
                res["trust_mean_rel"] = max(res["trust_mean_rel"], rel)
            elif os.environ.get("MERIT_DEBUG"):
                print("TRUST", rank, summary, want, flush=True)
        return out

    opt.step = hooked_step

    # the split is real: some matrix cut mid-row on some rank, some rank without some param
    layouts = [v[1] for v in opt.__dict__.get("_merit_layouts", {}).values()]
    full_ref = None
    if cfg.get("full_batch"):
        torch.manual_seed(0)
        full_ref = Tiny()
        full_opt = OPT_CLS(full_ref.parameters(), **HP)
    for step in range(STEPS):
        x, y = batch(step, rank, world)
        hook = None
        if cfg.get("nan_at") == step and rank == world - 1:
            def poison(g):
                g = g.clone()
                g.view(-1)[-1] = float("nan")
                return g

            hook = model.l1.weight.register_hook(poison)
        loss = engine(x, y)
        if cfg.get("overflow_at") == step and rank == 0:
            loss = loss * float("inf")  # fp16 overflow on one rank: every rank must skip
        engine.backward(loss)
        if hook is not None:
            hook.remove()
        engine.step()
        if full_ref is not None and step == 0:
            xs, ys = zip(*[batch(step, r, world) for r in range(world)])
            full_ref.to(DEVICE)(torch.cat(xs), torch.cat(ys)).backward()
            full_opt.step()
            res["full_batch_diff"] = max(
                (deepspeed.utils.safe_get_full_fp32_param(p).cpu() - q.detach().cpu()).abs().max().item()
                for p, q in zip(model.parameters(), full_ref.parameters())
            )
    layouts = [v[1] for v in opt.__dict__.get("_merit_layouts", {}).values()]
    mid_row = any(
        f.is_matrix and any(length % (f.shape[1] * math.prod(f.shape[2:])) or col0 for _, length, _, col0 in f.row_pieces())
        for lay in layouts for f in lay.fragments
    )
    missing = any(not lay.fragments_of(i) for lay in layouts for i in range(len(lay.shapes)))
    flags = torch.tensor([float(mid_row), float(missing)], device=DEVICE)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    res["split_mid_row"], res["rank_without_param"] = bool(flags[0]), bool(flags[1])
    # DeepSpeed's own accessor agrees with the oracle (not under round robin: known DS bug)
    if not cfg.get("round_robin"):
        dd = 0.0
        for i, flat in enumerate(oracle.partitions()):
            full = oracle.full(i, gather_flat(flat.detach()))
            for p, w in full.items():
                dd = max(dd, (deepspeed.utils.safe_get_full_fp32_param(p).view(w.shape).to(w.device) - w).abs().max().item())
        res["safe_get_diff"] = dd
    res["skipped_steps"] = getattr(engine, "skipped_steps", 0)
    skips = [None] * world
    dist.all_gather_object(skips, opt.nonfinite_skips)
    res["nonfinite_skips"] = skips
    res["flavour"] = oracle.kind
    res["scratch_buffers"] = len(opt.__dict__.get("_merit_scratch", {}))  # 0: only the fused form ran
    res["offload_param"] = bool(getattr(engine.optimizer, "offload_param", False))  # DeepSpeed's own flag
    res["adapters"] = sorted({v[3] for v in opt.__dict__.get("_merit_layouts", {}).values()})
    engine.destroy() if hasattr(engine, "destroy") else None
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="merit")
    ap.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                    help="nccl: on GPUs (benchmarks/gpu_smoke.sh), one per rank")
    args = ap.parse_args()
    global OPT_CLS, OPT_FN, DEVICE
    OPT_CLS, OPT_FN = OPTIMIZERS[args.optimizer]
    if args.backend == "nccl":
        DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(DEVICE)
    deepspeed.init_distributed(dist_backend=args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in args.configs:
        try:
            results[name] = run_config(name, CONFIGS[name], rank, world)
        except Exception as e:  # report, keep the other configs running in lockstep
            import traceback

            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            raise
    if rank == 0:
        with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
            json.dump({"world": world, "configs": results}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter teardown: with several engines built in one process, a native
    # thread's destructor occasionally aborts at exit ("terminate called without an active
    # exception") after all results are written. Everything is flushed and synchronised here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
