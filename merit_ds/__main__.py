import sys

from .cli import main

rc = main()
if sys.argv[1:2] == ["train"]:
    from .train.loop import exit_process

    exit_process(rc)
sys.exit(rc)
