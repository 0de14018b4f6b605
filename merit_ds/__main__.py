import os
import sys

from .cli import main

rc = main()
if sys.argv[1:2] == ["train"]:  # see merit_ds/train/__main__.py
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
sys.exit(rc)
