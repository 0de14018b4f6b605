"""Worker for test_train_export.py: fp32 weights consolidated from bf16 ZeRO 1/2/3 checkpoints.

DeepSpeed names every bf16 ZeRO checkpoint ``bf16_zero_pp_rank_*``; only ZeRO-1 with fp32
accumulation is its BF16_Optimizer, which ``zero_to_fp32`` refuses. For each stage: a small GPT-2
(tied embedding and head) under ``deepspeed.initialize`` in bf16 with merit_ds's data types, one
MERIT step, ``save_checkpoint``; then ``merit_ds.train.export.consolidated_state_dict`` on rank 0
against DeepSpeed's own ``safe_get_full_fp32_param`` of every parameter (bitwise), and which
consolidation the export records. Two ranks, so every flat partition is cut (the loop test in
test_recipes_train.py asserts a matrix split between ranks). Result JSON at $MERIT_TEST_RESULT.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def main() -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers import GPT2Config, GPT2LMHeadModel

    import merit_ds  # noqa: F401
    from merit_ds.integrations.param_groups import merit_param_groups
    from merit_ds.train.export import _consolidation, consolidated_state_dict
    from merit_ds.train.ds_config import make_ds_config

    root = Path(sys.argv[1])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    result = {}
    for stage in (1, 2, 3):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=16, n_embd=24, n_layer=2, n_head=2))
        cfg = make_ds_config(stage, "bf16", lr=1e-2, global_batch=4, micro_batch=2)
        cfg["gradient_clipping"] = 0.0
        if stage == 3:
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=merit_param_groups(model), config=cfg)
        x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(rank))
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        path = root / f"stage{stage}"
        engine.save_checkpoint(str(path), tag="t")
        full = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
        dist.barrier()
        if rank == 0:
            got = consolidated_state_dict(path / "t", stage)
            result[str(stage)] = {
                "wrapper": type(engine.optimizer).__name__,
                "consolidation": _consolidation(path / "t", stage),
                "files": sorted(f.name for f in (path / "t").iterdir()),
                "names": sorted(full),
                "missing": sorted(set(full) - set(got)),
                "max_diff": max(float((got[n].float() - full[n].float()).abs().max()) for n in full if n in got),
                "bitwise": all(torch.equal(got[n], full[n].view(got[n].shape)) for n in full if n in got),
            }
        dist.barrier()
        engine.destroy()
    if rank == 0:
        with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
