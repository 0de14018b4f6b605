"""MERIT on one process: a tiny GPT-2 (built from a config, no download) learns a toy
sequence task. The smallest complete use of `from merit_ds import MERIT`.

    .venv/bin/python examples/quickstart.py
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from merit_ds import MERIT


def main(steps: int = 60) -> list[float]:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=64, n_positions=32))
    # Decay matrices only (biases and LayerNorm weights are vectors).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = MERIT([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                lr=1e-2, betas=(0.9, 0.95))
    # Toy data: each sequence counts upward modulo 64 from a random start.
    losses = []
    for step in range(steps):
        start = torch.randint(0, 64, (16, 1))
        x = (start + torch.arange(32)) % 64
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    return losses


if __name__ == "__main__":
    main()
