"""Compiles MERIT's Triton kernels ahead of time for NVIDIA GPUs (no GPU needed: Triton's
bundled ptxas), with the launch options the step uses, and prints per kernel what the PTX
holds: the set of distinct instruction opcodes (``mul.rn.f32``, ``st.global.v4.b32``, ...) and
the number of ``.ftz`` modifiers, so that the test checks properties (which instructions are
present or absent), not counts that a scheduling change in a Triton upgrade moves. Plus one
negative control, ``control_fp_fusion``: the statistics kernel compiled with
``enable_fp_fusion=True`` (which the step does not use), to show that the no-contraction
check sees the difference. Run in its own process: Triton must not be in interpreter mode.

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


# an instruction line: an optional guard predicate (@%p1, @!%p1), then the opcode with its
# modifiers; directives (.reg, .loc), labels ($L__BB0_1:), comments and braces do not match
INSTRUCTION = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*)", re.MULTILINE)


def opcodes(ptx: str) -> list:
    return sorted(set(INSTRUCTION.findall(ptx)))


def compile_kernel(name: str, arch, options: dict) -> dict:
    fn, sig, constexprs = KERNELS[name]
    signature = {**sig, **{c: "constexpr" for c in constexprs}}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", int(arch), 32), options=options)
    ptx = compiled.asm["ptx"]
    return {"cubin_bytes": len(compiled.asm["cubin"]), "opcodes": opcodes(ptx),
            "ftz": ptx.count(".ftz")}  # flushing subnormals would differ from the CPU kernel


def main(archs):
    out = {}
    for arch in archs:
        for name in KERNELS:
            out[f"{name}@sm_{arch}"] = compile_kernel(name, arch, OPTIONS)
    out[f"control_fp_fusion@sm_{archs[-1]}"] = compile_kernel("statistics", archs[-1],
                                                              {**OPTIONS, "enable_fp_fusion": True})
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:] or ["90"])
