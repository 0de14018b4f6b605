"""An unmodified HF Trainer script (as the HF examples are): it parses TrainingArguments from
the command line and knows nothing of merit_ds. test_run.py starts it under
``python -m merit_ds.run`` and ``accelerate launch -m merit_ds.run`` with ``--optim merit``, and
plainly as negative controls. Writes the optimizer the Trainer stepped, its step counts and the
number of ranks to $MERIT_TEST_RESULT (rank 0)."""

import json
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainingArguments


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, 64, (16,), generator=g)
        return {"input_ids": ids, "labels": ids}


def main():
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens())
    trainer.train()
    metrics = trainer.evaluate() if str(args.eval_strategy) not in ("no", "IntervalStrategy.NO") else {}
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    steps = sorted({float(s["step"]) for s in opt.state.values()})
    if trainer.args.process_index == 0:
        with open(os.environ["MERIT_TEST_RESULT"], "w") as f:
            json.dump({"optimizer": type(opt).__module__ + "." + type(opt).__name__, "steps": steps,
                       "groups": len(opt.param_groups), "world_size": trainer.args.world_size,
                       "wrapped": type(getattr(opt, "optimizer", opt)).__name__,
                       "eval_loss": metrics.get("eval_loss")}, f)


if __name__ == "__main__":
    main()
