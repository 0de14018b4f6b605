"""MERIT and LAMB under tensor parallelism (issue 19).

Fast tier: the placement arithmetic (merit_ds.optim.tp_layout) on hand-worked layouts, a
one-process simulation of two TP ranks against float64 whole-matrix maxima (with the naive
per-slice statistics as negative control), the refusals, and the client-optimizer check.

Slow tier: real 4-rank jobs (TP 2 x DP 2, gloo) of tests/tp_worker.py -- DeepSpeed AutoTP on a
tiny Llama and a Megatron-style model with an mpu, ZeRO 0/1/2, MERIT and LAMB -- each step
compared with the single-device optimizer on the whole matrices; Megatron-DeepSpeed's own
``deepspeed.initialize`` call refused without the opt-in and stepping MERIT exactly with it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch

from _dist import REPO_ROOT, TESTS_DIR, launch
from merit_ds.optim import formulas as F
from merit_ds.optim.lamb_fragments import LambFragmentRule
from merit_ds.optim.layout import layout_from_offsets, stats_layout
from merit_ds.optim.merit_fragments import MeritFragmentRule
from merit_ds.optim.tp_layout import TensorSplit, combine, exchange_plan, globalize_rows
from merit_ds.sharding import ShardingLayoutError
from merit_ds.sharding import tensor_parallel as tp_adapter

MERIT_RULE, LAMB_RULE = MeritFragmentRule(), LambFragmentRule()


# ---- placement arithmetic, hand-worked ------------------------------------------------------
def test_dim0_slice_becomes_rows_of_the_whole_matrix():
    # rank 1 of 2 holds rows 3..5 of a (5, 4) matrix (sizes 3 + 2), then a (2,) vector
    local = layout_from_offsets([(2, 4), (2,)], [0, 8], 0, 10)
    whole = globalize_rows(local, [TensorSplit(0, 3, 5), None])
    assert whole.shapes == ((5, 4), (2,))
    (w, b) = whole.fragments
    assert (w.shape, w.param_start, w.numel, w.partition_offset) == ((5, 4), 12, 8, 0)  # row 3 * 4 columns
    assert (b.shape, b.param_start, b.numel, b.partition_offset) == ((2,), 0, 2, 8)


def test_dim0_fragment_cut_mid_row_keeps_its_column():
    # a ZeRO piece: elements 5..8 of a (3, 4) slice (row 1 col 1 .. row 1 col 3 + row 2 col 0)
    local = layout_from_offsets([(3, 4)], [0], 5, 4)
    (f,) = globalize_rows(local, [TensorSplit(0, 3, 6)]).fragments
    assert f.param_start == 3 * 4 + 5 and f.row_pieces() == [(0, 3, 4, 1), (3, 1, 5, 0)]


def test_merit_column_slots_of_a_row_parallel_slice():
    # (2, 3) slice = columns 4..6 of a (2, 8) matrix: [rw 2 | ru 2 | cw 3 | cu 3] -> [rw 2 | ru 2 | cw 8 | cu 8]
    size, segments = MERIT_RULE.column_split_slots((2, 3), 4, 8)
    assert size == 20
    assert segments == [(0, 0, 4), (4, 4 + 4, 3), (7, 4 + 8 + 4, 3)]


def test_exchange_plan_indices_and_flags():
    shapes = [(2, 3), (4,)]
    local = stats_layout(shapes, MERIT_RULE.stats_size)  # [10 | 2 | flag flag] = 14
    ex = exchange_plan(local, [TensorSplit(1, 4, 8), None], MERIT_RULE, tp_rank=1)
    assert ex.global_numel == 20 + 2 + 2
    assert ex.to_global.tolist() == [0, 1, 2, 3, 8, 9, 10, 16, 17, 18, 20, 21, 22, 23]
    assert ex.silent.numel() == 0  # MAX: a replicated parameter's maxima may meet themselves
    both = combine([ex, ex])
    assert both.global_numel == 48 and both.to_global[14:].tolist() == [i + 24 for i in ex.to_global.tolist()]


def test_lamb_replicated_sums_come_from_tp_rank_0_only():
    local = stats_layout([(2, 3), (4,)], LAMB_RULE.stats_size)  # [2 | 2 | flags]
    split = [TensorSplit(1, 3, 6), None]
    assert exchange_plan(local, split, LAMB_RULE, tp_rank=0).silent.tolist() == []
    ex1 = exchange_plan(local, split, LAMB_RULE, tp_rank=1)
    assert ex1.silent.tolist() == [2, 3]  # the vector's two sums; never the flags
    assert ex1.to_global.tolist() == [0, 1, 2, 3, 4, 5]


def test_bad_splits_are_refused():
    with pytest.raises(ValueError, match="dim 2"):
        TensorSplit(2, 0, 4)
    with pytest.raises(ValueError, match="exceeds"):
        globalize_rows(layout_from_offsets([(3, 2)], [0], 0, 6), [TensorSplit(0, 2, 4)])


# ---- two TP ranks x two ZeRO pieces, simulated in one process, against float64 ---------------
def _simulate(full_w, full_u, dim, sizes, pieces, use_exchange=True):
    """Each TP rank's slice cut into ZeRO pieces; statistics as the sharded step computes them,
    combined with MAX over all (TP, DP) ranks; returns every TP rank's reduced local buffer."""
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    full = full_w.shape[dim]
    buffers, plans, layouts = [], [], []
    for r, (off, n) in enumerate(zip(offsets, sizes)):
        w, u = full_w.narrow(dim, off, n).contiguous(), full_u.narrow(dim, off, n).contiguous()
        split = TensorSplit(dim, off, full)
        for lo, hi in pieces(w.numel()):
            local = layout_from_offsets([tuple(w.shape)], [0], lo, hi - lo)
            if use_exchange:
                local = globalize_rows(local, [split])
            stats = stats_layout(local.shapes, MERIT_RULE.stats_size)
            buf = torch.zeros(stats.buffer_numel)
            for f in local.fragments:
                slot = stats.slots[f.param_index]
                MERIT_RULE.fragment_statistics(slot.shape, f.param_start, w.reshape(-1)[lo:hi], u.reshape(-1)[lo:hi],
                                               buf.narrow(0, slot.offset, slot.size))
            plans.append(exchange_plan(stats, [split], MERIT_RULE, tp_rank=r) if use_exchange else None)
            buffers.append(buf)
            layouts.append((r, stats))
    if use_exchange:
        n = plans[0].global_numel
        whole = torch.zeros(n)
        for buf, ex in zip(buffers, plans):
            g = torch.zeros(n)
            g.index_copy_(0, ex.to_global, buf)
            whole = torch.maximum(whole, g)
        return [(r, stats, whole.index_select(0, ex.to_global)) for (r, stats), ex in zip(layouts, plans)]
    whole = torch.stack(buffers).amax(0)  # naive: the same entries meet, whatever they index
    return [(r, stats, whole) for r, stats in layouts]


