"""MERIT's Triton partition step (merit_ds/optim/segmented_triton.py), run on CPU tensors
under Triton's interpreter.

The kernels do the CPU kernel's arithmetic operation for operation (explicit FMAs, IEEE
division and square root), so a group flattened as ZeRO 1/2 lays it out, cut into rank
partitions anywhere (mid-row included), stepped with the Triton phase 1, an element-wise max
of the buffers (the all-reduce) and the Triton phase 3, must equal single-device MERIT on its
CPU kernel bit for bit: weights, moments, and the statistics buffer against the CPU kernel's
per-fragment pass 1. Small tiles (2 x 8) make every parameter span many tiles and every
fragment edge fall inside one.
"""

import math

import pytest
import torch

from merit_ds import MERIT
from merit_ds.optim import cpu_kernel, segmented_triton
from merit_ds.optim.merit_fragments import MeritFragmentRule
from merit_ds.optim.layout import layout_from_offsets, stats_layout
import test_optim_segmented as segmented_tests
from test_optim_segmented import GROUP, LR, assert_bitwise, flat_group  # the same hyperparameters


SHAPES = [(6, 5), (7,), (1, 9), (9, 1), (4, 6), (), (3, 40), (17, 19), (3, 4, 2), (300,), (5, 3, 2, 2)]
SMALL = dict(block_rows=2, block_cols=8)
# The kernels divide by a zero maximum where the result is then discarded (s = 1 there, as in
# the CPU kernel); the interpreter runs them in numpy, which warns about such IEEE divisions.
pytestmark = [
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning",
                               "ignore:invalid value encountered in divide:RuntimeWarning"),
    # CPU tensors need Triton's interpreter (tests/conftest.py sets it where there is no GPU);
    # on a GPU machine the GPU smoke test runs these checks on the GPU instead
    pytest.mark.skipif(not segmented_triton.interpreting(), reason="Triton runs compiled here (a GPU is present)"),
]


def make(seed, shapes=SHAPES):
    return segmented_tests.make(seed, shapes, zero_row_in=4)  # (4, 6): an all-zero row


def split(shapes, world):
    offsets, total = flat_group(shapes)
    total += (-total) % world
    return offsets, total, total // world


def flatten(tensors, offsets, total):
    flat = torch.zeros(total)
    for off, x in zip(offsets, tensors):
        flat[off:off + x.numel()] = x.reshape(-1)
    return flat


def run_sharded(params, grads, ms, vs, world, nonfinite=None, tiles=SMALL):
    """Triton phases 1 and 3 on each rank's partition; returns weights, moments (per
    parameter), the reduced buffer and the flags."""
    shapes = [tuple(p.shape) for p in params]
    offsets, total, psize = split(shapes, world)
    flat_w, flat_g, flat_m, flat_v = (flatten(x, offsets, total) for x in (params, grads, ms, vs))
    if nonfinite is not None:
        flat_g[offsets[nonfinite] + 1] = float("nan")
    sl = stats_layout(shapes, MeritFragmentRule().stats_size)
    flag_base = sl.slots[0].flag
    reduced = torch.zeros(sl.buffer_numel)
    plans, split_matrices = [], 0
    for r in range(world):
        layout = layout_from_offsets(shapes, offsets, r * psize, psize)
        split_matrices += sum(1 for f in layout.fragments if f.is_matrix and f.numel < math.prod(f.shape))
        p = segmented_triton.plan(shapes, layout.fragments, sl.slots, flag_base, "cpu", **tiles)
        buf = torch.zeros(sl.buffer_numel)
        part = slice(r * psize, (r + 1) * psize)
        segmented_triton.statistics(p, flat_w[part], flat_g[part], flat_m[part], flat_v[part], GROUP, buf)
        torch.maximum(reduced, buf, out=reduced)  # the all_reduce(MAX)
        plans.append(p)
    if world > 1:
        assert split_matrices > 0  # some matrix really is cut across ranks
    for r, p in enumerate(plans):
        part = slice(r * psize, (r + 1) * psize)
        segmented_triton.apply(p, flat_w[part], flat_g[part], flat_m[part], flat_v[part], GROUP, reduced, LR)
    out = lambda t, x, off: t[off:off + x.numel()].view_as(x)  # noqa: E731
    return ([out(flat_w, x, o) for x, o in zip(params, offsets)], [out(flat_m, x, o) for x, o in zip(params, offsets)],
            [out(flat_v, x, o) for x, o in zip(params, offsets)], reduced, reduced[flag_base:])


