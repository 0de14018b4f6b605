"""Pure layout logic and partial-maxima math (no processes): hand-written expected splits."""

import math

import pytest
import torch

from merit_ds.optim import formulas as F
from merit_ds.optim.layout import (
    Fragment,
    layout_from_fragments,
    layout_from_offsets,
    layout_from_param_partitions,
    stats_layout,
)
from merit_ds.optim import LAMB, MERIT

merit_stats_size = MERIT.fragment_rule.stats_size


def test_zero12_layout_cuts_group_into_equal_slices():
    # W1 (3x4) at 0, b1 (4) at 12, W2 (2x5) at 16; 26 elements padded to 28; world 2 -> 14 each
    shapes = [(3, 4), (4,), (2, 5)]
    offsets = [0, 12, 16]
    r0 = layout_from_offsets(shapes, offsets, 0, 14)
    r1 = layout_from_offsets(shapes, offsets, 14, 14)
    assert r0.fragments == (Fragment(0, (3, 4), 0, 12, 0), Fragment(1, (4,), 0, 2, 12))
    assert r1.fragments == (Fragment(1, (4,), 2, 2, 0), Fragment(2, (2, 5), 0, 10, 2))
    # the geometry records the same shapes on both ranks; the stats buffer depends only on
    # them: MERIT 2*(3+4) + 2 + 2*(2+5) + 3 flags, LAMB 2 sums of squares each + 3 flags
    assert r0.shapes == r1.shapes == tuple(shapes)
    merit_buf = stats_layout(r0.shapes, merit_stats_size)
    assert merit_buf.buffer_numel == 14 + 2 + 14 + 3
    assert [s.offset for s in merit_buf.slots] == [0, 14, 16]
    assert [s.flag for s in merit_buf.slots] == [30, 31, 32]
    lamb_buf = stats_layout(r0.shapes, LAMB.fragment_rule.stats_size)
    assert [(s.offset, s.size, s.flag) for s in lamb_buf.slots] == [(0, 2, 6), (2, 2, 7), (4, 2, 8)]
    assert lamb_buf.buffer_numel == 9


def test_zero12_layout_mid_row_split_and_alignment_padding():
    # W (3x5) at 0, then 1 element of alignment padding, b (3,) at 16; world 3, 6 each (18)
    shapes, offsets = [(3, 5), (3,)], [0, 16]
    frags = [layout_from_offsets(shapes, offsets, r * 6, 6).fragments for r in range(3)]
    assert frags[0] == (Fragment(0, (3, 5), 0, 6, 0),)  # row 0 + row 1[0:1]
    assert frags[1] == (Fragment(0, (3, 5), 6, 6, 0),)  # row 1[1:5] + row 2[0:2]
    assert frags[2] == (Fragment(0, (3, 5), 12, 3, 0), Fragment(1, (3,), 0, 2, 4))  # pad at 3
    # elements of b past the partition end belong to nobody here (18 < 19)


def test_round_robin_offsets_are_per_parameter():
    # flatten order b, W (round robin) but stats order W, b
    shapes, offsets = [(2, 3), (2,)], [2, 0]
    lay = layout_from_offsets(shapes, offsets, 0, 4)
    assert lay.fragments == (Fragment(1, (2,), 0, 2, 0), Fragment(0, (2, 3), 0, 2, 2))


def test_zero3_layout_per_parameter_partitions_with_empty_rank():
    # W (3x3): pn = 3; b (2,): pn = 1 at world 3 -> rank 2 holds only padding of b
    shapes, pns = [(3, 3), (2,)], [3, 1]
    lays = [layout_from_param_partitions(shapes, pns, r) for r in range(3)]
    assert lays[0].fragments == (Fragment(0, (3, 3), 0, 3, 0), Fragment(1, (2,), 0, 1, 3))
    assert lays[1].fragments == (Fragment(0, (3, 3), 3, 3, 0), Fragment(1, (2,), 1, 1, 3))
    assert lays[2].fragments == (Fragment(0, (3, 3), 6, 3, 0),)
    assert all(l.partition_numel == 4 for l in lays)
    # world 2, W (3x3): pn 5, rank 1 gets row 1[2:3], row 2 and one padding element
    lay = layout_from_param_partitions([(3, 3)], [5], 1)
    assert lay.fragments == (Fragment(0, (3, 3), 5, 4, 0),) and lay.partition_numel == 5
    assert lay.fragments[0].row_pieces() == [(0, 1, 1, 2), (1, 3, 2, 0)]


