"""The sharded step on simulated ranks (threads in one process), against one-device MERIT
and LAMB.

Each simulated rank holds a flat fp32 partition cut from a flattened group exactly as ZeRO
1/2 (equal slices, per-parameter offsets with padding and reordering) or ZeRO 3
(per-parameter pieces) would; the one statistics all-reduce (MAX for MERIT, SUM for LAMB)
is replaced by a thread barrier that combines all ranks' buffers. Cheap, so it sweeps
shapes (conv weights, 0-d, 1-row matrices), worlds and the non-finite policies, for both
optimizers. MERIT must match bit for bit; LAMB's norms are float64 sums in another order,
so it must match within TOL_LAMB (rtol). The real multi-process DeepSpeed runs are in
test_zero_deepspeed.py.
"""

import math
import threading

import pytest
import torch

import merit_ds  # noqa: F401  (registers the resolver)
from merit_ds.optim import LAMB, MERIT, segmented_triton
from merit_ds.optim.cpu_kernel import available as kernel_available
from merit_ds.optim import merge_trust_stats, summarize_trust_stats
from merit_ds.sharding import collective
from merit_ds.sharding import stats as sharded_stats
from merit_ds.optim.layout import layout_from_offsets, layout_from_param_partitions
from merit_ds.sharding.step import ShardedGroupStep, run_sharded_steps

SHAPES = [(5, 7), (7,), (3, 4, 2), (), (6, 5), (1, 3), (2,)]
HP = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
OPTIMIZERS = {"merit": MERIT, "lamb": LAMB}
TOL_LAMB = 1e-6  # relative, per step; measured: see test_lamb_sharded_difference_is_rounding_only


class SimWorld:
    """``world`` ranks as threads; the statistics all-reduce meets at a barrier."""

    def __init__(self, world):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.buffers = [None] * world
        self.local = threading.local()
        self.calls = [0] * world
        self.ops = set()

    def all_reduce_stats(self, buffer, op, group=None):
        rank = self.local.rank
        self.buffers[rank] = buffer.clone()
        self.calls[rank] += 1
        self.ops.add(op)
        self.barrier.wait()
        stacked = torch.stack(self.buffers)
        reduced = stacked.amax(0) if op == "max" else stacked.sum(0)
        self.barrier.wait()
        buffer.copy_(reduced)
        return buffer

    def all_gather(self, packed, group=None):
        rank = self.local.rank
        self.buffers[rank] = packed.clone()
        self.barrier.wait()
        out = [b.clone() for b in self.buffers]
        self.barrier.wait()
        return out

    def run(self, fn):
        errors = [None] * self.world

        def body(rank):
            self.local.rank = rank
            try:
                fn(rank)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                errors[rank] = e
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
        if real:
            raise real[0]
        return errors


def _zero12_cut(shapes, world, perm, align):
    """Flatten in order ``perm`` with ``align``-element padding after each param (ZeRO 1/2)."""
    offsets = [0] * len(shapes)
    pos = 0
    for k, i in enumerate(perm):
        offsets[i] = pos
        pos += math.prod(shapes[i])
        if k != len(perm) - 1:
            pos += (-pos) % align
    total = pos + (-pos) % (2 * world)
    size = total // world
    layouts = [layout_from_offsets(shapes, offsets, r * size, size) for r in range(world)]
    return layouts, offsets, size


def _split(full, offsets, shapes, layouts, size, world):
    """Full per-param tensors -> per-rank flat partitions (zeros in padding)."""
    flat = torch.zeros(size * world)
    for t, off in zip(full, offsets):
        flat[off : off + t.numel()] = t.reshape(-1)
    return [flat[r * size : (r + 1) * size].clone() for r in range(world)]


def _split_z3(full, shapes, pns, world):
    parts = []
    for r in range(world):
        pieces = []
        for t, pn in zip(full, pns):
            piece = torch.zeros(pn)
            flat = t.reshape(-1)[r * pn : (r + 1) * pn]
            piece[: flat.numel()] = flat
            pieces.append(piece)
        parts.append(torch.cat(pieces))
    return parts


