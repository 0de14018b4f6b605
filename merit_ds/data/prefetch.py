"""Prefetch a :class:`~.sampler.TokenBlockLoader` in a worker thread, resume-exact.

While the device computes micro-batch k, a worker thread reads micro-batch k+1 .. k+depth from
the token shards (and, when the loader's tensors are bound for CUDA, copies them into pinned
host memory, so that the caller's ``.to(device, non_blocking=True)`` is an asynchronous DMA).
Reading shards is numpy/memmap work that releases the GIL.

Resume semantics are the loader's own: its state is the position of the batches *consumed*
(returned by ``next``), never of those prefetched. The worker walks its own cursor over the same
deterministic global order (a private copy of :class:`~.sampler.BlockOrder`, whose permutation
cache is not thread-safe) and the wrapped loader's ``consumed`` / ``micro_step`` advance only in
:meth:`PrefetchLoader.__next__`. :meth:`load_state_dict` stops the worker, drops what it had
prefetched and restarts it at the loaded position. Batches are bitwise those of the plain loader.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Optional

import torch

from .sampler import TokenBlockLoader

__all__ = ["PrefetchLoader"]

_STOP = object()


class PrefetchLoader:
    """``next`` / ``state_dict`` / ``load_state_dict`` of ``loader``, prefetched ``depth`` micro-batches ahead.

    ``pin``: copy batches into pinned memory (default: when CUDA is available). Other attributes
    (``grad_accum``, ``tokens``, ``get_batch``, ...) are the loader's. :meth:`close` stops the worker.
    """

    def __init__(self, loader: TokenBlockLoader, depth: int = 2, pin: Optional[bool] = None):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        if loader.device is not None:
            raise ValueError("PrefetchLoader needs a host loader (device=None): the caller moves batches to the device")
        self.loader, self.depth = loader, int(depth)
        self.pin = torch.cuda.is_available() if pin is None else bool(pin)
        self._order = copy.deepcopy(loader.order)  # the worker's own permutation cache
        self._thread: Optional[threading.Thread] = None
        self._start()

    def __getattr__(self, name):  # grad_accum, tokens, get_batch, global_batch, ...
        if name == "loader":  # not yet set (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    # --- the worker ----------------------------------------------------------------------------
    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        cursor = (self.loader.consumed, self.loader.micro_step)
        self._thread = threading.Thread(target=self._work, args=(cursor, self._queue, self._stop), daemon=True,
                                        name="merit_ds-prefetch")
        self._thread.start()

    def _batch(self, consumed: int, micro_step: int):
        ld = self.loader
        x, y = ld.blocks_to_tensors(ld.block_ids(consumed, micro_step, self._order))
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def _work(self, cursor, q: queue.Queue, stop: threading.Event) -> None:
        consumed, micro_step = cursor
        while not stop.is_set():
            try:
                item = ((consumed, micro_step), self._batch(consumed, micro_step))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                item = (None, exc)
            q.put(item)  # blocks while `depth` batches wait; _halt drains the queue to release it
            if item[0] is None:
                return
            # (a batch-size change halts this thread before the loader's sizes change)
            consumed, micro_step = self.loader.position_after(consumed, micro_step)

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():  # drain: the worker may be blocked in put()
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.01)
            self._thread = None

    # --- the loader's interface -------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            raise RuntimeError("PrefetchLoader is closed")
        position, batch = self._queue.get()
        if position is None:
            self._halt()
            raise batch
        ld = self.loader
        # the worker's cursor and the consumer's must agree; anything else is a bug here
        assert position == (ld.consumed, ld.micro_step), (position, ld.consumed, ld.micro_step)
        ld.advance()
        return batch

    def state_dict(self) -> dict:
        """The loader's state: the batches consumed, not those waiting in the queue."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._halt()  # what was prefetched belongs to the old position
        try:
            self.loader.load_state_dict(state)
        finally:
            self._start()  # at the loaded position, or the unchanged one if the state was refused

    def set_global_batch(self, global_batch: int) -> None:
        """A batch-size schedule's change, between steps: the rank's share of every later step moves
        (:meth:`.sampler.TokenBlockLoader.block_ids`), so what was prefetched at the old batch is
        dropped and the worker restarts at the same position with the new batch."""
        if global_batch == self.loader.global_batch:
            return
        self._halt()
        try:
            self.loader.set_global_batch(global_batch)
        finally:
            self._start()

    def close(self) -> None:
        self._halt()
