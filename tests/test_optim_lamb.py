"""LAMB on one device: equivalence to an independent float64 reference (every step, from the
optimizer's own state), foreach vs reference, low precision, the clamp, bias correction,
state_dict round trip, validation and the non-finite policy (a group is one unit)."""

import copy

import pytest
import torch
from torch.testing import assert_close

from merit_ds import LAMB
from reference_lamb import reference_lamb_step

SHAPES = {"vector": (7,), "square": (6, 6), "wide": (4, 9), "3d": (3, 4, 5), "conv_4d": (5, 3, 2, 2), "scalar": ()}
HYPER = dict(lr=0.02, betas=(0.9, 0.95), eps=1e-6)


def make_params(dtype=torch.float64, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for k, s in shapes.items()}


def random_grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    return {k: scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for k, p in params.items()}


@pytest.mark.parametrize("implementation", ["single_tensor", "foreach"])
@pytest.mark.parametrize("extra", [dict(weight_decay=0.0), dict(weight_decay=0.1), dict(weight_decay=0.01, max_trust_ratio=0.5),
                                   dict(weight_decay=0.1, bias_correction=False)])
def test_matches_reference_every_step(implementation, extra):
    """Each of 6 steps, from the optimizer's own state, equals the float64 reference <= 1e-12."""
    params = make_params()
    params["zeros"] = torch.zeros(4, 5, dtype=torch.float64, requires_grad=True)  # ||w|| = 0: ratio 1
    opt = LAMB(params.values(), implementation=implementation, **HYPER, **extra)
    ratios_seen = set()
    for step in range(6):
        grads = random_grads(params, step)
        before = {k: p.detach().clone() for k, p in params.items()}
        states = {k: (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()) if opt.state[p] else
                  (torch.zeros_like(p), torch.zeros_like(p)) for k, p in params.items()}
        for k, p in params.items():
            p.grad = grads[k]
        opt.step()
        for k, p in params.items():
            w_ref, m_ref, v_ref, ratio = reference_lamb_step(
                before[k], grads[k], *states[k], step + 1, lr=0.02, beta1=0.9, beta2=0.95, eps=1e-6, **extra)
            ratios_seen.add(round(ratio, 6))
            assert_close(p.detach(), w_ref, atol=1e-12, rtol=0, msg=lambda m: f"{k} step {step}: {m}")
            assert_close(opt.state[p]["exp_avg"], m_ref, atol=1e-12, rtol=0)
            assert_close(opt.state[p]["exp_avg_sq"], v_ref, atol=1e-12, rtol=0)
            assert opt.state[p]["step"].item() == step + 1
    assert len(ratios_seen) > 5  # the ratios differ per tensor and step: the check has teeth
    if "max_trust_ratio" in extra:
        assert max(ratios_seen) == 0.5  # the clamp bound some ratio


def test_ratio_one_where_a_norm_is_zero_and_bias_corrected_first_step():
    """betas 0.9/0.99, step 1: m_hat = g, v_hat = g^2, so u = sign(g) (eps 0). A zero matrix
    gets ratio 1 (update -lr*u); a nonzero one gets ||w||/||u||."""
    w0 = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    w1 = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    opt = LAMB([w0, w1], lr=0.1, betas=(0.9, 0.99), eps=0.0)
    w0.grad = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    w1.grad = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    opt.step()
    assert_close(w0.detach(), torch.tensor([[-0.1, 0.1], [-0.1, -0.1]], dtype=torch.float64), atol=1e-15, rtol=0)
    # ||w1|| = 5, ||u|| = sqrt(2): w1 - 0.1 * 5/sqrt(2) * [1, -1]
    r = 5 / 2**0.5
    assert_close(w1.detach(), torch.tensor([[3.0 - 0.1 * r, 4.0 + 0.1 * r]], dtype=torch.float64), atol=1e-15, rtol=0)


