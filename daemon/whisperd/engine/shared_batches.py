"""Windows of several recordings decoded in one batch that never waits for its slowest row.

Each recording is transcribed by its own thread (audio decoding, voice activity detection and the
rules around the model stay per file and run on the CPU in parallel); when a thread needs windows
decoded it hands them here. One decoding thread keeps a batch in flight on the device: it admits
waiting rows into free slots, moves the batch a few tokens, and hands back each row as soon as it
finishes, so a continuation or a fallback of one window joins the batch beside the others'
windows instead of waiting for the whole batch to end (continuous batching).

From idle, a batch starts as soon as every transcription in progress has rows waiting (or waits
for its turn to scan its file), or enough rows wait to fill a batch, so a backlog starts with full
batches without a timer and a single file is never held back.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, cast

Row = TypeVar("Row")
Result = TypeVar("Result")
RowIn = TypeVar("RowIn", contravariant=True)  # a decoder only takes rows in
Tag = TypeVar("Tag", bound=Hashable)

log = logging.getLogger(__name__)


class RowDecoder(Protocol[RowIn, Result]):
    """A batch in flight on a device, row by row (the static-cache decoder, through the backend)."""

    @property
    def room(self) -> int:
        """How many more rows `admit` takes now."""
        ...

    @property
    def occupied(self) -> int:
        """Rows in flight."""
        ...

    def admit(self, rows: Sequence[RowIn], tags: Sequence[object]) -> None: ...

    def advance(self) -> list[tuple[object, Result]]:
        """Move the batch on; the rows that finished, with their tags."""
        ...

    def drop(self) -> None:
        """Give up every row in flight (after a failure)."""
        ...


class _Member:
    """One transcription in progress (a thread inside `member()`), and how many of its rows are
    waiting or in flight."""

    def __init__(self) -> None:
        self.outstanding = 0
        self.standing_by = False  # waiting for something other than its rows (its turn to scan)


@dataclass(eq=False)
class _Entry(Generic[Row, Result]):
    """One row on its way through the decoder, and where its result goes."""

    row: Row
    tag: object
    results: queue.SimpleQueue[tuple[object, Result | BaseException]]
    member: _Member | None = None


@dataclass
class _Counters:
    admissions: int = 0
    rows: int = 0
    most_rows_at_once: int = 0


class RowStream(Generic[Row, Result]):
    """One caller's rows: `submit` hands rows in (with a tag each), `completed` yields (tag,
    result) as rows finish, in the order they finish, until none is outstanding. A failure of the
    decoder is raised from `completed`."""

    def __init__(self, batches: SharedBatches[Row, Result]) -> None:
        self._batches = batches
        self._results: queue.SimpleQueue[tuple[object, Result | BaseException]] = queue.SimpleQueue()
        self._outstanding = 0

    def submit(self, rows: Sequence[Row], tags: Sequence[object]) -> None:
        self._outstanding += len(rows)
        self._batches._submit([_Entry(row, tag, self._results) for row, tag in zip(rows, tags)])

    def completed(self) -> Iterator[tuple[object, Result]]:
        while self._outstanding:
            tag, result = self._results.get()
            self._outstanding -= 1
            if isinstance(result, BaseException):
                self._drain()
                raise result
            yield tag, result

    def _drain(self) -> None:
        """After a failure, wait for this stream's other rows (failed with it) so none is left behind."""
        while self._outstanding:
            self._results.get()
            self._outstanding -= 1