def _gather(parts, layouts, shapes):
    out = [torch.full((math.prod(s),), float("nan")) for s in shapes]
    for part, lay in zip(parts, layouts):
        for f in lay.fragments:
            out[f.param_index][f.param_start : f.param_start + f.numel] = part[f.partition_offset : f.partition_offset + f.numel]
    return [o.reshape(s) for o, s in zip(out, shapes)]


def _run(monkeypatch, world, flavour, policy="skip", steps=3, nan_at=None, perm=None, align=1, track=False,
         optimizer="merit", diffs=None, implementation="foreach"):
    """``implementation``: the sharded optimizers'; the single-device control runs the same
    path (``"single_tensor"``, bitwise equal to foreach, for ``"foreach"``)."""
    g = torch.Generator().manual_seed(world * 7 + len(flavour))
    shapes = SHAPES
    full = [torch.randn(s, generator=g) for s in shapes]
    if flavour == "zero12":
        layouts, offsets, size = _zero12_cut(shapes, world, perm or list(range(len(shapes))), align)
        parts = _split(full, offsets, shapes, layouts, size, world)
    else:
        pns = [math.ceil(math.prod(s) / world) for s in shapes]
        layouts = [layout_from_param_partitions(shapes, pns, r) for r in range(world)]
        parts = _split_z3(full, shapes, pns, world)
    # every config must really cut a matrix mid-row and leave a rank without some parameter
    assert any(len(f.row_pieces()) > 1 or f.row_pieces()[0][3] != 0 for l in layouts for f in l.fragments if f.is_matrix)
    assert any(not lay.fragments_of(i) for lay in layouts for i in range(len(shapes)))

    ref_params = [t.clone() for t in full]
    cls = OPTIMIZERS[optimizer]
    ref_impl = "single_tensor" if implementation == "foreach" else implementation
    ref = cls(ref_params, **HP, nonfinite_grads=policy, implementation=ref_impl)
    opts = [cls([p], **HP, nonfinite_grads=policy, implementation=implementation) for p in parts]
    ref.track_stats = track
    for o in opts:
        o.track_stats = track
    sim = SimWorld(world)
    monkeypatch.setattr(collective, "all_reduce_stats", sim.all_reduce_stats)
    monkeypatch.setattr(sharded_stats, "_all_gather", sim.all_gather)
    summaries = [None] * world
    for step in range(steps):
        grads = [torch.randn(s, generator=g) for s in shapes]
        if nan_at == step:
            grads[0].view(-1)[-1] = float("nan")  # lives on the last rank holding param 0
        for p, gr in zip(ref_params, grads):
            p.grad = gr.clone()
        if flavour == "zero12":
            gparts = _split(grads, offsets, shapes, layouts, size, world)
        else:
            gparts = _split_z3(grads, shapes, pns, world)
        for p, gp in zip(parts, gparts):
            p.grad = gp
        ref_error = None
        try:
            ref.step()
        except FloatingPointError as e:
            ref_error = e

        def rank_step(r):
            s = ShardedGroupStep(opts[r], opts[r].param_groups[0], parts[r], layouts[r], None, "sim")
            run_sharded_steps([s])

        if ref_error is not None:
            with pytest.raises(FloatingPointError):
                sim.run(rank_step)
            return ref, opts, sim
        sim.run(rank_step)
        got = _gather(parts, layouts, shapes)
        for a, b in zip(got, ref_params):
            if cls is MERIT:
                torch.testing.assert_close(a, b, atol=0, rtol=0)
            else:
                torch.testing.assert_close(a, b, atol=0, rtol=TOL_LAMB)
                if diffs is not None and a.numel():
                    diffs.append(((a - b).abs() / b.abs().clamp_min(1e-30)).max().item())
        if cls is LAMB:  # write the reference weights back into the partitions
            _copy_into(parts, layouts, ref_params)
        if track:
            _check_trust_stats(ref, opts, sim, summaries, skipped=nan_at == step, clips=cls.fragment_rule.clips)
    assert sim.calls == [steps] * world
    assert sim.ops == {cls.fragment_rule.reduce_op}
    # the fused form (CPU kernel) and the whole-partition forms keep no partition-sized
    # scratch (the torch form leaves statistics steps to the per-fragment step); the others do
    fused = cls is MERIT and implementation != "foreach" and kernel_available()
    whole = all(o.__dict__.get("_merit_segmented_plans") for o in opts)
    fused = fused or (whole and (not track or _forms(opts) == {"segmented_triton"}))
    assert all(("_merit_scratch" in o.__dict__) != fused for o in opts)
    return ref, opts, sim


