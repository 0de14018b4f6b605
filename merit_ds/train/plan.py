"""``merit-ds plan``: batch arithmetic, memory per GPU per ZeRO stage, and wall time.

Memory (ZeRO paper accounting, Rajbhandari et al. 2020, section 3.1; Psi = parameters, Nd =
data-parallel ranks). Mixed precision bf16 keeps 2-byte params and grads plus K = 12 bytes/param
of optimizer state (fp32 master 4 + MERIT's m 4 + v 4; MERIT has Adam's state, nothing more).
The bf16 configs accumulate gradients in fp32 (``grad_accum_dtype: fp32``): ZeRO-1 runs
DeepSpeed's BF16_Optimizer, whose fp32 gradient buffer is not partitioned (g = 2 + 4 bytes/param,
per GPU); ZeRO-2/3 keep an fp32 gradient partition (g = 4 bytes/param, divided by Nd).
fp32 training: params 4, grads 4, K = 8 (m, v; the params are the master copy)::

    stage 0 (DDP)   (p + g + K) Psi
    stage 1         (p + g) Psi + K Psi / Nd      (bf16: g = 6)
    stage 2         p Psi + (g + K) Psi / Nd      (bf16: g = 4)
    stage 3         (p + g + K) Psi / Nd          (bf16: g = 4)     (+ the layers gathered live, not counted)
    offload         optimizer states (K Psi / Nd) live in CPU memory instead of the GPU

Activations per micro-batch: MEASURED, not a rule of thumb (:mod:`.activations`): the bytes
autograd saves for backward in the actual model (1- and 2-layer builds of the preset at a
64-token sequence, so one layer's share and the rest separate), scaled to the micro-batch's
tokens (nothing grows with ``s^2`` under SDPA). GPT-2 with the presets' ``gelu_pytorch_tanh`` and
no KV cache saves 64.08 s b h bytes per layer in fp32 and 32.07 in bf16 (``gelu_new`` 112: the
34 s b h of Korthikanti et al. undercounts HF GPT-2 by 2x); the rest (~4.1 s b V bytes) is
mostly the plain loss's fp32 log-softmax, 4 V bytes per token. With full activation
checkpointing each layer keeps only its input (``e s b h`` bytes) and one layer is live again
during backward.

The loss (``loss="lean"``, the default; :mod:`.lean_loss`): the output projection and the
cross-entropy chunked over C = 2^26 // V tokens (1,334 for V = 50,304). It saves one fp32
log-sum-exp per token instead of the fp32 log-softmax, ``(4 V - 4)`` bytes per token fewer than
the measurement (which runs the plain loss; the difference is measured in
``tests/test_lean_loss.py``), and its backward holds one chunk's fp32 logits and their gradient,
``(4 + e') C V`` bytes, and an fp32 accumulator for the output weight's gradient plus one chunk's
product, ``(4 + e') V h`` (``e' = e`` in bf16, 0 in fp32, where the copies are no-ops). ZeRO-3
rows keep the plain loss: the lm_head weight is a partitioned shard outside its module's forward
and :func:`.lean_loss.lean_lm_loss` falls back to ``model.lm_head(h)``. ``loss="plain"`` (today's
``lm_loss(engine(input_ids=x).logits, y)``): the measured rest plus what the loss's backward
holds next to the saved log-softmax, ``8 s b V`` bytes in fp32 and bf16 alike: nll_loss's
gradient and log_softmax's, both fp32 and full-vocabulary (counted by a TorchDispatchMode in
``benchmarks/bench_loss_memory.py``: the plain loss peaks at 12 s b V with the saved 4; the
former ``(4 + e) s b V`` counted the bf16 cast instead and undercounted bf16 by 2 s b V).

DeepSpeed's communication buffers (``comm``), per GPU, sized from DeepSpeed's own defaults
(:func:`deepspeed_bucket_defaults`: ``reduce_bucket_size`` and ``allgather_bucket_size`` of
``deepspeed.runtime.zero.config.DeepSpeedZeroConfig``, 5e8 elements each in DeepSpeed 0.19.8)
and the overlap_comm that merit_ds's configs set (:mod:`.ds_config`: on at stages 2 and 3, off at
1), as DeepSpeed 0.19.8 allocates them: ZeRO-1/2 (``stage_1_and_2.setup_buckets``, during backward,
next to the activations) ``reduce_bucket_size`` elements of the gradient dtype, twice with
overlap_comm (double buffering); ZeRO-1 in bf16 runs BF16_Optimizer instead, which has no such
bucket; ZeRO-3 one ``reduce_bucket_size`` buffer of the communication dtype, from initialisation.
``allgather_bucket_size`` allocates nothing: ZeRO-1/2 gather the updated partitions in place into
the flat parameter buffer (``all_gather_into_tensor``; the fallback narrows views of it), so it is
shown in :func:`comm_bucket_bytes`'s reasoning but counts 0. Stage 0 reduces after backward, when
the activations are gone (not counted).

Optimizer scratch: on a GPU partition MERIT's sharded step runs its Triton kernels
(merit_ds.optim.segmented_triton): the only thing they keep is a tile table of 128 bytes per
4,096 partition elements (~0.03 bytes/param / Nd), counted here; without triton the torch form
(merit_ds.optim.segmented) runs instead and its chunk temporaries peak near 2.5 bytes/param / Nd,
not counted. LAMB's sharded step keeps three partition-sized fp32 work buffers (12 bytes/param /
Nd; ZeRO-0: the whole model); none under CPU offload (MERIT: the fused CPU kernel); DeepSpeed's
AdamW (FusedAdam) none. Not modelled: allocator overhead, ZeRO-3's prefetch and live-parameter
buffers, the CUDA context; hence the planner fills at most ``HEADROOM`` of the GPU.

Wall time: :func:`flops_per_token` x D tokens (``6 N + 12 L h s`` per token: forward +
backward, attention included, PaLM's MFU convention; the training loop's MFU uses the same count)
divided by ``GPUs x peak bf16 dense FLOP/s x MFU``. MFU (model FLOPs utilisation) is an
assumption you state (default 0.40; GPT-2-sized models with SDPA typically reach 0.3-0.5).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Optional

from .batch import BatchConfigError, divisors, plan_batch
from .batch_schedule import BatchScheduleError, build_step_table, parse_batch_schedule, warmup_steps_by_tokens
from merit_ds.optim import registry

from .lean_loss import default_chunk_tokens
from .presets import (TOKEN_BUDGET, ModelPreset, get_model_preset, get_optim_preset, lr_rule_note, optimizer_label,
                      optimizer_names, parse_batch, scaled_lr, warmup_steps)

__all__ = ["GPUS", "LOSSES", "DEFAULT_LOSS", "MemoryEstimate", "memory_per_gpu", "activation_bytes", "loss_work_bytes",
           "comm_bucket_bytes", "comm_bytes_per_step", "deepspeed_bucket_defaults", "deepspeed_zero_defaults",
           "recommended_stage", "recipe_zero_stage", "recipe_micro_batch", "optimizer_scratch_bytes", "flops_per_token",
           "wall_time_seconds", "make_plan", "format_plan"]

GiB = 1024 ** 3
HEADROOM = 0.90
DEFAULT_MFU = 0.40
#: The loss the memory model can assume: "lean" (:mod:`.lean_loss`, chunked) or "plain" (full logits).
LOSSES = ("lean", "plain")
#: ``make_plan``'s and ``merit-ds plan``'s default (ds_configs/generate.py sizes the recipes with it).
DEFAULT_LOSS = "lean"

#: Peak dense bf16 tensor-core FLOP/s (no sparsity) and nominal memory, from NVIDIA datasheets.
GPUS: dict[str, dict] = {
    "a100-40gb": {"peak_flops": 312e12, "mem_gib": 40},
    "a100": {"peak_flops": 312e12, "mem_gib": 80},
    "h100": {"peak_flops": 989e12, "mem_gib": 80},        # H100 SXM
    "h100-pcie": {"peak_flops": 756e12, "mem_gib": 80},
    "h200": {"peak_flops": 989e12, "mem_gib": 141},       # H200 SXM: H100's compute, more memory
}


@dataclass(frozen=True)
class MemoryEstimate:
    stage: int
    offload: bool
    params: float          # bytes per GPU
    grads: float
    optimizer: float       # on the GPU (0 with offload)
    optimizer_cpu: float   # per GPU, in host memory (offload only)
    activations: float
    scratch: float = 0.0   # the optimizer's work buffers on the GPU
    comm: float = 0.0      # DeepSpeed's gradient-reduction buckets

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.scratch + self.comm + self.activations


def _bytes_per_param(precision: str) -> tuple[int, int, int]:
    if precision == "bf16":
        return 2, 2, 12
    if precision == "fp32":
        return 4, 4, 8
    raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")


def loss_work_bytes(model: ModelPreset, tokens: int, *, precision: str = "bf16", loss: str = "lean") -> float:
    """What the loss holds beyond the saved activations (module docstring): plain, nll_loss's and
    log_softmax's fp32 gradients, ``8 N V`` (measured peak: these two next to the saved fp32
    log-softmax, in fp32 and bf16 alike); lean, one chunk of fp32 logits and
    their gradient's cast, ``(4 + e') C V``, and the output weight's fp32 gradient accumulator with
    one chunk's product, ``(4 + e') V h`` (``e' = e`` in bf16, 0 in fp32)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    e = 2 if precision == "bf16" else 4
    v = model.vocab_size
    if loss == "plain":
        return float(8 * tokens * v)
    e_copy = e if e != 4 else 0
    chunk = min(default_chunk_tokens(v), tokens)
    return float((4 + e_copy) * chunk * v + (4 + e_copy) * v * model.n_embd)


def activation_bytes(model: ModelPreset, micro_batch: int, seq_len: int, *, precision: str = "bf16",
                     activation_checkpointing: bool = False, loss: str = "lean") -> float:
    """Activation memory of one micro-batch: measured saved bytes, scaled (module docstring),
    with the loss's share as ``loss`` ("lean" | "plain") holds it."""
    from .activations import activation_model

    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    e = 2 if precision == "bf16" else 4
    act = activation_model(model, precision)
    tokens = seq_len * micro_batch
    per_layer = act.per_layer_per_token * tokens
    if activation_checkpointing:
        layers = model.n_layer * e * tokens * model.n_embd + per_layer
    else:
        layers = model.n_layer * per_layer
    rest = act.rest_per_token * tokens
    if loss == "lean":
        rest -= (4 * model.vocab_size - 4) * tokens  # the fp32 log-softmax, replaced by one fp32 lse per token
    return layers + rest + loss_work_bytes(model, tokens, precision=precision, loss=loss)


_BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size")
#: the other DeepSpeedZeroConfig defaults the communication model reads (see comm_bytes_per_step)
_COMM_KEYS = ("use_multi_rank_bucket_allreduce", "max_live_parameters", "max_reuse_distance")


@functools.lru_cache(maxsize=1)
def deepspeed_zero_defaults() -> dict[str, int]:
    """Defaults of the ``DeepSpeedZeroConfig`` fields the planner models, as the installed
    DeepSpeed defines them in ``deepspeed/runtime/zero/config.py`` (0.19.8: ``reduce_bucket_size``
    and ``allgather_bucket_size`` 5e8 elements, ``use_multi_rank_bucket_allreduce`` true,
    ``max_live_parameters`` (``stage3_max_live_parameters``) and ``max_reuse_distance`` 1e9).
    Read from the model when deepspeed is already imported, else from that file's syntax tree:
    importing deepspeed prints its accelerator choice on stdout, which would corrupt
    ``merit-ds plan --json``."""
    import sys

    keys = _BUCKET_KEYS + _COMM_KEYS
    if "deepspeed.runtime.zero.config" in sys.modules:
        fields = sys.modules["deepspeed.runtime.zero.config"].DeepSpeedZeroConfig.model_fields
        return {k: int(fields[k].default) for k in keys}
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("deepspeed")  # a top-level package: found, not imported
    if spec is None or spec.origin is None:
        raise RuntimeError("deepspeed is not installed: the planner reads its ZeRO defaults from it")
    source = Path(spec.origin).parent / "runtime" / "zero" / "config.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    out: dict[str, int] = {}
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef) and cls.name == "DeepSpeedZeroConfig":
            for node in cls.body:
                if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                        and node.target.id in keys and node.value is not None):
                    continue
                arg = node.value                                   # True, or Field(pp_int(5e8), ...)
                if isinstance(arg, ast.Call) and arg.args:
                    arg = arg.args[0]
                    if isinstance(arg, ast.Call) and arg.args:     # pp_int(5e8)
                        arg = arg.args[0]
                out[node.target.id] = int(ast.literal_eval(arg))
    if set(out) != set(keys):
        raise RuntimeError(f"could not read {keys} defaults from {source} (found {out})")
    return out


