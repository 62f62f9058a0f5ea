"""Model runtime and micro-batcher: the only code that calls onnxruntime in the service.

Owns: loading the model card and its ONNX file into an InferenceSession (in the app lifespan), and
the MicroBatcher, worker threads that gather cells from concurrent requests (module route, cell
route, V2 infer) into `session.run` calls of up to `max_batch` cells, waiting at most `max_wait_ms` for
a batch to fill. Its queue is bounded in cells: a submit that would overflow it raises QueueFullError,
which the routes answer with 503 + Retry-After, so overload sheds instead of growing memory.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model.card import ModelCard, read_card

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The batcher holds as many cells as it may; the caller should retry later."""


@dataclass(frozen=True)
class ModelRuntime:
    """The served model: its card, its onnxruntime session, and the names the graph uses."""

    card: ModelCard
    session: ort.InferenceSession
    variant: str
    path: Path
    input_name: str
    output_names: tuple[str, ...]

    @property
    def size(self) -> int:
        return self.card.input.size


def load_runtime(model_dir: Path, variant: str, threads: int) -> ModelRuntime:
    card = read_card(model_dir)
    path = card.onnx_path(model_dir, variant)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = card.input.tensor.name
    graph_inputs = [i.name for i in session.get_inputs()]
    if input_name not in graph_inputs:
        raise ValueError(f"model card names input {input_name!r}, but {path} has inputs {graph_inputs}")
    outputs = tuple(o.name for o in card.outputs)
    log.info("serving %s %s (%s, %s px)", card.name, card.version, variant, card.input.size)
    return ModelRuntime(card, session, variant, path, input_name, outputs)


@dataclass
class _Job:
    batch: np.ndarray  # (n, 1, S, S) uint8 or float32 grey levels
    runtime: ModelRuntime  # the model this job started with: a swap never changes it mid-request
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float = field(default_factory=time.perf_counter)
    taken: int = 0  # cells of this job already handed to a batch (gatherers only)
    finished: int = 0  # cells of this job already inferred (under the batcher's lock)
    failed: bool = False
    parts: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # by first cell


BatchObserver = Callable[[int, float], None]  # (cells in the batch, seconds in session.run)


