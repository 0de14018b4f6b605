"""Worker for test_tensor_parallel.py: MERIT / LAMB under tensor x data parallelism, 4 CPU ranks
(TP 2 x DP 2), one step at a time against the single-device optimizer on the whole matrices.

Two families (one per process: DeepSpeed keeps its parallel groups in module globals):

- ``--family autotp``: DeepSpeed AutoTP training on a tiny HF Llama (``"tensor_parallel":
  {"autotp_size": 2}``), the optimizer named in the JSON. AutoTP splits q/k/v, gate/up and
  lm_head (unevenly: 43 rows as 22 + 21) along dim 0 and o/down along dim 1.
- ``--family mpu``: a Megatron-style model of this file's own column- and row-parallel
  layers (Megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes and its
  forward/backward collectives) with an ``mpu`` passed to ``deepspeed.initialize``; config
  ``megatron_ds`` replays Megatron-DeepSpeed's call (client Adam on Megatron's param groups,
  its parameter scheduler, the mpu, the config dict) under the opt-in replacement.

Around every ``step()`` of the optimizer the hook rebuilds, independently of merit_ds's layout
code, every parameter's whole fp32 weight and averaged gradient: DeepSpeed's own records
(ZeRO 1/2 ``round_robin_bit16_offsets``; no ZeRO: the parameters) over the data-parallel
group, then the TP slices over the TP group (split read from DeepSpeed's per-parameter
``partition_sizes`` or the layers' ``partition_dim``). It steps the single-device optimizer
(functional form, own moments) on exactly those, lets the sharded step run, rebuilds again and
records the largest difference, separately for split and replicated parameters, and the
statistics all-reduces inside the step. ``naive`` configs switch merit_ds's tensor-parallel
adapter off: the negative control (per-slice statistics).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as Fn

import deepspeed
import merit_ds
from merit_ds.optim import LAMB, MERIT, lamb, merit
from merit_ds.sharding import collective

warnings.filterwarnings("ignore")
STEPS, MICRO, TP = 3, 2, 2
HP = {"lr": 1e-2, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1}

CONFIGS = {
    # name: family, zero stage, optimizer JSON name, extras
    "autotp_z0": dict(family="autotp", stage=0, opt="MERIT"),
    "autotp_z1": dict(family="autotp", stage=1, opt="MERIT"),
    "autotp_z2": dict(family="autotp", stage=2, opt="MERIT"),
    "autotp_z2_foreach": dict(family="autotp", stage=2, opt="MERIT", implementation="foreach"),
    "autotp_z1_bf16": dict(family="autotp", stage=1, opt="MERIT", bf16=True),
    "autotp_z2_bf16_lamb": dict(family="autotp", stage=2, opt="ShardedLAMB", bf16=True),
    "autotp_z1_lamb": dict(family="autotp", stage=1, opt="ShardedLAMB"),
    "autotp_z2_lamb": dict(family="autotp", stage=2, opt="ShardedLAMB"),
    "autotp_z2_naive": dict(family="autotp", stage=2, opt="MERIT", naive=True),
    "mpu_z0": dict(family="mpu", stage=0, opt="MERIT"),
    "mpu_z1": dict(family="mpu", stage=1, opt="MERIT"),
    "mpu_z2": dict(family="mpu", stage=2, opt="MERIT"),
    "mpu_z2_lamb": dict(family="mpu", stage=2, opt="ShardedLAMB"),
    "mpu_z1_naive": dict(family="mpu", stage=1, opt="MERIT", naive=True),
    "megatron_ds": dict(family="mpu", stage=1, opt="MERIT", megatron_ds=True),
}


# ---- a Megatron-style mpu and tensor-parallel layers -------------------------------------------
class Mpu:
    """The parts of Megatron's ``mpu`` DeepSpeed and merit_ds call: TP groups {0,1}, {2,3};
    DP groups {0,2}, {1,3} (TP ranks adjacent, as Megatron lays them out)."""

    def __init__(self, world: int, tp: int):
        rank = dist.get_rank()
        self._tp = self._dp = None
        for start in range(0, world, tp):  # every rank creates every group, in the same order
            g = dist.new_group(list(range(start, start + tp)))
            if start <= rank < start + tp:
                self._tp = g
        for first in range(tp):
            g = dist.new_group(list(range(first, world, tp)))
            if rank % tp == first:
                self._dp = g
        self.tp_size, self.dp_size = tp, world // tp

    def get_tensor_model_parallel_group(self):
        return self._tp

    def get_tensor_model_parallel_rank(self):
        return dist.get_rank(group=self._tp)

    def get_tensor_model_parallel_world_size(self):
        return self.tp_size

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size

    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_rank(self):
        return dist.get_rank(group=self._dp)

    def get_data_parallel_world_size(self):
        return self.dp_size

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def _mark(p, dim):
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1


class ColumnParallelLinear(nn.Module):
    """Megatron's column-parallel linear: this rank's rows of W (out, in) and of b."""

    def __init__(self, full: nn.Linear, mpu: Mpu):
        super().__init__()
        r, n = mpu.get_tensor_model_parallel_rank(), mpu.tp_size
        rows = full.out_features // n
        self.weight = nn.Parameter(full.weight.detach()[r * rows : (r + 1) * rows].clone())
        self.bias = nn.Parameter(full.bias.detach()[r * rows : (r + 1) * rows].clone())
        _mark(self.weight, 0)
        _mark(self.bias, 0)
        self.group = mpu.get_tensor_model_parallel_group()

    def forward(self, x):
        return Fn.linear(_CopyToTP.apply(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Megatron's row-parallel linear: this rank's columns of W; the bias is replicated."""

    def __init__(self, full: nn.Linear, mpu: Mpu):
        super().__init__()
        r, n = mpu.get_tensor_model_parallel_rank(), mpu.tp_size
        cols = full.in_features // n
        self.weight = nn.Parameter(full.weight.detach()[:, r * cols : (r + 1) * cols].clone())
        self.bias = nn.Parameter(full.bias.detach().clone())
        _mark(self.weight, 1)
        self.group = mpu.get_tensor_model_parallel_group()

    def forward(self, x):
        return _ReduceFromTP.apply(Fn.linear(x, self.weight), self.group) + self.bias