def deepspeed_bucket_defaults() -> dict[str, int]:
    """``reduce_bucket_size`` and ``allgather_bucket_size`` (elements), DeepSpeed's defaults."""
    d = deepspeed_zero_defaults()
    return {k: d[k] for k in _BUCKET_KEYS}


def comm_bucket_bytes(stage: int, precision: str = "bf16", *, overlap_comm: Optional[bool] = None) -> float:
    """GPU bytes of DeepSpeed's gradient-reduction bucket(s) during backward (module docstring).

    ``overlap_comm`` defaults to what merit_ds's configs set (:func:`.ds_config.make_ds_config`: on
    at stages 2 and 3). ZeRO-1/2: ``reduce_bucket_size`` elements of the gradient dtype (fp32
    with fp32 training; bf16 at ZeRO-2 in bf16, whose fp32 accumulation lives in the partition),
    two of them with overlap_comm; ZeRO-1 in bf16 (BF16_Optimizer) none; ZeRO-3 one of the
    communication dtype. ``allgather_bucket_size`` counts 0: the updated partitions are gathered
    in place into the flat parameter buffer, no bucket is allocated for it."""
    if stage == 0 or (stage == 1 and precision == "bf16"):
        return 0.0
    e = 2 if precision == "bf16" else 4
    reduce = deepspeed_bucket_defaults()["reduce_bucket_size"]
    if stage == 3:
        return float(reduce * e)
    overlap = (stage == 2) if overlap_comm is None else overlap_comm
    return float(reduce * e * (2 if overlap else 1))


