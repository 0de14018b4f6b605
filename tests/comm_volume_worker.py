"""Worker for test_comm_volume.py and benchmarks/zero_comm_volume.py: what DeepSpeed sends.

For each named configuration (a ZeRO stage and the data types merit_ds's own
``make_ds_config`` writes for it), build a DeepSpeed engine around a small MLP with MERIT, train
one optimizer step to settle start-up traffic, then record every collective the *next* optimizer
step issues (``grad_accum`` micro-batches and the step), by wrapping ``torch.distributed``'s
collectives before DeepSpeed binds them. Per call: the operation, the dtype and the bytes of the
full (unsharded) message S; per step the bytes each rank sends on a ring, by the usual counts
(all-reduce ``2 (N-1)/N S``; reduce-scatter, all-gather, reduce and broadcast ``(N-1)/N S``),
split into ZeRO's gradient/parameter traffic, the optimizer's own (MERIT's statistics all-reduce:
any collective inside the wrapped optimizer's ``step``) and the rest (scalar loss and norm
reductions, ZeRO-3's integer bookkeeping).

Usage: ``comm_volume_worker.py --configs NAME[,NAME...] [--grad-accum K ...]``; rank 0 writes
``{config: {grad_accum: {...}}}`` as JSON to $MERIT_TEST_RESULT.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import warnings

import torch
import torch.distributed as tdist
import torch.nn as nn

warnings.filterwarnings("ignore")

#: name -> (ZeRO stage, precision) as merit_ds.train.ds_config.make_ds_config writes them: bf16
#: accumulates gradients in fp32 at stages 1-3 (stage 1 then runs DeepSpeed's BF16_Optimizer)
#: and in bf16 at stage 0 (DeepSpeed refuses fp32 accumulation without ZeRO).
CONFIGS = {
    "z0_fp32": (0, "fp32", {}), "z1_fp32": (1, "fp32", {}), "z2_fp32": (2, "fp32", {}), "z3_fp32": (3, "fp32", {}),
    "z0_bf16": (0, "bf16", {}), "z1_bf16": (1, "bf16", {}), "z2_bf16": (2, "bf16", {}), "z3_bf16": (3, "bf16", {}),
    # ZeRO-2 reducing each slice to its owner instead of all-reducing the bucket (DeepSpeed's
    # use_multi_rank_bucket_allreduce=false): the reduce-scatter volume
    "z2_bf16_reduce": (2, "bf16", {"use_multi_rank_bucket_allreduce": False}),
}
#: ZeRO-3 keeps parameters under stage3_param_persistence_threshold (default 1e5 elements)
#: gathered; every matrix here is smaller, so the worker sets it to 0 to see what a GPT-2's
#: matrices (590k to 4.2M elements) cost.
STAGE3 = {"stage3_param_persistence_threshold": 0}
WIDTH, DEPTH, MICRO = 96, 3, 2

_LOG: list[dict] | None = None  # collectives recorded while not None
_IN_STEP = [False]  # inside the wrapped optimizer's step(): the optimizer's own statistics


def _ring_factor(op: str, n: int) -> float:
    f = (n - 1) / n
    return 2 * f if op == "all_reduce" else f


def _record(op: str, size_of):
    original = getattr(tdist, op)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if _LOG is not None:
            nbytes, dtype = size_of(*args, **kwargs)
            _LOG.append({"op": op, "bytes": nbytes, "dtype": str(dtype).replace("torch.", ""), "optimizer": _IN_STEP[0]})
        return original(*args, **kwargs)

    setattr(tdist, op, wrapper)


def _first_tensor(*args, **kwargs):
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError("no tensor argument")


def _nbytes(t: torch.Tensor):
    return t.numel() * t.element_size(), t.dtype


def _install() -> None:
    """Wrap the collectives DeepSpeed's torch backend calls (it binds all_gather_into_tensor and
    reduce_scatter_tensor at init: this runs before that). S is the full message: the tensor of
    an all-reduce/reduce/broadcast, the output of an all-gather, the input of a reduce-scatter."""
    _record("all_reduce", lambda *a, **k: _nbytes(_first_tensor(*a, **k)))
    _record("reduce", lambda *a, **k: _nbytes(_first_tensor(*a, **k)))
    _record("broadcast", lambda *a, **k: _nbytes(_first_tensor(*a, **k)))
    _record("all_gather_into_tensor", lambda *a, **k: _nbytes(k.get("output_tensor", a[0] if a else None)))
    _record("reduce_scatter_tensor", lambda *a, **k: _nbytes(k.get("input", a[1] if len(a) > 1 else None)))

    def _list_bytes(lst):
        return sum(t.numel() * t.element_size() for t in lst), lst[0].dtype

    _record("all_gather", lambda *a, **k: _list_bytes(k.get("tensor_list", a[0] if a else None)))
    _record("reduce_scatter", lambda *a, **k: _list_bytes(k.get("input_list", a[1] if len(a) > 1 else None)))


def _model() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers)


def run_config(name: str, grad_accum: int, world: int) -> dict:
    import deepspeed
    from merit_ds.integrations.param_groups import merit_param_groups
    from merit_ds.train.ds_config import make_ds_config

    global _LOG
    stage, precision, extra = CONFIGS[name]
    cfg = make_ds_config(stage, precision, lr=1e-3, global_batch=MICRO * grad_accum * world, micro_batch=MICRO)
    cfg["gradient_clipping"] = 0.0
    cfg["zero_optimization"].update(extra, **(STAGE3 if stage == 3 else {}))
    torch.manual_seed(0)
    model = _model()
    n_params = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=merit_param_groups(model), config=cfg)
    inner = engine.basic_optimizer
    inner_step = inner.step

    def flagged_step(*a, **k):
        _IN_STEP[0] = True
        try:
            return inner_step(*a, **k)
        finally:
            _IN_STEP[0] = False

    inner.step = flagged_step
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(1 + tdist.get_rank())

    def one_step():
        for _ in range(grad_accum):
            x = torch.randn(MICRO, WIDTH, generator=gen).to(dtype)
            loss = engine(x).float().pow(2).mean()
            engine.backward(loss)
            engine.step()

    one_step()
    tdist.barrier()
    _LOG = []
    one_step()
    calls, _LOG = _LOG, None
    tdist.barrier()
    elem = 2 if precision == "bf16" else 4
    # ZeRO's traffic: floating-point, outside the optimizer's step, not a scalar (loss, overflow
    # and norm reductions) -- ZeRO-3 also broadcasts a few int64s (its module-trace bookkeeping)
    zero_calls = [c for c in calls if not c["optimizer"] and c["bytes"] > 64 and c["dtype"].startswith(("float", "bfloat"))]
    sent_zero = sum(_ring_factor(c["op"], world) * c["bytes"] for c in zero_calls)
    sent_optimizer = sum(_ring_factor(c["op"], world) * c["bytes"] for c in calls if c["optimizer"])
    sent_other = sum(_ring_factor(c["op"], world) * c["bytes"] for c in calls) - sent_zero - sent_optimizer
    ops: dict[str, dict] = {}
    for c in zero_calls:
        o = ops.setdefault(f"{c['op']}[{c['dtype']}]", {"calls": 0, "bytes": 0})
        o["calls"] += 1
        o["bytes"] += c["bytes"]
    out = {"stage": stage, "precision": precision, "optimizer_wrapper": type(engine.optimizer).__name__,
           "n_params": n_params, "world": world, "grad_accum": grad_accum, "sent_zero_bytes": sent_zero,
           "sent_optimizer_bytes": sent_optimizer, "sent_other_bytes": sent_other, "elem_bytes": elem, "ops": ops, "n_calls": len(calls)}
    engine.destroy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", required=True, help="comma-separated names from CONFIGS")
    ap.add_argument("--grad-accum", type=int, nargs="+", default=[1, 3])
    args = ap.parse_args()
    _install()
    import deepspeed
    import merit_ds  # noqa: F401  (registers MERIT for DeepSpeed's JSON)

    deepspeed.init_distributed(dist_backend="gloo")
    world = tdist.get_world_size()
    result: dict = {}
    for name in args.configs.split(","):
        for k in args.grad_accum:
            result.setdefault(name, {})[str(k)] = run_config(name, k, world)
    if tdist.get_rank() == 0 and os.environ.get("MERIT_TEST_RESULT"):
        with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
            json.dump(result, f, indent=1)
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
