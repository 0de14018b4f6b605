"""Rank worker for test_recipes_trainer's validation test: the validation loss of a fixed tiny
GPT-2 over real ranks (gloo), for several micro-batches and set sizes. argv: DATA_DIR."""

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from merit_ds.train.data_source import make_val_loader
from merit_ds.train.presets import MODEL_PRESETS, gpt2_config
from merit_ds.train.trainer import Trainer

SEQ = 16


class Engine(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.module, self.device = model, torch.device("cpu")

    def forward(self, **kw):
        return self.module(**kw)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(gpt2_config(MODEL_PRESETS["tiny"], n_layer=1, n_embd=16, n_head=2, n_positions=SEQ,
                                        vocab_size=256))
    out = {}
    for n in (7, 100):
        for micro in (1, 2, 3):
            val = make_val_loader(sys.argv[1], seq_len=SEQ, eval_sequences=n, micro_batch=micro, rank=rank, world=world)
            out[f"{n}/{micro}"] = Trainer.evaluate(SimpleNamespace(engine=Engine(model), val_loader=val))
    if rank == 0:
        with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
            json.dump(out, f)
    # every rank past its last collective before any tears gloo down (else a peer still
    # reading the final all-reduce can abort with "terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()
    # and no interpreter teardown either: gloo's threads can still abort it ("terminate called without
    # an active exception", seen once in CI on 2026-12-07 after the barrier and destroy above); the
    # training loop ends the same way (merit_ds.train.loop.exit_process)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
