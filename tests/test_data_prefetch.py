"""The prefetching loader (merit_ds.data.prefetch): bitwise the plain loader's batches, state =
batches consumed (not prefetched), resume mid-prefetch, errors reach the consumer."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from merit_ds.data.errors import DataError
from merit_ds.data.prefetch import PrefetchLoader
from merit_ds.data.sampler import TokenBlockLoader


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    np.random.default_rng(5).integers(0, 50_000, size=6_000, dtype=np.uint16).tofile(d / "train.bin")
    np.random.default_rng(6).integers(0, 50_000, size=500, dtype=np.uint16).tofile(d / "val.bin")
    return d


def _loader(data_dir, rank=1, world=2):
    # 6000 tokens / 16 = 374 blocks: a few epochs in 40 steps of 24, reshuffled each epoch
    return TokenBlockLoader(data_dir, block_size=16, global_batch=24, micro_batch=4, rank=rank, world_size=world,
                            seed=7)


def _take(it, n):
    return [torch.cat(next(it), dim=1) for _ in range(n)]  # x and y side by side


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetched_batches_are_the_plain_loaders_bitwise(data_dir, depth):
    plain = _take(_loader(data_dir), 120)  # 40 steps x grad_accum 3, across epoch boundaries
    pre = PrefetchLoader(_loader(data_dir), depth=depth, pin=False)
    got = _take(pre, 120)
    pre.close()
    assert all(torch.equal(a, b) and a.dtype == b.dtype == torch.int64 for a, b in zip(plain, got))
    assert len(got) == 120 and pre.state_dict() == _loader(data_dir).state_dict() | {"consumed": 40 * 24}


def test_state_is_what_was_consumed_and_resumes_mid_prefetch(data_dir):
    plain = _take(_loader(data_dir), 60)
    pre = PrefetchLoader(_loader(data_dir), depth=3, pin=False)
    _take(pre, 7)  # step 2, micro-step 1 consumed; the worker is up to 3 batches ahead
    while pre._queue.qsize() < 3:  # make sure batches are waiting in the queue (prefetched, not consumed)
        threading.Event().wait(0.01)
    state = pre.state_dict()
    assert (state["consumed"], state["micro_step"]) == (2 * 24, 1)
    # a fresh prefetcher from that state continues exactly where the consumer was
    fresh = PrefetchLoader(_loader(data_dir), depth=2, pin=False)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_take(fresh, 20), plain[7:27]))
    # the same one, rewound while its queue is full: the prefetched batches are dropped
    _take(pre, 5)
    pre.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_take(pre, 20), plain[7:27]))
    # a refused state leaves the prefetcher working at its position
    with pytest.raises(DataError, match="seed"):
        pre.load_state_dict(dict(state, seed=8))
    assert torch.equal(_take(pre, 1)[0], plain[27])
    for p in (pre, fresh):
        p.close()


def test_a_read_error_reaches_the_consumer_in_order(data_dir, monkeypatch):
    loader = _loader(data_dir)
    real = loader.blocks_to_tensors
    calls = []

    def failing(ids):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("shard unreadable (simulated)")
        return real(ids)

    monkeypatch.setattr(loader, "blocks_to_tensors", failing)
    pre = PrefetchLoader(loader, depth=2, pin=False)
    _take(pre, 2)  # the two good batches first
    with pytest.raises(OSError, match="simulated"):
        next(pre)
    assert (loader.consumed, loader.micro_step) == (0, 2)  # the failed batch was not consumed
    with pytest.raises(RuntimeError, match="closed"):
        next(pre)


def test_pinned_when_asked(data_dir):
    if not torch.cuda.is_available():
        pytest.skip("pinned memory needs CUDA")
    pre = PrefetchLoader(_loader(data_dir), depth=2)
    x, y = next(pre)
    assert x.is_pinned() and y.is_pinned()
    pre.close()


def test_a_batch_schedule_change_drops_what_was_prefetched_at_the_old_batch(data_dir):
    """Global batch 24 for 3 steps, then 48 (a --batch-schedule phase change, between steps):
    bitwise the plain loader's batches with the same changes, though the worker had read
    micro-batches of the 4th step at the old batch (whose rank-1 share starts elsewhere)."""
    def walk(loader, pre=None):
        it = pre or loader
        out = _take(it, 3 * 3)  # 3 steps x grad_accum 3 at batch 24
        if pre is not None:
            while pre._queue.qsize() < 3:  # the worker is ahead, at the old batch
                threading.Event().wait(0.01)
        (pre or loader).set_global_batch(48)
        assert (pre or loader).grad_accum == 6
        return out + _take(it, 4 * 6)  # 4 steps x grad_accum 6 at batch 48

    plain = walk(_loader(data_dir))
    pre = PrefetchLoader(_loader(data_dir), depth=3, pin=False)
    got = walk(pre.loader, pre)
    assert pre.state_dict()["consumed"] == 3 * 24 + 4 * 48
    pre.close()
    assert len(got) == len(plain) == 33 and all(torch.equal(a, b) for a, b in zip(plain, got))
    # the control: the same change made on the wrapped loader alone leaves the stale batches queued
    stale = PrefetchLoader(_loader(data_dir), depth=3, pin=False)
    _take(stale, 9)
    while stale._queue.qsize() < 3:
        threading.Event().wait(0.01)
    stale.loader.set_global_batch(48)
    with pytest.raises(AssertionError):
        _take(stale, 24)
    stale.close()
