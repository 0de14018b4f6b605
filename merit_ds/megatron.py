"""MERIT for Megatron-LM: a megatron-core optimizer factory, exact under its
DistributedOptimizer and tensor parallelism. Optional extra: ``pip install -e ".[megatron]"``
(megatron-core 0.16.x, the last line for Python 3.11).

In ``pretrain_gpt.py`` (Megatron-LM's ``training.py`` ``setup_model_and_optimizer``), where
``get_megatron_optimizer(config, model, ...)`` is called::

    from merit_ds.megatron import get_megatron_merit_optimizer
    optimizer = get_megatron_merit_optimizer(config, model, config_overrides, use_gloo_process_groups)

Same signature and behaviour as megatron-core's ``get_megatron_optimizer`` (and, like
``get_megatron_muon_optimizer``, it builds on it): megatron-core makes the param groups (no
weight decay for biases and norms, ``config_overrides``, lr multipliers), the process groups,
the grad buffers and its wrapper (``FP32Optimizer``, ``Float16OptimizerWithFloat16Params`` or
``DistributedOptimizer``); only the inner optimizer is MERIT instead of Adam, for every
parameter (matrices get MERIT's element-wise ratios, vectors its tensor-level ratio: one rule,
no second optimizer). ``config.adam_beta1/2``, ``adam_eps``, ``lr``, ``weight_decay`` are
MERIT's. ``optimizer=NAME`` builds any registered merit_ds optimizer with a sharded rule the same
way (the baselines included: docs/optimizer.md, "Adding an optimizer").

Exactness. Under ``use_distributed_optimizer`` the inner optimizer holds one fp32 piece per
parameter, cut anywhere (:mod:`merit_ds.sharding.pieces`). :func:`attach_distributed_optimizer`
reads each piece's place in its parameter from megatron-core's own range map
(``DistributedOptimizer.model_param_gbuf_map`` -> ``gbuf_ranges[...]["param_map"][param]["param"]``,
never recomputed) and its tensor-parallel split from Megatron's ``tensor_model_parallel`` /
``partition_dim``; MERIT then computes the whole matrices' statistics with one small all-reduce
per ``step()`` over the data- x tensor-parallel ranks. Without the distributed optimizer the
wrappers hand MERIT whole (fp32 copies of the) parameters, and tensor parallelism is handled as
for DeepSpeed (:mod:`merit_ds.sharding.tensor_parallel`, megatron-core's groups).

Refused with a clear error: pipeline parallelism, expert (MoE) parameters, the precision-aware
optimizer (``use_precision_aware_optimizer``), Megatron FSDP, ``optimizer_cpu_offload``,
``config.optimizer`` other than "adam" or a merit_ds optimizer's name (the factory decides).
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

__all__ = ["get_megatron_merit_optimizer", "attach_distributed_optimizer", "pieces_of_distributed_optimizer",
           "MegatronNotSupported"]


class MegatronNotSupported(ValueError):
    """A megatron-core option the MERIT factory does not support (yet): named in the message."""


def _optimizer_name(config, keyword: str) -> str:
    """Which optimizer to build: ``config.optimizer`` when it names a merit_ds optimizer (Megatron's
    ``--optimizer lamb``), else the factory's keyword (default MERIT; ``adam`` is Megatron's default)."""
    name = getattr(config, "optimizer", "adam")
    return keyword if name in ("adam", keyword) else name


def _sharded_names() -> list[str]:
    """Registered optimizers with a sharded rule (what the factory can build)."""
    from merit_ds.optim import registry

    return [s.name for s in registry.specs() if s.fragment_rule is not None]


def _require_megatron():
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        raise ImportError("merit_ds.megatron needs megatron-core: pip install -e \".[megatron]\" "
                          "(megatron-core 0.16.x)") from None


def _check_config(config) -> None:
    refusals = [
        (getattr(config, "use_precision_aware_optimizer", False), "use_precision_aware_optimizer",
         "it keeps the moments in TransformerEngine's FusedAdam"),
        (getattr(config, "optimizer_cpu_offload", False), "optimizer_cpu_offload",
         "the hybrid CPU/GPU optimizer builds its own Adam"),
    ]
    for on, name, why in refusals:
        if on:
            raise MegatronNotSupported(f"get_megatron_merit_optimizer: {name}=True is not supported ({why}); "
                                       f"turn it off.")
    ours = _sharded_names()
    if getattr(config, "optimizer", "adam") not in ("adam", *ours):
        raise MegatronNotSupported(f"get_megatron_merit_optimizer builds a merit_ds optimizer ({', '.join(ours)}): "
                                   f"config.optimizer={config.optimizer!r} is not one of them; leave it 'adam' "
                                   f"(the default).")
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
            raise MegatronNotSupported("get_megatron_merit_optimizer: pipeline parallelism (pipeline-model-parallel "
                                       "size > 1) is not supported yet; run with size 1.")
    except ImportError:  # pragma: no cover
        pass


class _InnerAsAdam:
    """Stands where megatron-core builds its Adam: the same keyword arguments, our optimizer built."""

    def __init__(self, cls):
        self.cls = cls

    def __call__(self, params=None, lr=None, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 **extra):
        if extra:
            raise MegatronNotSupported(f"get_megatron_merit_optimizer: megatron-core asked the optimizer for "
                                       f"{sorted(extra)}, which {self.cls.__name__} does not support")
        # MERIT folds weight decay into its direction (decoupled from the moments): adam_w_mode
        # (decoupled_weight_decay) has no second meaning here.
        return self.cls(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


@contextlib.contextmanager
def _inner_optimizer(cls):
    """megatron-core's Adam replaced by ``cls`` for the duration of one factory call."""
    import megatron.core.optimizer as mco

    saved = (mco.Adam, mco.USING_PYTORCH_OPTIMIZER)
    mco.Adam, mco.USING_PYTORCH_OPTIMIZER = _InnerAsAdam(cls), False
    try:
        yield
    finally:
        mco.Adam, mco.USING_PYTORCH_OPTIMIZER = saved


