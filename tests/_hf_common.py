"""Shared by the HF tests and their multi-process workers: tiny GPT-2, fixed data, records,
and the plain-MERIT reference that re-runs each recorded step.

Reference protocol (docs/design/field_notes.md, "Testing MERIT: compare per step, from identical
inputs"): a worker records, at the start of every
optimizer step and at the end of training, the full fp32 weights and the lr the stepping
optimizer holds. The reference loads the weights recorded before step k, computes the loss of
the same global batch in one process (mean over the global batch = mean of the equal-sized
per-rank means), takes one plain MERIT step with the same grouping and the recorded lr, and
compares with the weights recorded after step k. Weights are re-synchronised every step so
last-bit differences cannot compound; moments are the reference's own.
"""

from __future__ import annotations

import gc
import json
import os

import torch

VOCAB, SEQ, N_EMBD = 128, 16, 32
HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6)
WEIGHT_DECAY = 0.5  # large so that a wrong decay grouping is visible above the tolerance


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2, n_embd=N_EMBD, n_head=2, vocab_size=VOCAB, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def token_data(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, SEQ), generator=g)


class LMDataset(torch.utils.data.Dataset):
    def __init__(self, tokens):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def full_weights(model) -> dict[str, torch.Tensor]:
    """Full fp32 weights by name on every rank (gathers ZeRO-3 partitions: a collective)."""
    params = list(model.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().float().clone() for n, p in params}
    return {n: p.detach().float().clone() for n, p in params}


def split_matrices(model) -> list[str]:
    """Names of matrices that this rank holds only part of (ZeRO 1/2 ``_hp_mapping`` fragment
    or ZeRO 3 partition strictly inside the parameter): evidence that a test really shards."""
    out = []
    for n, p in model.named_parameters():
        if hasattr(p, "ds_tensor"):
            if len(p.ds_shape) == 2 and 0 < p.ds_tensor.numel() < p.ds_numel:
                out.append(n)
        elif p.dim() == 2 and getattr(p, "_hp_mapping", None) is not None:
            numel = p._hp_mapping.lp_fragment_address.numel
            if 0 < numel < p.numel():
                out.append(n)
    return out


def run_scenarios(names: str, scenario) -> None:
    """Worker epilogue: run each comma-separated scenario, tell tests/_dist.py which ran (the
    records themselves are <out>/<scenario>.pt), and leave the process group cleanly."""
    for name in names.split(","):
        scenario(name)
    if os.environ.get("MERIT_TEST_RESULT") and int(os.environ.get("RANK", "0")) == 0:
        save_json(os.environ["MERIT_TEST_RESULT"], {"scenarios": names.split(",")})
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    gc.collect()  # the Trainers' cyclic garbage freed now, not in interpreter teardown (merit_ds/run.py)


def save_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def reference_check(rec: dict, tokens: torch.Tensor, global_batch: int, *, weight_decay: float, hp: dict,
                    all_decayed: bool = False, loss_scale: float = 15 / 16, clip: float = 0.0,
                    optimizer: str = "MERIT") -> list[float]:
    """Replay ``rec`` (``{"weights": [...], "lrs": [...]}``) with plain single-process MERIT (or
    ``optimizer="LAMB"``); return per step the max |difference| between the recorded and the
    reference weights after the step."""
    import merit_ds
    from merit_ds.integrations.param_groups import merit_param_groups

    model = tiny_gpt2()
    if all_decayed:  # the negative control: one flat list, everything decayed
        groups = [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    else:
        groups = merit_param_groups(model, weight_decay)
    opt = getattr(merit_ds, optimizer)(groups, **hp)
    named = dict(model.named_parameters())
    diffs = []
    for k, lr in enumerate(rec["lrs"]):
        with torch.no_grad():
            for n, w in rec["weights"][k].items():
                named[n].copy_(w)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = tokens[k * global_batch:(k + 1) * global_batch]
        (model(input_ids=batch, labels=batch).loss * loss_scale).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        after = rec["weights"][k + 1]
        diffs.append(max(float((named[n].detach() - after[n]).abs().max()) for n in after))
    return diffs