VOCAB, HIDDEN, FFN = 13, 7, 10


class MegatronStyle(nn.Module):
    """embedding (replicated) -> column-parallel (7 -> 10) -> gelu -> row-parallel (10 -> 7)
    -> norm -> projection (7 -> 2) -> head (2 -> 13) (replicated)."""

    def __init__(self, mpu: Mpu):
        super().__init__()
        torch.manual_seed(0)  # the whole layers are the same on every rank; each keeps its slice
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.up = ColumnParallelLinear(nn.Linear(HIDDEN, FFN), mpu)
        self.down = RowParallelLinear(nn.Linear(FFN, HIDDEN), mpu)
        self.norm = nn.LayerNorm(HIDDEN)
        # (a narrow projection first: its sizes put ZeRO's boundary mid-row of `up` in both
        # the one-group and Megatron's two-group layouts)
        self.proj = nn.Linear(HIDDEN, 2, bias=False)
        self.head = nn.Linear(2, VOCAB, bias=False)

    def forward(self, x, y):
        h = self.emb(x)
        h = h + self.down(Fn.gelu(self.up(h)))
        return Fn.cross_entropy(self.head(self.proj(self.norm(h))).view(-1, VOCAB), y.view(-1))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # sizes chosen so that ZeRO's data-parallel boundary falls mid-row of v_proj (and 43 rows of
    # lm_head split unevenly, 22 + 21)
    cfg = LlamaConfig(vocab_size=43, hidden_size=12, intermediate_size=18, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


# ---- whole tensors, from the frameworks' own records ----------------------------------------
def split_of(p):
    """(dim, sizes per TP rank) of a split parameter, from DeepSpeed's or the layer's record."""
    meta = getattr(p, "ds_autotp_universal_checkpoint_meta", None)
    if isinstance(meta, dict) and meta.get("partition_dim") is not None and not meta.get("replicated"):
        return meta["partition_dim"], [int(s) for s in meta["partition_sizes"]]
    if getattr(p, "tensor_model_parallel", False) and isinstance(getattr(p, "partition_dim", None), int):
        return p.partition_dim, [p.shape[p.partition_dim]] * TP
    return None


def tp_whole(t, split, tp_group):
    """The whole tensor from every TP rank's slice ``t`` (padded to the largest, trimmed)."""
    if split is None:
        return t
    dim, sizes = split
    pad = list(t.shape)
    pad[dim] = max(sizes)
    buf = torch.zeros(pad, dtype=t.dtype)
    buf.narrow(dim, 0, t.shape[dim]).copy_(t)
    parts = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(parts, buf, group=tp_group)
    return torch.cat([x.narrow(dim, 0, n) for x, n in zip(parts, sizes)], dim=dim)


class Oracle:
    """Every model parameter's TP-local fp32 tensor (weight or gradient) as DeepSpeed holds it."""

    def __init__(self, engine, opt, dp_group):
        self.engine, self.opt, self.dp = engine, opt, dp_group
        self.zero = type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer"

    def local(self, grads: bool) -> dict:
        out = {}
        if not self.zero:
            for g in self.opt.param_groups:
                for p in g["params"]:
                    t = p.grad if grads else p
                    out[p] = t.detach().float().clone()
            return out
        zo = self.engine.optimizer
        # ZeRO 1/2 steps one group per step() call (the others are out of param_groups then)
        active = {id(g["params"][0]) for g in self.opt.param_groups if g["params"]}
        for i, flat in enumerate(zo.single_partition_of_fp32_groups):
            if id(flat) not in active:
                continue
            t = (flat.grad if grads else flat).detach().float()
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(self.dp))]
            dist.all_gather(parts, t.contiguous(), group=self.dp)
            whole = torch.cat(parts)
            for p, off in zip(zo.round_robin_bit16_groups[i], zo.round_robin_bit16_offsets[i]):
                out[p] = whole[off : off + p.numel()].view(p.shape).clone()
        return out

    def cut_mid_row(self) -> bool:
        """Whether some ZeRO partition boundary falls inside a row of some matrix."""
        if not self.zero:
            return False
        zo = self.engine.optimizer
        for i in range(len(zo.single_partition_of_fp32_groups)):
            ps = int(zo.partition_size[i])
            for p, off in zip(zo.round_robin_bit16_groups[i], zo.round_robin_bit16_offsets[i]):
                if p.dim() == 2:
                    for b in range(ps, ps * dist.get_world_size(self.dp), ps):
                        if off < b < off + p.numel() and (b - off) % p.shape[1]:
                            return True
        return False