@pytest.mark.parametrize("dim", [0, 1])
def test_simulated_tp_statistics_equal_the_whole_matrix(dim):
    g = torch.Generator().manual_seed(3)
    full_w, full_u = torch.randn(7, 9, generator=g), torch.randn(7, 9, generator=g)
    sizes = [4, 3] if dim == 0 else [5, 4]  # uneven, as DeepSpeed cuts 43 rows into 22 + 21
    halves = lambda n: [(0, n // 2 + 1), (n // 2 + 1, n)]  # noqa: E731 - ZeRO cuts mid-row
    assert any(lo % (full_w.shape[1] if dim == 0 else sizes[0]) for lo, _ in halves(sizes[0] * 9 if dim == 0 else 7 * sizes[0]))
    W, U = full_w.double().abs(), full_u.double().abs()  # the float64 reference
    for r, stats, reduced in _simulate(full_w, full_u, dim, sizes, halves):
        off, n = sum(sizes[:r]), sizes[r]
        slot = stats.slots[0]
        rows, cols, _ = F.matrix_dims(slot.shape)
        rw, ru = reduced[:rows], reduced[rows : 2 * rows]
        cw, cu = reduced[2 * rows : 2 * rows + cols], reduced[2 * rows + cols : 2 * rows + 2 * cols]
        if dim == 0:  # whole rows 0..7 (others' rows included), all columns
            assert torch.equal(rw.double(), W.amax(1)) and torch.equal(cu.double(), U.amax(0))
        else:  # all rows; this slice's columns
            assert torch.equal(rw.double(), W.amax(1)) and torch.equal(ru.double(), U.amax(1))
            assert torch.equal(cw.double(), W[:, off : off + n].amax(0))
        assert rw.max().item() == W.max().item()  # the tensor maxima: max of the row maxima


@pytest.mark.parametrize("dim", [0, 1])
def test_naive_per_slice_statistics_are_wrong(dim):
    g = torch.Generator().manual_seed(3)
    shape = (8, 9) if dim == 0 else (7, 10)  # even slices: the naive buffers have one size
    full_w, full_u = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    sizes = [4, 4] if dim == 0 else [5, 5]
    out = _simulate(full_w, full_u, dim, sizes, lambda n: [(0, n // 2 + 1), (n // 2 + 1, n)], use_exchange=False)
    W = full_w.double().abs()
    wrong = 0
    for r, stats, reduced in out:
        rows, cols, _ = F.matrix_dims(stats.slots[0].shape)
        if dim == 0:  # the slice's rows are rows off.. of W; with sizes 4/3 they meet other rows
            off = sum(sizes[:r])
            wrong += not torch.equal(reduced[:rows].double(), W[off : off + rows].amax(1))
        else:
            off = sum(sizes[:r])
            wrong += not torch.equal(reduced[2 * rows : 2 * rows + cols].double(), W[:, off : off + cols].amax(0))
    assert wrong >= 1


# ---- what is read from the frameworks, and what is refused --------------------------------------
GROUP = tp_adapter.TPGroup(None, 1, 2, "test")


def test_split_read_from_deepspeed_autotp_meta():
    p = torch.nn.Parameter(torch.zeros(21, 12))
    setattr(p, tp_adapter.AUTOTP_META, {"partition_dim": 0, "partition_sizes": (22, 21), "replicated": False})
    assert tp_adapter.split_of(p, GROUP) == TensorSplit(0, 22, 43)
    q = torch.nn.Parameter(torch.zeros(12))
    setattr(q, tp_adapter.AUTOTP_META, {"partition_dim": None, "replicated": True})
    assert tp_adapter.split_of(q, GROUP) is None


def test_split_read_from_megatron_attributes():
    p = torch.nn.Parameter(torch.zeros(7, 5))
    p.tensor_model_parallel, p.partition_dim = True, 1
    assert tp_adapter.split_of(p, GROUP) == TensorSplit(1, 5, 10)
    assert tp_adapter.split_of(torch.nn.Parameter(torch.zeros(3)), GROUP) is None  # no attribute: replicated


@pytest.mark.parametrize("mark, match", [
    (dict(allreduce=False), "expert parallelism"),
    (dict(sequence_parallel=True), "sequence parallelism"),
    (dict(tensor_model_parallel=True, partition_dim=2), "partition_dim=2"),
    (dict(tensor_model_parallel=True), "partition_dim=None"),
])
def test_unsupported_layouts_are_refused(mark, match):
    p = torch.nn.Parameter(torch.zeros(4, 4))
    for k, v in mark.items():
        setattr(p, k, v)
    with pytest.raises(ShardingLayoutError, match=match):
        tp_adapter.split_of(p, GROUP)


def test_autotp_sizes_that_do_not_match_the_slice_are_refused():
    p = torch.nn.Parameter(torch.zeros(20, 12))
    setattr(p, tp_adapter.AUTOTP_META, {"partition_dim": 0, "partition_sizes": (22, 21), "replicated": False})
    with pytest.raises(ShardingLayoutError, match="cannot place its slice"):
        tp_adapter.split_of(p, GROUP)


class _PipelineMpu:
    def get_pipeline_model_parallel_world_size(self):
        return 2

    def get_tensor_model_parallel_world_size(self):
        return 2


class _UlyssesMpu:  # DeepSpeed's sequence-parallel mpu shape
    def initialize_sequence_parallel(self):
        pass

    def get_tensor_model_parallel_world_size(self):
        return 1


@pytest.mark.parametrize("mpu, match", [(_PipelineMpu(), "pipeline parallelism"), (_UlyssesMpu(), "sequence parallelism")])
def test_mpu_with_pipeline_or_sequence_parallelism_is_refused(tmp_path, mpu, match):
    import torch.distributed as dist
    from deepspeed.utils import groups

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    saved = groups.mpu
    try:
        groups.mpu = mpu
        with pytest.raises(ShardingLayoutError, match=match):
            tp_adapter.current()
        groups.mpu = None
        assert tp_adapter.current() is None  # no mpu, no AutoTP group: no tensor parallelism
    finally:
        groups.mpu = saved
        dist.destroy_process_group()


def test_zero3_under_tensor_parallelism_is_refused(monkeypatch):
    from merit_ds.optim import MERIT

    monkeypatch.setattr(tp_adapter, "current", lambda: GROUP)
    p = torch.nn.Parameter(torch.zeros(0))  # what ZeRO-3 leaves of a partitioned parameter
    p.ds_shape, p.tensor_model_parallel, p.partition_dim = (4, 4), True, 0
    with pytest.raises(ShardingLayoutError, match="ZeRO stage 3 with tensor parallelism"):
        tp_adapter.sharded_tp(MERIT([p]), [p], layout_from_offsets([(4, 4)], [0], 0, 8), None, "zero3")


# ---- the client optimizer -------------------------------------------------------------------
def _megatron_adam():
    a, b = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(2))
    return torch.optim.Adam([{"params": [a], "wd_mult": 1.0, "lr_mult": 1.0, "name": "wd"},
                             {"params": [b], "wd_mult": 0.0, "lr_mult": 0.5, "name": "no_wd"}],
                            lr=3e-4, weight_decay=0.01, betas=(0.9, 0.95))


CFG = {"optimizer": {"type": "MERIT", "params": {"lr": 1e-2, "betas": [0.9, 0.99], "weight_decay": 0.1}}}


def test_client_optimizer_against_the_json_is_refused(monkeypatch):
    from merit_ds.integrations import client_optimizer
    from merit_ds.integrations.deepspeed import MeritConfigError

    monkeypatch.delenv(client_optimizer.ENV, raising=False)
    adam = _megatron_adam()
    bound = {"optimizer": adam}
    with pytest.raises(MeritConfigError) as e:
        client_optimizer.resolve(CFG, bound)
    msg = str(e.value)
    for part in ('"type": "MERIT"', "optimizer=Adam", "drop optimizer=", 'drop the "optimizer" entry',
                 "--replace-client-optimizer"):
        assert part in msg
    assert bound["optimizer"] is adam
    # the JSON's own class as client: nothing to say; a config naming DeepSpeed's AdamW: not ours
    from merit_ds.optim import MERIT

    assert client_optimizer.resolve(CFG, {"optimizer": MERIT([torch.nn.Parameter(torch.ones(2))])}) is False
    assert client_optimizer.resolve({"optimizer": {"type": "AdamW"}}, {"optimizer": adam}) is False


def test_client_optimizer_replaced_on_its_own_groups_when_opted_in(monkeypatch, capsys):
    from merit_ds.integrations import client_optimizer
    from merit_ds.optim import MERIT

    monkeypatch.setenv(client_optimizer.ENV, "1")
    adam = _megatron_adam()

    class Sched:
        optimizer = adam

    sched = Sched()
    bound = {"optimizer": adam, "lr_scheduler": sched}
    assert client_optimizer.resolve(CFG, bound) is True
    new = bound["optimizer"]
    assert isinstance(new, MERIT) and sched.optimizer is new
    g0, g1 = new.param_groups
    assert g0["params"] == adam.param_groups[0]["params"] and g1["params"] == adam.param_groups[1]["params"]
    # per-group lr / weight_decay and Megatron's keys kept; Adam's betas replaced by the JSON's
    assert (g0["lr"], g0["weight_decay"], g0["wd_mult"], g0["name"]) == (3e-4, 0.01, 1.0, "wd")
    assert (g1["lr_mult"], g1["name"]) == (0.5, "no_wd")
    assert g0["betas"] == (0.9, 0.99) and g0["eps"] == 1e-6
    assert "replaced the client optimizer Adam by MERIT" in capsys.readouterr().out


def test_merit_ds_run_flag_sets_the_opt_in(tmp_path):
    script = tmp_path / "show.py"
    script.write_text("import os, sys; print(os.environ.get('MERIT_DS_REPLACE_CLIENT_OPTIMIZER'), sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("MERIT_DS_REPLACE_CLIENT_OPTIMIZER", None)
    out = subprocess.run([sys.executable, "-m", "merit_ds.run", "--replace-client-optimizer", str(script), "--x", "1"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "1 ['--x', '1']"


# ---- real ranks ---------------------------------------------------------------------------------
def _check_exact(r, *, zero):
    assert r["split_dims"] == [0, 1], r  # both kinds of split matrix present
    if zero:
        assert r["cut_mid_row"], r  # and ZeRO cuts some matrix mid-row
    # ZeRO 1/2 call step() once per param group (Megatron's two groups: twice per training step)
    assert r["steps"] == 3 * r["groups"] and r["all_reduces"] == [1] * r["steps"], r
    assert max(r["diff_split"]) <= (1e-6 if r["optimizer"] == "LAMB" else 0.0), r
    assert max(r["diff_replicated"]) <= (1e-6 if r["optimizer"] == "LAMB" else 0.0), r


@pytest.mark.slow
def test_deepspeed_autotp_exact():
    exact = ("autotp_z0", "autotp_z1", "autotp_z2", "autotp_z2_foreach", "autotp_z1_lamb", "autotp_z2_lamb",
             "autotp_z1_bf16", "autotp_z2_bf16_lamb")
    out = launch(TESTS_DIR / "tp_worker.py", nprocs=4, timeout=600, args=["--configs", *exact, "autotp_z2_naive"])
    res = {r["name"]: r for r in out["results"]}
    for name in exact:
        _check_exact(res[name], zero=not name.endswith("z0"))
        assert res[name]["uneven"]  # lm_head's 43 rows as 22 + 21
    assert res["autotp_z0"]["wrapper"] == "MERIT"
    naive = res["autotp_z2_naive"]  # negative control: per-slice statistics
    assert min(naive["diff_split"]) > 1e-5 and max(naive["diff_replicated"]) == 0.0, naive


@pytest.mark.slow
def test_megatron_style_mpu_exact_and_megatron_deepspeed_call_refused():
    out = launch(TESTS_DIR / "tp_worker.py", nprocs=4, timeout=600,
                 args=["--configs", "mpu_z0", "mpu_z1", "mpu_z2", "mpu_z2_lamb", "mpu_z1_naive", "megatron_ds"])
    res = {r["name"]: r for r in out["results"]}
    for name in ("mpu_z0", "mpu_z1", "mpu_z2", "mpu_z2_lamb"):
        _check_exact(res[name], zero=name != "mpu_z0")
    assert min(res["mpu_z1_naive"]["diff_split"]) > 1e-5
    refused = res["megatron_ds"]
    assert "optimizer=Adam" in refused["refused"] and refused["adam_untouched"]


@pytest.mark.slow
def test_megatron_deepspeed_call_steps_merit_when_opted_in():
    # the deepspeed launcher running `--module merit_ds.run --replace-client-optimizer SCRIPT`,
    # as a Megatron-DeepSpeed job would
    out = launch("--module", nprocs=4, launcher="deepspeed", timeout=600,
                 args=["merit_ds.run", "--replace-client-optimizer", str(TESTS_DIR / "tp_worker.py"),
                       "--configs", "megatron_ds"])
    (r,) = out["results"]
    assert r["refused"] is None and r["optimizer"] == "MERIT" and r["wrapper"] == "DeepSpeedZeroOptimizer"
    _check_exact(r, zero=True)
    assert r["scheduler_points_to_new"]
    for keys in r["group_keys"]:  # Megatron's keys kept, Adam's own dropped
        assert {"lr_mult", "wd_mult", "name"} <= set(keys) and not {"amsgrad", "foreach", "fused"} & set(keys), keys
    assert r["group_wd"] == [0.1, 0.0]  # Megatron's scheduler: wd * wd_mult, on MERIT's groups
    assert r["lr_after"] == [0.01, 0.01]  # its warmup reached the peak lr on MERIT's groups