class SharedBatches(Generic[Row, Result]):
    """Feeds rows from concurrent callers to one `RowDecoder` from one decoding thread."""

    def __init__(self, decoder: RowDecoder[Row, Result], batch_rows: int) -> None:
        self._decoder = decoder
        self._batch_rows = batch_rows
        self._lock = threading.Condition()
        self._members: set[_Member] = set()
        self._local = threading.local()
        self._waiting: list[_Entry[Row, Result]] = []
        self._in_flight: dict[int, _Entry[Row, Result]] = {}
        self._thread: threading.Thread | None = None
        self.counters = _Counters()

    @contextmanager
    def member(self) -> Iterator[None]:
        """Count the calling thread's transcription as in progress: a batch starting from idle
        waits for its rows while it runs."""
        member = _Member()
        with self._lock:
            self._members.add(member)
        self._local.member = member
        try:
            yield
        finally:
            self._local.member = None
            with self._lock:
                self._members.discard(member)
                self._lock.notify_all()

    @contextmanager
    def standing_by(self) -> Iterator[None]:
        """Around a wait of the calling transcription's that is not for rows (its turn to scan the
        file): meanwhile a batch starting from idle does not wait for it."""
        member = getattr(self._local, "member", None)
        if member is None:
            yield
            return
        with self._lock:
            member.standing_by = True
            self._lock.notify_all()
        try:
            yield
        finally:
            with self._lock:
                member.standing_by = False

    def stream(self) -> RowStream[Row, Result]:
        return RowStream(self)

    def decode(self, rows: Sequence[Row]) -> list[Result]:
        """Decode `rows` (beside other callers' rows) and return their results in order."""
        stream = self.stream()
        stream.submit(rows, range(len(rows)))
        found: dict[object, Result] = dict(stream.completed())
        return [found[i] for i in range(len(rows))]

    # -- the callers' side ------------------------------------------------------------------------

    def _submit(self, entries: list[_Entry[Row, Result]]) -> None:
        member = getattr(self._local, "member", None)
        with self._lock:
            for entry in entries:
                entry.member = member
            if member is not None:
                member.outstanding += len(entries)
            self._waiting.extend(entries)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="decode-batches", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    # -- the decoding thread ----------------------------------------------------------------------

    def _ready_from_idle(self) -> bool:
        """Start a batch when no transcription is still preparing rows, or a batch's worth waits."""
        preparing = sum(1 for m in self._members if m.outstanding == 0 and not m.standing_by)
        return bool(self._waiting) and (preparing == 0 or len(self._waiting) >= self._batch_rows)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._in_flight and not self._ready_from_idle():
                    self._lock.wait()
                taken = self._waiting[:self._decoder.room]
                del self._waiting[:len(taken)]
            try:
                self._admit(taken)
                self._deliver(self._decoder.advance())
            except BaseException as exc:  # noqa: BLE001 - handed to every caller whose rows were in flight
                # Whatever failed (the device, or this bookkeeping), the thread goes on: it is the
                # only one decoding, and a caller left without its rows would wait forever.
                log.warning("decoding failed; failing the rows in flight", exc_info=True)
                self._fail([*taken, *self._in_flight.values()], exc)

    def _admit(self, taken: list[_Entry[Row, Result]]) -> None:
        if not taken:
            return
        for entry in taken:
            self._in_flight[id(entry)] = entry
        self._decoder.admit([entry.row for entry in taken], [id(entry) for entry in taken])
        self.counters.admissions += 1
        self.counters.rows += len(taken)
        self.counters.most_rows_at_once = max(self.counters.most_rows_at_once, self._decoder.occupied)

    def _deliver(self, finished: list[tuple[object, Result]]) -> None:
        with self._lock:
            for key, result in finished:
                # The keys admit() handed the decoder; any other raises KeyError, which fails the rows in flight.
                entry = self._in_flight.pop(cast(int, key))
                self._done(entry)
                entry.results.put((entry.tag, result))
            self._lock.notify_all()

    def _fail(self, entries: list[_Entry[Row, Result]], exc: BaseException) -> None:
        self._decoder.drop()
        with self._lock:
            for entry in {id(e): e for e in entries}.values():
                self._in_flight.pop(id(entry), None)
                self._done(entry)
                entry.results.put((entry.tag, exc))
            self._lock.notify_all()

    def _done(self, entry: _Entry[Row, Result]) -> None:
        if entry.member is not None:
            entry.member.outstanding -= 1
