"""Atomic, verified, keep-last-K checkpoints around ``engine.save_checkpoint``.

Layout (one directory per optimizer step; DeepSpeed's per-rank files inside)::

    OUT/checkpoints/
      latest                      text: the tag of the newest complete checkpoint (atomic replace)
      step_00000040/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   (DeepSpeed)
        merit_ds_checkpoint.json  what was trained (optimizer, model, batch, world, ZeRO stage,
                                  precision, step) + every file's size and sha256; written last
      .tmp-step_00000050/         a save in progress: never read, removed on the next save

A save goes to ``.tmp-<tag>``; only after every rank finished and rank 0 wrote the metadata
does the directory get its final name (``os.rename``, atomic on POSIX), and only then does
``latest`` move. A run killed at any moment leaves the previous checkpoint intact and
``latest`` pointing at it. Checkpoints must be on a filesystem every node sees (multi-node).

Before anything is loaded (and before the run writes anything), :func:`validate` checks the
metadata, the files against their sizes and checksums, and compatibility with the current run;
a corrupt or incompatible checkpoint is a :class:`CheckpointError`, naming what is wrong.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from merit_ds.fileio import atomic_write_text, fsync_dir, fsync_file, replace_directory, sha256_file

__all__ = ["CheckpointError", "META", "tag_for", "latest_checkpoint", "validate", "finalize", "prune", "complete_checkpoints",
           "auto_resume_point", "refuse_going_back"]

META = "merit_ds_checkpoint.json"
LATEST = "latest"
#: In a universal copy: which checkpoint (and which metadata, by sha256) it was converted from.
UNIVERSAL_SOURCE = "merit_ds_universal_source.json"
FORMAT = "merit_ds.train.checkpoint/1"
#: Keys of the run description that must match to resume.
COMPATIBLE_KEYS = ("optimizer", "model_config", "seq_len", "global_batch", "precision", "zero_stage", "schedule")
#: Values of keys that checkpoints written before the key existed lack (all trained MERIT).
LEGACY_DEFAULTS = {"optimizer": "merit"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from: missing, corrupt, or from a different run."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _files(directory: Path) -> dict:
    """Size and sha256 of every file; each is fsynced too (DeepSpeed does not), so that the
    rename and ``latest`` that follow never point at data still only in the page cache."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != META:
            fsync_file(p)
            st = p.stat()  # mtime: a restart re-hashes only files changed since (validate, "changed")
            out[str(p.relative_to(directory))] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(p)}
    for d in sorted({p.parent for p in directory.rglob("*")} | {directory}):
        fsync_dir(d)
    return out


def finalize(ckpt_root: Path, tmp_tag: str, tag: str, run_info: dict, step: int) -> Path:
    """Rank 0, after every rank's save returned: metadata, rename to the final name, move ``latest``."""
    tmp_dir, final = ckpt_root / tmp_tag, ckpt_root / tag
    meta = {"format": FORMAT, "step": step, "tag": tag, "run": run_info, "files": _files(tmp_dir)}
    atomic_write_text(tmp_dir / META, json.dumps(meta, indent=1, sort_keys=True))
    # re-saving a step after a resume: the old copy goes only once the new is named
    replace_directory(tmp_dir, final, ckpt_root / f".old-{tag}")
    atomic_write_text(ckpt_root / LATEST, tag)
    fsync_dir(ckpt_root)
    return final


