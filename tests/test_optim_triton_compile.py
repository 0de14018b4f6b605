"""MERIT's Triton kernels compiled ahead of time for NVIDIA GPUs on this CPU machine
(tests/triton_compile_worker.py, Triton's bundled ptxas): what Triton's interpreter, which the
other Triton tests use, cannot show."""

import json
import os
import subprocess
import sys
from pathlib import Path

from merit_ds.optim import segmented_triton


def test_kernels_compile_for_nvidia_gpus_with_ieee_arithmetic():
    """The kernels compiled ahead of time for sm_80 and sm_90 (Triton's own ptxas; no GPU
    needed), with the step's launch options. The interpreter checks the arithmetic; this
    checks what a GPU would run: it compiles, every division and square root is the IEEE one
    (no approximate forms), nothing flushes subnormals, the FMAs are exactly the explicit ones
    (no contraction), and phase 1 stores nothing to w, m, v."""
    worker = Path(__file__).with_name("triton_compile_worker.py")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, str(worker), "80", "90"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    per_thread = segmented_triton.BLOCK_ROWS * segmented_triton.BLOCK_COLS // (32 * segmented_triton.LAUNCH["num_warps"])
    for arch in (80, 90):
        variants = {k.split("@")[0]: v for k, v in got.items() if k.endswith(f"@sm_{arch}")}
        assert set(variants) == {"statistics", "statistics_propagate", "apply", "apply_track", "apply_propagate",
                                 "tensor_max"}
        for k in variants.values():  # every variant a step can launch
            assert k["cubin_bytes"] > 0
            assert k["div.full.f32"] == k["div.approx.f32"] == k["sqrt.approx.f32"] == k["ftz"] == 0, k
        stats, apply_, track = variants["statistics"], variants["apply"], variants["apply_track"]
        # m', v', u: three FMAs per element; the update one more
        assert (stats["fma.rn.f32"], stats["sqrt.rn.f32"], stats["div.rn.f32"]) == (3 * per_thread, per_thread, per_thread)
        assert (apply_["fma.rn.f32"], apply_["sqrt.rn.f32"]) == (4 * per_thread, per_thread)
        assert stats["st.global"] == 0 and stats["atom"] > 0  # phase 1 only combines maxima
        assert apply_["atom"] == 0 and apply_["st.global"] == 3 * per_thread  # w, m, v once each
        # a statistics step: the same arithmetic, plus one atomic per statistic per tile (Triton
        # compiles a float atomic min / max as two integer ones, by sign: 3 + 2 * 2)
        assert (track["fma.rn.f32"], track["sqrt.rn.f32"]) == (4 * per_thread, per_thread)
        assert track["atom"] == 7 and track["st.global"] == 3 * per_thread
