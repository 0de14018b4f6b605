"""The CPU kernel's build is cached per checkout AND per CPU (issue 21): it is compiled with
-march=native, so a build made on one node type must never be loaded on another."""

from __future__ import annotations

from pathlib import Path

from merit_ds.optim import cpu_kernel

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw
processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw
"""
SKYLAKE_NO_AVX512 = ZEN4.replace("AuthenticAMD", "GenuineIntel").replace("25", "6").replace(" avx512f avx512bw", "")


def test_build_name_differs_between_cpus_and_checkouts():
    src = Path(cpu_kernel._SOURCE)
    a, b = cpu_kernel.build_name(src, ZEN4), cpu_kernel.build_name(src, SKYLAKE_NO_AVX512)
    assert a != b  # one node's -march=native build is never another's
    assert a == cpu_kernel.build_name(src, ZEN4)  # the same CPU finds its build again
    assert a != cpu_kernel.build_name(Path("/elsewhere/merit_cpu.cpp"), ZEN4)  # per checkout, as before
    # the flags' order and the other processors' lines do not matter
    shuffled = ZEN4.replace("fpu sse2 avx avx2 avx512f avx512bw", "avx512bw fpu avx avx2 sse2 avx512f")
    assert cpu_kernel.build_name(src, shuffled) == a


def test_cpu_identity_reads_the_first_processor():
    ident = cpu_kernel.cpu_identity(ZEN4)
    assert ident == "cpu family=25; flags=avx avx2 avx512bw avx512f fpu sse2; model=17; vendor_id=AuthenticAMD"
    assert cpu_kernel._NAME == cpu_kernel.build_name(cpu_kernel._SOURCE)  # this machine's
