"""Run an unmodified training script with merit_ds registered: ``python -m merit_ds.run SCRIPT [ARGS]``.

Scripts written for the HF Trainer or DeepSpeed need two things from merit_ds that they do not
do themselves: ``import merit_ds`` (so that DeepSpeed's JSON resolves ``"type": "MERIT"`` /
``"ShardedLAMB"``, the sharded step is registered and the Trainer/Accelerate guards are armed)
and, for ``--optim merit`` / ``--optim sharded_lamb``, the explicit
:func:`~merit_ds.integrations.hf_trainer.register_trainer_optim`. This runner does both, then
runs the script as ``python SCRIPT ARGS`` would (``__name__ == "__main__"``, ``sys.argv``,
the script's folder first on ``sys.path``), so no line of the script changes::

    python -m merit_ds.run run_clm.py --optim merit --model_name_or_path ... --output_dir out
    torchrun --nproc_per_node 8 -m merit_ds.run run_clm.py --optim merit --deepspeed ds.json ...
    deepspeed --num_gpus 8 --module merit_ds.run train.py --deepspeed_config ds_merit.json
    accelerate launch -m merit_ds.run run_clm.py --optim merit ...
    python -m merit_ds.run -m package.module ARGS        # a module instead of a file
    deepspeed --module merit_ds.run --replace-client-optimizer pretrain_gpt.py ... # Megatron-DeepSpeed

``--replace-client-optimizer`` (before the script): a script that passes its own optimizer to
``deepspeed.initialize`` while its JSON names ``"MERIT"`` / ``"ShardedLAMB"`` trains the JSON's
optimizer, built on the script's param groups (:mod:`merit_ds.integrations.client_optimizer`);
without it that call is refused, since DeepSpeed would silently train the client optimizer.

The ``deepspeed`` launcher puts ``--local_rank=N`` before the module's arguments; the runner
hands it to the script right after the script's name, where the launcher would have put it.
"""

from __future__ import annotations

import os
import runpy
import sys

__all__ = ["main", "prepare"]

USAGE = "usage: python -m merit_ds.run [--replace-client-optimizer] SCRIPT.py [ARGS ...] | -m MODULE [ARGS ...]"
#: Replace a client optimizer passed to deepspeed.initialize by the one the DeepSpeed JSON names
#: (scripts that always build their own, like Megatron-DeepSpeed's pretrain_gpt.py).
REPLACE_FLAG = "--replace-client-optimizer"
REPLACE_ENV = "MERIT_DS_REPLACE_CLIENT_OPTIMIZER"  # merit_ds.integrations.client_optimizer.ENV


def prepare() -> None:
    """Everything a script needs from merit_ds, without editing it."""
    import merit_ds  # noqa: F401  (JSON names, the sharded step, the Trainer/Accelerate guards)
    from merit_ds.build_locks import first_rank_of_node, warn_stale_build_locks

    if first_rank_of_node():  # once per node, before a DeepSpeed op build would hang
        warn_stale_build_locks()

    _cpu_ranks_for_accelerate()

    try:
        import transformers  # noqa: F401
    except ImportError:  # a plain DeepSpeed script: nothing to register with the Trainer
        return
    from merit_ds.integrations.hf_trainer import register_trainer_optim

    register_trainer_optim()


def _cpu_ranks_for_accelerate() -> None:
    """On a machine where DeepSpeed runs on its CPU accelerator (no GPU), tell Accelerate (and so
    the HF Trainer) that the ranks are CPU ranks: ``ACCELERATE_USE_CPU=true``, when several ranks
    were launched (torchrun, the deepspeed launcher) and no ``ACCELERATE_*`` variable is set (under
    ``accelerate launch`` its config decides). Without it, a script launched with several ranks and without ``--use_cpu`` gets no
    distributed backend from Accelerate (``PartialState._prepare_backend`` finds no GPU and, not
    told CPU, settles on a single process), so every rank thinks it is alone and DeepSpeed refuses
    the batch arithmetic ("train_batch_size is not equal to micro_batch_per_gpu *
    gradient_acc_step * world_size 4 != 4 * 1 * 2")."""
    import torch

    several_ranks = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1  # torchrun / the deepspeed launcher
    # accelerate launch sets ACCELERATE_* itself from its config (and with use_cpu DeepSpeed's plugin is
    # dropped: leave its choices alone)
    by_accelerate = any(k.startswith("ACCELERATE_") for k in os.environ)
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    if several_ranks and not by_accelerate and (os.environ.get("DS_ACCELERATOR") == "cpu" or not gpu):
        os.environ["ACCELERATE_USE_CPU"] = "true"


def _close_process_group() -> None:
    """After a script that finished normally on every rank, close the process group it left open
    (the HF Trainer does not). Left to interpreter exit, gloo's C++ state is torn down while the
    interpreter is finalizing and aborts the process now and then ("terminate called without an
    active exception", exit -6, no Python frame), failing a run that had finished. Measured on
    this path (``accelerate launch -m merit_ds.run`` of tests/_runner_hf_script.py, 2 CPU ranks):
    with ``destroy_process_group`` alone 2 of 11 runs aborted (the rank that does not write
    results, so reaches exit first, each time; CI saw the same); with the barrier and the
    collection below together, none of 40 (docs/design/field_notes.md, 'DeepSpeed on CPU').

    - the barrier (gloo only, where the abort was seen): no rank tears its connections down
      while a peer still finishes its last collective or writes its results. Not on NCCL: rank 0
      alone may still be uploading (``push_to_hub``) for longer than NCCL's watchdog waits;
    - ``gc.collect()``: objects in reference cycles (the Trainer's) that still hold tensors or
      communication state are freed now, while the interpreter is alive, not during its teardown.
    """
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1 and dist.get_backend() == "gloo":
            dist.barrier()
        dist.destroy_process_group()
    gc.collect()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher_args = []
    while argv and (argv[0].startswith("--local_rank") or argv[0] == REPLACE_FLAG):
        if argv[0] == REPLACE_FLAG:  # ours: the opt-in of merit_ds.integrations.client_optimizer
            os.environ[REPLACE_ENV] = "1"
            argv.pop(0)
        else:  # the deepspeed launcher's, for the script
            launcher_args.append(argv.pop(0))
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        print(__doc__.split("\n\n")[1], file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    module = None
    if argv[0] == "-m":
        if len(argv) < 2:
            print(USAGE, file=sys.stderr)
            return 2
        module, rest = argv[1], argv[2:]
        target = module
    else:
        target, rest = argv[0], argv[1:]
        if not os.path.isfile(target):
            print(f"merit_ds.run: error: no such script: {target}", file=sys.stderr)
            return 2
    prepare()
    sys.argv = [target, *launcher_args, *rest]
    try:
        try:
            if module is not None:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
                runpy.run_path(target, run_name="__main__")
        except SystemExit as done:
            if done.code in (None, 0):  # the usual ending, sys.exit(main()): a normal finish too
                _close_process_group()
            raise
        _close_process_group()
    finally:
        # DeepSpeed's CPU all-reduce segment of this rank (66 MiB in /dev/shm, never unlinked by
        # DeepSpeed), whether the script finished, failed or exited: peers keep their mappings
        from merit_ds.integrations.deepspeed_shm import release_cpu_allreduce_buffer

        release_cpu_allreduce_buffer(int(os.environ.get("RANK", "0")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