def ds_config(cfg):
    c = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 otherwise; the reference does not clip
        "zero_optimization": {"stage": cfg["stage"]},
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": cfg["opt"], "params": dict(HP, **({"implementation": cfg["implementation"]}
                                                               if cfg.get("implementation") else {}))},
        "steps_per_print": 10**9,
    }
    if cfg["family"] == "autotp":
        c["tensor_parallel"] = {"autotp_size": TP}
    if cfg.get("bf16"):  # bf16 weights, fp32 master partitions (what the recipes run)
        c["bf16"] = {"enabled": True}
    return c


def run_config(name, cfg, mpu):
    if cfg.get("naive"):  # negative control: merit_ds's tensor-parallel adapter off
        from merit_ds.sharding import tensor_parallel

        saved = tensor_parallel.current
        tensor_parallel.current = lambda: None
    try:
        return _run(name, cfg, mpu)
    finally:
        if cfg.get("naive"):
            tensor_parallel.current = saved


class MegatronScheduler:
    """What Megatron's OptimizerParamScheduler does each step: every group's lr and
    weight_decay from the schedule times the group's lr_mult / wd_mult."""

    def __init__(self, optimizer, lr, wd):
        self.optimizer, self.lr, self.wd, self.num_steps = optimizer, lr, wd, 0

    def step(self, increment=1):
        self.num_steps += increment
        lr = self.lr * min(1.0, (self.num_steps + 1) / 2)  # a warmup, so lr changes between steps
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
            g["weight_decay"] = self.wd * g.get("wd_mult", 1.0)

    def state_dict(self):
        return {"num_steps": self.num_steps}