def _copy_into(parts, layouts, full):
    for part, lay in zip(parts, layouts):
        for f in lay.fragments:
            part[f.partition_offset : f.partition_offset + f.numel] = full[f.param_index].reshape(-1)[
                f.param_start : f.param_start + f.numel]


def _check_trust_stats(ref, opts, sim, summaries, skipped, clips=True):
    """Ranks' fragment statistics, merged (and reduced by reduce_trust_stats over the simulated
    ranks), against single-device MERIT's per-parameter statistics of the same step."""
    want = merge_trust_stats(ref.partial_stats.values())
    got = merge_trust_stats(sharded_stats.local_trust_stats(o) for o in opts)
    n_elements = sum(math.prod(s) for s in SHAPES)
    if skipped and not clips:  # LAMB skips the whole group: nothing recorded anywhere
        assert int(want.count) == int(got.count) == 0

        def reduce_none(r):
            summaries[r] = sharded_stats.reduce_trust_stats(opts[r])

        sim.run(reduce_none)
        assert summaries == [None] * len(opts)
        return
    assert int(want.count) == n_elements - (math.prod(SHAPES[0]) if skipped else 0)
    assert int(got.count) == int(want.count)
    assert int(got.clipped) == int(want.clipped)
    if clips:
        assert 0 < int(want.clipped) < int(want.count)  # some, not all, elements clipped: teeth
    else:
        assert int(want.clipped) == 0
    exact = 0 if clips else TOL_LAMB  # LAMB: ratios from float64 sums in another order
    torch.testing.assert_close(got.ratio_min, want.ratio_min, atol=0, rtol=exact)
    torch.testing.assert_close(got.ratio_max, want.ratio_max, atol=0, rtol=exact)
    torch.testing.assert_close(got.ratio_sum, want.ratio_sum, atol=0, rtol=1e-6)
    assert want.ratio_min < want.ratio_max

    def reduce(r):
        summaries[r] = sharded_stats.reduce_trust_stats(opts[r])

    sim.run(reduce)
    ref_summary = summarize_trust_stats(want)
    for summary in summaries:
        assert summary == summaries[0]  # every rank gets the same numbers
        for key in ("trust_ratio_min", "trust_ratio_max", "clip_fraction"):
            assert summary[key] == pytest.approx(ref_summary[key], rel=exact, abs=0), key
        assert summary["trust_ratio_mean"] == pytest.approx(ref_summary["trust_ratio_mean"], rel=1e-6, abs=0)


@pytest.mark.parametrize("optimizer, implementation", [("merit", "foreach"), ("merit", "fused"), ("lamb", "foreach")])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("flavour", ["zero12", "zero3"])
def test_trust_stats_reduced_over_ranks_equal_one_device(monkeypatch, world, flavour, optimizer, implementation):
    """track_stats on: still exactly one statistics all-reduce per step() (asserted in _run),
    and the five scalars per rank combine into the single-device optimizer's statistics (the
    CPU kernel counts them in its own pass, on fragments and on whole tensors alike)."""
    _run(monkeypatch, world, flavour, track=True, optimizer=optimizer, implementation=implementation)


@pytest.mark.parametrize("optimizer", ["merit", "lamb"])
def test_trust_stats_skip_nonfinite_parameter_on_every_rank(monkeypatch, optimizer):
    _run(monkeypatch, 3, "zero12", nan_at=1, track=True, perm=[6, 2, 0, 5, 1, 4, 3], align=4, optimizer=optimizer)


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("flavour", ["zero12", "zero3"])
def test_sharded_step_equals_one_device_bitwise(monkeypatch, world, flavour, implementation):
    """foreach: the materialised path vs the single_tensor reference; fused: the CPU kernel
    on fragments vs the CPU kernel on whole tensors. Bit for bit either way."""
    _run(monkeypatch, world, flavour, implementation=implementation)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("flavour", ["zero12", "zero3"])
def test_sharded_lamb_equals_one_device(monkeypatch, world, flavour):
    """One all_reduce(SUM) per step() (asserted in _run); every step within TOL_LAMB."""
    _run(monkeypatch, world, flavour, optimizer="lamb")


