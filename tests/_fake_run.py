"""A merit_ds.train run directory made by hand, for tests of what reads one (export, resume): a
small GPT-2 with GPT-2's vocabulary, ZeRO-0 checkpoints of steps 1 and 2 written through
merit_ds.train.checkpoint's own ``finalize`` (sizes and sha256 recorded, ``latest`` moved)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from merit_ds.train import checkpoint as ckpt

#: The run description stored in the checkpoints (what ``describe_run`` records).
RUN_INFO = {"optimizer": "merit", "model": "tiny", "seq_len": 16, "global_batch": 2, "micro_batch": 2,
            "model_config": {"n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 16, "vocab_size": 50304},
            "precision": "fp32", "zero_stage": 0, "world": 1, "launcher": "deepspeed"}


def md5s(root: Path) -> dict:
    """md5 of every file under ``root`` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_run(run: Path, steps=(1, 2)) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    root = run / "checkpoints"
    root.mkdir(parents=True)
    mc = RUN_INFO["model_config"]
    config = GPT2Config(**mc, bos_token_id=50256, eos_token_id=50256)
    (run / "model_config.json").write_text(config.to_json_string())
    (run / "run.json").write_text(json.dumps({"optimizer": "merit"}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in steps))
    torch.manual_seed(0)
    for step in steps:
        tmp = root / f".tmp-{ckpt.tag_for(step)}"
        tmp.mkdir()
        torch.save({"module": GPT2LMHeadModel(config).state_dict()}, tmp / "mp_rank_00_model_states.pt")
        ckpt.finalize(root, tmp.name, ckpt.tag_for(step), RUN_INFO, step)
    return run


@pytest.fixture
def run(tmp_path) -> Path:
    return make_run(tmp_path / "run")