def _run(name, cfg, mpu):
    rank = dist.get_rank()
    config = ds_config(cfg)
    scheduler = None
    if cfg["family"] == "autotp":
        model = tiny_llama()
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        from deepspeed.utils import groups

        tp_group, dp_group = groups.get_tensor_model_parallel_group(), groups._get_data_parallel_group()
        batch = lambda step: torch.randint(0, 43, (MICRO, 6), generator=torch.Generator().manual_seed(step * 10 + dist.get_rank(dp_group)))  # noqa: E731
        forward = lambda e, x: e(input_ids=x, labels=x).loss  # noqa: E731
    else:
        model = MegatronStyle(mpu)
        tp_group, dp_group = mpu.get_tensor_model_parallel_group(), mpu.get_data_parallel_group()
        if cfg.get("megatron_ds"):
            # Megatron's _get_param_groups: weight decay for matrices, none for biases and norms,
            # lr_mult / wd_mult / name on each group; its optimizer is Adam, built by the script.
            decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
            no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
            groups_ = [{"name": "wd", "params": decay, "wd_mult": 1.0, "lr_mult": 1.0},
                       {"name": "no_wd", "params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0}]
            adam = torch.optim.Adam(groups_, lr=3e-4, weight_decay=0.01, betas=(0.9, 0.95), eps=1e-8)
            sched = MegatronScheduler(adam, lr=HP["lr"], wd=HP["weight_decay"])
            args = SimpleNamespace(local_rank=int(os.environ.get("LOCAL_RANK", 0)), deepspeed_config=None,
                                   deepspeed_config_dict=config, no_pipeline_parallel=True)
            # Megatron-DeepSpeed's call (megatron/training.py setup_model_and_optimizer), as it is.
            # Without the opt-in it must be refused; under `python -m merit_ds.run
            # --replace-client-optimizer` MERIT replaces Adam.
            from merit_ds.integrations.deepspeed import MeritConfigError

            try:
                engine, _, _, scheduler = deepspeed.initialize(
                    model=model, optimizer=adam, args=args, lr_scheduler=sched,
                    mpu=mpu if args.no_pipeline_parallel else None, config=args.deepspeed_config_dict)
            except MeritConfigError as e:
                return dict(name=name, refused=str(e), adam_untouched=all(g["lr"] == 3e-4 for g in adam.param_groups))
        else:
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                                   mpu=mpu)
        batch = lambda step: torch.randint(0, VOCAB, (MICRO, 5), generator=torch.Generator().manual_seed(step * 10 + dist.get_rank(dp_group)))  # noqa: E731
        forward = lambda e, x: e(x, (x * 3 + 1) % VOCAB)  # noqa: E731
    opt = engine.optimizer if isinstance(engine.optimizer, (MERIT, LAMB)) else engine.optimizer.optimizer
    oracle = Oracle(engine, opt, dp_group)
    model_params = [p for p in engine.module.parameters()]
    splits = {p: split_of(p) for p in model_params}
    res = dict(name=name, optimizer=type(opt).__name__, wrapper=type(engine.optimizer).__name__,
               split_dims=sorted({s[0] for s in splits.values() if s is not None}),
               uneven=any(s is not None and len(set(s[1])) > 1 for s in splits.values()),
               cut_mid_row=oracle.cut_mid_row(), groups=len(opt.param_groups) if oracle.zero else 1, diff_split=[], diff_replicated=[], all_reduces=[], steps=0)
    if cfg.get("megatron_ds"):
        res.update(refused=None, scheduler_points_to_new=scheduler is not None and scheduler.optimizer is opt,
                   group_keys=[sorted(k for k in g if k != "params") for g in opt.param_groups])
    # originals in the group's order: the ZeRO oracle keys by model parameter; without ZeRO the
    # group holds the model parameters themselves
    ref_state = {}
    real_step = opt.step
    fn, cls = (merit, MERIT) if isinstance(opt, MERIT) else (lamb, LAMB)

    def hooked(*a, **k):
        w0, g0 = oracle.local(False), oracle.local(True)
        whole_w = {p: tp_whole(w0[p], splits[p], tp_group) for p in w0}
        whole_g = {p: tp_whole(g0[p], splits[p], tp_group) for p in g0}
        expected = {}
        for grp in opt.param_groups:
            members = [p for p in (opt.original_params(grp) if oracle.zero else grp["params"]) if p in whole_w]
            if not members:
                continue
            ws = [whole_w[p].clone() for p in members]
            for p in members:
                ref_state.setdefault(p, (torch.zeros_like(whole_w[p]), torch.zeros_like(whole_w[p]), torch.tensor(0.0)))
            kw = dict(lr=float(grp["lr"]), beta1=grp["betas"][0], beta2=grp["betas"][1], eps=grp["eps"],
                      weight_decay=grp["weight_decay"], implementation=grp.get("implementation"))
            if cls is LAMB:
                kw.update(max_trust_ratio=grp["max_trust_ratio"], bias_correction=grp["bias_correction"])
            fn(ws, [whole_g[p] for p in members], [ref_state[p][0] for p in members],
               [ref_state[p][1] for p in members], [ref_state[p][2] for p in members], **kw)
            expected.update(zip(members, ws))
        c0 = collective.counter.calls
        out = real_step(*a, **k)
        res["all_reduces"].append(collective.counter.calls - c0)
        w1 = oracle.local(False)
        ds, dr = 0.0, 0.0
        for p, want in expected.items():
            got = tp_whole(w1[p], splits[p], tp_group)
            d = (got - want).abs().max().item()
            if splits[p] is not None:
                ds = max(ds, d)
            else:
                dr = max(dr, d)
        res["diff_split"].append(ds)
        res["diff_replicated"].append(dr)
        res["steps"] += 1
        return out

    opt.step = hooked
    for step in range(STEPS):
        x = batch(step)
        engine.backward(forward(engine, x))
        engine.step()
        if scheduler is not None:
            scheduler.step()
    opt.step = real_step
    res["lr_after"] = [float(g["lr"]) for g in opt.param_groups]
    res["group_wd"] = [float(g["weight_decay"]) for g in opt.param_groups]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher's
    a = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    world = dist.get_world_size()
    families = {CONFIGS[n]["family"] for n in a.configs}
    assert len(families) == 1, "one family per process"
    mpu = Mpu(world, TP) if families == {"mpu"} else None
    results = [run_config(n, CONFIGS[n], mpu) for n in a.configs]
    if dist.get_rank() == 0:
        with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
            json.dump({"results": results}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
