import os
import sys

# Tests import their helpers (reference_merit, _dist) by bare name.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # MERIT's Triton kernels (merit_ds/optim/segmented_triton.py) run under Triton's
    # interpreter on CPU tensors; Triton reads this when it is imported, so it is set before
    # anything can import it.
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

from merit_ds.integrations.deepspeed_shm import stale_buffers  # noqa: E402


def _release_new(before: set) -> None:
    for path in set(stale_buffers()) - before:
        try:
            path.unlink()
        except OSError:
            pass


@pytest.fixture(autouse=True, scope="module")
def _release_deepspeed_shm_buffers_of_module_fixtures():
    """The same for jobs that module-scoped fixtures launch (set up before any test's own
    fixture, so the per-test one below counts their buffers as already there)."""
    before = set(stale_buffers())
    yield
    _release_new(before)


@pytest.fixture(autouse=True)
def _release_deepspeed_shm_buffers():
    """Remove the /dev/shm all-reduce buffers of the CPU jobs this test launched.

    DeepSpeed never unlinks them (merit_ds/integrations/deepspeed_shm.py); the training loop
    does at a clean exit, but workers of other tests, and jobs that fail, leave 66 MiB per
    rank of RAM behind: a day of test runs left 15 GiB on a 24 GiB machine."""
    before = set(stale_buffers())
    yield
    _release_new(before)
