"""MERIT for megatron-core (issue 20): the factory, the DistributedOptimizer pieces, refusals.

megatron-core's DDP buffers and DistributedOptimizer need CUDA; what runs on CPU runs here with
the real package: its range maps (tests/megatron_worker.py, real gloo ranks, data-parallel 2-4,
tensor-parallel 2 from its own parallel_state), its optimizer-building code with MERIT inside.
The whole factory on a GPT with the distributed optimizer on and off: benchmarks/gpu_smoke.sh.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from _dist import TESTS_DIR, launch  # noqa: E402
from merit_ds import megatron as mm  # noqa: E402
from merit_ds.optim import LAMB, MERIT  # noqa: E402


def _groups():
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    common = {"is_expert_parallel": False, "is_decoupled_lr": False}
    return [{"params": [w], "wd_mult": 1.0, "lr_mult": 1.0, **common},
            {"params": [b], "wd_mult": 0.0, "lr_mult": 0.5, **common}]


@pytest.mark.parametrize("name, cls", [("merit", MERIT), ("lamb", LAMB)])
def test_megatron_core_builds_our_optimizer_with_its_hyperparameters(monkeypatch, name, cls):
    import megatron.core.optimizer as mco
    from megatron.core.optimizer import OptimizerConfig

    built = {}
    # its FP32Optimizer wrapper allocates on CUDA: capture what it was handed instead
    monkeypatch.setattr(mco, "FP32Optimizer", lambda opt, config, init: built.setdefault("inner", opt))
    monkeypatch.setattr(mco.parallel_state, "get_tensor_model_parallel_group", lambda *a, **k: None)  # not initialised
    cfg = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8)
    groups = _groups()
    with mm._inner_optimizer(cls):
        mco._get_megatron_optimizer_based_on_param_groups(cfg, model_chunks=[], param_groups=groups)
    inner = built["inner"]
    assert type(inner) is cls
    g0, g1 = inner.param_groups
    assert (g0["lr"], g0["betas"], g0["eps"], g0["weight_decay"]) == (1e-2, (0.9, 0.95), 1e-8, 0.1)
    assert g1["lr_mult"] == 0.5 and g1["wd_mult"] == 0.0  # Megatron's group keys ride along
    # the patch is undone
    assert mco.Adam is not None and not isinstance(mco.Adam, mm._InnerAsAdam)


def test_precision_aware_keywords_are_refused():
    with pytest.raises(mm.MegatronNotSupported, match="exp_avg_dtype"):
        mm._InnerAsAdam(MERIT)(params=[torch.nn.Parameter(torch.ones(2))], lr=1e-3, exp_avg_dtype=torch.bfloat16)


@pytest.mark.parametrize("field, value, match", [
    ("use_precision_aware_optimizer", True, "use_precision_aware_optimizer"),
    ("optimizer_cpu_offload", True, "optimizer_cpu_offload"),
    ("optimizer", "sgd", "config.optimizer='sgd'"),
])
def test_unsupported_megatron_options_are_named(field, value, match):
    from types import SimpleNamespace

    cfg = SimpleNamespace(use_precision_aware_optimizer=False, optimizer_cpu_offload=False, optimizer="adam")
    setattr(cfg, field, value)
    with pytest.raises(mm.MegatronNotSupported, match=match):
        mm._check_config(cfg)


def test_pieces_follow_megatron_cores_ranges():
    from megatron.core.optimizer.distrib_optimizer import Range

    w = torch.nn.Parameter(torch.zeros(5, 4))
    w.tensor_model_parallel, w.partition_dim = True, 0
    main = torch.zeros(7)
    out = mm.pieces_of_distributed_optimizer([w], [main], lambda p: Range(9, 16), dp_group="DP", tp_group=None)
    param, piece = out[main]
    assert param is w and (piece.shape, piece.start, piece.numel, piece.process_group) == ((5, 4), 9, 7, "DP")
    assert piece.split is None and piece.tp_rank is None  # no tensor parallelism here
    with pytest.raises(ValueError, match="does not match"):
        mm.pieces_of_distributed_optimizer([w], [torch.zeros(6)], lambda p: Range(9, 16), dp_group=None)


def test_without_megatron_core_the_import_says_how_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("megatron"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[megatron\]"'):
        mm._require_megatron()


@pytest.mark.slow
@pytest.mark.parametrize("world, tp, extra", [(2, 1, []), (3, 1, []), (4, 2, []), (4, 2, ["--optimizer", "lamb"])])
def test_distributed_optimizer_pieces_are_exact(world, tp, extra):
    r = launch(TESTS_DIR / "megatron_worker.py", nprocs=world, args=["--tp", str(tp), *extra], timeout=300)
    assert r["cut_mid_row"], r  # some matrix really is cut mid-row by the data-parallel split
    assert r["pieces"] < r["params"]  # and some rank holds no piece of some parameter
    assert r["all_reduces"] == [1, 1, 1]
    assert r["diff"] == [0.0, 0.0, 0.0], r  # bitwise single-device, every step


@pytest.mark.slow
def test_a_group_empty_on_one_rank_still_meets_the_others():
    """A param group wholly inside one rank's range is empty on the other: that rank must still
    reserve the group's statistics (else the buffers differ in size: a hang, or gloo's error)."""
    r = launch(TESTS_DIR / "megatron_worker.py", nprocs=2, args=["--tp", "1", "--small-group"], timeout=300)
    assert r["some_rank_has_an_empty_group"], r
    assert r["diff"] == [0.0, 0.0, 0.0] and r["all_reduces"] == [1, 1, 1], r


@pytest.mark.slow
def test_naive_pieces_are_not_exact():
    r = launch(TESTS_DIR / "megatron_worker.py", nprocs=2, args=["--tp", "1", "--naive"], timeout=300)
    assert max(r["diff_matrices"]) > 1e-4, r


def test_gpu_smoke_megatron_section_dry_runs_on_cpu():
    """As far as the CPU allows: imports, megatron-core's process groups and the GPT built on the
    CPU; it stops before megatron-core's CUDA-only forward and DDP, saying so."""
    import json
    import subprocess
    import sys

    from _dist import REPO_ROOT, dist_env, free_port

    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); import gpu_smoke; "
            "print(json.dumps(gpu_smoke.megatron_factory('cpu')))")
    env = dist_env({"MASTER_PORT": str(free_port())})
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "the model was built on the CPU" in out["skipped"] and "nothing stepped" in out["skipped"]


