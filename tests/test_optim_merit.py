"""MERIT on one device: equivalence to an independent float64 reference, fast path vs
reference, low precision, state_dict round trip, validation and the non-finite policy."""

import copy

import pytest
import torch
from torch.testing import assert_close

from merit_ds import MERIT
from reference_merit import reference_step

SHAPES = {
    "vector": (7,),
    "square": (6, 6),
    "wide": (4, 9),
    "tall": (9, 4),
    "row_1xN": (1, 8),
    "col_Nx1": (8, 1),
    "3d": (3, 4, 5),
    "conv_4d": (5, 3, 2, 2),
}


def make_params(dtype=torch.float64, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for k, s in shapes.items()}


def random_grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    return {k: scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for k, p in params.items()}


HYPER = dict(lr=0.03, betas=(0.9, 0.95), eps=1e-6)


@pytest.mark.parametrize("implementation", ["single_tensor", "foreach"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_reference_every_step(implementation, weight_decay):
    """Each of 8 steps, from the optimizer's own current state, equals the reference <= 1e-12."""
    params = make_params()
    # Special cases riding along: an all-zero matrix (ratio 1 where max|W| is 0) and a
    # matrix whose gradient is zero at step 0 (max|U| is 0 unless decay makes it nonzero).
    params["zeros"] = torch.zeros(4, 5, dtype=torch.float64, requires_grad=True)
    params["zero_grad"] = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).requires_grad_()
    opt = MERIT(params.values(), weight_decay=weight_decay, implementation=implementation, **HYPER)
    for step in range(8):
        grads = random_grads(params, step)
        if step == 0:
            grads["zero_grad"].zero_()
        before = {k: p.detach().clone() for k, p in params.items()}
        states = {k: (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()) if opt.state[p] else
                  (torch.zeros_like(p), torch.zeros_like(p)) for k, p in params.items()}
        for k, p in params.items():
            p.grad = grads[k]
        opt.step()
        for k, p in params.items():
            w_ref, m_ref, v_ref = reference_step(before[k], grads[k], *states[k], lr=0.03, beta1=0.9, beta2=0.95,
                                                 eps=1e-6, weight_decay=weight_decay)
            assert_close(p.detach(), w_ref, atol=1e-12, rtol=0, msg=lambda m: f"{k} step {step}: {m}")
            assert_close(opt.state[p]["exp_avg"], m_ref, atol=1e-12, rtol=0)
            assert_close(opt.state[p]["exp_avg_sq"], v_ref, atol=1e-12, rtol=0)
            assert opt.state[p]["step"].item() == step + 1
    # The all-zero matrix: s = 1, so its update is exactly -lr * clip(u).
    assert params["zeros"].abs().max().item() > 0


def test_zero_row_gets_ratio_one():
    """A zero row of W forces s = 1 in that row even though the column ratio is larger."""
    w = torch.tensor([[0.0, 0.0], [2.0, 4.0]], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[1.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    opt = MERIT([w], lr=0.1, betas=(0.0, 0.0), eps=0.0)
    w.grad = g
    opt.step()
    # betas 0: m = g, v = g^2, u = sign(g). Row 0: s = 1 -> -0.1 * sign(g).
    # Row 1: max(4/1, col 2/1 or 4/1, tensor 4/1) = 4 -> clip(4*u) = 1 -> -0.1.
    assert_close(w.detach(), torch.tensor([[-0.1, 0.1], [1.9, 3.9]], dtype=torch.float64), atol=0, rtol=0)


def _run(implementation, dtype, steps=4, weight_decay=0.1):
    params = make_params(dtype=dtype)
    opt = MERIT(params.values(), weight_decay=weight_decay, implementation=implementation, **HYPER)
    for step in range(steps):
        for k, g in random_grads(params, step).items():
            params[k].grad = g
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_foreach_bitwise_equals_single_tensor(dtype):
    ref, ref_opt = _run("single_tensor", dtype)
    fast, fast_opt = _run("foreach", dtype)
    for k in ref:
        assert_close(fast[k], ref[k], atol=0, rtol=0)
        assert_close(fast_opt.state[fast[k]]["exp_avg_sq"], ref_opt.state[ref[k]]["exp_avg_sq"], atol=0, rtol=0)


@pytest.mark.parametrize("implementation", ["single_tensor", "foreach"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_use_fp32_math(implementation, dtype):
    """bf16/fp16 params: fp32 state and arithmetic, rounded once on write-back."""
    low = make_params(dtype=dtype)
    high = {k: p.detach().float().requires_grad_() for k, p in low.items()}
    opt_low = MERIT(low.values(), weight_decay=0.1, implementation=implementation, **HYPER)
    opt_high = MERIT(high.values(), weight_decay=0.1, implementation="single_tensor", **HYPER)
    grads = random_grads(low, 0)
    for k in low:
        low[k].grad = grads[k]
        high[k].grad = grads[k].float()
    opt_low.step()
    opt_high.step()
    for k in low:
        assert opt_low.state[low[k]]["exp_avg"].dtype == torch.float32
        assert_close(low[k].detach(), high[k].detach().to(dtype), atol=0, rtol=0)


def test_state_dict_round_trip_continues_identically():
    a, opt_a = _run("foreach", torch.float64, steps=3)
    b = {k: p.detach().clone().requires_grad_() for k, p in a.items()}
    opt_b = MERIT(b.values(), weight_decay=0.1, **HYPER)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    sd = opt_a.state_dict()
    assert set(sd["state"][0]) == {"exp_avg", "exp_avg_sq", "step"}
    for step in range(3, 6):
        grads = random_grads(a, step)
        for k in a:
            a[k].grad, b[k].grad = grads[k], grads[k].clone()
        opt_a.step()
        opt_b.step()
    for k in a:
        assert_close(b[k], a[k], atol=0, rtol=0)


def test_param_groups_with_different_hyperparameters():
    params = make_params()
    names = list(params)
    groups = [
        {"params": [params[n] for n in names[:3]], "lr": 0.01, "weight_decay": 0.0},
        {"params": [params[n] for n in names[3:]], "lr": 0.05, "weight_decay": 0.2, "betas": (0.8, 0.99), "eps": 1e-8},
    ]
    opt = MERIT(groups, **HYPER)
    before = {k: p.detach().clone() for k, p in params.items()}
    grads = random_grads(params, 0)
    for k in params:
        params[k].grad = grads[k]
    opt.step()
    z = lambda p: torch.zeros_like(p)  # noqa: E731
    for i, k in enumerate(names):
        hp = dict(lr=0.01, beta1=0.9, beta2=0.95, eps=1e-6, weight_decay=0.0) if i < 3 else dict(
            lr=0.05, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.2)
        w_ref, _, _ = reference_step(before[k], grads[k], z(before[k]), z(before[k]), **hp)
        assert_close(params[k].detach(), w_ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(lr=-1e-3), "learning rate: -0.001"),
        (dict(lr=float("nan")), "learning rate: nan"),
        (dict(betas=(1.0, 0.9)), "index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), "index 1: -0.1"),
        (dict(eps=-1e-8), "epsilon value: -1e-08"),
        (dict(weight_decay=-0.1), "weight_decay value: -0.1"),
        (dict(nonfinite_grads="ignore"), "'ignore'"),
        (dict(implementation="cuda"), "'cuda'"),
    ],
)
def test_invalid_hyperparameters_name_the_value(kwargs, text):
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(")", r"\)")):
        MERIT([torch.zeros(2, requires_grad=True)], **kwargs)


def test_invalid_param_group_override():
    opt = MERIT([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="learning rate: -5"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "lr": -5})


def test_sparse_gradient_rejected():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        MERIT(emb.parameters()).step()


@pytest.mark.parametrize("implementation", ["single_tensor", "foreach"])
def test_nonfinite_gradient_skips_that_parameter_only(implementation):
    bad_value = float("nan")
    params = make_params()
    clean = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    opt = MERIT(params.values(), implementation=implementation, **HYPER)
    opt_clean = MERIT([p for k, p in clean.items() if k != "square"], implementation=implementation, **HYPER)
    grads = random_grads(params, 0)
    grads["square"][2, 3] = bad_value
    for k in params:
        params[k].grad = grads[k]
        clean[k].grad = grads[k].clone()
    before = params["square"].detach().clone()
    with pytest.warns(RuntimeWarning, match="skipped the step of 1 parameter"):
        opt.step()
    opt_clean.step()
    assert opt.nonfinite_skips == 1
    assert_close(params["square"].detach(), before, atol=0, rtol=0)
    assert len(opt.state[params["square"]]) == 0 or opt.state[params["square"]]["step"].item() == 0
    for k in params:
        if k != "square":
            assert_close(params[k], clean[k], atol=0, rtol=0)


def test_nonfinite_gradient_raise_modifies_nothing():
    params = make_params()
    opt = MERIT(params.values(), nonfinite_grads="raise", **HYPER)
    grads = random_grads(params, 0)
    grads["wide"][0, 0] = float("inf")
    before = {k: p.detach().clone() for k, p in params.items()}
    for k in params:
        params[k].grad = grads[k]
    with pytest.raises(FloatingPointError, match=r"shapes \[\(4, 9\)\]"):
        opt.step()
    for k in params:
        assert_close(params[k].detach(), before[k], atol=0, rtol=0)


def test_nonfinite_propagate_reaches_weights():
    w = torch.ones(3, 3, requires_grad=True)
    opt = MERIT([w], nonfinite_grads="propagate")
    w.grad = torch.full((3, 3), float("nan"))
    opt.step()
    assert torch.isnan(w).all()


def test_track_stats_values():
    """clip fraction and ratio summary against a direct computation."""
    params = make_params(shapes={"m": (5, 4), "v": (6,)})
    opt = MERIT(params.values(), track_stats=True, lr=0.1, betas=(0.0, 0.0), eps=0.0)
    grads = random_grads(params, 0)
    for k in params:
        params[k].grad = grads[k]
    w = params["m"].detach().clone()
    opt.step()
    u = grads["m"].sign()  # betas 0, eps 0: u = g/|g|
    W, U = w.abs(), u.abs()
    s = torch.maximum(W.amax(1, keepdim=True) / U.amax(1, keepdim=True), W.amax(0, keepdim=True) / U.amax(0, keepdim=True))
    s = torch.maximum(s, W.max() / U.max())
    st = opt.last_stats[params["m"]]
    assert_close(st.clip_fraction, ((s * u).abs() > 1).double().mean().float(), atol=0, rtol=0)
    assert_close(st.ratio_max.double(), s.max(), atol=1e-6, rtol=0)
    assert_close(st.ratio_min.double(), s.min(), atol=1e-6, rtol=0)
    assert opt.last_stats[params["v"]].ratio_min == opt.last_stats[params["v"]].ratio_max


def test_group_resolver_takes_over_a_group():
    calls = []
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.ones(4)

    def resolver(opt, group):
        return (lambda: calls.append(len(group["params"]))) if group.get("sharded") else None

    MERIT.register_group_resolver(resolver)
    try:
        opt = MERIT([{"params": [p], "sharded": True}])
        opt.step()
        assert calls == [1]
        assert p.abs().max().item() == 0  # the default path did not run
    finally:
        MERIT._group_resolvers.remove(resolver)


@pytest.mark.slow  # torch.compile
def test_compiled_matches_reference_within_rounding():
    """implementation='compiled' (torch.compile): same math, the compiler may contract
    multiply-adds, so one step agrees with the single-tensor path to fp32 rounding. (The CPU
    kernel behind 'fused' on CPU is tested in test_optim_cpu_kernel.py.)"""
    pytest.importorskip("torch._inductor")
    shapes = {"m": (6, 10), "v": (10,), "conv": (4, 3, 2, 2)}
    ref = make_params(dtype=torch.float32, shapes=shapes)
    fused = {k: p.detach().clone().requires_grad_() for k, p in ref.items()}
    opt_ref = MERIT(ref.values(), weight_decay=0.1, implementation="single_tensor", **HYPER)
    opt_fused = MERIT(fused.values(), weight_decay=0.1, implementation="compiled", **HYPER)
    for step in range(2):
        grads = random_grads(ref, step)
        for k in ref:
            ref[k].grad, fused[k].grad = grads[k], grads[k].clone()
        # Start each step from identical weights and state (MERIT amplifies last bits).
        for k in ref:
            fused[k].data.copy_(ref[k].data)
            if opt_ref.state[ref[k]]:
                for key in ("exp_avg", "exp_avg_sq"):
                    opt_fused.state[fused[k]][key].copy_(opt_ref.state[ref[k]][key])
        opt_ref.step()
        opt_fused.step()
        for k in ref:
            assert_close(fused[k].detach(), ref[k].detach(), atol=1e-6, rtol=1e-6)
            assert_close(opt_fused.state[fused[k]]["exp_avg_sq"], opt_ref.state[ref[k]]["exp_avg_sq"], atol=1e-9, rtol=1e-6)


def test_partial_trust_stats_merge_over_any_split_equals_whole():
    """PartialTrustStats of pieces merge into the whole's: count, clipped, min, max exactly."""
    from merit_ds.optim import merge_trust_stats, partial_trust_stats

    g = torch.Generator().manual_seed(3)
    trust = torch.rand(7, 9, generator=g) * 3
    u = torch.randn(7, 9, generator=g)
    whole = partial_trust_stats(trust, u)
    assert int(whole.clipped) == int(((trust * u).abs() > 1).sum()) and int(whole.count) == 63
    flat_t, flat_u = trust.reshape(-1), u.reshape(-1)
    cuts = [0, 5, 5, 30, 31, 63]  # includes an empty piece (the identity)
    parts = [partial_trust_stats(flat_t[a:b], flat_u[a:b]) for a, b in zip(cuts, cuts[1:])]
    merged = merge_trust_stats(parts)
    for i in (0, 4):
        assert int(merged[i]) == int(whole[i])
    assert float(merged.ratio_min) == float(trust.min()) and float(merged.ratio_max) == float(trust.max())
    assert_close(merged.ratio_sum, trust.double().sum(), atol=0, rtol=1e-12)
    # a vector's scalar ratio broadcasts over its elements
    vec = partial_trust_stats(torch.tensor(2.0), torch.tensor([0.1, 0.6, -0.7]))
    assert (int(vec.count), int(vec.clipped), float(vec.ratio_sum)) == (3, 2, 6.0)


def test_track_stats_entries_follow_the_parameters_stepped():
    """A parameter without a gradient loses its entry; switching track_stats off keeps the last."""
    a, b = torch.ones(3, 2, requires_grad=True), torch.ones(4, requires_grad=True)
    opt = MERIT([a, b], track_stats=True)
    a.grad, b.grad = torch.ones(3, 2), torch.ones(4)
    opt.step()
    assert set(opt.partial_stats) == {a, b} and int(opt.partial_stats[a].count) == 6
    b.grad = None
    opt.step()
    assert set(opt.partial_stats) == {a} and set(opt.last_stats) == {a}
    opt.track_stats = False
    opt.step()
    assert set(opt.partial_stats) == {a}


def test_finite_gradient_whose_sum_overflows_is_not_skipped():
    """The cheap screen (a per-tensor sum) overflows for huge but finite gradients; the exact
    check must clear them so the step is taken."""
    w = torch.ones(4, 4, requires_grad=True)
    opt = MERIT([w], lr=0.1)
    w.grad = torch.full((4, 4), 3e38)
    assert not torch.isfinite(w.grad.sum())
    opt.step()
    assert opt.nonfinite_skips == 0
    assert opt.state[w]["step"].item() == 1
    assert_close(opt.state[w]["exp_avg"], torch.full((4, 4), 0.1 * 3e38), atol=0, rtol=1e-6)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_infinite_gradient_skipped(bad):
    w = torch.ones(3, requires_grad=True)
    opt = MERIT([w])
    w.grad = torch.tensor([0.1, bad, 0.2])
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert opt.nonfinite_skips == 1 and torch.equal(w.detach(), torch.ones(3))


def test_fused_statistics_step_runs_foreach_path():
    """track_stats with implementation='fused' gives the foreach path's statistics (no compile)."""
    params = make_params(shapes={"m": (5, 4)})
    twin = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    fused = MERIT(params.values(), implementation="fused", track_stats=True, **HYPER)
    ref = MERIT(twin.values(), implementation="foreach", track_stats=True, **HYPER)
    grads = random_grads(params, 0)
    params["m"].grad, twin["m"].grad = grads["m"], grads["m"].clone()
    fused.step()
    ref.step()
    assert_close(params["m"], twin["m"], atol=0, rtol=0)
    assert fused.last_stats[params["m"]] == ref.last_stats[twin["m"]]