def prune(ckpt_root: Path, keep_last: int) -> list[Path]:
    """Remove complete checkpoints beyond the newest ``keep_last``, stale temporaries, and the
    universal copies (``universal/step_*``, made when a run resumed on another world size) of
    checkpoints that are gone: each is as large as its source, and only ever re-made from it."""
    removed = []
    universal = ckpt_root / "universal"
    for stale in [*ckpt_root.glob(".tmp-*"), *universal.glob(".tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    if keep_last > 0:
        done = sorted(p for p in ckpt_root.glob("step_*") if (p / META).exists())
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    for copy in sorted(universal.glob("step_*")):
        if not (ckpt_root / copy.name).is_dir():  # its source was pruned (or never kept)
            shutil.rmtree(copy, ignore_errors=True)
            removed.append(copy)
    return removed


def latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    pointer = ckpt_root / LATEST
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    path = ckpt_root / tag
    if not tag or not path.is_dir():
        raise CheckpointError(f"{pointer} names {tag!r}, which is not a checkpoint directory in {ckpt_root}")
    return path


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """The complete checkpoints (their metadata written: the save finished) of a run, newest first."""
    if not Path(ckpt_root).is_dir():
        return []
    return sorted((p for p in Path(ckpt_root).glob("step_*") if (p / META).is_file()), key=lambda p: p.name,
                  reverse=True)


def auto_resume_point(ckpt_root: Path) -> tuple[Optional[Path], Optional[str]]:
    """What ``--resume auto`` resumes from, and a note to print when it is not simply ``latest``.

    ``latest`` names the newest checkpoint whose save completed; a crash between a save's rename
    and the move of ``latest``, or a lost ``latest`` file, leaves complete ``step_*`` directories
    newer than it (or none named at all): the newest complete one is used then, and the note says
    so, rather than training again from step 0 over them (which would truncate metrics.jsonl and
    prune those checkpoints). Validation (sizes, checksums, compatibility) follows in the caller.
    """
    done = complete_checkpoints(ckpt_root)
    pointer = Path(ckpt_root) / LATEST
    named = latest_checkpoint(ckpt_root) if pointer.exists() else None
    if not done:
        if any(Path(ckpt_root).glob("step_*")) if Path(ckpt_root).is_dir() else False:
            raise CheckpointError(f"{ckpt_root} holds step_* directories but none is complete ({META} missing: "
                                  "interrupted saves) and no 'latest': refusing to train over them from step 0. "
                                  "Pass --resume PATH to one of them if you know it is good, or use another --out")
        return named, None
    newest = done[0]
    if named is None:
        return newest, (f"{pointer} is missing: resuming from the newest complete checkpoint {newest.name} "
                        f"(of {len(done)})")
    if named.name < newest.name:
        return newest, f"{pointer} names {named.name}, but {newest.name} is newer and complete: resuming from it"
    return named, None


def refuse_going_back(resume_from: Path, ckpt_root: Path) -> None:
    """Refuse ``--resume PATH`` to a checkpoint of this same run that is older than its newest
    complete one: training on from it here would overwrite the newer checkpoints and drop the
    metrics recorded after it. Into a new ``--out`` it is fine."""
    resume_from, root = Path(resume_from).resolve(), Path(ckpt_root).resolve()
    if resume_from.parent != root:
        return
    newer = [p.name for p in complete_checkpoints(root) if p.name > resume_from.name]
    if newer:
        raise CheckpointError(f"--resume {resume_from.name} is older than this run's newest checkpoint(s) "
                              f"{', '.join(sorted(newer))}: continuing here would overwrite them and the metrics "
                              f"recorded after {resume_from.name}. To branch from it, pass the same --resume with a "
                              "new --out; to continue the run, use --resume auto. Nothing was changed.")


def validate(path: Path, run_info: dict, *, checksums: bool | str = True, allow_world_change: bool = False) -> dict:
    """Return the checkpoint's metadata, or raise :class:`CheckpointError` saying what is wrong."""
    path = Path(path)
    try:
        return _validate(path, run_info, checksums=checksums, allow_world_change=allow_world_change)
    except (KeyError, TypeError, ValueError, AttributeError, OSError) as exc:
        # metadata with the right format but missing or mistyped fields, or unreadable files
        raise CheckpointError(f"corrupt checkpoint {path}: {path / META} is malformed or a file cannot be read "
                              f"({type(exc).__name__}: {exc})") from None


def _validate(path: Path, run_info: dict, *, checksums: bool, allow_world_change: bool) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a directory)")
    meta_file = path / META
    if not meta_file.exists():
        raise CheckpointError(f"{path} is not a complete merit_ds checkpoint: {META} is missing "
                              f"(an interrupted save, or not written by merit_ds.train)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_file}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: unknown checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    for rel, rec in meta["files"].items():
        f = path / rel
        if not f.exists():
            raise CheckpointError(f"corrupt checkpoint {path}: file {rel} is missing")
        if f.stat().st_size != rec["bytes"]:
            raise CheckpointError(f"corrupt checkpoint {path}: {rel} has {f.stat().st_size} bytes, expected {rec['bytes']}")
        if checksums == "changed" and rec.get("mtime_ns") == f.stat().st_mtime_ns:
            continue  # untouched since its sha256 was taken at save time (--verify full re-hashes)
        if checksums and sha256_file(f) != rec["sha256"]:
            raise CheckpointError(f"corrupt checkpoint {path}: {rel} fails its sha256 check")
    saved = meta["run"]
    for key in COMPATIBLE_KEYS:
        if saved.get(key, LEGACY_DEFAULTS.get(key)) != run_info.get(key, LEGACY_DEFAULTS.get(key)):
            raise CheckpointError(f"incompatible checkpoint {path}: it was trained with "
                                  f"{key}={saved.get(key, LEGACY_DEFAULTS.get(key))!r}, "
                                  f"this run has {key}={run_info.get(key)!r}")
    if not allow_world_change and saved.get("world") != run_info.get("world") and run_info.get("zero_stage", 0) > 0:
        raise CheckpointError(
            f"incompatible checkpoint {path}: saved with {saved.get('world')} data-parallel ranks, this run has "
            f"{run_info.get('world')}. ZeRO checkpoints are per rank: resume with {saved.get('world')} ranks or through "
            f"DeepSpeed's universal format (universal_copy)")
    return meta


def universal_copy(path: Path, universal_root: Path) -> Path:
    """DeepSpeed universal (world-size independent) copy of a validated ZeRO checkpoint, made once.

    ``python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state`` writes into a
    temporary directory renamed into place when complete; the source is only read. The copy
    records the sha256 of the source's metadata (which holds every file's sha256): an existing
    copy is reused only if it was made from this very checkpoint, otherwise it is converted again
    (a tag reused after a resume from an earlier step names another checkpoint).
    """
    import subprocess
    import sys

    path = Path(path)
    final = Path(universal_root) / path.name
    try:
        source = {"source": str(path), "meta_sha256": sha256_file(path / META)}
        if final.is_dir():
            try:
                made_from = json.loads((final / UNIVERSAL_SOURCE).read_text())
            except (OSError, ValueError):
                made_from = None
            if isinstance(made_from, dict) and made_from.get("meta_sha256") == source["meta_sha256"]:
                return final
            shutil.rmtree(final)  # from another checkpoint that had the same tag: convert again
        tmp = Path(universal_root) / f".tmp-{path.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
               "--output_folder", str(tmp), "--inject_missing_state"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"converting {path} to DeepSpeed's universal format failed:\n{r.stderr[-2000:]}")
        atomic_write_text(tmp / UNIVERSAL_SOURCE, json.dumps(source, indent=1, sort_keys=True))
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        raise CheckpointError(f"cannot make the universal copy of {path} in {universal_root}: {exc}") from None
    return final