def kernel_reference(params, grads, ms, vs):
    """Single-device MERIT on its CPU kernel (the default for fp32 on CPU)."""
    assert cpu_kernel.available(), "the CPU kernel must build here (setup.sh builds it)"
    return segmented_tests.reference(params, grads, ms, vs, implementation=None)


def kernel_statistics(params, grads, ms, vs):
    """The statistics buffer the CPU kernel's pass 1 fills for the whole tensors."""
    shapes = [tuple(p.shape) for p in params]
    sl = stats_layout(shapes, MeritFragmentRule().stats_size)
    buf = torch.zeros(sl.buffer_numel)
    for slot, p, g, m, v in zip(sl.slots, params, grads, ms, vs):
        bad = cpu_kernel.fragment_statistics(slot.shape, 0, p.reshape(-1), g.reshape(-1), m.reshape(-1),
                                             v.reshape(-1), GROUP, buf.narrow(0, slot.offset, slot.size))
        buf[slot.flag] = float(bad)
    return buf


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_triton_step_equals_the_cpu_kernel_bitwise(world):
    params, grads, ms, vs = make(world)
    w_t, m_t, v_t, reduced, flags = run_sharded(params, grads, ms, vs, world)
    assert torch.equal(reduced, kernel_statistics(params, grads, ms, vs))
    assert not flags.any()
    assert_bitwise((w_t, m_t, v_t), kernel_reference(params, grads, ms, vs), params)


def test_triton_step_with_default_tiles_and_the_reference_formulas():
    """Default 16 x 256 tiles (a 300-column matrix spans two column blocks), two ranks; and
    within fp32 rounding of the single-tensor reference (torch's own operations)."""
    shapes = [(40, 300), (300,), (5, 7)]
    params, grads, ms, vs = make(11, shapes=[(40, 300), (300,), (5, 7), (2, 3), (9,)])
    params, grads, ms, vs = (x[:3] for x in (params, grads, ms, vs))
    w_ref, _, _ = kernel_reference(params, grads, ms, vs)
    w_t, _, _, _, _ = run_sharded(params, grads, ms, vs, 2, tiles={})
    w_single, _, _ = segmented_tests.reference(params, grads, ms, vs)
    for i in range(len(shapes)):
        assert torch.equal(w_t[i], w_ref[i]), i
        torch.testing.assert_close(w_t[i], w_single[i], atol=1e-6, rtol=1e-6)


def test_triton_step_skips_a_nonfinite_parameter_everywhere():
    params, grads, ms, vs = make(9)
    w_ref, _, _ = kernel_reference(params, grads, ms, vs)
    w_t, m_t, v_t, _, flags = run_sharded(params, grads, ms, vs, world=3, nonfinite=2)
    assert flags.tolist() == [1.0 if i == 2 else 0.0 for i in range(len(SHAPES))]
    assert torch.equal(w_t[2], params[2]) and torch.equal(m_t[2], ms[2]) and torch.equal(v_t[2], vs[2])
    for i in set(range(len(SHAPES))) - {2}:
        assert torch.equal(w_t[i], w_ref[i]), i


