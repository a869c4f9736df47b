"""Collect feature rows from all machines into batches for the engine.

A batch is dispatched when it holds ``max_batch`` rows or when ``max_delay_ms`` has passed since
its oldest row arrived, whichever comes first, so the added alert latency is bounded by
``max_delay_ms`` plus one inference.

Overload policy: the queue holds at most ``queue_size`` rows; when it is full the OLDEST row is
dropped (a stale window is worth less than a fresh one) and counted in ``dropped``.

Threading: ``submit`` is called on the event loop; inference runs in one dedicated worker thread
(``engine.infer`` releases the GIL in onnxruntime/TensorRT); scores are delivered back on the
event loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Sequence

import numpy as np

from appliance.contracts import Engine, FeatureRow, Score

log = logging.getLogger(__name__)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        emit: Callable[[Sequence[Score]], None],
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
        self._queue: collections.deque[tuple[float, FeatureRow]] = collections.deque(
            maxlen=queue_size
        )
        self._own_executor = executor is None
        self._executor = executor
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.submitted = 0
        self.dropped = 0
        self.batches = 0
        self.rows_scored = 0
        self.errors = 0

    def submit(self, row: FeatureRow) -> None:
        """Queue one row (event loop only). Never blocks; drops the oldest row when full."""
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("batcher queue full: dropped %d oldest rows so far", self.dropped)
        self._queue.append((asyncio.get_running_loop().time(), row))
        self.submitted += 1
        if self._wakeup is not None:
            self._wakeup.set()

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
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = self._queue[0][0]
            delay = oldest + self.max_delay_s - loop.time()
            if len(self._queue) < self.max_batch and delay > 0:
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), delay)
                continue
            await self._dispatch()

    async def _dispatch(self) -> None:
        n = min(self.max_batch, len(self._queue))
        rows = [self._queue.popleft()[1] for _ in range(n)]
        batch = np.stack([r.vector for r in rows])
        loop = asyncio.get_running_loop()
        try:
            scores = await loop.run_in_executor(self._executor, self.engine.infer, batch)
        except Exception as err:  # a failing batch must not stop the pipeline
            self.errors += 1
            log.error("inference failed for a batch of %d rows: %s", n, err)
            return
        self.batches += 1
        self.rows_scored += n
        name = self.engine.backend
        self._emit(
            [
                Score(r.machine, r.window_end, float(s), name)
                for r, s in zip(rows, scores, strict=False)
            ]
        )

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
        while self._queue and loop.time() < deadline:
            await self._dispatch()

    async def close(self) -> None:
        """Stop the batch loop and the engine; idempotent."""
        await self._cancel_loop()
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
            "queued": len(self._queue),
        }
