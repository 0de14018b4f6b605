"""Which code produced a cell: recorded in every cell's row, checked when a study is resumed.

A cell's numbers are a function of the code that trained it (the ``merit_ds`` package and the
libraries under it: torch, DeepSpeed, transformers, numpy), its settings and the machine's float
arithmetic. :func:`code_version` identifies the code:

``source``   sha256 over every source file of the installed ``merit_ds`` package (relative path and
             contents; ``__pycache__`` and compiled files left out, and the study's analysis-only
             modules, :data:`ANALYSIS_ONLY`, which never touch a cell's training). It is the
             "diff hash": it changes with any edit to the package, committed or not, tracked or not.
``libraries`` the versions of the libraries a cell runs through.
``key``      a short hash of ``source`` and ``libraries``: what a resumed study compares
             (:func:`merit_ds.study.runner.run_grid`). Two cells with the same key ran the same code.
``commit``   ``git rev-parse HEAD`` of the checkout the package sits in, and ``dirty``: whether the
             package's files differ from that commit (modified or untracked). For people; None for
             both where git or the repository is missing (an installed copy): the key still works.

``label`` is what ``results.csv`` shows: ``<commit[:12]>[+dirty] <key>`` (``no-git <key>`` without git).
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path

__all__ = ["code_version", "source_hash", "ANALYSIS_ONLY", "PACKAGE_ROOT"]

#: The package whose source identifies the code.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

#: Modules that only read results (tables, intervals, plots): editing them changes no cell, so
#: they are not part of the code version (a study can be re-reported by newer analysis code).
ANALYSIS_ONLY = frozenset({"study/analysis.py", "study/report.py", "study/families.py", "study/intervals.py"})

_COMPILED = (".pyc", ".pyo", ".so", ".pyd", ".o", ".dll", ".dylib")
_LIBRARIES = ("torch", "deepspeed", "transformers", "numpy")


def source_hash(root: Path = PACKAGE_ROOT, *, exclude=ANALYSIS_ONLY) -> str:
    """sha256 (hex) over ``root``'s source files: for each, in sorted order, its path relative to
    ``root`` and the sha256 of its bytes."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if "__pycache__" in path.parts or rel.endswith(_COMPILED) or rel in exclude or path.name.startswith("."):
            continue
        h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest()


def _library_versions() -> dict:
    from importlib import metadata

    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(root: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def _git_state(root: Path) -> tuple[str | None, bool | None]:
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return None, None
    status = _git(root, "status", "--porcelain", "--untracked-files=all", "--", ".")
    return commit.strip(), (None if status is None else bool(status.strip()))


@functools.lru_cache(maxsize=None)
def _cached(root: str) -> dict:
    return _compute(Path(root))


def _compute(root: Path) -> dict:
    source = source_hash(root)
    libraries = _library_versions()
    key = hashlib.sha256(json.dumps({"source": source, "libraries": libraries}, sort_keys=True).encode()).hexdigest()[:16]
    commit, dirty = _git_state(root)
    label = f"{commit[:12] if commit else 'no-git'}{'+dirty' if dirty else ''} {key}"
    return {"key": key, "source": source, "libraries": libraries, "commit": commit, "dirty": dirty, "label": label}


def code_version(root: Path | None = None, *, fresh: bool = False) -> dict:
    """``{"key", "source", "libraries", "commit", "dirty", "label"}`` of the code in ``root``
    (default: this package). Computed once per process (the code a process runs is the code it
    imported) unless ``fresh``."""
    root = Path(root or PACKAGE_ROOT).resolve()
    return _compute(root) if fresh else dict(_cached(str(root)))