def test_plan_tables():
    """Tile geometry on a hand-checked case, and the persistent bytes."""
    shapes = [(3, 10), (5,)]
    sl = stats_layout(shapes, MeritFragmentRule().stats_size)
    offsets, total = flat_group(shapes, gap=0)  # W at 0..30, b at 30..35
    layout = layout_from_offsets(shapes, offsets, 12, 20)  # W.flat[12:30] (row 1 from column 2), b[0:2]
    p = segmented_triton.plan(shapes, layout.fragments, sl.slots, sl.slots[0].flag, "cpu", block_rows=2,
                              block_cols=8)
    got = [dict(zip(segmented_triton.TILE_FIELDS, row)) for row in p.tiles.tolist()]
    # W: rows 1..2, column blocks 0 and 8; base = partition offset of W[1, 0] = 0 - 12 + 10
    assert [(t["base"], t["nrows"], t["col0"], t["lo"], t["hi"], t["row_entry"], t["col_entry"]) for t in got[:2]] == [
        (-2, 2, 0, 0, 18, 1, 6), (-2, 2, 8, 0, 18, 1, 14)]
    # b: one virtual row of 8 at partition offset 18, its one entry pair at slot offset 26
    assert [(t["base"], t["nrows"], t["lo"], t["hi"], t["row_entry"], t["row_stride"], t["is_matrix"])
            for t in got[2:]] == [(18, 1, 18, 20, 26, 0, 0)]
    assert p.matrices.tolist() == [[0, 0, 3]]
    assert p.persistent_bytes() == 3 * 16 * 8 + 3 * 8 + 4 * 4


