import os
import sys

# Tests import their helpers (reference_merit, _dist) by bare name.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import pytest  # noqa: E402

from merit_ds.integrations.deepspeed_shm import stale_buffers  # noqa: E402


@pytest.fixture(autouse=True)
def _release_deepspeed_shm_buffers():
    """Remove the /dev/shm all-reduce buffers of the CPU jobs this test launched.

    DeepSpeed never unlinks them (merit_ds/integrations/deepspeed_shm.py); the training loop
    does at a clean exit, but workers of other tests, and jobs that fail, leave ~34 MiB per
    rank of RAM behind: a few hundred jobs exhausted a 24 GiB machine."""
    before = set(stale_buffers())
    yield
    for path in set(stale_buffers()) - before:
        try:
            path.unlink()
        except OSError:
            pass
