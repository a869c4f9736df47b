"""Collect feature rows from all machines into batches for the engine.

A batch is dispatched when it holds ``max_batch`` rows or when ``max_delay_ms`` has passed since
its oldest row arrived, whichever comes first (Triton's dynamic batcher), so the added alert
latency is bounded by ``max_delay_ms`` plus one inference. One batch is in flight in the
inference worker while the next one fills; rows keep their arrival time while they wait, so a
slow engine call does not add a full ``max_delay_ms`` to the windows queued behind it: a batch
whose oldest row is already due goes out as soon as the call in flight returns.

Columnar: rows are copied into a preallocated float32 ring (``queue_size`` × features), a batch
is copied out of it into one preallocated staging array, and the scores of a batch come back as
one :class:`~appliance.contracts.ScoreBatch` (arrays, no per-row objects). ``submit_many`` takes
rows already in columns.

Overload policy: the queue holds at most ``queue_size`` rows; when it is full the OLDEST row is
dropped (a stale window is worth less than a fresh one) and counted in ``dropped``.

Threading: ``submit``/``submit_many`` are called on the event loop; inference runs in one
dedicated worker thread (``ServingEngine.infer``; onnxruntime/TensorRT release the GIL); scores
are delivered back on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.contracts import FeatureRow, ScoreBatch
from appliance.infer.select import ServingEngine

log = logging.getLogger(__name__)

_Inferred = tuple[npt.NDArray[np.float32], str]


class Batcher:
    def __init__(
        self,
        engine: ServingEngine,
        emit: Callable[[ScoreBatch], None],
        *,
        max_batch: int = 32,
        max_delay_ms: int = 20,
        queue_size: int = 1024,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.engine = engine
        self._emit = emit
        self.max_batch = max_batch
        self.max_delay_s = max_delay_ms / 1000.0
        n_features = engine.bundle.n_features
        self._cap = queue_size
        self._vec = np.zeros((queue_size, n_features), np.float32)
        self._end = np.zeros(queue_size, np.float64)
        self._arrived = np.zeros(queue_size, np.float64)  # time.monotonic() at submit
        self._machine: list[str] = [""] * queue_size
        self._head = 0  # ring index of the oldest queued row
        self._count = 0
        self._stage = np.zeros((max_batch, n_features), np.float32)  # the batch in flight
        self._own_executor = executor is None
        self._executor = executor
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[_Inferred] | None = None
        self._stopping = False
        self.submitted = 0
        self.dropped = 0
        self.batches = 0
        self.rows_scored = 0
        self.errors = 0

    # -- input (event loop) -----------------------------------------------------------------
    def submit(self, row: FeatureRow) -> None:
        """Queue one row (event loop only). Never blocks; drops the oldest row when full."""
        cap = self._cap
        if self._count == cap:
            self._head = (self._head + 1) % cap
            self._count -= 1
            self._count_dropped(1)
        i = (self._head + self._count) % cap
        self._vec[i] = row.vector
        self._end[i] = row.window_end
        self._machine[i] = row.machine
        self._arrived[i] = time.monotonic()
        self._count += 1
        self.submitted += 1
        self._poke()

    def submit_many(
        self,
        machines: Sequence[str],
        window_end: npt.ArrayLike,
        vectors: npt.NDArray[np.float32],
    ) -> None:
        """Queue ``len(machines)`` rows given as columns (``vectors`` is ``[N, F]``)."""
        n = len(machines)
        if n == 0:
            return
        cap = self._cap
        ends = np.asarray(window_end, dtype=np.float64)
        self.submitted += n
        if n > cap:  # only the newest ``cap`` rows can be kept
            self._count_dropped(n - cap + self._count)
            machines, ends, vectors = machines[n - cap :], ends[n - cap :], vectors[n - cap :]
            self._head = self._count = 0
            n = cap
        over = self._count + n - cap
        if over > 0:
            self._head = (self._head + over) % cap
            self._count -= over
            self._count_dropped(over)
        now = time.monotonic()
        j = (self._head + self._count) % cap
        first = min(n, cap - j)
        self._vec[j : j + first] = vectors[:first]
        self._end[j : j + first] = ends[:first]
        self._arrived[j : j + first] = now
        self._machine[j : j + first] = machines[:first]
        if first < n:
            rest = n - first
            self._vec[:rest] = vectors[first:]
            self._end[:rest] = ends[first:]
            self._arrived[:rest] = now
            self._machine[:rest] = machines[first:]
        self._count += n
        self._poke()

    def _count_dropped(self, n: int) -> None:
        before = self.dropped
        self.dropped += n
        if before == 0 or before // 1000 != self.dropped // 1000:
            log.warning("batcher queue full: dropped %d oldest rows so far", self.dropped)

    def _poke(self) -> None:
        # Wake the batch loop only when it has something new to decide: the first row (to arm
        # the max_delay timer) or a full batch. Waking it per row would cost a loop turn each.
        if self._wakeup is not None and (self._count == 1 or self._count >= self.max_batch):
            self._wakeup.set()

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine in the worker thread (parity check included), then the batch loop."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="infer")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.engine.start)
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="batcher")

    async def _run(self) -> None:
        assert self._wakeup is not None
        while not self._stopping:
            if self._inflight is not None or self._count == 0:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            delay = float(self._arrived[self._head]) + self.max_delay_s - time.monotonic()
            if self._count < self.max_batch and delay > 0:
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), delay)
                continue
            self._launch()

    def _launch(self) -> asyncio.Future[_Inferred]:
        """Take the oldest rows (up to max_batch) into the staging array and send them to the
        worker; the scores are delivered by :meth:`_done` on the loop."""
        n = min(self.max_batch, self._count)
        cap, h = self._cap, self._head
        first = min(n, cap - h)
        batch = self._stage[:n]
        batch[:first] = self._vec[h : h + first]
        ends = np.empty(n, np.float64)
        ends[:first] = self._end[h : h + first]
        machines = self._machine[h : h + first]
        if first < n:
            batch[first:] = self._vec[: n - first]
            ends[first:] = self._end[: n - first]
            machines += self._machine[: n - first]
        self._head = (h + n) % cap
        self._count -= n
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, self.engine.infer, batch)
        self._inflight = fut
        fut.add_done_callback(lambda f: self._done(f, tuple(machines), ends))
        return fut

    def _done(self, fut: asyncio.Future[_Inferred], machines: tuple[str, ...], ends: Any) -> None:
        self._inflight = None
        if self._wakeup is not None:
            self._wakeup.set()
        if fut.cancelled():
            return
        err = fut.exception()
        if err is not None:  # a failing batch must not stop the pipeline
            self.errors += 1
            log.error("inference failed for a batch of %d rows: %s", len(machines), err)
            return
        scores, backend = fut.result()
        self.batches += 1
        self.rows_scored += len(machines)
        try:
            self._emit(ScoreBatch(machines, ends, scores, backend))
        except Exception:  # a broken consumer must not stop scoring
            self.errors += 1
            log.exception("score consumer failed on a batch of %d rows", len(machines))

    async def _wait_inflight(self) -> None:
        fut = self._inflight
        if fut is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(fut)
            await asyncio.sleep(0)  # let the done-callback deliver the scores

    async def _cancel_loop(self) -> None:
        """Stop the batch loop. A flag plus a wake-up ends it even if the cancellation is lost
        (Python 3.10/3.11's ``asyncio.wait_for`` can swallow a cancel that races with the
        awaited event), so shutdown cannot hang here."""
        self._stopping = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def drain(self, timeout_s: float = 2.0) -> None:
        """Stop batching and score what is queued (at shutdown), within ``timeout_s``."""
        await self._cancel_loop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        await self._wait_inflight()
        while self._count and loop.time() < deadline and self._executor is not None:
            self._launch()
            await self._wait_inflight()

    async def close(self) -> None:
        """Stop the batch loop and the engine; idempotent."""
        await self._cancel_loop()
        await self._wait_inflight()
        if self._executor is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self.engine.close)
            if self._own_executor:
                self._executor.shutdown(wait=True)
            self._executor = None

    def stats(self) -> dict[str, int]:
        return {
            "submitted": self.submitted,
            "dropped": self.dropped,
            "batches": self.batches,
            "rows_scored": self.rows_scored,
            "errors": self.errors,
            "queued": self._count,
            "in_flight": int(self._inflight is not None),
        }
