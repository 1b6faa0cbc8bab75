"""Prometheus metrics: counters the daemon updates as jobs move, gauges read when scraped.

Off unless the config has a ``metrics:`` section. Exposed over HTTP (``listen``) and/or written as a
node_exporter textfile (``textfile``, replaced atomically every ``TEXTFILE_INTERVAL_S``).

The job store's gauges (jobs per state, the oldest queued job) cover every host that shares the
store; they are read at scrape time by a collector of their own, so the main loop never computes
them. A scrape while the database is unreachable leaves them out instead of failing the scrape.
Labels never carry file paths: an inbox is named by its id.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from whisperd import __version__
from whisperd.config import parse_listen
from whisperd.jobstore import STATES, Job, JobStore, JobStoreError
from whisperd.logs import get_logger

log = get_logger("whisperd.metrics")
TEXTFILE_INTERVAL_S = 15.0
#: Job lengths from a voice memo to a long meeting (seconds of processing or of waiting).
DURATION_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


@dataclass
class StoreView:
    """What the scrape-time collector reads: set by the daemon once its parts exist."""

    store: JobStore | None = None
    inboxes: Mapping[str, Path] = field(default_factory=dict)  # inbox id -> path on this host
    worker_up: Callable[[], bool] = lambda: False
    worker_busy: Callable[[], bool] = lambda: False
    events_lost: Callable[[], int] = lambda: 0


class _ScrapeCollector(Collector):
    """Gauges that are read, not counted: the job store's, the worker's and the inboxes'."""

    def __init__(self, view: StoreView) -> None:
        self.view = view

    def collect(self) -> Iterable[Metric]:
        view = self.view
        yield GaugeMetricFamily("whisperd_worker_up", "1 while the worker process (holding the model) is alive.",
                                value=int(view.worker_up()))
        yield GaugeMetricFamily("whisperd_worker_busy", "1 while the worker is transcribing a job.",
                                value=int(view.worker_busy()))
        inbox_up = GaugeMetricFamily("whisperd_inbox_up", "1 while the inbox folder exists and is a folder.",
                                     labels=["inbox"])
        for inbox_id, path in sorted(view.inboxes.items()):
            inbox_up.add_metric([inbox_id], int(os.path.isdir(path)))
        yield inbox_up
        yield CounterMetricFamily("whisperd_watcher_events_lost", "File events the kernel dropped (inotify "
                                  "overflow); each triggers a rescan.", value=view.events_lost())
        if view.store is None:
            return
        try:
            counts = view.store.counts()
            oldest = view.store.queued(limit=1)
        except JobStoreError as exc:
            log.debug("metrics: job store unavailable", error=str(exc))
            return
        jobs = GaugeMetricFamily("whisperd_jobs", "Jobs in the job store by state (every host sharing it).",
                                 labels=["state"])
        for state in STATES:
            jobs.add_metric([str(state)], counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("whisperd_oldest_queued_job_timestamp_seconds",
                                "When the oldest queued job was queued (0 when the queue is empty).",
                                value=oldest[0].enqueued_at if oldest else 0.0)


class Metrics:
    """The daemon's metrics in a registry of their own; the methods are what the daemon reports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.view = StoreView()
        r = self.registry
        self.build_info = Gauge("whisperd_build_info", "whisperd version and the engine the worker loaded.",
                                ["version", "backend", "model", "device", "precision"], registry=r)
        self.enqueued = Counter("whisperd_jobs_enqueued", "Jobs this host queued.", registry=r)
        self.attempts = Counter("whisperd_job_attempts", "Attempts this host ran, by how they ended.",
                                ["outcome"], registry=r)
        self.finished = Counter("whisperd_jobs_finished", "Jobs this host finished, by final state.",
                                ["state"], registry=r)
        self.duration = Histogram("whisperd_job_duration_seconds", "Wall time of successful transcriptions.",
                                  buckets=DURATION_BUCKETS, registry=r)
        self.queue_wait = Histogram("whisperd_job_queue_wait_seconds", "Time from queued to started, per attempt.",
                                    buckets=DURATION_BUCKETS, registry=r)
        self.audio = Counter("whisperd_audio_seconds", "Seconds of audio transcribed.", registry=r)
        self.processing = Counter("whisperd_processing_seconds", "Wall seconds spent on successful transcriptions.",
                                  registry=r)
        self.last_finished = Gauge("whisperd_last_job_finished_timestamp_seconds",
                                   "When this host last finished a job (done or failed).", registry=r)
        self.worker_starts = Counter("whisperd_worker_starts", "Worker processes started, by why.",
                                     ["reason"], registry=r)
        self.hook_deliveries = Counter("whisperd_hook_deliveries", "Completion hook deliveries, by result "
                                       "(delivered, retry, failed).", ["hook", "result"], registry=r)
        for outcome in ("done", "error", "crashed", "timeout", "interrupted", "gone"):
            self.attempts.labels(outcome)
        for state in ("done", "failed", "superseded"):
            self.finished.labels(state)
        for reason in ("startup", "restart", "reload"):
            self.worker_starts.labels(reason)
        r.register(_ScrapeCollector(self.view))
        self._servers: list[Any] = []
        self._stop = threading.Event()
        self._textfile_thread: threading.Thread | None = None

    # -- what the daemon reports ------------------------------------------------------------------

    def engine_loaded(self, engine: Mapping[str, Any]) -> None:
        self.build_info.clear()
        self.build_info.labels(__version__, *(str(engine.get(k, "")) for k in
                                              ("backend", "model", "device", "precision"))).set(1)

    def job_enqueued(self) -> None:
        self.enqueued.inc()

    def job_started(self, job: Job) -> None:
        if job.started_at is not None:
            self.queue_wait.observe(max(0.0, job.started_at - job.enqueued_at))

    def attempt(self, outcome: str) -> None:
        self.attempts.labels(outcome).inc()

    def job_finished(self, job: Job) -> None:
        """A job reached a final state on this host; `job` is the row as recorded."""
        self.finished.labels(str(job.state)).inc()
        if job.state == "superseded":
            return
        self.last_finished.set(job.finished_at or 0.0)
        if job.state == "done" and job.wall_seconds is not None:
            self.duration.observe(job.wall_seconds)
            self.processing.inc(job.wall_seconds)
            self.audio.inc(job.audio_seconds or 0.0)

    def hook_delivery(self, hook: str, result: str) -> None:
        self.hook_deliveries.labels(hook, result).inc()

    def worker_started(self, reason: str) -> None:
        self.worker_starts.labels(reason).inc()

    # -- exposing them ----------------------------------------------------------------------------

    def serve(self, listen: str | None, textfile: Path | None) -> None:
        if listen:
            host, port = parse_listen(listen)
            server, _thread = start_http_server(port, host, registry=self.registry)
            self._servers.append(server)
            log.info("metrics served", listen=f"{host}:{port}", path="/metrics")
        if textfile is not None:
            self._textfile_thread = threading.Thread(target=self._write_textfile_loop, args=(textfile,),
                                                     name="whisperd-metrics-textfile", daemon=True)
            self._textfile_thread.start()

    def _write_textfile_loop(self, path: Path) -> None:
        while True:
            try:
                write_to_textfile(str(path), self.registry)  # a temp file renamed over the old one
            except OSError as exc:
                log.warning("cannot write the metrics textfile", path=str(path), error=str(exc))
            if self._stop.wait(TEXTFILE_INTERVAL_S):
                return

    def close(self) -> None:
        self._stop.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        if self._textfile_thread is not None:
            self._textfile_thread.join(5)
