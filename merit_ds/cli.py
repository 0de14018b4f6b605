"""``merit-ds`` / ``python -m merit_ds``: ``plan`` (batch, memory, wall time), ``train``, ``export`` and ``study``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="merit-ds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from .train import plan as plan_mod

    p = sub.add_parser("plan", help="micro-batch, grad-accum, steps, memory per GPU per ZeRO stage, wall time")
    plan_mod.add_arguments(p)
    sub.add_parser("train", help="train a recipe (same as python -m merit_ds.train; see --help there)", add_help=False)
    from .train import export as export_mod

    e = sub.add_parser("export", help="a run's checkpoint as a Hugging Face model directory (from_pretrained, pipeline)")
    export_mod.add_arguments(e)
    sub.add_parser("study", help="the large-batch study (same as python -m merit_ds.study; see --help there)",
                   add_help=False)
    if argv[:1] == ["study"]:
        from .study.__main__ import main as study_main
        return study_main(argv[1:])
    if argv[:1] == ["train"]:
        from .train.loop import main as train_main
        return train_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "export":
        return export_mod.run_cli(args)
    try:
        return plan_mod.run(args)
    except ValueError as exc:  # BatchConfigError included: a clear message, no traceback
        print(f"merit-ds plan: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
