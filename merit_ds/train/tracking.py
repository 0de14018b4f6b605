"""Metrics out: ``metrics.jsonl`` (the record tests and plots read), Accelerate's trackers
(TensorBoard by default, W&B optional), and the train/val loss plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

__all__ = ["MetricsLog", "make_trackers", "plot_losses", "wandb_init_kwargs"]


class MetricsLog:
    """Append-only JSON lines on rank 0; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        def kept(rec: dict) -> bool:  # the final evaluation (a val-only record) is redone on resume
            return rec.get("step", 0) < step or (rec.get("step", 0) == step and "loss" in rec)

        keep = [line for line in self.path.read_text().splitlines() if line.strip() and kept(json.loads(line))]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def make_trackers(kind: str, out_dir: Path, run_name: str, config: dict):
    """Accelerate tracker objects used directly (rank 0 only), so both launchers log the same way."""
    if kind == "none":
        return []
    from accelerate import PartialState
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    PartialState()  # Accelerate's trackers log through its state; reuses the running process group

    trackers = []
    for k in kind.split(","):
        if k == "tensorboard":
            t = TensorBoardTracker(run_name, str(out_dir / "tensorboard"))
        elif k == "wandb":
            t = WandBTracker(run_name, **wandb_init_kwargs(out_dir))
        else:
            raise ValueError(f"unknown tracker {k!r}: use tensorboard, wandb, both comma-separated, or none")
        t.main_process_only = False  # we only build trackers on rank 0 already
        if hasattr(t, "start"):
            t.start()
        try:
            t.store_init_configuration({k2: v for k2, v in config.items() if isinstance(v, (int, float, str, bool))})
        except Exception:  # hparams logging is a nicety; never fail a run for it
            pass
        trackers.append(t)
    return trackers


def wandb_init_kwargs(out_dir: Path) -> dict:
    """``wandb.init`` arguments: files under ``OUT/wandb``; offline unless W&B can log in.

    ``WANDB_MODE`` (online / offline / disabled) is honoured when set. Otherwise the run is
    online only with an API key (``WANDB_API_KEY`` or a ``wandb login`` entry in ~/.netrc), and
    offline without one, instead of W&B's interactive prompt or error: an offline run is
    uploaded later with ``wandb sync OUT/wandb/offline-run-*``.
    """
    kw = {"dir": str(out_dir)}
    if not os.environ.get("WANDB_MODE"):
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        logged_in = bool(os.environ.get("WANDB_API_KEY")) or (
            netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace"))
        if not logged_in:
            kw["mode"] = "offline"
    return kw


def plot_losses(records: list[dict], path: Path, title: str = "") -> Optional[Path]:
    """Train loss per step and validation loss at eval steps, one PNG; where the records' ``global_batch``
    changes (a batch schedule), a dashed line marks the new phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", lw=1.5)
        last = val[-1]
        ax.annotate(f"val {last[1]:.3f} (ppl {math.exp(last[1]):.1f})", xy=last, xytext=(-120, 25),
                    textcoords="offset points", arrowprops={"arrowstyle": "->"})
    # batch-size schedule: a dashed line where the global batch changes, labelled with the new batch
    changes, last_batch = [], None
    for r in records:
        b = r.get("global_batch")
        if b is not None and "loss" in r:
            if last_batch is not None and b != last_batch:
                changes.append((r["step"], b))
            last_batch = b
    for i, (step, b) in enumerate(changes):
        ax.axvline(step - 0.5, color="grey", ls="--", lw=0.8, label="batch change" if i == 0 else None)
        ax.annotate(f"batch {b}", xy=(step - 0.5, 1), xycoords=("data", "axes fraction"), xytext=(2, -12),
                    textcoords="offset points", fontsize=7, color="grey")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