def test_lamb_sharded_difference_is_rounding_only(monkeypatch):
    """The measured per-step difference of sharded LAMB: float64 summation order reaches the
    fp32 weights in at most a few last bits (relative 1e-6 would allow ~8 ulps)."""
    diffs = []
    for world, flavour in [(2, "zero12"), (3, "zero12"), (4, "zero3")]:
        _run(monkeypatch, world, flavour, optimizer="lamb", steps=4, diffs=diffs)
    assert diffs and max(diffs) <= 2.5e-7, max(diffs)


@pytest.mark.parametrize("optimizer", ["merit", "lamb"])
def test_reordered_and_padded_flatten(monkeypatch, optimizer):
    _run(monkeypatch, 3, "zero12", perm=[6, 2, 0, 5, 1, 4, 3], align=4, optimizer=optimizer)


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
@pytest.mark.parametrize("flavour", ["zero12", "zero3"])
def test_nonfinite_gradient_skips_parameter_on_every_rank(monkeypatch, flavour, implementation):
    ref, opts, _ = _run(monkeypatch, 3, flavour, nan_at=1, implementation=implementation)
    assert ref.nonfinite_skips == 1
    assert [o.nonfinite_skips for o in opts] == [1, 1, 1]


@pytest.mark.parametrize("flavour", ["zero12", "zero3"])
def test_lamb_nonfinite_gradient_skips_the_group_on_every_rank(monkeypatch, flavour):
    """LAMB's skip unit is the group (one step count per flat partition): every parameter of
    the group is skipped on every rank, as single-device LAMB skips the whole group."""
    ref, opts, _ = _run(monkeypatch, 3, flavour, nan_at=1, optimizer="lamb")
    assert ref.nonfinite_skips == len(SHAPES)
    assert [o.nonfinite_skips for o in opts] == [len(SHAPES)] * 3
    assert {o.state[o.param_groups[0]["params"][0]]["step"].item() for o in opts} == {2.0}  # 3 steps, 1 skipped
    assert {s["step"].item() for s in ref.state.values()} == {2.0}


@pytest.mark.parametrize("optimizer, implementation", [("merit", "foreach"), ("merit", "fused"), ("lamb", "foreach")])
def test_nonfinite_gradient_raises_on_every_rank_before_modifying(monkeypatch, optimizer, implementation):
    _run(monkeypatch, 3, "zero12", policy="raise", nan_at=0, optimizer=optimizer, implementation=implementation)


@pytest.mark.parametrize("cls", [MERIT, LAMB])
def test_naive_flat_partition_step_differs(monkeypatch, cls):
    """Negative control: an optimizer treating each flat partition as one vector is wrong
    (for LAMB: per-partition trust ratios, what DeepSpeed's FusedLamb computes under ZeRO)."""
    shapes = SHAPES
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    layouts, offsets, size = _zero12_cut(shapes, 3, list(range(len(shapes))), 1)
    parts = _split(full, offsets, shapes, layouts, size, 3)
    gparts = _split(grads, offsets, shapes, layouts, size, 3)
    for p, gp in zip(parts, gparts):
        p.grad = gp
        cls([p], **HP).step()  # its own params: resolver steps them as one vector
    ref_params = [t.clone() for t in full]
    for p, gr in zip(ref_params, grads):
        p.grad = gr
    cls(ref_params, **HP).step()
    diff = max((a - b).abs().max().item() for a, b in zip(_gather(parts, layouts, shapes), ref_params))
    assert diff > 1e-3


@pytest.mark.parametrize("optimizer, implementation", [("merit", "foreach"), ("merit", "fused"), ("lamb", "foreach")])
@pytest.mark.parametrize("flavour", ["zero12", "zero3"])
def test_propagate_policy_updates_moments_in_place(monkeypatch, flavour, optimizer, implementation):
    _run(monkeypatch, 3, flavour, policy="propagate", optimizer=optimizer, implementation=implementation)


