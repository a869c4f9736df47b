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
dedicated worker thread (``ServingEngine.infer``; onnxruntime/TensorRT release the GIL), fed by
a ``SimpleQueue`` and answering with ``call_soon_threadsafe`` (half the hand-off cost of
``run_in_executor``'s future chain); scores are delivered back on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from appliance.contracts import Engine, FeatureRow, ScoreBatch

log = logging.getLogger(__name__)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        emit: Callable[[ScoreBatch], None],
        *,
        max_batch: int = 32,
        max_delay_ms: int = 20,
        queue_size: int = 1024,
    ) -> None:
        self.engine = engine
        self._emit = emit
        self.max_batch = max_batch
        self.max_delay_s = max_delay_ms / 1000.0
        n_features = engine.n_features
        self._cap = queue_size
        self._vec = np.zeros((queue_size, n_features), np.float32)
        self._end = np.zeros(queue_size, np.float64)
        self._arrived = np.zeros(queue_size, np.float64)  # time.monotonic() at submit
        self._machine: list[str] = [""] * queue_size
        self._head = 0  # ring index of the oldest queued row
        self._count = 0
        self._stage = np.zeros((max_batch, n_features), np.float32)  # the batch in flight
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[None] | None = None
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
        # A full batch goes out from here when the worker is idle (no loop turn in between);
        # the batch loop is woken only to arm the max_delay timer for a first row. Waking it per
        # row would cost a loop turn each.
        if self._wakeup is None:
            return
        if self._count >= self.max_batch and self._inflight is None and not self._stopping:
            self._launch()
        elif self._count == 1:
            self._wakeup.set()

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the inference worker thread, the engine in it (parity check included, a
        background build if one is needed), then the batch loop."""
        self._loop = asyncio.get_running_loop()
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="infer", daemon=True)
            self._worker.start()
        await self._in_worker(self.engine.start)
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="batcher")

    def _work(self) -> None:
        """The inference worker: runs jobs in order until it gets ``None``."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()

    async def _in_worker(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` in the worker thread and wait for it (start, close: not the hot path)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def settle(err: BaseException | None) -> None:
            if fut.cancelled():
                return
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(err)

        def job() -> None:
            try:
                fn()
            except BaseException as err:
                loop.call_soon_threadsafe(settle, err)
            else:
                loop.call_soon_threadsafe(settle, None)

        self._jobs.put(job)
        await fut

    def replace_engine(self, engine: Engine) -> Engine:
        """Score every batch launched from now on with ``engine`` (already started, same
        ``n_features``); returns the engine it replaces. Event loop only.

        Batches are launched on the loop and run in order in the worker, so the swap falls
        between two batches: the batch in flight (if any) is scored by the old engine, every
        later one by the new; no row is dropped or scored twice. The old engine stays open: the
        caller closes it with :meth:`call_in_worker` (queued behind the batch in flight)."""
        if engine.n_features != self.engine.n_features:
            raise ValueError(
                f"replacement engine has {engine.n_features} features, "
                f"the batcher {self.engine.n_features}"
            )
        old, self.engine = self.engine, engine
        return old

    async def call_in_worker(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` in the inference worker after the jobs queued before it (the batch in
        flight); e.g. close an engine replaced by :meth:`replace_engine`."""
        if self._worker is None:
            fn()
            return
        await self._in_worker(fn)

    async def _run(self) -> None:
        """Dispatch on time: a batch whose oldest row has waited max_delay goes out even if it
        is not full (full batches go out from ``submit``/``_done`` directly)."""
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

    def _launch(self) -> None:
        """Take the oldest rows (up to max_batch) into the staging array and hand them to the
        worker; :meth:`_done` delivers the scores on the loop."""
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
        loop = self._loop
        assert loop is not None
        self._inflight = loop.create_future()
        infer = self.engine.infer
        done = self._done
        names = tuple(machines)

        def job() -> None:
            try:
                scores, backend = infer(batch)
            except Exception as err:
                loop.call_soon_threadsafe(done, names, ends, None, "", err)
            else:
                loop.call_soon_threadsafe(done, names, ends, scores, backend, None)

        self._jobs.put(job)

    def _done(
        self,
        machines: tuple[str, ...],
        ends: npt.NDArray[np.float64],
        scores: npt.NDArray[np.float32] | None,
        backend: str,
        err: Exception | None,
    ) -> None:
        """On the loop: deliver one batch's scores, then send the next batch if one is due."""
        fut, self._inflight = self._inflight, None
        if fut is not None and not fut.done():
            fut.set_result(None)
        if err is not None or scores is None:  # a failing batch must not stop the pipeline
            self.errors += 1
            log.error("inference failed for a batch of %d rows: %s", len(machines), err)
        else:
            self.batches += 1
            self.rows_scored += len(machines)
            try:
                self._emit(ScoreBatch(machines, ends, scores, backend))
            except Exception:  # a broken consumer must not stop scoring
                self.errors += 1
                log.exception("score consumer failed on a batch of %d rows", len(machines))
        if self._stopping or not self._count:
            return
        if (
            self._count >= self.max_batch
            or float(self._arrived[self._head]) + self.max_delay_s <= time.monotonic()
        ):
            self._launch()
        elif self._wakeup is not None:
            self._wakeup.set()  # re-arm the timer for the rows queued meanwhile

    async def _wait_inflight(self) -> None:
        fut = self._inflight
        if fut is not None:
            await asyncio.shield(fut)

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
        if self._worker is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        await self._wait_inflight()
        while self._count and loop.time() < deadline:
            self._launch()
            await self._wait_inflight()

    async def close(self) -> None:
        """Stop the batch loop, the engine and the worker thread; idempotent."""
        await self._cancel_loop()
        await self._wait_inflight()
        if self._worker is not None:
            await self._in_worker(self.engine.close)
            self._jobs.put(None)
            await asyncio.to_thread(self._worker.join)
            self._worker = None

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
