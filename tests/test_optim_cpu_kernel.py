"""MERIT's fused CPU kernel (merit_ds/optim/csrc/merit_cpu.cpp), the default on CPU for fp32.

The kernel computes the formulas in fp32 with explicit fused multiply-adds (torch's ops round
their products separately or fuse them their own way), so the kernel is held to the single-tensor reference within fp32
rounding, one step at a time from identical inputs (TOL below). Kernel against kernel
(whole tensors vs fragments, sharded) is bitwise: test_zero_step_simulated.py.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from merit_ds import MERIT
from merit_ds.optim import cpu_kernel
from merit_ds.optim.merit import resolve_implementation

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="the CPU kernel did not build (no g++?)")

SHAPES = {"square": (6, 6), "wide": (4, 9), "tall": (9, 4), "row_1xN": (1, 8), "col_Nx1": (8, 1), "3d": (3, 4, 5),
          "conv_4d": (5, 3, 2, 2), "vector": (7,), "scalar": (), "big": (64, 300)}
HYPER = dict(lr=0.03, betas=(0.9, 0.95), eps=1e-6)
TOL = dict(atol=1e-6, rtol=1e-6)  # fp32 rounding of a few operations (weights ~1, lr 0.03)


def make(seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen).requires_grad_() for k, s in shapes.items()}


def grads_for(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return {k: torch.randn(p.shape, generator=gen) for k, p in params.items()}


def test_default_on_cpu_fp32_is_the_kernel():
    w = torch.zeros(3, 4)
    assert resolve_implementation(None, [w], [w], [w], [w]) == "cpu_kernel"
    assert resolve_implementation("fused", [w], [w], [w], [w]) == "cpu_kernel"
    bf = w.bfloat16()
    assert resolve_implementation(None, [bf], [bf], [w], [w]) == "foreach"  # low precision: foreach
    d = w.double()
    assert resolve_implementation(None, [d], [d], [d], [d]) == "foreach"
    assert resolve_implementation(None, [w.t()], [w.t()], [w.t()], [w.t()]) == "foreach"  # not contiguous
    assert resolve_implementation(None, [w], [w], [w], [w.t()]) == "foreach"  # any tensor of the set
    # a bare tensor where a list belongs would be iterated element by element (and mis-paired):
    with pytest.raises(TypeError, match="lists of tensors"):
        resolve_implementation(None, [w.view(-1)], w.view(-1), w.view(-1), w.view(-1))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_single_tensor_every_step(weight_decay):
    params = make()
    params["zeros"] = torch.zeros(4, 5, requires_grad=True)  # max|W| = 0: ratio 1
    params["zero_grad"] = torch.randn(3, 3, generator=torch.Generator().manual_seed(7)).requires_grad_()
    twin = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    kern = MERIT(params.values(), weight_decay=weight_decay, implementation="fused", **HYPER)
    ref = MERIT(twin.values(), weight_decay=weight_decay, implementation="single_tensor", **HYPER)
    moved = 0.0
    for step in range(5):
        grads = grads_for(params, step)
        if step == 0:
            grads["zero_grad"].zero_()
        for k in params:  # identical inputs every step (MERIT amplifies last bits)
            twin[k].data.copy_(params[k].data)
            if kern.state[params[k]]:
                for key in ("exp_avg", "exp_avg_sq"):
                    ref.state[twin[k]][key].copy_(kern.state[params[k]][key])
            params[k].grad, twin[k].grad = grads[k], grads[k].clone()
        before = {k: p.detach().clone() for k, p in params.items()}
        kern.step()
        ref.step()
        for k in params:
            assert_close(params[k].detach(), twin[k].detach(), **TOL, msg=lambda m: f"{k} step {step}: {m}")
            for key in ("exp_avg", "exp_avg_sq"):
                assert_close(kern.state[params[k]][key], ref.state[twin[k]][key], atol=1e-7, rtol=1e-6)
            assert kern.state[params[k]]["step"].item() == step + 1
            moved = max(moved, (params[k].detach() - before[k]).abs().max().item())
    assert moved > 1e-3
    assert params["zeros"].abs().max().item() > 0  # s = 1 there: the update is -lr * clip(u)


def test_nonfinite_gradient_skips_that_parameter_only():
    params = make()
    clean = {k: p.detach().clone().requires_grad_() for k, p in params.items() if k != "square"}
    opt = MERIT(params.values(), implementation="fused", **HYPER)
    opt_clean = MERIT(clean.values(), implementation="fused", **HYPER)
    grads = grads_for(params, 0)
    grads["square"][2, 3] = float("inf")
    for k in params:
        params[k].grad = grads[k]
        if k in clean:
            clean[k].grad = grads[k].clone()
    before = params["square"].detach().clone()
    with pytest.warns(RuntimeWarning, match="skipped the step of 1 parameter"):
        opt.step()
    opt_clean.step()
    assert opt.nonfinite_skips == 1
    assert torch.equal(params["square"].detach(), before)
    assert opt.state[params["square"]]["step"].item() == 0
    assert torch.equal(opt.state[params["square"]]["exp_avg"], torch.zeros(6, 6))  # nothing written
    for k in clean:
        assert_close(params[k], clean[k], atol=0, rtol=0)


def test_nonfinite_raise_modifies_nothing_and_propagate_reaches_the_weights():
    params = make()
    opt = MERIT(params.values(), implementation="fused", nonfinite_grads="raise", **HYPER)
    grads = grads_for(params, 0)
    grads["wide"][0, 0] = float("nan")
    before = {k: p.detach().clone() for k, p in params.items()}
    for k in params:
        params[k].grad = grads[k]
    with pytest.raises(FloatingPointError, match=r"shapes \[\(4, 9\)\]"):
        opt.step()
    for k in params:
        assert torch.equal(params[k].detach(), before[k])
    w = torch.ones(3, 3, requires_grad=True)
    opt = MERIT([w], implementation="fused", nonfinite_grads="propagate")
    w.grad = torch.ones(3, 3)
    w.grad[1, 1] = float("nan")
    opt.step()
    assert torch.isnan(w[1, 1]) and torch.isfinite(w).sum() == 8  # only the NaN element


@pytest.mark.slow  # a fresh interpreter
def test_fallback_without_the_kernel_runs_foreach_and_says_so():
    """No C++ compiler (CXX names none): one warning, and the default step is the foreach
    path, bitwise. (MERIT_DS_CPU_KERNEL=0 selects the same fallback silently.)"""
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "from merit_ds import MERIT\n"
        "g = torch.Generator().manual_seed(0)\n"
        "a = torch.randn(5, 7, generator=g).requires_grad_(); b = a.detach().clone().requires_grad_()\n"
        "a.grad = torch.randn(5, 7, generator=g); b.grad = a.grad.clone()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    MERIT([a], lr=0.1).step()\n"
        "MERIT([b], lr=0.1, implementation='foreach').step()\n"
        "print(sum('fused CPU kernel is not available' in str(w.message) for w in caught), torch.equal(a, b))\n"
    )
    env = dict(os.environ, CXX="/nonexistent/g++", TORCH_EXTENSIONS_DIR=os.devnull + "_none")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "True"]


def test_statistics_step_takes_the_same_path():
    """track_stats on or off, the kernel's weights are bitwise the same (a diagnostics cadence
    never changes the trajectory); its statistics equal the foreach path's on the same inputs
    up to the kernel's rounding of u (count exactly; min, max, mean to 1e-6; clipped count to
    one element per tensor, an element may sit on the clip boundary)."""
    a, b, c = make(), make(), make()
    opt_a = MERIT(a.values(), implementation="fused", weight_decay=0.1, **HYPER)
    opt_b = MERIT(b.values(), implementation="fused", weight_decay=0.1, track_stats=True, **HYPER)
    opt_c = MERIT(c.values(), implementation="foreach", weight_decay=0.1, track_stats=True, **HYPER)
    for step in range(3):
        grads = grads_for(a, step)
        for k in a:
            a[k].grad, b[k].grad, c[k].grad = grads[k], grads[k].clone(), grads[k].clone()
            c[k].data.copy_(b[k].data)
            if opt_b.state[b[k]]:
                for key in ("exp_avg", "exp_avg_sq"):
                    opt_c.state[c[k]][key].copy_(opt_b.state[b[k]][key])
        opt_a.step()
        opt_b.step()
        opt_c.step()
        for k in a:
            assert torch.equal(a[k], b[k]), k
            got, want = opt_b.partial_stats[b[k]], opt_c.partial_stats[c[k]]
            assert int(got.count) == int(want.count) == a[k].numel()
            assert abs(int(got.clipped) - int(want.clipped)) <= 1, k
            assert float(got.ratio_min) == pytest.approx(float(want.ratio_min), rel=1e-6), k
            assert float(got.ratio_max) == pytest.approx(float(want.ratio_max), rel=1e-6), k
            assert float(got.ratio_sum) == pytest.approx(float(want.ratio_sum), rel=1e-6)
    clipped = sum(int(opt_b.partial_stats[b[k]].clipped) for k in b)
    assert 0 < clipped < sum(p.numel() for p in b.values())  # some, not all: the count has teeth


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 2), (1, 6), (6, 1)])
def test_ratio_tables_in_cpp_equal_the_torch_formulation_bitwise(shape):
    """The C++ ratio tables against the formulas' torch operations, on maxima that include the
    special cases: zeros (ratio -1, i.e. s = 1), ratios below the tensor floor (clamped),
    infinities (inf/inf = NaN propagates through the clamp) and ordinary values."""
    from merit_ds.optim import formulas as F

    rows, cols, inner = F.matrix_dims(shape)
    r, c = rows * inner, cols * inner
    gen = torch.Generator().manual_seed(3)
    for case in range(4):
        slot = torch.rand(2 * (r + c), generator=gen) * 3
        if case >= 1:  # a zero in each of the four tables
            for off in (0, r, 2 * r, 2 * r + c):
                slot[off] = 0.0
        if case >= 2:  # an infinite |u| row maximum: the floor becomes finite/inf = 0 ...
            slot[r + r - 1] = float("inf")
        if case >= 3:  # ... or inf/inf = NaN when |w| is infinite too
            slot[r - 1] = float("inf")
        got = cpu_kernel.ratio_tables(shape, slot)
        want = cpu_kernel.ratio_tables_reference(shape, slot)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            assert torch.equal(g.isnan(), w.isnan()), (case, g, w)
            assert torch.equal(g.nan_to_num(), w.nan_to_num()), (case, g, w)
        if case == 0:  # the clamp is exercised: some ratio below the floor was raised to it
            floor = slot[:r].max() / slot[r:2 * r].max()
            assert (got[0] == floor).any() or (got[1] == floor).any()


def _per_tensor_reference(params, grads, ms, vs, group, lr, track):
    """The kernel driven tensor by tensor from Python (pass 1, ratio tables, pass 2): what
    step_tensors does in one C++ call."""
    recorded = []
    for p, g, m, v in zip(params, grads, ms, vs):
        w, g, m, v = p.view(-1), g.view(-1), m.view(-1), v.view(-1)
        slot = torch.zeros(MERIT.fragment_rule.stats_size(p.shape))
        bad = cpu_kernel.fragment_statistics(p.shape, 0, w, g, m, v, group, slot)
        if bad:
            recorded.append(None)
            continue
        ratios = cpu_kernel.ratio_tables(p.shape, slot)
        recorded.append(cpu_kernel.fragment_apply(p.shape, 0, w, g, m, v, group, ratios, lr, track=track))
    return recorded


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_whole_group_call_is_bitwise_the_per_tensor_calls(weight_decay):
    """cpu_kernel.step_tensors (the default CPU step: one C++ call for the group) against the
    same kernel driven tensor by tensor: weights, moments and statistics bitwise, over three
    steps, with a zero matrix (ratio 1), a zero gradient, an empty tensor, a non-finite
    gradient ("skip": that tensor untouched) and a 4-d tensor."""
    shapes = dict(SHAPES, zeros=(4, 5), empty=(0, 3), nan=(3, 3))
    a = make(shapes=shapes)
    a["zeros"].data.zero_()
    b = {k: p.detach().clone() for k, p in a.items()}
    ma, va = ({k: torch.zeros_like(p) for k, p in a.items()} for _ in range(2))
    mb, vb = ({k: torch.zeros_like(p) for k, p in a.items()} for _ in range(2))
    group = dict(betas=(0.9, 0.95), eps=1e-6, weight_decay=weight_decay)
    keys = list(a)
    for step in range(3):
        grads = grads_for(a, step)
        grads["scalar"].zero_()
        if step == 1:
            grads["nan"][1, 2] = float("nan")
        nan_before = (a["nan"].detach().clone(), ma["nan"].clone(), va["nan"].clone())
        bad, got = cpu_kernel.step_tensors(
            [a[k].detach() for k in keys], [grads[k] for k in keys], [ma[k] for k in keys], [va[k] for k in keys],
            lr=0.03, betas=group["betas"], eps=group["eps"], weight_decay=weight_decay, track=True)
        want = _per_tensor_reference([b[k] for k in keys], [grads[k] for k in keys], [mb[k] for k in keys],
                                     [vb[k] for k in keys], group, 0.03, True)
        assert bad == ([keys.index("nan")] if step == 1 else [])
        nan_after = (a["nan"].detach(), ma["nan"], va["nan"])
        assert all(torch.equal(x, y) for x, y in zip(nan_before, nan_after)) == (step == 1)  # skipped: untouched
        for k, g_stats, w_stats in zip(keys, got, want):
            for x, y in ((a[k], b[k]), (ma[k], mb[k]), (va[k], vb[k])):
                assert torch.equal(x, y), (step, k)
            if w_stats is None:  # skipped
                continue
            for x, y in zip(g_stats, w_stats):
                assert torch.equal(x, y), (step, k, g_stats, w_stats)
    assert not torch.equal(a["square"], make(shapes=shapes)["square"])  # it did step


def test_whole_group_call_raise_and_propagate():
    params = [torch.randn(4, 6), torch.randn(5)]
    grads = [torch.randn(4, 6), torch.randn(5)]
    grads[1][3] = float("inf")
    ms, vs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    before = [p.clone() for p in params]
    hyper = dict(lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    bad, _ = cpu_kernel.step_tensors(params, grads, ms, vs, nonfinite_grads="raise", **hyper)
    assert bad == [1]
    for p, q, m, v in zip(params, before, ms, vs):  # nothing written, not even the clean matrix
        assert torch.equal(p, q) and not m.any() and not v.any()
    bad, _ = cpu_kernel.step_tensors(params, grads, ms, vs, nonfinite_grads="propagate", **hyper)
    assert bad == [1]
    assert not torch.equal(params[0], before[0]) and not torch.isfinite(params[1]).all()
    with pytest.raises(ValueError, match="nonfinite_grads"):
        cpu_kernel.step_tensors(params, grads, ms, vs, nonfinite_grads="ignore", **hyper)
