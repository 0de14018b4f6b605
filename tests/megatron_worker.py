"""Worker for test_megatron.py: MERIT on megatron-core DistributedOptimizer pieces, real ranks on gloo.

megatron-core's DistributedOptimizer cannot run on a CPU-only torch (its grad buffers are
allocated with ``torch.cuda.current_device()``); its range-map classmethods can. So this worker
lays out a grad buffer the way megatron-core's DDP does (parameters in reverse order, each
starting at a 64-element boundary, the bucket padded to a multiple of the data-parallel size),
asks megatron-core's own ``DistributedOptimizer._build_model_gbuf_range`` which part of which
parameter this rank owns, cuts the fp32 pieces exactly as ``_build_model_and_main_param_groups``
does (``model_param.view(-1)[start:end]``), swaps them into MERIT's param groups and attaches
them with merit_ds.megatron (the code the factory runs on a GPU). Tensor parallelism comes from
megatron-core's ``parallel_state.initialize_model_parallel`` and Megatron's
``tensor_model_parallel`` / ``partition_dim`` attributes.

Each step, every rank's pieces are reassembled into the whole matrices and compared with
single-device MERIT (functional, its own moments) on the whole matrices fed the same gradient.
``--naive``: the pieces stepped as plain vectors (negative control).

``--resume-after K`` (with ``--megatron-path torch|te``): after K steps the optimizer goes through
megatron-core's own checkpoint code, called on a stand-in that holds only what it reads (the real
object needs CUDA): ``DistributedOptimizer.state_dict`` and ``get_parameter_state_dp_reshardable``
save, ``torch.save`` / ``torch.load`` serialize, a fresh optimizer on the same pieces (their values
wiped) is restored by ``load_state_dict`` and ``load_parameter_state_from_dp_reshardable``, and the
run goes on; the comparison with the uninterrupted single-device reference continues step by step.
``torch`` / ``te``: megatron-core's two step-count paths (no TE/Apex: one step tensor for every
state; TE/Apex installed: the count lives in the param groups). ``--drop-group-step``: the saved
groups lose their step (negative control: a resumed LAMB restarts its bias correction).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

# name, whole shape, split dim under TP (Megatron: 0 column-parallel weight and bias, 1 row-parallel)
PARAMS = [("emb", (13, 6), None), ("qkv_w", (12, 6), 0), ("qkv_b", (12,), 0), ("proj_w", (6, 8), 1),
          ("proj_b", (6,), None), ("ln_w", (6,), None), ("fc_w", (10, 6), 0), ("out_w", (6, 10), 1)]
HP = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
STEPS = 3
# what megatron-core's factory puts in every param group; its checkpoint load matches saved groups by them
MEGATRON_GROUP_KEYS = [dict(wd_mult=1.0, lr_mult=1.0, is_expert_parallel=False, is_decoupled_lr=False),
                       dict(wd_mult=1.0, lr_mult=1.5, is_expert_parallel=False, is_decoupled_lr=False)]


class _Bucket:
    def __init__(self, size, offset):
        self.grad_data = torch.empty(size)  # megatron-core reads only its numel
        self.offset = offset


class _Buffer:
    """What ``_build_model_gbuf_range`` reads of megatron-core's ``_ParamAndGradBuffer``."""

    def __init__(self, params, dp_group):
        self.data_parallel_group = dp_group
        dp = dp_group.size()
        self.param_index_map, at = {}, 0
        for p in reversed(params):  # the DDP lays parameters out in reverse order
            at = (at + 63) // 64 * 64  # each at a 64-element boundary
            self.param_index_map[p] = (at, at + p.numel(), 0)
            at += p.numel()
        size = (at + dp - 1) // dp * dp  # one bucket, divisible by the data-parallel size
        self.buckets = [_Bucket(size, 0)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--naive", action="store_true")
    ap.add_argument("--optimizer", default="merit")
    ap.add_argument("--small-group", action="store_true",
                    help="ln_w in a group of its own (lr 0.03): wholly on one data-parallel rank, empty on the others")
    ap.add_argument("--resume-after", type=int, default=None)
    ap.add_argument("--megatron-path", choices=["torch", "te"], default="torch")
    ap.add_argument("--drop-group-step", action="store_true")
    a = ap.parse_args()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    import merit_ds  # noqa: F401
    from merit_ds.megatron import attach_distributed_optimizer, pieces_of_distributed_optimizer, statistics_groups
    from merit_ds.optim import LAMB, MERIT, lamb, merit
    from merit_ds.sharding import collective
    from merit_ds.sharding.pieces import attach_pieces

    ps.initialize_model_parallel(tensor_model_parallel_size=a.tp)
    tp_group, dp_group = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()
    tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    cls, fn = (MERIT, merit) if a.optimizer == "merit" else (LAMB, lamb)

    g = torch.Generator().manual_seed(0)
    whole = {n: torch.randn(*s, generator=g) for n, s, _ in PARAMS}
    local = {}
    for n, s, dim in PARAMS:
        t = whole[n]
        if dim is not None and a.tp > 1:
            t = t.chunk(a.tp, dim=dim)[tp_rank]
        p = torch.nn.Parameter(t.clone())
        if dim is not None:
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1
        local[n] = p
    params = [local[n] for n, _, _ in PARAMS]
    buffer = _Buffer(params, dp_group)
    gbuf_range = DistributedOptimizer._build_model_gbuf_range(buffer, 0)  # megatron-core's own
    param_map = gbuf_range["param_map"]
    owned = [p for p in params if p in param_map]
    mains = [p.detach().view(-1)[param_map[p]["param"].start:param_map[p]["param"].end].clone() for p in owned]
    main_of = {id(p): m for p, m in zip(owned, mains)}
    names_all = [n for n, _, _ in PARAMS]
    cut_mid_row = any(p.dim() == 2 and (param_map[p]["param"].start % p.shape[1] or param_map[p]["param"].end % p.shape[1])
                      for p in owned)

    groups = [[p for n, p in zip(names_all, params) if not (a.small_group and n == "ln_w")]]
    if a.small_group:
        groups.append([local["ln_w"]])
    def build():
        o = cls([dict(params=g, **MEGATRON_GROUP_KEYS[i], **({"lr": 0.03} if i else {})) for i, g in enumerate(groups)],
                **HP)
        for group, members in zip(o.param_groups, groups):  # what DistributedOptimizer does to the inner optimizer
            group["params"] = [main_of[id(p)] for p in members if id(p) in main_of]
        if not a.naive:
            pg, tp = statistics_groups(dp_group, tp_group if a.tp > 1 else None)
            attach_pieces(o, pieces_of_distributed_optimizer(owned, mains, lambda p: param_map[p]["param"], dp_group,
                                                             tp_group if a.tp > 1 else None), process_group=pg, tp=tp)
        return o

    opt = build()
    res_groups = [len(g["params"]) for g in opt.param_groups]
    if a.naive:
        naive = cls([{"params": list(mains)}], **HP)  # each piece a plain vector (one group)
    ref_w = {n: whole[n].clone() for n, _, _ in PARAMS}
    ref_state = {n: (torch.zeros_like(whole[n]), torch.zeros_like(whole[n]), torch.tensor(0.0)) for n, _, _ in PARAMS}
    res = {"group_sizes": res_groups, "diff": [], "diff_matrices": [], "all_reduces": [], "cut_mid_row": cut_mid_row, "pieces": len(mains),
           "params": len(params)}
    steps = STEPS if a.resume_after is None else a.resume_after + 2
    for step in range(steps):
        if step == a.resume_after:
            opt, res["shared_step_tensors_after_load"] = _megatron_checkpoint_round_trip(
                opt, build, gbuf_range, groups, main_of, a.megatron_path, a.drop_group_step)
        gg = torch.Generator().manual_seed(100 + step)
        grads = {n: torch.randn(*s, generator=gg) for n, s, _ in PARAMS}  # the averaged gradient, whole
        for n, s, dim in PARAMS:
            lg = grads[n].chunk(a.tp, dim=dim)[tp_rank] if dim is not None and a.tp > 1 else grads[n]
            local[n].grad = lg.clone()
        for p, m in zip(owned, mains):
            r = param_map[p]["param"]
            m.grad = p.grad.reshape(-1)[r.start:r.end].clone()
        c0 = collective.counter.calls
        (naive if a.naive else opt).step()
        res["all_reduces"].append(collective.counter.calls - c0)
        # the reference: single-device optimizer on the whole tensors from the same weights
        kw = dict(lr=HP["lr"], beta1=HP["betas"][0], beta2=HP["betas"][1], eps=HP["eps"], weight_decay=HP["weight_decay"])
        if cls is LAMB:
            kw.update(max_trust_ratio=10.0, bias_correction=True)
        for gi, members in enumerate(groups):
            names = [n for n, p in local.items() if any(p is m for m in members)]
            gkw = dict(kw, lr=0.03) if gi == 1 else kw
            fn([ref_w[n] for n in names], [grads[n] for n in names], [ref_state[n][0] for n in names],
               [ref_state[n][1] for n in names], [ref_state[n][2] for n in names], **gkw)
        # reassemble: pieces into this TP rank's slices (sum over DP), slices into wholes (gather over TP)
        diff = diff_m = 0.0
        for n, s, dim in PARAMS:
            p = local[n]
            buf = torch.zeros(p.numel())
            if p in param_map:
                r = param_map[p]["param"]
                buf[r.start:r.end] = main_of[id(p)].detach()
            dist.all_reduce(buf, group=dp_group)
            sl = buf.view(p.shape)
            if dim is not None and a.tp > 1:
                parts = [torch.empty_like(sl) for _ in range(a.tp)]
                dist.all_gather(parts, sl.contiguous(), group=tp_group)
                sl = torch.cat(parts, dim=dim)
            d = (sl - ref_w[n]).abs().max().item()
            diff = max(diff, d)
            if len(s) == 2:
                diff_m = max(diff_m, d)
            ref_w[n].copy_(sl)  # one step at a time from identical inputs
            with torch.no_grad():  # and the local slices follow the sharded result, as DDP's all-gather would
                full = sl if dim is None or a.tp == 1 else sl.chunk(a.tp, dim=dim)[tp_rank]
                p.copy_(full)
        res["diff"].append(diff)
        res["diff_matrices"].append(diff_m)
    flag = torch.tensor([float(res["cut_mid_row"])])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    res["cut_mid_row"] = bool(flag.item())
    res["world"], res["tp"] = dist.get_world_size(), a.tp
    res["piece_steps"] = sorted({float(st["step"]) for st in opt.state.values()})  # every piece's count
    res["group_steps"] = [g.get("step") for g in opt.param_groups if g["params"]]  # groups with a piece here
    smallest = torch.tensor([float(min(res_groups))])
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    res["some_rank_has_an_empty_group"] = smallest.item() == 0
    if dist.get_rank() == 0:
        with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def _megatron_checkpoint_round_trip(opt, build, gbuf_range, groups, main_of, path, drop_group_step):
    """Save ``opt`` with megatron-core's DistributedOptimizer checkpoint code, restore it into a fresh
    optimizer on the same (wiped) pieces; returns it and how many distinct step tensors its states
    hold right after the load (megatron-core's torch path gives them all one)."""
    import io
    from types import SimpleNamespace

    import megatron.core.optimizer.distrib_optimizer as mdo

    index_map = {}  # model parameter -> (its group, its place among the group's pieces)
    for gi, members in enumerate(groups):
        for order, p in enumerate(p for p in members if id(p) in main_of):
            index_map[p] = (gi, order)
    numel = {0: {(torch.float32, torch.float32): [0]}}  # the load checks it against the same value

    def stand_in(inner):  # the attributes these methods read; the real object needs CUDA
        d = mdo.DistributedOptimizer.__new__(mdo.DistributedOptimizer)
        d.optimizer, d.grad_scaler = inner, None
        d.ddp_config = SimpleNamespace(use_megatron_fsdp=False)
        d.config = SimpleNamespace(fp16=False, exp_avg_dtype=torch.float32, exp_avg_sq_dtype=torch.float32,
                                   use_precision_aware_optimizer_no_fp8_or_ds_fp8=False)
        d.gbuf_ranges = [{(torch.float32, torch.float32): [gbuf_range]}]
        d.model_param_group_index_map = index_map
        d.per_bucket_numel = d.per_bucket_numel_unpadded = numel
        return d

    flags = {"torch": (False, False), "te": (True, True)}[path]  # (HAVE_APEX_OR_TE, USING_TE_OPTIMIZER)
    before = (mdo.HAVE_APEX_OR_TE, mdo.USING_TE_OPTIMIZER, torch.cuda.current_device)
    mdo.HAVE_APEX_OR_TE, mdo.USING_TE_OPTIMIZER = flags
    torch.cuda.current_device = lambda: "cpu"  # where load_state_dict allocates the moments
    try:
        old = stand_in(opt)
        buf = io.BytesIO()
        torch.save({"optimizer": mdo.DistributedOptimizer.state_dict(old),
                    "param_state": mdo.DistributedOptimizer.get_parameter_state_dp_reshardable(old)}, buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=False)
        if drop_group_step:
            for g in ckpt["optimizer"]["optimizer"]["param_groups"]:
                g.pop("step", None)
        for bucket in ckpt["param_state"][0][(torch.float32, torch.float32)]:
            for elem in bucket:
                elem["padding"] = False  # what megatron-core's sharded_state_dict marks on each element
        with torch.no_grad():
            for m in main_of.values():
                m.fill_(float("nan"))  # the restore must bring the weights back
        new = stand_in(build())
        mdo.DistributedOptimizer.load_state_dict(new, ckpt["optimizer"])
        shared = len({id(st["step"]) for st in new.optimizer.state.values() if "step" in st})
        mdo.DistributedOptimizer.load_parameter_state_from_dp_reshardable(new, ckpt["param_state"])
    finally:
        mdo.HAVE_APEX_OR_TE, mdo.USING_TE_OPTIMIZER, torch.cuda.current_device = before
    return new.optimizer, shared


if __name__ == "__main__":
    main()
