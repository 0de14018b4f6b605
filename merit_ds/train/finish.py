"""The end of a run, after its last step: the final evaluation and its record, the closing lines
(val loss, gradient diversity, throughput), the last checkpoint made final before it is
reported, the Hugging Face export (OUT/hf_model), the trackers closed, the plots."""

from __future__ import annotations

from pathlib import Path

from merit_ds.data.prefetch import PrefetchLoader

from . import checkpoint as ckpt
from .export import export_after_training
from .launcher import rank0_print
from .metrics import RunLog, Throughput, compiled_graphs
from .run_config import RunConfig
from .tracking import plot_losses
from .trainer import LoopConfig, Trainer

__all__ = ["finish_run"]


def finish_run(trainer: Trainer, config: LoopConfig, meter: Throughput, log: RunLog, args, rc: RunConfig) -> None:
    """Everything after :meth:`.Trainer.train` returns; every rank calls it (the evaluation, the
    checkpoint and the export are collective)."""
    runner, plan = trainer.runner, rc.plan
    rank, world, out = runner.rank, runner.world, Path(args.out)
    final = trainer.evaluate()
    summary = meter.summary()
    log({"step": plan.steps, **final, **summary, **({"compile_graphs": compiled_graphs()} if config.count_graphs else {})},
        plan.steps)
    rank0_print(runner, f"final: val loss {final['val_loss']:.4f} +- {final['val_loss_se']:.4f} (standard error over "
                        f"{final['val_blocks']} blocks), perplexity {final['val_ppl']:.2f}")
    if rank == 0:
        div = [r for r in log.read() if r.get("gdiv_bound") is not None]
        if div:  # the last measurement: the batch bound beside the batch used
            d = div[-1]
            print(f"gradient diversity at step {d['step']}: Delta {d['gdiv_delta']:.3g} over n = {d['gdiv_n']} sequences, "
                  f"batch bound n x Delta {d['gdiv_bound']:.3g} (at most ~n; large-data extrapolation "
                  f"{d['gdiv_bound_data']:.3g}) vs the global batch {d['gdiv_batch']}", flush=True)
    if summary:
        rank0_print(runner, "throughput: " + ", ".join(
            f"{k} {v:.4g}" for k, v in summary.items()))
    if trainer.saved_step != plan.steps:
        trainer.save(config.ckpt_root, config.run_info, config.keep_last, background=True)
    trainer.finish_save()  # the last checkpoint final (or its error on every rank) before we report it
    if isinstance(trainer.train_loader, PrefetchLoader):
        trainer.train_loader.close()
    rank0_print(runner, f"checkpoint: {config.ckpt_root / ckpt.tag_for(plan.steps)}")
    if not args.no_export:  # every rank: the probe forward is collective under ZeRO 3
        export_after_training(trainer.engine, data=args.data, run=out, seq_len=rc.seq_len)  # prints "exported: DIR"
    if rank == 0:
        log.finish()
        if not args.no_plot:
            batch = plan.global_batch if rc.batch_table is None else f"schedule {rc.batch_table.schedule.spec}"
            png = plot_losses(log.read(), out / "loss.png", f"{rc.model} + {rc.label}, ZeRO {rc.zero_stage}, "
                                                            f"batch {batch} x {rc.seq_len}, {world} ranks")
            print(f"plot: {png}", flush=True)
            from .diversity import plot_diversity

            png = plot_diversity(log.read(), out / "diversity.png")
            if png:
                print(f"plot: {png}", flush=True)
