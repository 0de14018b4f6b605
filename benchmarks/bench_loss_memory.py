"""Peak memory and wall time of the LM loss: the full-logits loss against the chunked (lean) one.

    python benchmarks/bench_loss_memory.py [--rounds 3] [--batch 4 --seq 1024 --hidden 768 --vocab 50257]

One forward + backward of the output projection and the cross-entropy, from the final hidden
states ``h (B, T, H)`` and the output embedding ``W (V, H)`` (GPT-2 Small's width, the real
vocabulary), in fp32 and in bf16 (h and W in that dtype, as a bf16 DeepSpeed run holds them):

* ``plain``: ``lm_loss(h @ W.T, y)`` -- what the training loop computes today
  (:func:`merit_ds.train.diagnostics.lm_loss`; the logits stay alive while it runs, as they do in
  ``lm_loss(engine(input_ids=x).logits, y)``);
* ``lean``: :func:`merit_ds.train.lean_loss.chunked_linear_cross_entropy` at its default chunk
  (``2^26 // V`` tokens: 256 MiB of fp32 logits);
* ``torch_native``: torch's own ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
  (torch >= 2.13, chunked; returns the loss in the input dtype), for comparison.

Memory is counted, not sampled: a ``TorchDispatchMode`` sees every aten op (forward and the
autograd engine's backward), adds the bytes of each storage an op creates and subtracts them when
the storage is freed (``weakref.finalize`` on the storage); the peak is the maximum of the live
sum after each op, i.e. at every allocation. Tensors that exist before the call (h, W, y) are
not counted; the gradients written for h and W are. Kernel-internal scratch that never becomes a
tensor (e.g. a GEMM's packing buffers) is not seen; it is the same for every candidate. The
count is deterministic: the rounds agree to the byte. Wall time is measured in separate runs
without the mode, the candidates interleaved round by round (median and min..max).

Writes benchmarks/results/loss_memory.json and loss_memory.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from merit_ds.train.diagnostics import lm_loss  # noqa: E402
from merit_ds.train.lean_loss import chunked_linear_cross_entropy, default_chunk_tokens  # noqa: E402

MiB = 2 ** 20


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under the mode and still alive; ``peak`` their maximum."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.tracked: dict[int, int] = {}

    def _free(self, ptr: int, nbytes: int) -> None:
        if self.tracked.pop(ptr, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            ptr, n = st.data_ptr(), st.nbytes()
            if n == 0 or ptr in inputs or ptr in self.tracked:  # a view, an in-place or out= result
                continue
            self.tracked[ptr] = n
            self.live += n
            weakref.finalize(st, self._free, ptr, n)
        self.peak = max(self.peak, self.live)
        return out


def plain(h, w, y):
    return lm_loss(h @ w.t(), y)


def lean(h, w, y):
    return chunked_linear_cross_entropy(h, w, y)


def torch_native(h, w, y):
    return F.linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, y.reshape(-1),
                                  options=torch.nn.LinearCrossEntropyOptions())


CANDIDATES = {"plain": plain, "lean": lean, "torch_native": torch_native}


def inputs(b, s, hdim, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(b, s, hdim, generator=g)).to(dtype).requires_grad_()
    w = (torch.randn(v, hdim, generator=g) * 0.02).to(dtype).requires_grad_()
    y = torch.randint(0, v, (b, s), generator=g)
    return h, w, y


def measure(fn, h, w, y):
    """(peak bytes over forward + backward, bytes alive between forward and backward, loss)."""
    h.grad = w.grad = None
    gc.collect()
    with LiveBytes() as mode:
        loss = fn(h, w, y)
        after_forward = mode.live
        loss.backward()
        peak = mode.peak
    value = float(loss.detach().float())
    del loss
    h.grad = w.grad = None
    gc.collect()
    return peak, after_forward, value


def timed(fn, h, w, y):
    h.grad = w.grad = None
    gc.collect()
    t0 = time.perf_counter()
    loss = fn(h, w, y)
    loss.backward()
    dt = time.perf_counter() - t0
    h.grad = w.grad = None
    return dt


def model_bytes(b, s, hdim, v, e):
    """The formulas of lean_loss's docstring and the planner (merit_ds/train/plan.py), in bytes,
    and the peaks they predict for this call: plain, the saved fp32 log-softmax and, at
    log_softmax's backward, nll_loss's and its own fp32 gradients (the gradients of h and W come
    later, when the logits' are gone); lean, one chunk's work, the fp32 accumulator for W's
    gradient and one chunk's product (plan.loss_work_bytes), h's gradient and the lse."""
    n, c = b * s, min(default_chunk_tokens(v), b * s)
    e_copy = e if e != 4 else 0
    terms = {
        "plain_saved_log_softmax": 4 * n * v,
        "plain_backward_work": 8 * n * v,
        "lean_saved_lse": 4 * n,
        "lean_work": (4 + e_copy) * c * v + (4 + e_copy) * v * hdim,
        "grad_h": e * n * hdim,
    }
    terms["plain_peak"] = terms["plain_saved_log_softmax"] + terms["plain_backward_work"]
    terms["lean_peak"] = terms["lean_work"] + terms["grad_h"] + terms["lean_saved_lse"]
    return terms


def stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--out", default=str(HERE / "results" / "loss_memory"))
    args = ap.parse_args(argv)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    names = args.candidates.split(",")
    b, s, hdim, v = args.batch, args.seq, args.hidden, args.vocab
    res: dict = {"shape": {"batch": b, "seq": s, "hidden": hdim, "vocab": v, "tokens": b * s,
                           "chunk_tokens": default_chunk_tokens(v)},
                 "rounds": args.rounds, "threads": torch.get_num_threads(),
                 "host": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
                 "load_avg_1min": [], "results": {}}
    for dname in args.dtypes.split(","):
        dtype = dtypes[dname]
        h, w, y = inputs(b, s, hdim, v, dtype)
        peaks = {n: [] for n in names}
        fwd = {n: [] for n in names}
        secs = {n: [] for n in names}
        losses = {}
        for r in range(args.rounds):
            res["load_avg_1min"].append(os.getloadavg()[0])
            for n in names:  # interleaved: every candidate once per round
                p, a, val = measure(CANDIDATES[n], h, w, y)
                peaks[n].append(p)
                fwd[n].append(a)
                losses[n] = val
                secs[n].append(timed(CANDIDATES[n], h, w, y))
                print(f"{dname} round {r}: {n:<13} peak {p / MiB:9.1f} MiB  after forward {a / MiB:8.1f} MiB  "
                      f"{secs[n][-1]:7.2f} s  loss {val:.6f}", flush=True)
        e = 4 if dname == "fp32" else 2
        res["results"][dname] = {
            "peak_bytes": {n: stats(peaks[n]) for n in names},
            "after_forward_bytes": {n: stats(fwd[n]) for n in names},
            "seconds": {n: stats(secs[n]) for n in names},
            "loss": losses,
            "model_bytes": model_bytes(b, s, hdim, v, e),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(res) + "\n")
    print(markdown(res))
    return 0


def markdown(res) -> str:
    sh = res["shape"]
    load = res["load_avg_1min"]
    lines = [f"# LM loss memory: full logits vs chunked (B={sh['batch']}, T={sh['seq']}, H={sh['hidden']}, "
             f"V={sh['vocab']}; {sh['tokens']:,} tokens, chunk {sh['chunk_tokens']:,} tokens)", "",
             f"One forward + backward of the output projection and the loss from the hidden states; {res['rounds']} "
             f"interleaved rounds, {res['threads']} thread(s), load average (1 min) {min(load):.1f}..{max(load):.1f} on "
             f"{res['host']}. Peak = live bytes of the storages created during the call (TorchDispatchMode count, "
             "the same to the byte in every round); inputs h, W, y not counted, the gradients of h and W counted.", "",
             "| dtype | loss | peak MiB | alive after forward MiB | peak vs plain | median s | min..max s | loss value |",
             "|---|---|---|---|---|---|---|---|"]
    for dname, r in res["results"].items():
        base = r["peak_bytes"]["plain"]["median"] if "plain" in r["peak_bytes"] else None
        for n, pk in r["peak_bytes"].items():
            spread = "" if pk["min"] == pk["max"] else f" ({pk['min'] / MiB:.1f}..{pk['max'] / MiB:.1f})"
            ratio = f"{pk['median'] / base:.4f}" if base else "-"
            t = r["seconds"][n]
            lines.append(f"| {dname} | {n} | {pk['median'] / MiB:.1f}{spread} | "
                         f"{r['after_forward_bytes'][n]['median'] / MiB:.1f} | {ratio} | {t['median']:.2f} | "
                         f"{t['min']:.2f}..{t['max']:.2f} | {r['loss'][n]:.6f} |")
    lines += ["", "The formulas (lean_loss's docstring, merit_ds/train/plan.py `loss_work_bytes`) for this call:", ""]
    for dname, r in res["results"].items():
        m = r["model_bytes"]
        terms = ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in m.items())
        lines.append(f"- {dname}: {terms}; measured peak / predicted: plain "
                     f"{r['peak_bytes']['plain']['median'] / m['plain_peak']:.4f}, lean "
                     f"{r['peak_bytes']['lean']['median'] / m['lean_peak']:.4f}"
                     if "plain" in r["peak_bytes"] and "lean" in r["peak_bytes"] else f"- {dname}: {terms}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
