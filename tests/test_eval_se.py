"""The validation loss carries its standard error (issue 21: evals that can see the effect)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from merit_ds.train.presets import MODEL_PRESETS
from merit_ds.train.trainer import Trainer


class _FixedLossModel(torch.nn.Module):
    """Logits [l, 0] over a 2-token vocabulary with target 0: each token's loss is
    softplus(-l) = log(1 + exp(-l)); l is chosen per block so that the loss is ``block_losses[b]``."""

    def __init__(self, block_losses):
        super().__init__()
        self.l = torch.tensor([-math.log(math.expm1(v)) for v in block_losses], dtype=torch.float64)
        self.device = torch.device("cpu")

    def forward(self, input_ids):
        b, t = input_ids.shape
        first = self.l[input_ids[:, 0]].view(b, 1).expand(b, t)  # input id 0 of a block = its index
        return SimpleNamespace(logits=torch.stack([first, torch.zeros_like(first)], -1).float())


class _Blocks:
    def __init__(self, n, t=4, micro=2):
        self.blocks, self.t, self.micro = n, t, micro

    def batches(self):
        for start in range(0, self.blocks, self.micro):
            ids = torch.arange(start, min(start + self.micro, self.blocks)).view(-1, 1).expand(-1, self.t)
            yield ids, torch.zeros_like(ids)


def test_val_loss_standard_error_hand_worked():
    # block means 1, 2, 4: mean 7/3; sample variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3;
    # standard error sqrt(7/3 / 3) = sqrt(7) / 3 = 0.881917...
    fake = SimpleNamespace(engine=_FixedLossModel([1.0, 2.0, 4.0]), val_loader=_Blocks(3))
    out = Trainer.evaluate(fake)
    assert out["val_blocks"] == 3
    assert abs(out["val_loss"] - 7 / 3) < 1e-6
    assert abs(out["val_loss_se"] - math.sqrt(7) / 3) < 1e-6


def test_equal_blocks_have_zero_standard_error():
    out = Trainer.evaluate(SimpleNamespace(engine=_FixedLossModel([2.5] * 4), val_loader=_Blocks(4)))
    assert out["val_loss_se"] < 1e-6 and abs(out["val_loss"] - 2.5) < 1e-6


def test_recipes_validate_on_2048_blocks_tiny_on_128():
    # 0.34 nats of per-block spread (128 blocks gave ~0.03) / sqrt(2048) = 0.0075 <= 0.01
    assert MODEL_PRESETS["gpt2-small"].eval_sequences == MODEL_PRESETS["gpt2-medium"].eval_sequences == 2048
    assert MODEL_PRESETS["tiny"].eval_sequences == 128
    assert 0.34 / math.sqrt(2048) <= 0.01 < 0.34 / math.sqrt(1024)
