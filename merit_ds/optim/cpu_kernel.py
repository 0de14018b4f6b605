"""MERIT's fused CPU kernel: build (JIT, at first use), the single-device group step and the
per-fragment passes of the sharded step.

``csrc/merit_cpu.cpp`` is compiled with ``torch.utils.cpp_extension.load`` (g++ with OpenMP,
``-O3``; cached under ``TORCH_EXTENSIONS_DIR``, about a minute the first time), the way
DeepSpeed builds its CPU ops. Without a compiler, or if the build fails, :func:`load` warns
once and returns ``None``; MERIT then runs its ``foreach`` path (``MERIT_DS_CPU_KERNEL=0``
forces that fallback).

Two passes per tensor (see the C++ file): pass 1 computes the new moments and ``u`` in
registers and only the row/column/tensor maxima; pass 2 recomputes them, applies the
update and writes ``w``, ``m``, ``v``. So each element is read twice and written once per
step, no scratch buffer is needed, and nothing is written before pass 2: a step skipped for
a non-finite gradient (detected in pass 1, on any rank) leaves the state untouched.

Two ways in: :func:`step_tensors` steps a whole param group of whole tensors in one C++ call
(pass 1, the trust ratios, pass 2, tensor after tensor; MERIT's default on one device), and
:func:`fragment_statistics` / :func:`ratio_tables` / :func:`fragment_apply` are the three
phases on one fragment, with the all-reduce of the maxima between them (the sharded step, and
ZeRO-Offload). The trust ratios are computed in C++ from the maxima, bitwise as the torch
formulation of :mod:`merit_ds.optim.formulas` (:func:`ratio_tables_reference`, tested). The
kernel's arithmetic is the formulas' per element, in float32, with explicit fused
multiply-adds where the formulas multiply and add (and no other contraction); it is not
bitwise the ``torch`` ops, so tests hold it to the reference within a stated tolerance.
Sharded and single-device runs of the kernel are bitwise equal: the same per-element code
runs on the same floats, and the maxima are exact.

Nothing here imports ``torch.distributed``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import formulas as F
from .trust_stats import PartialTrustStats, empty_trust_stats

__all__ = ["load", "available", "fragment_statistics", "fragment_apply", "ratio_tables", "step_tensors", "supports"]

_lock = threading.Lock()
_SOURCE = Path(__file__).with_name("csrc") / "merit_cpu.cpp"


def cpu_identity(cpuinfo: Optional[str] = None) -> str:
    """What ``-march=native`` compiles for: the first processor's vendor, family, model and
    instruction-set flags (``/proc/cpuinfo``; elsewhere ``platform.machine()/processor()``)."""
    import platform

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    keep = ("vendor_id", "cpu family", "model", "flags", "features", "cpu part", "cpu implementer")
    first = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in keep and key not in first:
            first[key] = " ".join(sorted(value.split())) if key in ("flags", "features") else value.strip()
    if not first:
        return f"{platform.machine()} {platform.processor()}"
    return "; ".join(f"{k}={first[k]}" for k in sorted(first))


def build_name(source: Path, cpuinfo: Optional[str] = None) -> str:
    """The extension's name, which torch uses as its build directory's name.

    Keyed by the source's path (torch rebuilds whenever another checkout's source path appears in
    a build directory; one name per checkout keeps each build, and its lock, its own) and by the
    CPU (the build uses ``-march=native``: on a cluster whose nodes share a home directory but not
    a CPU model, one node's build would die with an illegal instruction on another)."""
    key = f"{Path(source).resolve()}\n{cpu_identity(cpuinfo)}"
    return "merit_ds_cpu_kernel_" + hashlib.sha256(key.encode()).hexdigest()[:10]


_NAME = build_name(_SOURCE)
_module = None
_tried = False
_error: Optional[str] = None


def load():
    """The compiled extension module, or ``None`` (with one warning) if it cannot be built."""
    global _module, _tried, _error
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("MERIT_DS_CPU_KERNEL", "1") == "0":
            _error = "disabled by MERIT_DS_CPU_KERNEL=0"
            return None
        if shutil.which(os.environ.get("CXX", "g++")) is None:
            _error = "no C++ compiler (g++) on PATH"
        else:
            try:
                from torch.utils.cpp_extension import load as cpp_load

                _clear_stale_lock()
                _use_this_environments_ninja()
                _module = cpp_load(
                    name=_NAME,
                    sources=[str(_SOURCE)],
                    extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-march=native"],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as e:  # noqa: BLE001 - any build failure falls back, loudly
                _error = f"{type(e).__name__}: {str(e)[-500:]}"
        if _module is None:
            warnings.warn(
                f"merit_ds: MERIT's fused CPU kernel is not available ({_error}); using the foreach path "
                "(correct, slower). The kernel needs g++ with OpenMP (apt-get install g++).",
                RuntimeWarning,
                stacklevel=3,
            )
        return _module


def _use_this_environments_ninja() -> None:
    """Build with the ninja installed beside this Python (the venv's pip ``ninja``), whatever PATH
    says. Two ninja versions (the system's 1.11 and the venv's 1.13, say) hash the same build
    command differently in ``.ninja_log``, so a process that finds the other one on PATH (a job
    launched with the venv's ``bin/`` first, a script run without it) rebuilt the kernel from
    scratch each time: 40-100 s inside the first training step."""
    here = Path(sys.executable).parent
    if (here / "ninja").is_file():
        path = os.environ.get("PATH", "")
        if path.split(os.pathsep)[0] != str(here):
            os.environ["PATH"] = str(here) + (os.pathsep + path if path else "")


# A build takes about a minute. torch waits on the build lock for as long as it exists, so a lock
# left by a process killed while building (a timed-out test, say) would hang every later start:
# wait while the lock is young, remove it once it is older than any build.
STALE_LOCK_SECONDS = 240


def _clear_stale_lock() -> None:
    try:  # torch's own rule for where the build lives (private; skipped if it moves)
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(_NAME, verbose=False)) / "lock"
    except (ImportError, TypeError):
        return
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_SECONDS:
            warnings.warn(f"merit_ds: removing a stale build lock ({lock}, {age:.0f} s old)", RuntimeWarning, stacklevel=3)
            lock.unlink(missing_ok=True)
            return
        time.sleep(1.0)  # another process is building: let it finish


def available() -> bool:
    """Whether the kernel is built (builds it on the first call)."""
    return load() is not None


def supports(param: Tensor, *tensors: Tensor) -> bool:
    """Whether the kernel can step this tensor: fp32, CPU, contiguous (state and grad too)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in (param, *tensors))


def fragment_statistics(
    shape, start: int, w: Tensor, g: Tensor, m: Tensor, v: Tensor, group: dict, slot: Tensor
) -> bool:
    """Pass 1 over elements ``[start, start + w.numel())`` of a parameter of ``shape``: combine
    this fragment's maxima into ``slot`` (MERIT's statistics layout, see
    :mod:`merit_ds.optim.merit_fragments`). Returns whether some gradient element is not
    finite."""
    beta1, beta2 = group["betas"]
    hp = (beta1, beta2, group["eps"], group["weight_decay"])
    if F.is_matrix(shape):
        rows, cols, inner = F.matrix_dims(shape)
        r, c = rows * inner, cols * inner
        return load().stats_matrix(
            w, g, m, v, start, c, inner, *hp, slot.narrow(0, 0, r), slot.narrow(0, r, r),
            slot.narrow(0, 2 * r, c), slot.narrow(0, 2 * r + c, c),
        )
    return load().stats_vector(w, g, m, v, *hp, slot)


def ratio_tables(shape, slot: Tensor):
    """The trust ratios pass 2 reads, from a parameter's (reduced) maxima.

    Matrices: ``(row_ratio, col_ratio)``, each clamped below by the tensor ratio exactly as
    :func:`~merit_ds.optim.formulas.matrix_trust_ratio` does, and ``-1`` where a maximum is 0
    (the kernel sets s = 1 there); computed in C++ (one loop instead of a dozen tensor
    operations per matrix), bitwise equal to :func:`ratio_tables_reference` (tested).
    Vectors: the tensor ratio as a Python float.
    """
    if not F.is_matrix(shape):
        return float(F.vector_trust_ratio(slot[0], slot[1]))
    rows, cols, inner = F.matrix_dims(shape)
    if rows * cols * inner == 0:  # an empty matrix: nothing to step
        return torch.empty(rows * inner), torch.empty(cols * inner)
    return tuple(load().ratio_matrix(slot, rows * inner, cols * inner))


def ratio_tables_reference(shape, slot: Tensor):
    """:func:`ratio_tables` written with the formulas' torch operations (the test's reference)."""
    if not F.is_matrix(shape):
        return float(F.vector_trust_ratio(slot[0], slot[1]))
    rows, cols, inner = F.matrix_dims(shape)
    r, c = rows * inner, cols * inner
    row_w, row_u = slot.narrow(0, 0, r), slot.narrow(0, r, r)
    col_w, col_u = slot.narrow(0, 2 * r, c), slot.narrow(0, 2 * r + c, c)
    floor = row_w.max() / row_u.max()  # the tensor maxima are the maxima of the row maxima
    row_ratio, row_zero = F.ratio_and_zero(row_w, row_u)
    col_ratio, col_zero = F.ratio_and_zero(col_w, col_u)
    row_ratio = row_ratio.clamp_(min=floor).masked_fill_(row_zero, -1.0)
    col_ratio = col_ratio.clamp_(min=floor).masked_fill_(col_zero, -1.0)
    return row_ratio.contiguous(), col_ratio.contiguous()


_NO_STATS = torch.empty(0, dtype=torch.float64)


def fragment_apply(
    shape, start: int, w: Tensor, g: Tensor, m: Tensor, v: Tensor, group: dict, ratios, lr: float,
    track: bool = False,
) -> Optional[PartialTrustStats]:
    """Pass 2: ``w``, ``m``, ``v`` of the fragment updated in place from ``ratios``
    (:func:`ratio_tables`). ``track``: also return the fragment's trust-ratio statistics
    (:class:`~merit_ds.optim.trust_stats.PartialTrustStats`, from the very s and s*u the
    update uses), so that a statistics step runs the same arithmetic as any other step."""
    beta1, beta2 = group["betas"]
    hp = (beta1, beta2, group["eps"], group["weight_decay"], lr)
    out = torch.zeros(5, dtype=torch.float64) if track else _NO_STATS
    if F.is_matrix(shape):
        _, cols, inner = F.matrix_dims(shape)
        load().apply_matrix(w, g, m, v, start, cols * inner, inner, *hp, *ratios, out)
    else:
        load().apply_vector(w, g, m, v, *hp, ratios, out)
    if not track:
        return None
    return _trust_stats(w.numel(), out.tolist())


def _trust_stats(numel: int, row: list) -> PartialTrustStats:
    """The kernel's five statistics (count, sum, min, max, clipped) as PartialTrustStats."""
    if numel == 0:
        return empty_trust_stats()
    count, ratio_sum, lo, hi, clipped = row
    return PartialTrustStats(
        torch.tensor(int(count), dtype=torch.int64), torch.tensor(ratio_sum, dtype=torch.float64),
        torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32),
        torch.tensor(int(clipped), dtype=torch.int64),
    )


