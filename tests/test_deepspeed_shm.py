"""merit_ds.integrations.deepspeed_shm: the name DeepSpeed gives its CPU all-reduce segment."""

import os
import subprocess
import sys

import pytest

from _dist import REPO_ROOT, dist_env, free_port
from merit_ds.integrations.deepspeed_shm import buffer_path, release_cpu_allreduce_buffer, stale_buffers

WORKER = """
import os, torch, deepspeed
deepspeed.init_distributed(dist_backend="gloo")
t = torch.ones(4)
deepspeed.comm.inference_all_reduce(t)  # the shm op's all-reduce (buffers made at init)
import torch.distributed as dist
dist.barrier()
if os.environ.get("RELEASE") == "1":
    from merit_ds.integrations.deepspeed_shm import release_cpu_allreduce_buffer
    assert release_cpu_allreduce_buffer(dist.get_rank())
dist.destroy_process_group()
"""


@pytest.mark.slow  # a deepspeed-launched job
@pytest.mark.parametrize("release", [False, True])
def test_deepspeed_leaves_its_segments_and_release_removes_them(tmp_path, release):
    """Two CPU ranks through DeepSpeed's comm: without the release both segments (named as
    buffer_path says) outlive the job; with it, none does."""
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    port = free_port()
    env = dist_env({"RELEASE": "1" if release else "0"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script)]
    env["LOCAL_SIZE"] = "2"  # what the deepspeed launcher exports; shm is used only when all ranks are local
    r = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    left = stale_buffers(port)
    if release:
        assert left == []
    else:
        assert left == [buffer_path(0, addr="127.0.0.1", port=str(port)), buffer_path(1, addr="127.0.0.1", port=str(port))]
        assert all(p.stat().st_size > 32 * 2**20 for p in left)  # the RAM each leaked segment holds


def test_release_is_quiet_when_there_is_no_segment(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    assert not buffer_path(0).exists()
    assert release_cpu_allreduce_buffer(0) is False