def get_megatron_merit_optimizer(config, model_chunks, config_overrides=None, use_gloo_process_groups: bool = True,
                                 pg_collection=None, dump_param_to_param_group_map: Optional[str] = None,
                                 *, optimizer: str = "merit"):
    """megatron-core's ``get_megatron_optimizer`` with MERIT (or the registered ``optimizer``) inside.

    Returns what megatron-core returns (a ``MegatronOptimizer``, chained when it makes several),
    with every ``DistributedOptimizer`` in it attached (:func:`attach_distributed_optimizer`).
    """
    _require_megatron()
    from megatron.core.optimizer import get_megatron_optimizer

    from merit_ds.optim import registry

    spec = registry.get(_optimizer_name(config, optimizer))
    if spec.fragment_rule is None:
        raise MegatronNotSupported(f"optimizer={optimizer!r} has no sharded rule; use one of {', '.join(_sharded_names())}")
    _check_config(config)
    if any(getattr(getattr(m, "ddp_config", None), "use_megatron_fsdp", False) for m in model_chunks):
        raise MegatronNotSupported("get_megatron_merit_optimizer: Megatron FSDP (use_megatron_fsdp) is not "
                                   "supported; use the distributed optimizer.")
    for m in model_chunks:
        for name, p in m.named_parameters():
            if p.requires_grad and not getattr(p, "allreduce", True):
                raise MegatronNotSupported(f"get_megatron_merit_optimizer: expert (MoE) parameter {name} is not "
                                           f"supported yet.")
    saved = config.optimizer
    config.optimizer = "adam"  # megatron-core's branch that builds the inner optimizer by keyword
    try:
        with _inner_optimizer(spec.cls):
            result = get_megatron_optimizer(config, model_chunks, config_overrides=config_overrides,
                                            use_gloo_process_groups=use_gloo_process_groups,
                                            pg_collection=pg_collection,
                                            dump_param_to_param_group_map=dump_param_to_param_group_map)
    finally:
        config.optimizer = saved
    for wrapper in getattr(result, "chained_optimizers", [result]):
        tp_group = getattr(wrapper, "tp_group", None)  # megatron-core's (pg_collection.tp, else parallel_state's)
        if type(wrapper).__name__ == "DistributedOptimizer":
            attach_distributed_optimizer(wrapper, tp_group)
        elif tp_group is not None and _tp(tp_group)[2] > 1:
            from merit_ds.sharding.tensor_parallel import current

            found = current()
            if found is None or found.group is not tp_group:
                raise MegatronNotSupported(
                    "get_megatron_merit_optimizer: tensor parallelism given through pg_collection, not megatron-core's "
                    "parallel_state, without the distributed optimizer: MERIT would not see the TP group. Use "
                    "use_distributed_optimizer=True, or initialise parallel_state.")
    return result