def _run(implementation, dtype, steps=4, **extra):
    params = make_params(dtype=dtype)
    opt = LAMB(params.values(), weight_decay=0.1, implementation=implementation, **HYPER, **extra)
    for step in range(steps):
        grads = random_grads(params, step)
        for k, p in params.items():
            p.grad = grads[k]
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
    low = make_params(dtype=dtype)
    high = {k: p.detach().float().requires_grad_() for k, p in low.items()}
    opt_low = LAMB(low.values(), weight_decay=0.1, implementation=implementation, **HYPER)
    opt_high = LAMB(high.values(), weight_decay=0.1, implementation="single_tensor", **HYPER)
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
    opt_b = LAMB(b.values(), weight_decay=0.1, **HYPER)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    sd = opt_a.state_dict()
    assert set(sd["state"][0]) == {"exp_avg", "exp_avg_sq", "step"}
    assert sd["param_groups"][0]["max_trust_ratio"] is None and sd["param_groups"][0]["bias_correction"] is True
    for step in range(3, 6):
        grads = random_grads(a, step)
        for k in a:
            a[k].grad, b[k].grad = grads[k], grads[k].clone()
        opt_a.step()
        opt_b.step()
    for k in a:
        assert_close(b[k], a[k], atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(lr=-1e-3), "learning rate: -0.001"),
        (dict(betas=(1.0, 0.9)), "index 0: 1.0"),
        (dict(eps=-1e-8), "epsilon value: -1e-08"),
        (dict(weight_decay=-0.1), "weight_decay value: -0.1"),
        (dict(max_trust_ratio=0.0), "max_trust_ratio: 0.0"),
        (dict(max_trust_ratio=float("inf")), "max_trust_ratio: inf"),
        (dict(nonfinite_grads="ignore"), "'ignore'"),
        (dict(implementation="fused"), "'fused'"),
    ],
)
def test_invalid_hyperparameters_name_the_value(kwargs, text):
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(")", r"\)")):
        LAMB([torch.zeros(2, requires_grad=True)], **kwargs)


def test_invalid_param_group_override():
    opt = LAMB([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="max_trust_ratio: -1"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "max_trust_ratio": -1})


@pytest.mark.parametrize("implementation", ["single_tensor", "foreach"])
def test_nonfinite_gradient_skips_the_whole_group(implementation):
    """One NaN skips every parameter of its group (they share one step count under ZeRO);
    another group steps exactly as it would alone."""
    params = make_params()
    names = list(params)
    clean = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    opt = LAMB([{"params": [params[k] for k in names[:3]]}, {"params": [params[k] for k in names[3:]]}],
               implementation=implementation, **HYPER)
    opt_clean = LAMB([clean[k] for k in names[3:]], implementation=implementation, **HYPER)
    grads = random_grads(params, 0)
    grads["square"][2, 3] = float("nan")
    for k in params:
        params[k].grad = grads[k]
        clean[k].grad = grads[k].clone()
    before = {k: params[k].detach().clone() for k in names[:3]}
    with pytest.warns(RuntimeWarning, match="skipped the step of 3 parameter"):
        opt.step()
    opt_clean.step()
    assert opt.nonfinite_skips == 3
    for k in names[:3]:
        assert_close(params[k].detach(), before[k], atol=0, rtol=0)
        assert opt.state[params[k]]["step"].item() == 0
    for k in names[3:]:
        assert_close(params[k], clean[k], atol=0, rtol=0)


def test_nonfinite_gradient_raise_modifies_nothing():
    params = make_params()
    opt = LAMB(params.values(), nonfinite_grads="raise", **HYPER)
    grads = random_grads(params, 0)
    grads["wide"][0, 0] = float("inf")
    before = {k: p.detach().clone() for k, p in params.items()}
    for k in params:
        params[k].grad = grads[k]
    with pytest.raises(FloatingPointError, match=r"LAMB: .*shapes \[\(4, 9\)\]"):
        opt.step()
    for k in params:
        assert_close(params[k].detach(), before[k], atol=0, rtol=0)


def test_track_stats_records_each_tensor_ratio_without_clipping():
    params = make_params()
    opt = LAMB(params.values(), track_stats=True, weight_decay=0.1, **HYPER)
    grads = random_grads(params, 0)
    before = {k: p.detach().clone() for k, p in params.items()}
    for k in params:
        params[k].grad = grads[k]
    opt.step()
    z = torch.zeros_like
    for k, p in params.items():
        st = opt.partial_stats[p]
        *_, ratio = reference_lamb_step(before[k], grads[k], z(p), z(p), 1, lr=0.02, beta1=0.9, beta2=0.95, eps=1e-6,
                                        weight_decay=0.1)
        assert int(st.count) == p.numel() and int(st.clipped) == 0
        assert float(st.ratio_min) == float(st.ratio_max) == pytest.approx(ratio, rel=1e-12)
