"""Compiles MERIT's Triton kernels ahead of time for NVIDIA GPUs (no GPU needed: Triton's
bundled ptxas), with the launch options the step uses, and prints per kernel what the PTX
holds. Run in its own process: Triton must not be in interpreter mode.

    TRITON_INTERPRET=0 python tests/triton_compile_worker.py 80 90
"""

import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from merit_ds.optim import segmented_triton
from merit_ds.optim import segmented_triton_kernels as k

ELEMENTWISE = {"addr_ptr": "*i64", "buf_ptr": "*fp32"}
HYPER = {n: "fp32" for n in ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps", "weight_decay")}
TILES = dict(NF=len(segmented_triton.TILE_FIELDS), BLOCK_R=segmented_triton.BLOCK_ROWS,
             BLOCK_C=segmented_triton.BLOCK_COLS)
OPTIONS = {k_: v for k_, v in segmented_triton.LAUNCH.items()}

APPLY = {**ELEMENTWISE, "tmax_ptr": "*fp32", "tab_ptr": "*i64", "count_ptr": "*i64", "sum_ptr": "*fp64",
         "min_ptr": "*fp32", "max_ptr": "*fp32", "clipped_ptr": "*i64", **HYPER, "neg_lr": "fp32"}

KERNELS = {
    "statistics": (k.statistics_kernel, {**ELEMENTWISE, "tab_ptr": "*i64", **HYPER}, dict(FLAGS=True, **TILES)),
    "statistics_propagate": (k.statistics_kernel, {**ELEMENTWISE, "tab_ptr": "*i64", **HYPER},
                             dict(FLAGS=False, **TILES)),
    "apply": (k.apply_kernel, APPLY, dict(HONOUR_FLAGS=True, TRACK=False, **TILES)),
    "apply_track": (k.apply_kernel, APPLY, dict(HONOUR_FLAGS=True, TRACK=True, **TILES)),
    "apply_propagate": (k.apply_kernel, APPLY, dict(HONOUR_FLAGS=False, TRACK=False, **TILES)),
    "tensor_max": (k.tensor_max_kernel, {"buf_ptr": "*fp32", "tmax_ptr": "*fp32", "mat_ptr": "*i64"}, dict(BLOCK=1024)),
}


def count(ptx: str, op: str) -> int:
    return len(re.findall(r"\b" + re.escape(op) + r"\b", ptx))


def main(archs):
    out = {}
    for arch in archs:
        for name, (fn, sig, constexprs) in KERNELS.items():
            signature = {**sig, **{c: "constexpr" for c in constexprs}}
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", int(arch), 32), options=OPTIONS)
            ptx = compiled.asm["ptx"]
            out[f"{name}@sm_{arch}"] = {
                "cubin_bytes": len(compiled.asm["cubin"]),
                **{op: count(ptx, op) for op in ("fma.rn.f32", "div.rn.f32", "sqrt.rn.f32", "div.full.f32",
                                                 "div.approx.f32", "sqrt.approx.f32", "ex2.approx.f32")},
                "ftz": ptx.count(".ftz"),  # flushing subnormals would differ from the CPU kernel
                "atom": len(re.findall(r"\batom\.", ptx)),
                "ld.global": len(re.findall(r"\bld\.global", ptx)),
                "st.global": len(re.findall(r"\bst\.global", ptx)),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:] or ["90"])