_POLICY = {"skip": 0, "propagate": 1, "raise": 2}


def step_tensors(
    params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, *, lr: float, betas: tuple, eps: float,
    weight_decay: float, nonfinite_grads: str = "skip", track: bool = False,
) -> tuple[list[int], Optional[list[PartialTrustStats]]]:
    """A whole group of whole tensors in one C++ call (single-device MERIT): per tensor pass 1,
    the trust ratios (:func:`ratio_tables`' arithmetic) and pass 2, with no Python between
    them (measured side by side on GPT-2 Small's 148 tensors: 0.109 s against 0.115 s for the
    same kernel driven per tensor from Python, docs/optimizer.md, "Speed"), and without the GIL.
    The same per-element code as :func:`fragment_statistics` /
    :func:`fragment_apply`, so the result is bitwise theirs (tested).

    Returns the indices of the tensors whose gradient is not finite (``"skip"``: those were
    left untouched; ``"raise"``: nothing was written) and, with ``track``, each tensor's
    trust-ratio statistics (those of skipped tensors are meaningless).
    """
    if nonfinite_grads not in _POLICY:
        raise ValueError(f"nonfinite_grads must be one of {sorted(_POLICY)}, got {nonfinite_grads!r}")
    row_len, inner = [], []
    for p in params:
        if F.is_matrix(p.shape):
            _, cols, k = F.matrix_dims(p.shape)
            row_len.append(cols * k)
            inner.append(k)
        else:
            row_len.append(0)
            inner.append(1)
    out = torch.zeros(len(params), 5, dtype=torch.float64) if track else _NO_STATS
    beta1, beta2 = betas
    bad = load().step_tensors(
        params, grads, exp_avgs, exp_avg_sqs, row_len, inner, beta1, beta2, eps, weight_decay, lr,
        _POLICY[nonfinite_grads], out,
    )
    if not track:
        return bad, None
    return bad, [_trust_stats(p.numel(), row) for p, row in zip(params, out.tolist())]