def optimizer_scratch_bytes(n_params: int, world: int, stage: int, *, offload: bool = False,
                            optimizer: str = "merit") -> float:
    """GPU bytes of the optimizer's own work memory, from its registered model
    (:attr:`merit_ds.optim.spec.OptimizerSpec.gpu_scratch_bytes` of the partition: MERIT, the
    Triton step's tile table, ~0.03 bytes per partition element; LAMB, three partition-sized
    fp32 buffers; DeepSpeed's fused AdamW none); none under offload (the step runs on the CPU)."""
    if offload:
        return 0.0
    partition = -(-int(n_params) // (world if stage >= 1 else 1))
    return float(registry.get(optimizer).gpu_scratch_bytes(partition))


def memory_per_gpu(n_params: int, world: int, stage: int, *, precision: str = "bf16",
                   offload: bool = False, activations: float = 0.0, optimizer: str = "merit",
                   comm_buckets: bool = True) -> MemoryEstimate:
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if offload and stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3")
    p, g, k = _bytes_per_param(precision)
    psi = float(n_params)
    params = p * psi / (world if stage >= 3 else 1)
    grads = g * psi / (world if stage >= 2 else 1)
    if precision == "bf16" and stage >= 1:
        # the configs accumulate gradients in fp32 (``data_types.grad_accum_dtype``, DeepSpeed 0.19.8):
        # ZeRO-1 -> BF16_Optimizer, bf16 grads plus an unpartitioned fp32 buffer (2 + 4 bytes/param);
        # ZeRO-2/3 -> an fp32 gradient partition in place of the bf16 one (4 bytes/param / Nd)
        grads = 6 * psi if stage == 1 else 4 * psi / world
    opt = k * psi / (world if stage >= 1 else 1)
    scratch = optimizer_scratch_bytes(n_params, world, stage, offload=offload, optimizer=optimizer)
    comm = comm_bucket_bytes(stage, precision) if comm_buckets else 0.0
    return MemoryEstimate(stage, offload, params, grads, 0.0 if offload else opt, opt if offload else 0.0, activations,
                          scratch, comm)


def flops_per_token(model: ModelPreset, seq_len: int) -> float:
    """Model FLOPs per trained token, forward + backward, attention included (PaLM, Chowdhery et
    al. 2022, appendix B): ``6 N + 12 L h s``, ``N`` the parameters that multiply (all but the
    position embedding; the tied token embedding counts once, as the LM head), ``12 L h s`` the
    attention scores and their weighted sum (no causal discount). The training loop's MFU and
    ``merit-ds plan`` both use it."""
    n_matmul = model.n_params - model.seq_len * model.n_embd
    return 6.0 * n_matmul + 12.0 * model.n_layer * model.n_embd * seq_len


def wall_time_seconds(flops_per_tok: float, tokens: float, gpus: int, peak_flops: float, mfu: float) -> float:
    if not 0 < mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1], got {mfu}")
    return flops_per_tok * tokens / (gpus * peak_flops * mfu)


