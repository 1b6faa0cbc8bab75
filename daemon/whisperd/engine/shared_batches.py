"""Windows of several recordings decoded in one batch.

Each recording is transcribed by its own thread (audio decoding, voice activity detection and the
rules around the model stay per file and run on the CPU in parallel); when a thread needs windows
decoded it hands them here and waits. A batch runs as soon as every transcription in progress is
waiting, or enough rows are waiting to fill a batch, so a backlog of files keeps the GPU's batches
full without a timer and a single file is never held back. The thread that completes a batch runs
it; the others sleep until their rows come back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Row = TypeVar("Row")
Result = TypeVar("Result")


@dataclass
class _Request(Generic[Row, Result]):
    rows: Sequence[Row]
    results: list[Result] | None = None
    error: BaseException | None = None
    done: bool = field(default=False)


class SharedBatches(Generic[Row, Result]):
    """Collects rows from concurrent callers and decodes them together with `run`."""

    def __init__(self, run: Callable[[list[Row]], list[Result]], batch_rows: int) -> None:
        self._run = run
        self._batch_rows = batch_rows
        self._lock = threading.Condition()
        self._members = 0  # transcriptions in progress that may still hand in rows
        self._waiting: list[_Request[Row, Result]] = []
        self._running = False
        self.batches_run = 0

    @contextmanager
    def member(self) -> Iterator[None]:
        """Count the calling transcription as in progress: batches wait for its rows while it runs."""
        with self._lock:
            self._members += 1
        try:
            yield
        finally:
            with self._lock:
                self._members -= 1
                self._lock.notify_all()

    def decode(self, rows: Sequence[Row]) -> list[Result]:
        """Decode `rows` (in a batch with other callers' rows) and return their results in order."""
        request: _Request[Row, Result] = _Request(rows)
        with self._lock:
            self._waiting.append(request)
            self._lock.notify_all()
            while not request.done:
                if self._running or not self._ready():
                    self._lock.wait()
                    continue
                batch = self._take()
                self._running = True
                self._lock.release()
                try:
                    self._decode(batch)
                finally:
                    self._lock.acquire()
                    self._running = False
                    self._lock.notify_all()
        if request.error is not None:
            raise request.error
        assert request.results is not None
        return request.results

    def _ready(self) -> bool:
        waiting_rows = sum(len(r.rows) for r in self._waiting)
        return bool(self._waiting) and (len(self._waiting) >= self._members or waiting_rows >= self._batch_rows)

    def _take(self) -> list[_Request[Row, Result]]:
        """Whole requests, oldest first, up to a batch of rows (always at least one request)."""
        taken: list[_Request[Row, Result]] = []
        rows = 0
        while self._waiting and (not taken or rows + len(self._waiting[0].rows) <= self._batch_rows):
            request = self._waiting.pop(0)
            taken.append(request)
            rows += len(request.rows)
        return taken

    def _decode(self, batch: list[_Request[Row, Result]]) -> None:
        rows = [row for request in batch for row in request.rows]
        try:
            results = self._run(rows)
        except BaseException as exc:  # noqa: BLE001 - handed to every caller whose rows were in it
            for request in batch:
                request.error, request.done = exc, True
            return
        self.batches_run += 1
        start = 0
        for request in batch:
            request.results = results[start:start + len(request.rows)]
            request.done = True
            start += len(request.rows)