def _force_segmented(monkeypatch):
    """Run a whole-partition form (the Triton kernels, else the torch form) on these CPU
    partitions, where the step would choose it on CUDA ones; and check that it really ran."""
    from merit_ds.optim.merit_fragments import MeritFragmentRule
    from merit_ds.sharding import step as step_mod

    ran = []

    def wanted(s):
        ok = isinstance(s.rule, MeritFragmentRule) and s.group.get("implementation") in (None, "fused", "triton",
                                                                                          "foreach")
        ran.append(ok)
        return ok

    monkeypatch.setattr(step_mod, "segmented_wanted", wanted)
    return ran


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("flavour", ["zero12", "zero3"])
def test_segmented_sharded_step_equals_one_device_bitwise(monkeypatch, world, flavour):
    """The segmented form inside the real sharded step (layouts, buffer, the one all-reduce,
    step counts) against single-tensor MERIT on one device, bit for bit."""
    ran = _force_segmented(monkeypatch)
    _, opts, _ = _run(monkeypatch, world, flavour, implementation="foreach")
    assert ran and all(ran)
    assert _forms(opts) == {"segmented"}  # the torch form (foreach's arithmetic)


def _forms(opts):
    return {form.__name__.rsplit(".", 1)[-1] for o in opts for form, _ in o.__dict__["_merit_segmented_plans"].values()}


INTERPRETED = pytest.mark.skipif(not segmented_triton.interpreting(),
                                 reason="Triton runs compiled here (a GPU is present): gpu_smoke checks it")


@INTERPRETED
@pytest.mark.parametrize("implementation", [None, "triton"])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("flavour", ["zero12", "zero3"])
def test_triton_form_inside_the_sharded_step_equals_the_cpu_kernel_bitwise(monkeypatch, world, flavour,
                                                                           implementation):
    """With the default implementation (or "triton") the sharded step runs the Triton kernels
    (here under Triton's interpreter, on these CPU partitions; compiled on a GPU): bit for bit
    single-device MERIT on its CPU kernel (default) or on the same kernels per tensor
    ("triton"), with skips and the 'raise' policy."""
    assert segmented_triton.available("cpu")  # tests run Triton interpreted (tests/conftest.py)
    ran = _force_segmented(monkeypatch)
    _, opts, _ = _run(monkeypatch, world, flavour, implementation=implementation)
    assert _forms(opts) == {"segmented_triton"}
    ref, opts, _ = _run(monkeypatch, world, flavour, nan_at=1, implementation=implementation)
    assert ref.nonfinite_skips == 1 and [o.nonfinite_skips for o in opts] == [1] * world
    _run(monkeypatch, world, flavour, policy="raise", nan_at=0, implementation=implementation)
    assert ran and all(ran)


@INTERPRETED
@pytest.mark.parametrize("flavour", ["zero12", "zero3"])
def test_statistics_steps_run_the_triton_form_and_count_like_the_cpu_kernel(monkeypatch, flavour):
    """track_stats steps stay on the Triton kernels (no partition-sized buffer appears; asserted
    in _run): the ranks' statistics merged equal single-device MERIT's on its CPU kernel (count,
    clipped, min, max exactly; the float64 sum within 1e-6), also with a skipped parameter; the
    torch form leaves statistics steps to the per-fragment step (asserted by the scratch check)."""
    ran = _force_segmented(monkeypatch)
    _, opts, _ = _run(monkeypatch, 3, flavour, track=True, implementation=None)
    assert _forms(opts) == {"segmented_triton"}
    _run(monkeypatch, 2, flavour, track=True, nan_at=1, implementation=None)
    _, opts, _ = _run(monkeypatch, 2, flavour, track=True, implementation="foreach")
    assert ran and all(ran)


@pytest.mark.parametrize("flavour", ["zero12", "zero3"])
def test_segmented_nonfinite_and_propagate_and_raise(monkeypatch, flavour):
    ran = _force_segmented(monkeypatch)
    ref, opts, _ = _run(monkeypatch, 3, flavour, nan_at=1, implementation="foreach")
    assert ref.nonfinite_skips == 1 and [o.nonfinite_skips for o in opts] == [1, 1, 1]
    _run(monkeypatch, 3, flavour, policy="propagate", implementation="foreach")
    _run(monkeypatch, 3, flavour, policy="raise", nan_at=0, implementation="foreach")
    _run(monkeypatch, 3, flavour, perm=[6, 2, 0, 5, 1, 4, 3], align=4, implementation="foreach")
    assert ran and all(ran)
