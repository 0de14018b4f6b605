"""Block loader: exact blocks, determinism, rank partitioning, exact resume across world/batch changes."""
import numpy as np
import pytest
import torch

from merit_ds.data import BlockOrder, DataError, TokenBlockLoader, TokenShards

T = 16


@pytest.fixture()
def shards(tmp_path):
    """20,001 tokens 0..20000 over three uneven shards: block b starts with token b*T."""
    tokens = np.arange(20_001, dtype="<u2")
    files, sizes = [], []
    for k, (a, b) in enumerate([(0, 7_000), (7_000, 7_013), (7_013, 20_001)]):
        f = tmp_path / f"train_{k:06d}.bin"
        tokens[a:b].tofile(f)
        files.append(f)
        sizes.append(b - a)
    return TokenShards(files, sizes, "synthetic")


def ids_of(x):
    """Block ids of a batch (first token / T), in row order."""
    return (x[:, 0] // T).tolist()


def run_steps(loader, steps):
    """Global blocks per step, as this rank's rows; asserts x/y are the exact shifted token runs."""
    out = []
    for _ in range(steps * loader.grad_accum):
        x, y = next(loader)
        assert x.dtype == torch.int64 and x.shape == (loader.micro_batch, T)
        start = x[:, :1]
        assert torch.equal(x, start + torch.arange(T)) and torch.equal(y, x + 1)
        out += ids_of(x)
    return out


def global_steps(loaders, steps):
    """Run all ranks for ``steps`` steps; return the per-step global batches (rank order)."""
    per_rank = [run_steps(L, steps) for L in loaders]
    per_step = len(per_rank[0]) // steps
    return [sum((r[s * per_step:(s + 1) * per_step] for r in per_rank), []) for s in range(steps)]


def make(shards, world, B, mb=None, seed=0, **kw):
    return [TokenBlockLoader(shards, block_size=T, global_batch=B, micro_batch=mb, rank=r, world_size=world,
                             seed=seed, **kw) for r in range(world)]


def test_blocks_and_epoch_permutation(shards):
    (L,) = make(shards, 1, 50)
    assert L.num_blocks == 20_000 // T == 1250 and L.steps_per_epoch == 25
    seen = sum(global_steps([L], 25), [])
    assert sorted(seen) == list(range(1250))  # one epoch = every block exactly once
    assert seen != list(range(1250))
    nxt = sum(global_steps([L], 25), [])
    assert sorted(nxt) == list(range(1250)) and nxt != seen  # a fresh permutation per epoch
    assert seen == BlockOrder(1250, seed=0).take(0, 1250).tolist()
    # block crossing the 7,000 / 7,013 shard boundaries reads across files
    x, y = L.blocks_to_tensors(np.array([437]))  # tokens 6992..7008
    assert x[0].tolist() == list(range(6992, 7008)) and y[0, -1].item() == 7008
    (U,) = make(shards, 1, 50, shuffle=False)
    assert sum(global_steps([U], 2), []) == list(range(100))


def test_determinism_and_seed(shards):
    a = global_steps(make(shards, 1, 12), 5)
    b = global_steps(make(shards, 1, 12), 5)
    c = global_steps(make(shards, 1, 12, seed=1), 5)
    assert a == b and a != c
    (L,) = make(shards, 1, 12)
    assert ids_of(L.get_batch(3)[0]) == a[3]  # stateless access agrees with iteration


@pytest.mark.parametrize("world,mb", [(2, 3), (3, 1), (6, 2)])
def test_rank_partition_is_disjoint_and_covers_the_global_batch(shards, world, mb):
    B = 12
    loaders = make(shards, world, B, mb)
    assert loaders[0].grad_accum == B // world // mb
    per_rank = [run_steps(L, 4) for L in loaders]
    reference = global_steps(make(shards, 1, B), 4)
    n = B // world
    for s in range(4):
        parts = [set(r[s * n:(s + 1) * n]) for r in per_rank]
        for i in range(world):
            for j in range(i + 1, world):
                assert not parts[i] & parts[j]
        assert set().union(*parts) == set(reference[s])
        assert sum((r[s * n:(s + 1) * n] for r in per_rank), []) == reference[s]


def test_exact_resume_with_world_size_change(shards):
    reference = sum(global_steps(make(shards, 1, 12), 130), [])  # crosses an epoch boundary (104 steps)
    first = make(shards, 2, 12, mb=3)
    got = sum(global_steps(first, 100), [])
    state = first[0].state_dict()
    assert [L.state_dict() for L in first[1:]] == [state]  # identical on every rank
    assert state["consumed"] == 1200 and state["micro_step"] == 0
    resumed = make(shards, 3, 12, mb=2)
    for L in resumed:
        L.load_state_dict(state)
    got += sum(global_steps(resumed, 30), [])
    assert got == reference  # no block repeated or skipped, same order


def test_global_batch_change_continues_the_same_block_sequence(shards):
    first = make(shards, 2, 12)
    got = sum(global_steps(first, 7), [])
    resumed = make(shards, 4, 8, mb=1)  # global batch 12 -> 8 and world 2 -> 4
    for L in resumed:
        L.load_state_dict(first[0].state_dict())
    got += sum(global_steps(resumed, 9), [])
    assert got == BlockOrder(1250, seed=0).take(0, 7 * 12 + 9 * 8).tolist()


def test_mid_step_state(shards):
    (L,) = make(shards, 1, 12, mb=4)
    reference = run_steps(make(shards, 1, 12, mb=4)[0], 3)
    got = []
    for _ in range(4):  # one step and one micro-batch of the next
        got += ids_of(next(L)[0])
    state = L.state_dict()
    assert (state["consumed"], state["micro_step"]) == (12, 1)
    (R,) = make(shards, 1, 12, mb=4)
    R.load_state_dict(state)
    for _ in range(5):
        got += ids_of(next(R)[0])
    assert got == reference
    (W,) = make(shards, 1, 12, mb=2)
    with pytest.raises(DataError, match="middle of a step"):
        W.load_state_dict(state)


def test_state_mismatch_and_bad_arguments(shards):
    state = make(shards, 1, 12)[0].state_dict()
    for kw, field in [({"seed": 1}, "seed"), ({"shuffle": False}, "shuffle")]:
        with pytest.raises(DataError, match=field):
            make(shards, 1, 12, **kw)[0].load_state_dict(state)
    other = TokenBlockLoader(shards, block_size=8, global_batch=12)
    with pytest.raises(DataError, match="block_size"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="divisible by world_size"):
        make(shards, 5, 12)
    with pytest.raises(DataError, match="divisible by micro_batch"):
        make(shards, 2, 12, mb=4)
    with pytest.raises(DataError, match="block_size"):
        TokenBlockLoader(shards, block_size=50_000, global_batch=1)
