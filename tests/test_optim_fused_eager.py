"""merit_ds/optim/fused.py's phases run eagerly (torch.compile replaced by the identity), against
the independent float64 reference: the functions it hands to the compiler are MERIT's step. The
compiled form itself is test_optim_merit.py::test_compiled_matches_reference_within_rounding (slow
tier)."""

import pytest
import torch

from merit_ds.optim import fused
from reference_merit import reference_step

HP = dict(lr=0.05, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


@pytest.fixture
def eager(monkeypatch):
    fused._compiled.cache_clear()
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    yield
    fused._compiled.cache_clear()  # the next caller compiles for real


def test_fused_phases_are_one_merit_step(eager):
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (3, 4, 2), (6,)]
    ws = [torch.randn(s, generator=g) for s in shapes]
    ws[0][2] = 0.0  # a zero row: its trust ratio is 1
    gs = [torch.randn(s, generator=g) for s in shapes]
    ms = [0.1 * torch.randn(s, generator=g) for s in shapes]
    vs = [0.01 * torch.rand(s, generator=g) for s in shapes]
    want = [reference_step(w, gr, m, v, **HP) for w, gr, m, v in zip(ws, gs, ms, vs)]
    steps = [torch.tensor(0.0) for _ in shapes]
    fused.fused_merit(ws, gs, ms, vs, steps, stats=None, **HP)
    assert [int(s) for s in steps] == [1, 1, 1]
    for w, m, v, (w_ref, m_ref, v_ref) in zip(ws, ms, vs, want):
        torch.testing.assert_close(w.double(), w_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m.double(), m_ref, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(v.double(), v_ref, rtol=1e-6, atol=1e-12)


def test_fused_low_precision_weights_step_in_the_states_dtype(eager):
    """bf16 weights with fp32 state: the math in fp32, the result written back to the bf16 weight."""
    g = torch.Generator().manual_seed(1)
    w32 = torch.randn(4, 6, generator=g)
    w = w32.to(torch.bfloat16)
    grad = torch.randn(4, 6, generator=g).to(torch.bfloat16)
    m, v = torch.zeros(4, 6), torch.zeros(4, 6)
    w_ref, _, _ = reference_step(w.float(), grad.float(), m, v, **HP)
    fused.fused_merit([w], [grad], [m], [v], [torch.tensor(0.0)], stats=None, **HP)
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w, w_ref.to(torch.bfloat16))  # bf16 tolerances: within its rounding
