"""MERIT's Triton kernels compiled ahead of time for NVIDIA GPUs on this CPU machine
(tests/triton_compile_worker.py, Triton's bundled ptxas): what Triton's interpreter, which the
other Triton tests use, cannot show."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # compiles 13 kernels ahead of time in a subprocess (~20 s uncached)


# float arithmetic without a rounding modifier: PTX lets ptxas fuse such a mul and add into an FMA
# (contraction); with an explicit .rn it must not. Triton writes these only with enable_fp_fusion.
BARE_ARITHMETIC = re.compile(r"^(?:mul|add|sub|fma|mad)\.f(?:32|64)$")
ARITHMETIC = {"statistics", "statistics_propagate", "apply", "apply_track", "apply_propagate"}


def _has(ops, prefix):
    return any(op == prefix or op.startswith(prefix + ".") for op in ops)


def test_kernels_compile_for_nvidia_gpus_with_ieee_arithmetic():
    """The kernels compiled ahead of time for sm_80 and sm_90 (Triton's own ptxas; no GPU
    needed), every launch variant with the step's launch options. The interpreter checks the
    arithmetic; this checks what a GPU would run, as properties of the PTX (which instructions
    are there or not; no counts, which an instruction-scheduling change moves): it compiles;
    nothing flushes subnormals (no .ftz); every division and square root is the IEEE
    round-to-nearest one (div.rn.f32 / sqrt.rn.f32; no approximate or div.full forms); the
    explicit FMAs are there (fma.rn.f32) and nothing else can be contracted into one (every
    float mul / add carries .rn, and the separately rounded products and sums are still there);
    phase 1 stores nothing (atomic maxima only)."""
    worker = Path(__file__).with_name("triton_compile_worker.py")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, str(worker), "80", "90"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for arch in (80, 90):
        variants = {k.split("@")[0]: v for k, v in got.items() if k.endswith(f"@sm_{arch}")
                    and not k.startswith("control")}
        assert set(variants) == ARITHMETIC | {"tensor_max"}
        for name, k in variants.items():  # every variant a step can launch
            ops = set(k["opcodes"])
            assert k["cubin_bytes"] > 0 and k["ftz"] == 0, (name, arch)
            assert not [op for op in ops if ".approx" in op or op.startswith("div.full")], (name, arch, ops)
            assert not [op for op in ops if BARE_ARITHMETIC.match(op)], (name, arch, ops)
            float_div_sqrt = {op for op in ops if op.startswith(("div.", "sqrt.")) and op.endswith((".f32", ".f64"))}
            assert float_div_sqrt <= {"div.rn.f32", "sqrt.rn.f32"}, (name, arch, float_div_sqrt)
        for name in ARITHMETIC:
            ops = set(variants[name]["opcodes"])
            # m' = fma(m, b1, (1 - b1) g), v' = fma(v, b2, (1 - b2) g g), u = fma(wd, w, m' / (sqrt(v') + eps)):
            # the explicit FMAs, the IEEE division and root, and the product (1 - b1) g and the sum
            # sqrt(v') + eps rounded on their own
            assert {"fma.rn.f32", "div.rn.f32", "sqrt.rn.f32", "mul.rn.f32", "add.rn.f32"} <= ops, (name, arch, ops)
            assert _has(ops, "ld.global"), (name, arch)
        stats = [set(variants[n]["opcodes"]) for n in ("statistics", "statistics_propagate")]
        for ops in stats:  # phase 1 only combines maxima: atomics, no store to w, m, v
            assert not _has(ops, "st.global") and _has(ops, "atom.global"), (arch, ops)
        for n in ("apply", "apply_propagate", "apply_track", "tensor_max"):
            assert _has(set(variants[n]["opcodes"]), "st.global"), (n, arch)
        for n in ("apply", "apply_propagate", "tensor_max"):  # no statistics: no atomic
            assert not _has(set(variants[n]["opcodes"]), "atom"), (n, arch)
        # the statistics step: per tile, atomic count / clipped adds, the float64 sum of s, min / max
        track = set(variants["apply_track"]["opcodes"])
        assert any(op.startswith("atom.global") and op.endswith(".add.f64") for op in track), (arch, track)
    # negative control: with fp fusion on (the step turns it off) Triton leaves mul / add without
    # .rn, which the check above would refuse: it tells the two apart
    control = set(got["control_fp_fusion@sm_90"]["opcodes"])
    assert {"mul.f32", "add.f32"} <= control and "mul.rn.f32" not in control, control