def test_triton_rejects_other_dtypes():
    shapes = [(4, 4)]
    sl = stats_layout(shapes, MeritFragmentRule().stats_size)
    layout = layout_from_offsets(shapes, [0], 0, 16)
    p = segmented_triton.plan(shapes, layout.fragments, sl.slots, sl.slots[0].flag, "cpu")
    x = torch.zeros(16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32"):
        segmented_triton.statistics(p, x, x, x, x, GROUP, torch.zeros(sl.buffer_numel))


def test_self_check_passes_here_and_catches_a_wrong_kernel(monkeypatch):
    """The first-use check against the torch form: passes with the real kernels, fails (and
    says where) when the update is wrong, and the sharded step then falls back with a warning."""
    from merit_ds.sharding import step as step_mod

    assert segmented_triton._run_self_check(torch.device("cpu")) is None
    real = segmented_triton.apply
    monkeypatch.setattr(segmented_triton, "apply",
                        lambda p, w, g, m, v, group, buf, lr, **kw: real(p, w, g, m, v, group, buf, 2 * lr, **kw))
    why = segmented_triton._run_self_check(torch.device("cpu"))
    assert why is not None and why.startswith("AssertionError: w:"), why
    monkeypatch.setattr(segmented_triton, "self_check", lambda device: why)
    with pytest.warns(RuntimeWarning, match="failed their self-check"):
        assert step_mod._triton_passes(torch.device("cpu")) is False
    monkeypatch.setattr(segmented_triton, "self_check", lambda device: None)
    assert step_mod._triton_passes(torch.device("cpu")) is True


def test_the_planners_estimate_is_the_plans_size_for_gpt2_small():
    """merit-ds plan counts MERIT's GPU scratch as the tile table; on GPT-2 Small's parameter
    set at world 8 (one rank's partition) the estimate is the plan's size within 1%."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from bench_optimizer_step import gpt2_small_shapes
    finally:
        sys.path.pop(0)
    shapes = [tuple(s) for s in gpt2_small_shapes()]
    offsets, total = flat_group(shapes, gap=0)
    psize = -(-total // 8)
    sl = stats_layout(shapes, MeritFragmentRule().stats_size)
    p = segmented_triton.plan(shapes, layout_from_offsets(shapes, offsets, 0, psize).fragments, sl.slots,
                              sl.slots[0].flag, "cpu")
    est = segmented_triton.estimated_persistent_bytes(psize)
    assert est <= p.persistent_bytes() <= 1.01 * est
    assert p.persistent_bytes() < 0.01 * 4 * psize  # under 1% of the fp32 partition


def _steps(impl, policy="skip", nan=None, track=True, steps=3):
    """MERIT on SHAPES (an empty matrix added) for ``steps`` steps; returns each step's weights,
    moments and statistics."""
    shapes = SHAPES + [(0, 3)]
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    opt = MERIT(params, lr=LR, nonfinite_grads=policy, implementation=impl, **GROUP)
    opt.track_stats = track
    out = []
    for k in range(steps):
        for p, g in zip(params, grads[k]):
            p.grad = g.clone()
        if nan is not None and nan[0] == k:
            params[nan[1]].grad.view(-1)[0] = float("nan")
        opt.step()
        out.append(([p.detach().clone() for p in params],
                    [opt.state[p]["exp_avg"].clone() for p in params if p in opt.state],
                    [float(opt.state[p]["step"]) for p in params if p in opt.state],
                    {i: tuple(float(x) for x in opt.partial_stats[p]) for i, p in enumerate(params)
                     if p in opt.partial_stats},
                    opt.nonfinite_skips))
    return out


@pytest.mark.parametrize("policy,nan", [("skip", None), ("skip", (1, 2)), ("propagate", None), ("propagate", (1, 2))])
def test_implementation_triton_equals_the_cpu_kernel_bitwise(policy, nan):
    """MERIT(implementation="triton") on one device (each tensor a one-fragment partition;
    interpreted here, on CUDA tensors on a GPU) against the default CPU kernel, step by step:
    weights, moments, step counts, skips and the trust-ratio statistics all equal (the
    statistics' float64 sum within 1e-12: another summation order)."""
    triton_run = _steps("triton", policy, nan)
    kernel_run = _steps(None, policy, nan)
    bitwise = dict(rtol=0, atol=0, equal_nan=True)  # with "propagate" a NaN reaches the weights
    for k, (a, b) in enumerate(zip(triton_run, kernel_run)):
        for x, y in zip(a[0] + a[1], b[0] + b[1]):
            torch.testing.assert_close(x, y, **bitwise, msg=lambda m: f"step {k}: {m}")
        assert a[2] == b[2] and a[4] == b[4], k
        assert a[3].keys() == b[3].keys(), k
        for i in a[3]:
            ca, sa, lo_a, hi_a, cl_a = a[3][i]
            cb, sb, lo_b, hi_b, cl_b = b[3][i]
            assert (ca, cl_a) == (cb, cl_b), (k, i)
            torch.testing.assert_close(torch.tensor([lo_a, hi_a]), torch.tensor([lo_b, hi_b]), **bitwise)
            torch.testing.assert_close(torch.tensor(sa), torch.tensor(sb), rtol=1e-12, atol=0, equal_nan=True)
    if nan is not None and policy == "skip":
        assert triton_run[-1][4] == 1 and nan[1] not in triton_run[nan[0]][3]  # skipped, no statistics
    if nan is not None and policy == "propagate":  # not skipped: the NaN is in the weights, as in the kernel
        assert torch.isnan(triton_run[nan[0]][0][nan[1]]).any() and triton_run[-1][4] == 0


def test_implementation_triton_raise_and_refusals():
    params = [torch.randn(4, 5, requires_grad=True), torch.randn(5, requires_grad=True)]
    before = [p.detach().clone() for p in params]
    opt = MERIT(params, lr=LR, nonfinite_grads="raise", implementation="triton", **GROUP)
    params[0].grad = torch.randn(4, 5)
    params[1].grad = torch.full((5,), float("inf"))
    with pytest.raises(FloatingPointError, match="nothing was modified"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert all(not opt.state[p] or float(opt.state[p]["step"]) == 0 for p in params)
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    x.grad = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="implementation='triton' cannot step these tensors"):
        MERIT([x], implementation="triton").step()


def test_gpu_smoke_equivalence_section_runs_on_cpu():
    """The GPU smoke test's optimizer_equivalence section, dry-run on CPU (Triton interpreted):
    the triton case against the CPU kernel reads 0 over three steps."""
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench)
    try:
        import gpu_smoke
    finally:
        sys.path.remove(bench)
    r = gpu_smoke.optimizer_equivalence("cpu", only=("merit_foreach", "merit_triton_vs_cpu_kernel"),
                                        shapes=[(96, 300), (300,), (50, 7), (3, 4, 5), (7,), ()])
    assert r["merit_foreach"] == 0.0 and r["merit_triton_vs_cpu_kernel"] == 0.0
    assert r["triton_bitwise_cpu_kernel"] is True