def test_row_pieces_of_docstring_example():
    frag = Fragment(0, (4, 5), 7, 11, 0)
    assert frag.row_pieces() == [(0, 3, 1, 2), (3, 5, 2, 0), (8, 3, 3, 0)]
    inside = Fragment(0, (4, 5), 6, 2, 0)  # within one row
    assert inside.row_pieces() == [(0, 2, 1, 1)]
    conv = Fragment(0, (2, 3, 2), 4, 6, 0)  # rows of 6 elements
    assert conv.row_pieces() == [(0, 2, 0, 4), (2, 4, 1, 0)]


def test_invalid_fragments_are_rejected():
    with pytest.raises(ValueError):
        layout_from_fragments([(2, 2)], [(0, 2, 3, 0)], 8)  # past the parameter's end
    with pytest.raises(ValueError):
        layout_from_fragments([(2, 2), (3,)], [(0, 0, 4, 0), (1, 0, 3, 2)], 8)  # overlap
    with pytest.raises(ValueError):
        layout_from_offsets([(2,)], [0, 1], 0, 2)


def test_stats_size():
    assert merit_stats_size((7, 5)) == 24
    assert merit_stats_size((4, 3, 2, 2)) == 2 * (4 + 3) * 4
    assert merit_stats_size((9,)) == 2 and merit_stats_size(()) == 2


@pytest.mark.parametrize("shape", [(4, 5), (7, 3), (3, 4, 2), (2, 3, 2, 2), (1, 6)])
def test_partial_maxima_combine_to_whole_matrix_maxima_bitwise(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 3
    rows, cols, inner = shape[0], shape[1], math.prod(shape[2:])
    full = F.matrix_maxima(x, x)
    numel = x.numel()
    for cuts in ([0, numel], [0, 1, numel], [0, 7 % numel or 1, numel - 2, numel], sorted({0, numel, 3, 5, 11, 13} & set(range(numel + 1)))):
        row = torch.zeros(rows * inner)
        col = torch.zeros(cols * inner)
        for a, b in zip(cuts[:-1], cuts[1:]):
            r, c = torch.zeros_like(row), torch.zeros_like(col)
            F.fragment_maxima_(x.reshape(-1)[a:b], a, cols, inner, r, c)
            torch.maximum(row, r, out=row)
            torch.maximum(col, c, out=col)
        torch.testing.assert_close(row, full.row_w.reshape(-1), atol=0, rtol=0)
        torch.testing.assert_close(col, full.col_w.reshape(-1), atol=0, rtol=0)


def test_partial_maxima_of_arange_fragment_by_hand():
    # (4,5) matrix holding 0..19; fragment [7, 18): head r1 c2..4, body r2, tail r3 c0..2
    x = torch.arange(20.0)
    row, col = torch.zeros(4), torch.zeros(5)
    F.fragment_maxima_(x[7:18], 7, 5, 1, row, col)
    assert row.tolist() == [0, 9, 14, 17]
    assert col.tolist() == [15, 16, 17, 13, 14]


@pytest.mark.slow  # benchmarks/gpu_smoke.py in a subprocess
def test_gpu_smoke_without_a_gpu_exits_0_and_writes_nothing(tmp_path):
    """benchmarks/gpu_smoke.py on a CPU-only machine (CI): exit 0, no results file."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu_smoke"
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "gpu_smoke.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not out.with_suffix(".md").exists() and not out.with_suffix(".json").exists()