def test_config_optimizer_names_which_merit_ds_optimizer():
    from types import SimpleNamespace

    assert mm._optimizer_name(SimpleNamespace(optimizer="adam"), "merit") == "merit"  # Megatron's default
    assert mm._optimizer_name(SimpleNamespace(optimizer="lamb"), "merit") == "lamb"   # --optimizer lamb
    assert mm._optimizer_name(SimpleNamespace(optimizer="merit"), "merit") == "merit"


@pytest.mark.slow
@pytest.mark.parametrize("world, tp, optimizer, path, extra", [(2, 1, "lamb", "torch", []), (4, 2, "lamb", "te", []),
                                                               (3, 1, "merit", "torch", []),
                                                               (2, 1, "lamb", "te", ["--small-group"])])
def test_megatron_checkpoint_round_trip_resumes_bitwise(world, tp, optimizer, path, extra):
    """Saved after 2 steps by megatron-core's own DistributedOptimizer checkpoint code, restored into
    a fresh optimizer on wiped pieces, 2 more steps: bitwise the uninterrupted single-device run,
    every step, and every piece counts 4 steps. ``torch``: megatron-core without TE/Apex gives every
    piece's state one shared step tensor (an in-place += advanced it once per piece: 12 after 4 steps
    with 5 pieces, and LAMB off by 1.9e-3 at step 4); ``te``: with TE/Apex it keeps the count only in
    the param groups (without merit_ds's group step, a resumed LAMB restarted its bias correction).
    ``--small-group``: a group with no piece on one rank goes through the save and load too."""
    r = launch(TESTS_DIR / "megatron_worker.py", nprocs=world, timeout=300,
               args=["--tp", str(tp), "--optimizer", optimizer, "--resume-after", "2", "--megatron-path", path, *extra])
    assert r["cut_mid_row"] and r["pieces"] < r["params"], r  # the pieces really are cut
    assert r["shared_step_tensors_after_load"] == (1 if path == "torch" else 0), r  # megatron-core's two paths
    assert r["diff"] == [0.0, 0.0, 0.0, 0.0] and r["all_reduces"] == [1, 1, 1, 1], r
    assert r["piece_steps"] == [4.0] and set(r["group_steps"]) == {4}, r
    if extra:
        assert r["some_rank_has_an_empty_group"], r


@pytest.mark.slow
def test_megatron_checkpoint_without_the_group_step_restarts_lambs_bias_correction():
    """Negative control: the same round trip with the step dropped from the saved param groups (what
    megatron-core with TE/Apex saved before merit_ds kept a group step): the pieces count from 0
    again and LAMB's bias correction moves the weights off the reference from the first resumed step."""
    r = launch(TESTS_DIR / "megatron_worker.py", nprocs=2, timeout=300,
               args=["--tp", "1", "--optimizer", "lamb", "--resume-after", "2", "--megatron-path", "te",
                     "--drop-group-step"])
    assert r["diff"][:2] == [0.0, 0.0] and min(r["diff"][2:]) > 1e-3, r
    assert r["piece_steps"] == [2.0], r