def comm_bytes_per_step(n_params: int, world: int, stage: int, grad_accum: int, *, precision: str = "bf16") -> float:
    """Bytes each GPU sends per optimizer step in ZeRO's gradient and parameter collectives, as
    DeepSpeed 0.19.8 issues them under merit_ds's configs (:func:`.ds_config.make_ds_config`),
    with ring counts (an all-reduce of S bytes sends ``2 (N-1)/N S`` per rank, a reduce-scatter
    or an all-gather ``(N-1)/N S``); ``f = (N-1)/N``, ``Psi`` parameters, ``b`` bytes of the
    compute dtype (bf16: 2, fp32: 4; the gradients travel in it even where they accumulate in
    fp32), ``k`` micro-batches per step:

    - ZeRO 0: one all-reduce of the gradients at the accumulation boundary: ``2 f Psi b``;
    - ZeRO 1 (DeepSpeedZeroOptimizer, and BF16_Optimizer in bf16 with fp32 accumulation): one
      all-reduce of the gradients at the boundary, then an all-gather of the updated parameters:
      ``3 f Psi b``;
    - ZeRO 2: the gradients are reduced at *every* micro-batch, and by an all-reduce of the whole
      bucket (DeepSpeed's ``use_multi_rank_bucket_allreduce``, default true; false reduces each
      slice to its owner, ``k + 1``), plus the all-gather: ``(2 k + 1) f Psi b``;
    - ZeRO 3: per micro-batch the parameters are gathered once and the gradients
      reduce-scattered, ``2 k f Psi b``, where forward's gathered parameters stay for backward:
      DeepSpeed releases one whose next use lies more than ``stage3_max_reuse_distance`` (1e9)
      parameters ahead in its module trace, and the longest distance, from a layer's forward to
      its backward, is under ``2 Psi`` (every parameter traversed at most twice in between), so
      ``2 Psi <= 1e9`` keeps them all (GPT-2 Medium: 0.71e9); beyond it some are gathered again,
      up to ``3 k f Psi b`` (counted so: an upper bound). Unmeasured: whether the trace settles
      under ``--compile``.

    Every count is measured: ``tests/test_comm_volume.py`` records the collectives DeepSpeed
    issues in one step at each stage, precision and accumulation and compares with this
    function. MERIT's statistics all-reduce (0.3% of GPT-2's parameters) and the loss reductions
    are not counted."""
    f = (world - 1) / world if world > 1 else 0.0
    b = 2 if precision == "bf16" else 4
    d = deepspeed_zero_defaults()
    k = float(grad_accum)
    if stage == 0:
        per = 2.0
    elif stage == 1:
        per = 3.0
    elif stage == 2:
        per = (2.0 * k if d["use_multi_rank_bucket_allreduce"] else k) + 1.0
    else:
        live = 2 * n_params <= d["max_reuse_distance"]
        per = (2.0 if live else 3.0) * k
    return per * f * n_params * b


def recommended_stage(rows: list[dict], precision: str) -> Optional[dict]:
    """The planner's ZeRO stage among ``make_plan``'s rows: the one that fits (no offload) and
    sends the fewest bytes per step (under a batch schedule: per step on average over the run),
    ties going to the lower stage; ZeRO-0 in bf16 only without accumulation (DeepSpeed
    accumulates its gradients in bf16: it refuses fp32 accumulation without ZeRO, and the
    configs accumulate in fp32 from ZeRO-1 on)."""
    ok = [r for r in rows if r["fits"] and not r["offload"] and r.get("comm_gb_per_step") is not None
          and not (r["stage"] == 0 and precision == "bf16" and r.get("max_grad_accum", r["grad_accum"]) > 1)]
    if not ok:
        return None
    return min(ok, key=lambda r: (round(r["comm_gb_per_step"], 6), r["stage"]))