class MicroBatcher:
    """Gathers cells from concurrent callers into shared onnxruntime calls, on `workers` threads.

    With one worker, onnxruntime spreads each call over its intra-op threads. With one worker per core
    and one intra-op thread each, the calls run side by side instead: no thread ever waits for
    another inside a call, and while one worker gathers or hands results back the other computes.
    Gathering is serialised (one gatherer at a time), so batches stay as full as one worker's would;
    a job split over several batches is put back together in order of its cells.
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        max_batch: int,
        max_wait_ms: float,
        max_queue_cells: int,
        observe: BatchObserver | None = None,
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"expected at least one inference worker, got {workers}")
        self.runtime = runtime
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_cells = max_queue_cells
        self.observe = observe
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._pending_cells = 0
        self._lock = threading.Lock()  # pending count and every job's finished/failed/parts
        self._gather_lock = threading.Lock()  # one gatherer at a time; guards _carry and job.taken
        self._threads = [
            threading.Thread(target=self._work, name=f"pvqc-batcher-{i}", daemon=True) for i in range(workers)
        ]
        self._carry: _Job | None = None  # a job only partly taken into the last batch

    @property
    def pending_cells(self) -> int:
        return self._pending_cells

    @property
    def running(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._jobs.put(None)  # each worker that meets it puts it back for the next one
        for thread in self._threads:
            thread.join(timeout=30)

    def has_room(self, cells: int) -> bool:
        """Whether `cells` more would fit now: lets a route refuse before decoding a frame."""
        return self._pending_cells + cells <= self.max_queue_cells

    async def infer(self, batch: np.ndarray, runtime: ModelRuntime | None = None) -> dict[str, np.ndarray]:
        """Outputs by name for a (n, 1, S, S) batch of grey levels (uint8 or float32).

        `runtime` (default: the current one) is the model that runs it; a batch only ever mixes
        jobs of one runtime, so a hot swap (or a shadow model) never mixes models in one call.

        uint8 cells wait in the queue as they are (4x smaller) and become float32 per batch.
        Raises QueueFullError when saturated.
        """
        n = len(batch)
        with self._lock:
            if self._pending_cells + n > self.max_queue_cells:
                raise QueueFullError(
                    f"{self._pending_cells} model inputs already waiting (limit {self.max_queue_cells}; "
                    f"this request needs {n})"
                )
            self._pending_cells += n
        loop = asyncio.get_running_loop()
        job = _Job(np.ascontiguousarray(batch), runtime or self.runtime, loop, loop.create_future())
        self._jobs.put(job)
        return await job.future

    # -- worker threads ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._gather_lock:
                taken = self._gather()
            if taken is None:
                return
            if taken:
                self._run(taken)

    def _next_job(self, timeout: float | None) -> _Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        return self._jobs.get(timeout=timeout) if timeout is None or timeout > 0 else self._jobs.get_nowait()

    def _gather(self) -> list[tuple[_Job, int, int]] | None:
        """(job, start, stop) slices totalling at most max_batch cells; None means stop."""
        first = self._next_job(None)
        if first is None:
            self._jobs.put(None)  # the other workers stop too
            return None
        taken: list[tuple[_Job, int, int]] = []
        room = self.max_batch
        deadline = time.perf_counter() + self.max_wait
        job: _Job | None = first
        while job is not None:
            if job.failed:  # its caller has its error: the cells not yet taken are dropped, not run
                with self._lock:
                    self._pending_cells -= len(job.batch) - job.taken
                job.taken = len(job.batch)
            else:
                start = job.taken
                stop = min(len(job.batch), start + room)
                taken.append((job, start, stop))
                job.taken = stop
                room -= stop - start
                if stop < len(job.batch):
                    self._carry = job  # the rest goes into the next batch, first in line
                    break
                if room == 0:
                    break
            try:
                job = self._next_job(deadline - time.perf_counter())
            except queue.Empty:
                break
            if job is None:  # stop requested: finish this batch, then leave
                self._jobs.put(None)
                break
            if taken and job.runtime is not taken[0][0].runtime:  # another model: opens the next batch
                self._carry = job
                break
        return taken

    def _run(self, taken: list[tuple[_Job, int, int]]) -> None:
        runtime = taken[0][0].runtime
        cells = sum(stop - start for _job, start, stop in taken)
        began = time.perf_counter()
        try:
            batch = np.concatenate([job.batch[start:stop] for job, start, stop in taken]).astype(
                np.float32, copy=False
            )
            values = runtime.session.run(list(runtime.output_names), {runtime.input_name: batch})
        except Exception as exc:  # a bad batch fails its callers, never the worker
            log.exception("inference failed on a batch of %d cells", cells)
            self._fail_jobs(taken, exc)
            return
        seconds = time.perf_counter() - began
        if self.observe is not None:
            self.observe(cells, seconds)
        offset = 0
        names = runtime.output_names
        for job, start, stop in taken:
            count = stop - start
            part = {name: v[offset : offset + count] for name, v in zip(names, values, strict=True)}
            offset += count
            with self._lock:
                self._pending_cells -= count
                if job.failed:
                    continue
                job.parts[start] = part
                job.finished += count
                complete = job.finished == len(job.batch)
            if complete:
                ordered = [job.parts[first] for first in sorted(job.parts)]
                result = {name: np.concatenate([p[name] for p in ordered]) for name in names}
                job.loop.call_soon_threadsafe(_resolve, job.future, result)

    def _fail_jobs(self, taken: list[tuple[_Job, int, int]], exc: Exception) -> None:
        """Fail every job of a batch that raised. Its slices in other batches are dropped when they
        finish; the gatherer drops (and releases) any rest it had not yet taken."""
        for job, start, stop in taken:
            with self._lock:
                self._pending_cells -= stop - start
                if job.failed:
                    continue
                job.failed = True
            job.loop.call_soon_threadsafe(_fail, job.future, exc)


def _resolve(future: asyncio.Future[dict[str, np.ndarray]], result: dict[str, np.ndarray]) -> None:
    if not future.done():  # the caller may have gone (client disconnect cancels it)
        future.set_result(result)


def _fail(future: asyncio.Future[dict[str, np.ndarray]], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
