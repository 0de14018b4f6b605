"""The segmented whole-partition MERIT step (merit_ds/optim/segmented.py) on CPU.

A group of parameters is flattened (with alignment gaps and tail padding, as ZeRO 1/2 lays it
out), cut into rank partitions anywhere (also mid-row), each partition's statistics are
computed with the segmented phase 1, combined with an element-wise max (what the all-reduce
does), and each partition is stepped with the segmented phase 3. The fp32 weights and moments
must equal single-device single-tensor MERIT fed the same gradients bit for bit: the
segmented step runs the formulas' element-wise operations on gathered maxima, which are exact.
"""

import math

import pytest
import torch

from merit_ds import MERIT
from merit_ds.optim import segmented
from merit_ds.optim.merit_fragments import MeritFragmentRule
from merit_ds.optim.layout import layout_from_offsets, stats_layout

SHAPES = [(6, 5), (7,), (3, 4, 2), (1, 9), (9, 1), (4, 6), (), (5, 3, 2, 2)]
GROUP = dict(betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
LR = 0.03


def flat_group(shapes, gap=3):
    offsets, at = [], 0
    for s in shapes:
        offsets.append(at)
        at += math.prod(s) + gap  # alignment padding between parameters
    return offsets, at


def run_sharded(params, grads, ms, vs, world, chunk, nonfinite=None):
    shapes = [tuple(p.shape) for p in params]
    offsets, total = flat_group(shapes)
    total += (-total) % world
    psize = total // world
    flat_w, flat_g, flat_m, flat_v = (torch.zeros(total) for _ in range(4))
    for t, src in ((flat_w, params), (flat_g, grads), (flat_m, ms), (flat_v, vs)):
        for off, x in zip(offsets, src):
            t[off:off + x.numel()] = x.reshape(-1)
    if nonfinite is not None:
        flat_g[offsets[nonfinite] + 1] = float("nan")
    sl = stats_layout(shapes, MeritFragmentRule().stats_size)
    flag_base = sl.slots[0].flag
    reduced = torch.zeros(sl.buffer_numel)
    plans = []
    for r in range(world):
        layout = layout_from_offsets(shapes, offsets, r * psize, psize)
        p = segmented.plan(shapes, layout.fragments, sl.slots, flag_base, psize, "cpu")
        buf = torch.zeros(sl.buffer_numel)
        part = slice(r * psize, (r + 1) * psize)
        segmented.statistics(p, flat_w[part], flat_g[part], flat_m[part], flat_v[part], GROUP, buf, chunk=chunk)
        torch.maximum(reduced, buf, out=reduced)  # the all_reduce(MAX)
        plans.append(p)
    for r, p in enumerate(plans):
        part = slice(r * psize, (r + 1) * psize)
        segmented.apply(p, flat_w[part], flat_g[part], flat_m[part], flat_v[part], GROUP, reduced, LR, chunk=chunk)
        assert p.persistent_bytes() < 4 * psize + 64 * 1024  # tables only: far below one partition here
    out = lambda t, x, off: t[off:off + x.numel()].view_as(x)  # noqa: E731
    return ([out(flat_w, x, o) for x, o in zip(params, offsets)], [out(flat_m, x, o) for x, o in zip(params, offsets)],
            [out(flat_v, x, o) for x, o in zip(params, offsets)], reduced[flag_base:])


def reference(params, grads, ms, vs, implementation="single_tensor"):
    """One single-device MERIT step from these weights, gradients and moments: (w, m, v)."""
    ps = [p.clone().requires_grad_() for p in params]
    opt = MERIT(ps, lr=LR, implementation=implementation, **GROUP)
    for p, g, m, v in zip(ps, grads, ms, vs):
        p.grad = g.clone()
        opt.state[p].update(step=torch.tensor(1.0), exp_avg=m.clone(), exp_avg_sq=v.clone())
    opt.step()
    return [p.detach() for p in ps], [opt.state[p]["exp_avg"] for p in ps], [opt.state[p]["exp_avg_sq"] for p in ps]


def make(seed, shapes=SHAPES, zero_row_in=5):
    """Weights, gradients and moments for ``shapes``; row 2 of parameter ``zero_row_in`` is all
    zero (s = 1 there)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in shapes]
    params[zero_row_in][2].zero_()
    grads = [torch.randn(s, generator=gen) for s in shapes]
    ms = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    vs = [torch.rand(s, generator=gen) * 0.1 for s in shapes]
    return params, grads, ms, vs


def assert_bitwise(got, want, params):
    """(w, m, v) lists equal bit for bit, and every parameter moved."""
    for i, p in enumerate(params):
        assert torch.equal(got[0][i], want[0][i]), (i, (got[0][i] - want[0][i]).abs().max())
        assert torch.equal(got[1][i], want[1][i]) and torch.equal(got[2][i], want[2][i]), i
        assert not torch.equal(got[0][i], p), i


@pytest.mark.parametrize("world,chunk", [(1, 1 << 20), (2, 7), (3, 64), (4, 5)])
def test_segmented_step_equals_single_tensor_bitwise(world, chunk):
    params, grads, ms, vs = make(world)
    w_seg, m_seg, v_seg, flags = run_sharded(params, grads, ms, vs, world, chunk)
    assert not flags.any()
    assert_bitwise((w_seg, m_seg, v_seg), reference(params, grads, ms, vs), params)


def test_segmented_step_skips_a_nonfinite_parameter_everywhere():
    params, grads, ms, vs = make(9)
    w_ref, _, _ = reference(params, grads, ms, vs)
    w_seg, m_seg, v_seg, flags = run_sharded(params, grads, ms, vs, world=3, chunk=11, nonfinite=2)
    assert flags.tolist() == [1.0 if i == 2 else 0.0 for i in range(len(SHAPES))]
    assert torch.equal(w_seg[2], params[2]) and torch.equal(m_seg[2], ms[2]) and torch.equal(v_seg[2], vs[2])
    for i in (0, 1, 3, 4, 5, 6, 7):
        assert torch.equal(w_seg[i], w_ref[i]), i


def test_gpu_smoke_section_runs_on_cpu(tmp_path):
    """The GPU smoke test's segmented_step section, dry-run on CPU with small shapes: its code
    runs (it is first executed on a GPU otherwise) and its correctness column reads 0."""
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench)
    try:
        import gpu_smoke
    finally:
        sys.path.remove(bench)
    r = gpu_smoke.segmented_step(2, device="cpu", shapes=[(20, 12), (12,), (6, 5, 2)], deepspeed_adam=False)
    assert r["torch_form_max_abs_diff_vs_single_tensor"] == 0.0
    assert r["plan_persistent_bytes"] < r["partition_bytes"]
    assert all(t["gb_per_s"] > 0 for t in r["times"].values())
    gpu_smoke.write({"env": {}, "segmented_step": {"ok": True, "seconds": 1, **r}}, tmp_path / "smoke")
    from merit_ds.optim import segmented_triton

    if not segmented_triton.interpreting():  # a GPU machine: Triton does not run on CPU tensors
        assert r["triton_unavailable"] == "not on cpu"
        return
    # the Triton kernels run here under the interpreter (tests/conftest.py): the same checks
    assert r["triton_self_check"] is None
    assert r["triton_bitwise_cpu_kernel"] is True and r["triton_max_abs_diff_vs_cpu_kernel"] == 0.0
    assert r["triton_plan_persistent_bytes"] < r["partition_bytes"]
    assert {"MERIT Triton kernels (default)", "MERIT segmented torch form (eager)"} <= set(r["times"])
    assert len(r["times"]) >= 3
    assert "| MERIT Triton kernels (default) |" in (tmp_path / "smoke.md").read_text()