def fitting_micro_batch(model: ModelPreset, per_rank: int, seq_len: int, *, mem_bytes: float, world: int, stage: int,
                        precision: str = "bf16", offload: bool = False, activation_checkpointing: bool = False,
                        optimizer: str = "merit", loss: str = DEFAULT_LOSS) -> tuple[Optional[int], float]:
    """The largest micro-batch dividing ``per_rank`` whose planned memory fits ``HEADROOM`` of a
    GPU of ``mem_bytes``, and that plan's bytes (what the training entry uses when no micro-batch
    is given on CUDA). ``(None, bytes at micro-batch 1)`` when even 1 does not fit."""
    row_loss = "plain" if stage == 3 else loss

    def total(m):
        act = activation_bytes(model, m, seq_len, precision=precision, activation_checkpointing=activation_checkpointing,
                               loss=row_loss)
        return memory_per_gpu(model.n_params, world, stage, precision=precision, offload=offload, activations=act,
                              optimizer=optimizer).total

    m = _pick_micro_batch(per_rank, lambda mm: total(mm) <= mem_bytes * HEADROOM)
    return m, total(m if m is not None else 1)


def _pick_micro_batch(per_rank: int, fits) -> Optional[int]:
    for m in sorted(divisors(per_rank), reverse=True):
        if fits(m):
            return m
    return None