def _tp(tp_group=None):
    """(group, rank, size) of tensor parallelism: the given group, else megatron-core's, else none."""
    import torch.distributed as dist

    if tp_group is None:
        try:
            from megatron.core import parallel_state as ps

            if ps.model_parallel_is_initialized():
                tp_group = ps.get_tensor_model_parallel_group()
        except ImportError:  # pragma: no cover
            pass
    if tp_group is None or dist.get_world_size(group=tp_group) <= 1:
        return None, None, 1
    return tp_group, dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def pieces_of_distributed_optimizer(model_params, main_params, param_range_of, dp_group, tp_group=None) -> dict:
    """``{main piece: (model parameter, Piece)}`` from megatron-core's records.

    ``model_params[i]`` / ``main_params[i]``: a model parameter and the fp32 piece the inner
    optimizer steps for it; ``param_range_of(model_param)``: megatron-core's ``"param"`` Range of
    it (``gbuf_ranges[g][dtype][bucket]["param_map"][param]["param"]``). ``tp_group``: the
    tensor-parallel group (default: megatron-core's). Pure bookkeeping; no collective.
    """
    from merit_ds.sharding.pieces import Piece

    pg, tp = statistics_groups(dp_group, tp_group)
    out = {}
    for model_param, main in zip(model_params, main_params):
        rng = param_range_of(model_param)
        if rng.size != main.numel():
            raise ValueError(f"megatron-core's range {rng} does not match the piece's {main.numel()} elements")
        split = _split_of(model_param, tp)
        out[main] = (model_param, Piece(tuple(model_param.shape), int(rng.start), int(rng.size), pg, split,
                                        tp.rank if tp is not None else None))
    return out


def _split_of(param, tp):
    from merit_ds.sharding.tensor_parallel import split_of

    return split_of(param, tp) if tp is not None else None


def statistics_groups(dp_group, tp_group=None):
    """(the group the statistics are all-reduced over, the TPGroup or None): the data-parallel
    group, or with tensor parallelism all data x tensor ranks (the world, checked)."""
    from merit_ds.sharding.tensor_parallel import TPGroup, _combined_group

    group, tp_rank, tp_size = _tp(tp_group)
    if group is None:
        return dp_group, None
    tp = TPGroup(group, tp_rank, tp_size, "megatron-core")
    return _combined_group(dp_group, tp), tp


def attach_distributed_optimizer(dist_opt, tp_group=None) -> None:
    """Tell the merit_ds optimizer inside megatron-core's ``DistributedOptimizer`` where each of its fp32
    pieces lies in its parameter (the wrapper's own range map) and how that parameter is split
    across tensor-parallel ranks. Called by :func:`get_megatron_merit_optimizer`."""
    from merit_ds.sharding.pieces import attach_pieces

    inner = dist_opt.optimizer
    for gi, group in enumerate(inner.param_groups):
        models = [*dist_opt.model_fp32_groups[gi], *dist_opt.model_float16_groups[gi]]
        mains = [*dist_opt.shard_fp32_groups[gi], *dist_opt.shard_fp32_from_float16_groups[gi]]
        if [id(t) for t in mains] != [id(t) for t in group["params"]]:
            raise MegatronNotSupported("DistributedOptimizer's param groups are not its shard groups "
                                       "(use_precision_aware_optimizer?); cannot place MERIT's pieces")

        def range_of(param, _opt=dist_opt):
            gbuf_index, dtype, bucket_index = _opt.model_param_gbuf_map[param]
            return _opt.gbuf_ranges[gbuf_index][dtype][bucket_index]["param_map"][param]["param"]

        pg, tp = statistics_groups(dist_opt.data_parallel_group, tp_group)
        attach_pieces(inner, pieces_of_distributed_optimizer(models, mains, range_of, dist_opt.data_parallel_group,
                                                             tp_group), process_group=pg, tp=tp)