def make_plan(model: str = "gpt2-small", batch="480", tokens: float = TOKEN_BUDGET, nodes: int = 1,
              gpus_per_node: int = 8, gpu: str = "h100", *, precision: str = "bf16",
              micro_batch: Optional[int] = None, activation_checkpointing: bool = False,
              mfu: float = DEFAULT_MFU, seq_len: Optional[int] = None, optimizer: str = "merit",
              batch_schedule: Optional[str] = None, loss: str = DEFAULT_LOSS) -> dict:
    """``optimizer`` (merit | lamb | adamw) sets the peak lr shown and the scratch buffers (MERIT
    the Triton step's tile table, ~0.03 bytes per partition element; LAMB: three partition-sized
    fp32 buffers on the GPU; AdamW none); the state is the same
    for all three (fp32 master, m and v: 12 bytes/param in bf16).

    ``batch_schedule`` (the training loop's ``--batch-schedule`` syntax, which replaces
    ``batch``): the steps come from the schedule's step table (the loop's own,
    :func:`~.batch_schedule.build_step_table`), the warmup is the same share of the tokens as
    the loop's, and the micro-batch is one that every phase's batch splits into over the
    ranks (the loop keeps the micro-batch and changes only the accumulation), so the memory
    table holds for the whole run; ``phases`` lists each phase's steps and accumulation.

    ``loss``: "lean" (:mod:`.lean_loss`, chunked; ZeRO-3 rows keep the plain loss, which the lean
    path falls back to there) or "plain" (the full logits, ``lm_loss(engine(input_ids=x).logits, y)``)."""
    preset = get_model_preset(model)
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {sorted(GPUS)}")
    if nodes <= 0 or gpus_per_node <= 0:
        raise BatchConfigError(f"nodes and GPUs per node must be positive, got {nodes} x {gpus_per_node}")
    world = nodes * gpus_per_node
    if seq_len is not None and seq_len <= 0:
        raise BatchConfigError(f"--seq-len must be a positive number of tokens, got {seq_len} (leave it out for the "
                               f"model's {preset.seq_len})")
    if micro_batch is not None and micro_batch <= 0:
        raise BatchConfigError(f"--micro-batch must be a positive number of sequences, got {micro_batch}")
    if not 0 < mfu <= 1:
        raise BatchConfigError(f"--mfu is a fraction of the GPU's peak, in (0, 1], got {mfu}")
    if loss not in LOSSES:
        raise BatchConfigError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    seq_len = seq_len or preset.seq_len
    tokens = int(tokens)
    table = None
    if batch_schedule is not None:
        try:
            schedule = parse_batch_schedule(batch_schedule)
        except BatchScheduleError as exc:
            raise BatchConfigError(str(exc)) from None
        global_batch = schedule.first_batch
        # the batches every step may take move in multiples of this many sequences
        unit = schedule.quantum
        if unit % world:
            raise BatchConfigError(
                f"batch schedule {schedule.spec}: its batches move in multiples of {unit} sequences, which "
                f"{world} ranks cannot split evenly; use sizes that are multiples of {world}")
        table = build_step_table(schedule, seq_len, token_budget=tokens)
    else:
        global_batch = parse_batch(batch)
        unit = global_batch
    base = plan_batch(global_batch, world, seq_len, token_budget=tokens)  # validates divisibility/budget
    per_rank = global_batch // world
    per_rank_unit = unit // world  # what every step's per-GPU batch is a multiple of
    budget = GPUS[gpu]["mem_gib"] * GiB * HEADROOM
    n = preset.n_params
    optim = get_optim_preset(model, optimizer)
    steps = table.steps if table is not None else base.steps
    trained = table.total_tokens if table is not None else steps * base.tokens_per_step
    rows = []
    for stage, offload in ((0, False), (1, False), (2, False), (3, False), (2, True), (3, True)):
        row_loss = "plain" if stage == 3 else loss  # ZeRO-3: lean_lm_loss falls back to the plain loss

        def est(m):
            act = activation_bytes(preset, m, seq_len, precision=precision,
                                   activation_checkpointing=activation_checkpointing, loss=row_loss)
            return memory_per_gpu(n, world, stage, precision=precision, offload=offload, activations=act,
                                  optimizer=optimizer)
        if micro_batch is not None:
            if per_rank_unit % micro_batch:
                what = (f"the {per_rank} sequences per GPU" if table is None else
                        f"every step's batch per GPU (multiples of {per_rank_unit} sequences under the schedule)")
                raise BatchConfigError(f"micro batch {micro_batch} does not divide {what}; "
                                       f"valid: {divisors(per_rank_unit)}")
            m = micro_batch
        else:
            m = _pick_micro_batch(per_rank_unit, lambda mm: est(mm).total <= budget)
        e = est(m if m else 1)
        rows.append({
            "stage": stage, "offload": offload, "micro_batch": m,
            "grad_accum": per_rank // m if m else None, "fits": bool(m) and e.total <= budget,
            "params_gib": e.params / GiB, "grads_gib": e.grads / GiB, "optimizer_gib": e.optimizer / GiB,
            "optimizer_cpu_gib": e.optimizer_cpu / GiB, "scratch_gib": e.scratch / GiB,
            "comm_gib": e.comm / GiB, "activations_gib": e.activations / GiB, "loss": row_loss,
            "total_gib": e.total / GiB,
            "comm_gb_per_step": (comm_bytes_per_step(n, world, stage, per_rank // m, precision=precision) / 1e9
                                 if m else None),
        })
    fpt = flops_per_token(preset.with_overrides(seq_len=seq_len), seq_len)
    seconds = wall_time_seconds(fpt, trained, world, GPUS[gpu]["peak_flops"], mfu)
    lr = scaled_lr(optim, global_batch)
    warmup = (warmup_steps_by_tokens(table, optim.warmup_fraction) if table is not None
              else warmup_steps(steps, optim.warmup_fraction))
    z2 = next(r for r in rows if r["stage"] == 2 and not r["offload"])
    phases = None
    if table is not None:
        levels = [(b, k) for ph in table.phases() for b, k in ph["levels"]]
        for r in rows:
            if r["micro_batch"]:
                # the deepest accumulation of any phase (ZeRO-0 in bf16 would accumulate in bf16 there),
                # and the bytes sent per step averaged over the run's steps (phases differ in accumulation)
                r["max_grad_accum"] = max(b // world // r["micro_batch"] for b, _ in levels)
                r["comm_gb_per_step"] = sum(k * comm_bytes_per_step(n, world, r["stage"], b // world // r["micro_batch"],
                                                                    precision=precision) for b, k in levels) / (
                    sum(k for _, k in levels) * 1e9)
    chosen = recommended_stage(rows, precision) or z2  # the stage the phases are shown at
    if table is not None:
        phases = [{**ph, "levels": [{"batch": b, "steps": k, "per_gpu": b // world,
                                     "grad_accum": b // world // chosen["micro_batch"] if chosen["micro_batch"] else None}
                                    for b, k in ph["levels"]]}
                  for ph in table.phases()]
    return {
        "model": model, "n_params": n, "seq_len": seq_len, "global_batch": global_batch,
        "micro_batch_fixed": micro_batch is not None,
        "tokens_per_step": base.tokens_per_step, "token_budget": tokens, "steps": steps, "tokens_trained": trained,
        "nodes": nodes, "gpus_per_node": gpus_per_node, "world": world, "per_gpu_batch": per_rank,
        "gpu": gpu, "gpu_mem_gib": GPUS[gpu]["mem_gib"], "peak_flops": GPUS[gpu]["peak_flops"], "mfu": mfu,
        "precision": precision, "activation_checkpointing": activation_checkpointing,
        "flops_per_token": fpt, "flops": fpt * trained, "wall_time_s": seconds,
        "optimizer": optimizer, "lr": lr, "lr_source": optim.lr_source, "warmup_steps": warmup,
        "batch_schedule": table.schedule.spec if table is not None else None, "phases": phases,
        "per_gpu_unit": per_rank_unit, "zero2_micro_batch": z2["micro_batch"], "loss": loss,
        "phase_stage": chosen["stage"], "phase_micro_batch": chosen["micro_batch"],
        "loss_chunk_tokens": min(default_chunk_tokens(preset.vocab_size), seq_len * (z2["micro_batch"] or 1)),
        "comm_bucket_defaults": deepspeed_bucket_defaults(),
        "stages": rows,
        "recommended_stage": (lambda r: r["stage"] if r else None)(recommended_stage(rows, precision)),
    }


def format_plan(p: dict) -> str:
    out = [
        f"model {p['model']}: {p['n_params']:,} parameters, seq_len {p['seq_len']}",
        f"cluster: {p['nodes']} nodes x {p['gpus_per_node']} {p['gpu']} ({p['gpu_mem_gib']} GiB) = {p['world']} data-parallel ranks",
    ]
    unit = p.get("per_gpu_unit", p["per_gpu_batch"])  # what make_plan fitted the micro-batch to
    if p.get("phases"):
        micro = p.get("phase_micro_batch", p["zero2_micro_batch"]) or "-"
        out.append(f"batch schedule {p['batch_schedule']}: {p['steps']:,} steps, {p['tokens_trained']:,} tokens "
                   f"(budget {p['token_budget']:,}); micro-batch {micro} at ZeRO-{p.get('phase_stage', 2)}, the same in "
                   "every phase, accumulation per phase:")
        for ph in p["phases"]:
            last = ph["first_step"] + ph["steps"] - 1
            levels = ", ".join(f"{lv['batch']:,} seq x {lv['steps']:,} steps ({lv['per_gpu']}/GPU = "
                               f"{micro} x {lv['grad_accum'] or '-'})" for lv in ph["levels"])
            out.append(f"  {ph['phase']}: steps {ph['first_step']:,}..{last:,}: {levels}")
        lr_note = f"{lr_rule_note(get_optim_preset(p['model'], p.get('optimizer', 'merit')))} to the first phase's batch"
    else:
        out += [
            f"batch: {p['global_batch']:,} sequences = {p['tokens_per_step']:,} tokens/step; "
            f"{p['per_gpu_batch']} sequences per GPU per step",
            f"steps: ceil({p['token_budget']:,} / {p['tokens_per_step']:,}) = {p['steps']:,}",
        ]
        lr_note = lr_rule_note(get_optim_preset(p["model"], p.get("optimizer", "merit")))
    out += [
        f"schedule: {optimizer_label(p.get('optimizer', 'merit'))} peak lr {p['lr']:.3g} ({lr_note}; {p['lr_source']}), warmup {p['warmup_steps']:,} steps, cosine to 0.1x",
        f"memory per GPU ({p['precision']}, activation checkpointing {'on' if p['activation_checkpointing'] else 'off'}; GiB; "
        f"micro-batch = largest divisor of {unit} fitting {int(HEADROOM * 100)}% of the GPU"
        + ("; accum: the first phase's" if p.get("phases") else "") + "):",
        f"  {'ZeRO':<11}{'params':>8}{'grads':>8}{'optim':>8}{'optim@CPU':>10}{'scratch':>8}{'comm':>7}{'activ.':>8}{'total':>8}{'micro':>7}{'accum':>7}{'sent GB/step':>14}",
    ]
    for r in p["stages"]:
        name = f"{r['stage']}{' +offload' if r['offload'] else ''}"
        micro = r["micro_batch"] if r["micro_batch"] else "-"
        accum = r["grad_accum"] if r["grad_accum"] else "-"
        note = "" if r["fits"] else (f"  does not fit at micro-batch {r['micro_batch']}" if p.get("micro_batch_fixed")
                                     else "  does not fit even at micro-batch 1")
        out.append(f"  {name:<11}{r['params_gib']:>8.2f}{r['grads_gib']:>8.2f}{r['optimizer_gib']:>8.2f}"
                   f"{r['optimizer_cpu_gib']:>10.2f}{r.get('scratch_gib', 0.0):>8.2f}{r.get('comm_gib', 0.0):>7.2f}"
                   f"{r['activations_gib']:>8.2f}{r['total_gib']:>8.2f}{micro!s:>7}{accum!s:>7}"
                   f"{(format(r['comm_gb_per_step'], '.2f') if r.get('comm_gb_per_step') is not None else '-'):>14}{note}")
    if p.get("loss"):
        lean = p["loss"] == "lean"
        out.append(f"  loss: {p['loss']}" + (f" (chunked over {p['loss_chunk_tokens']:,} tokens; ZeRO-3 rows: plain, "
                                               "the lm_head weight is partitioned there)" if lean else
                                               " (full-vocabulary logits)")
                   + "; comm: DeepSpeed's reduce buckets (reduce_bucket_size "
                   f"{p['comm_bucket_defaults']['reduce_bucket_size']:,} elements)")
    rec = recommended_stage(p["stages"], p["precision"])
    out.append("  sent: ZeRO's gradient and parameter collectives per GPU per step"
               + (" (the mean over the schedule's steps)" if p.get("phases") else "") + ", as DeepSpeed issues them (ring counts; "
               "ZeRO-1 all-reduces then gathers, ZeRO-2 all-reduces at every micro-batch, ZeRO-3 gathers and "
               "reduce-scatters at every micro-batch)")
    if rec is not None:
        why = ("fits, sends the fewest bytes" + (", the lowest stage of those" if sum(
            1 for r in p["stages"] if r["fits"] and not r["offload"] and r.get("comm_gb_per_step") is not None
            and abs(r["comm_gb_per_step"] - rec["comm_gb_per_step"]) < 1e-6) > 1 else ""))
        bf16_z0 = next((r for r in p["stages"] if r["stage"] == 0 and p["precision"] == "bf16" and r["fits"]
                        and r.get("max_grad_accum", r["grad_accum"]) > 1), None)
        out.append(f"  recommended: ZeRO-{rec['stage']} (micro-batch {rec['micro_batch']} x {rec['grad_accum']}, "
                   f"{rec['comm_gb_per_step']:.2f} GB sent per GPU per step: {why})"
                   + ("; not ZeRO-0: it would accumulate the gradients of the micro-batches in bf16" if bf16_z0 else ""))
    else:
        out.append("  recommended: none fits without offload (see the +offload rows, or more GPUs)")
    h = p["wall_time_s"] / 3600
    out.append(f"compute: {p['flops_per_token']:.4g} FLOPs/token (6 N + 12 L h s, attention included) x "
               f"{p.get('tokens_trained', p['steps'] * p['tokens_per_step']):,} tokens = {p['flops']:.3e} FLOPs")
    out.append(f"wall time: {p['flops']:.3e} / ({p['world']} x {p['peak_flops'] / 1e12:.0f} TFLOP/s x MFU {p['mfu']:.2f}) "
               f"= {h:.2f} h ({h / 24:.2f} days)")
    return "\n".join(out)


#: The cluster shapes one recipe file serves (ds_configs/generate.py): 8, 16 and 32 H100s; its
#: micro-batch is fitted on the largest and divides the per-GPU batch on all three.
RECIPE_CLUSTERS = ((1, 8), (2, 8), (4, 8))
RECIPE_GPU = "h100"


@functools.lru_cache(maxsize=None)
def recipe_micro_batch(model: str, batch: int, stage: int) -> Optional[int]:
    """The micro-batch of a recipe file at ``stage``: what the planner fits on 32 H100s."""
    nodes, gpn = RECIPE_CLUSTERS[-1]
    p = make_plan(model, batch, TOKEN_BUDGET, nodes, gpn, RECIPE_GPU)
    return next(r for r in p["stages"] if r["stage"] == stage and not r["offload"])["micro_batch"]


@functools.lru_cache(maxsize=None)
def recipe_zero_stage(model: str, batch: int) -> int:
    """The ZeRO stage of a recipe file, which serves 8 to 32 GPUs with one stage and one
    micro-batch: among the stages that fit at that micro-batch on every cluster of
    ``RECIPE_CLUSTERS`` (and, in bf16, never accumulate in bf16: ZeRO-0 only where every cluster
    runs one micro-batch per step), the planner's choice (:func:`recommended_stage`) on 8 GPUs,
    where the most micro-batches per step make ZeRO-2's per-micro-batch reductions cost most.
    ``merit-ds plan`` at your cluster says whether another stage sends less there."""
    candidates = []
    for stage in (0, 1, 2, 3):
        micro = recipe_micro_batch(model, batch, stage)
        if not micro:
            continue
        rows = []
        for nodes, gpn in RECIPE_CLUSTERS:
            p = make_plan(model, batch, TOKEN_BUDGET, nodes, gpn, RECIPE_GPU, micro_batch=micro)
            rows.append(next(r for r in p["stages"] if r["stage"] == stage and not r["offload"]))
        if all(recommended_stage([r], "bf16") is r for r in rows):  # fits; ZeRO-0: no bf16 accumulation
            candidates.append(rows[0])                             # judged on the first (8 GPUs)
    best = recommended_stage(candidates, "bf16")
    if best is None:
        raise ValueError(f"no ZeRO stage fits {model} at batch {batch} on {RECIPE_CLUSTERS} x {RECIPE_GPU}")
    return best["stage"]


def recipes_table(nodes: int = 4, gpus_per_node: int = 8, gpu: str = "h100") -> str:
    """Markdown table of every model x batch preset on one cluster shape: each recipe file's ZeRO
    stage (:func:`recipe_zero_stage`) and micro-batch (:func:`recipe_micro_batch`)."""
    from .presets import BATCH_PRESETS

    world = nodes * gpus_per_node
    rows = ["| model | batch (seq) | tokens/step | ZeRO | micro x accum x world | steps (48B) | peak lr | warmup | wall time |",
            "|---|---|---|---|---|---|---|---|---|"]
    for model in ("gpt2-small", "gpt2-medium"):
        for batch in BATCH_PRESETS.values():
            stage = recipe_zero_stage(model, batch)
            p = make_plan(model, batch, TOKEN_BUDGET, nodes, gpus_per_node, gpu,
                          micro_batch=recipe_micro_batch(model, batch, stage))
            r = next(r for r in p["stages"] if r["stage"] == stage and not r["offload"])
            rows.append(f"| {model} | {batch:,} | {p['tokens_per_step']:,} | {stage} | {r['micro_batch']} x {r['grad_accum']} x {world} "
                        f"| {p['steps']:,} | {p['lr']:.3g} | {p['warmup_steps']:,} | {p['wall_time_s'] / 3600:.1f} h |")
    return "\n".join(rows)


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="gpt2-small", help="tiny | gpt2-small | gpt2-medium")
    parser.add_argument("--optimizer", default="merit", choices=list(optimizer_names()),
                        help="whose lr preset and optimizer memory to show (any registered optimizer)")
    parser.add_argument("--batch", default="480", help="global batch in sequences, or a preset: 480 1k 2k 4k 6k")
    parser.add_argument("--batch-schedule", default=None, metavar="SPEC",
                        help='a batch-size schedule instead of --batch, as the training loop takes it: '
                             '"480@0,4k@10e9" or "ramp:480..4k@0..10e9"')
    parser.add_argument("--tokens", type=float, default=TOKEN_BUDGET, help="token budget (default 48e9)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--micro-batch", type=int, default=None, help="fix the micro-batch instead of fitting it")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--loss", default=DEFAULT_LOSS, choices=list(LOSSES),
                        help="the loss's memory model: lean (chunked, merit_ds.train.lean_loss) or plain (full logits)")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="assumed model FLOPs utilisation")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--recipes", action="store_true",
                        help="markdown table of all model x batch presets on --nodes x --gpus-per-node --gpu")


def run(args) -> int:
    if args.recipes:
        print(recipes_table(args.nodes, args.gpus_per_node, args.gpu))
        return 0
    p = make_plan(args.model, args.batch, args.tokens, args.nodes, args.gpus_per_node, args.gpu,
                  precision=args.precision, micro_batch=args.micro_batch,
                  activation_checkpointing=args.activation_checkpointing, mfu=args.mfu, seq_len=args.seq_len,
                  optimizer=args.optimizer, batch_schedule=args.batch_schedule, loss=args.loss)
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    return 0
