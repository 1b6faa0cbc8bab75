"""`whisperd run`: the daemon's lifecycle - start-up, signals, reload, shutdown - around the job runner.

The watcher feeds the job store; the main loop claims jobs and hands each to the JobRunner
(whisperd.runner), which runs it through the supervised worker and records the outcome. While the
worker has room (several jobs at once on an engine whose windows share batches), the loop claims
more; otherwise it waits on the worker.

Threads: watchdog's and the watcher's threads only enqueue; everything else (claiming, running,
recording results, signals, sd_notify) happens on the main thread, so state changes have one owner.

The job store may be a database shared with other hosts. While it is unreachable the daemon stays
up: it keeps the files it is told about for later, retries with backoff, and catches up once the
database is back (whisperd.runner holds a finished job's outcome meanwhile).

Over 500 lines as one idea: the daemon's lifecycle, wiring the parts together (each part
lives in its own module).
"""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whisperd.atomic import atomic_write_text
from whisperd.config import ConfigError, DaemonConfig, load_config
from whisperd.jobstore import Job, JobStore, JobStoreError, JobStoreUnavailable, load_host_id, open_job_store
from whisperd.logs import configure_logging, get_logger
from whisperd.naming import HOST_ID_ENV
from whisperd.notify import Notifier
from whisperd.options import EngineSettings
from whisperd.rules import InboxRules, RuleError
from whisperd.runner import JobRunner, outputs_up_to_date
from whisperd.status import STATUS_FILE, STATUS_REFRESH_SECONDS, DaemonStatus, progress_parts
from whisperd.supervisor import WorkerStartError, WorkerSupervisor
from whisperd.watcher import Inbox, Watcher

if TYPE_CHECKING:
    from whisperd.hooks import HookDispatcher
    from whisperd.metrics import Metrics

log = get_logger("whisperd.daemon")
EXIT_FAILURE = 1  # systemd's Restart=on-failure starts us again
EXIT_CONFIG = 78  # EX_CONFIG: the unit's RestartPreventExitStatus keeps systemd from looping on it
# Settings the running watcher and job store were built from; a reload cannot change them.
RESTART_ONLY_SETTINGS = ("state_dir", "settle_seconds", "rescan_seconds", "log_format", "log_level", "job_store",
                         "metrics")
UNRECOGNISED_KEPT = 100  # names of unrecognised files remembered for `status` (and logged once each)
#: Waits between attempts to reach an unavailable job database.
STORE_RETRY_FIRST_S = 0.5
STORE_RETRY_MAX_S = 10.0
#: While jobs run and the queue was empty, look again this often (a new file wakes the loop at once).
CLAIM_AGAIN_WHILE_BUSY_S = 5.0


class Daemon:
    def __init__(self, config_path: Path, overrides: dict[str, Any] | None = None) -> None:
        self.config_path = config_path
        self.overrides = overrides or {}
        # A bad config is reported by run() with EX_CONFIG, so that systemd does not restart-loop on it.
        self.config_error: ConfigError | None = None
        try:
            self.config: DaemonConfig = load_config(config_path, self.overrides)
        except ConfigError as exc:
            self.config_error = exc
        watchdog_seconds = None if self.config_error else self.config.watchdog_seconds
        self.notifier = Notifier(watchdog_seconds)
        self.rules = InboxRules(self.config.inboxes if self.config_error is None else ())
        self.wake = threading.Event()
        self.stop_requested = False
        self.stop_deadline: float | None = None
        self.reload_requested = False
        self.exit_code = 0
        self.started_at = time.time()
        self._last_status_write = 0.0
        self._counts: dict[str, int] = {}  # the job store's, as last read for the status line
        self._lock_fd: int | None = None
        self.host_id = ""
        self.store: JobStore | None = None
        self.store_down_since: float | None = None
        self._store_retry_s = STORE_RETRY_FIRST_S
        self._next_reap = 0.0
        self._claimed_nothing_at: float | None = None  # monotonic; None when the last claim got a job
        self._claims_paused_until = 0.0  # monotonic: the database failed while jobs were running
        # Files reported while the job database was unreachable, queued once it is back.
        self._pending: dict[Path, os.stat_result] = {}
        self._pending_lock = threading.Lock()
        self.runner: JobRunner | None = None
        self.watcher: Watcher | None = None
        self.supervisor: WorkerSupervisor | None = None
        self.metrics: Metrics | None = None
        self.hooks: HookDispatcher | None = None
        self.unrecognised: OrderedDict[str, str] = OrderedDict()
        self._unrecognised_lock = threading.Lock()

    # -- start-up ----------------------------------------------------------------------------

    def run(self) -> int:
        if self.config_error is not None:
            print(f"whisperd: {self.config_error}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
        cfg = self.config
        configure_logging(cfg.log_format, cfg.log_level)
        try:
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
            self._take_state_lock()
            self.host_id = load_host_id(cfg.state_dir)
            os.environ[HOST_ID_ENV] = self.host_id  # for temp names, here and in the worker
        except OSError as exc:
            log.error("cannot use the state directory", state_dir=str(cfg.state_dir), error=str(exc))
            return EXIT_CONFIG
        except ConfigError as exc:
            log.error("cannot start", error=str(exc))
            return EXIT_FAILURE
        self._install_signal_handlers()
        if not self._open_store():
            return 0 if self.stop_requested else EXIT_CONFIG
        assert self.runner is not None and self.store is not None
        try:
            recovered = self.runner.recover_interrupted()
        except JobStoreUnavailable:  # stopped while waiting for the database
            self._shutdown()
            return 0
        log.info("daemon starting", pid=os.getpid(), config=str(self.config_path), state_dir=str(cfg.state_dir),
                 inboxes=[str(i.path) for i in cfg.inboxes], requeued_after_crash=recovered, host_id=self.host_id,
                 job_store=self.store.location, lease_seconds=self.store.lease_seconds)
        self.store.on_queued(self.wake.set)
        if not self._start_metrics():
            self._shutdown()
            return EXIT_CONFIG
        self._start_hooks()
        self.watcher = Watcher(self._inboxes(cfg), self.on_file_ready, settle_seconds=cfg.settle_seconds,
                               rescan_seconds=cfg.rescan_seconds, on_unrecognised=self.on_unrecognised_file,
                               empty_settle_seconds=min(cfg.rescan_seconds, 60.0))
        self.watcher.start()
        self.notifier.status("loading model")
        self._write_status(force=True)
        error = self._start_worker(cfg.engine, "startup")
        if error is not None:
            if not self.stop_requested:
                log.error("cannot load the model", error=str(error))
            self._shutdown()
            return 0 if self.stop_requested else EXIT_CONFIG
        self.notifier.ready(self._status_line())
        self._write_status(force=True)
        try:
            self._main_loop()
        finally:
            self._shutdown()
        return self.exit_code

    def _open_store(self) -> bool:
        """Open the job store and prove it can be written; False (logged) when it cannot be used,
        or when a stop came while waiting for a database that is unreachable (retried with backoff)."""
        cfg = self.config
        where = str(cfg.database_path) if cfg.job_store.backend == "sqlite" else "the PostgreSQL job database"
        while True:
            try:
                if self.store is None:
                    self.store = open_job_store(cfg, self.host_id)
                self.store.check_writable()
                break
            except JobStoreUnavailable as exc:
                if not self._store_unavailable(exc):
                    return False
            except (sqlite3.Error, JobStoreError, OSError) as exc:
                advice = ("Move it aside to start with an empty queue (finished files are not redone: their outputs "
                          "are newer), or fix its permissions") if cfg.job_store.backend == "sqlite" else \
                    "Check job_store.url and the role's privileges (whisperd check-config tells more)"
                message = f"the job database {where} cannot be used: {exc}. {advice}"
                log.error("cannot use the job database", path=where, error=str(exc))
                print(f"whisperd: {message}", file=sys.stderr, flush=True)
                self.notifier.status(message[:200])
                return False
        self._store_available()
        self.runner = JobRunner(self.store, self.config.jobs, self.rules, on_change=self._job_changed,
                                tick=self._tick, on_progress=self._job_progressed)
        return True

    def _start_hooks(self) -> None:
        """Completion hooks: the runner records their events with the job's final state; a thread
        delivers them (also those a crash left pending, and retries)."""
        from whisperd.hooks import HookDispatcher, events_for, job_event

        assert self.store is not None and self.runner is not None
        self.hooks = HookDispatcher(self.store, self.config.hooks, self.metrics)
        self.runner.hook_events = lambda event, job, outputs, error: events_for(
            self.config.hooks, job_event(event, job, outputs=outputs, error=error))
        self.hooks.start()

    def _start_metrics(self) -> bool:
        """Serve metrics when configured; False (logged) when the address cannot be bound."""
        if self.config.metrics is None:
            return True
        from whisperd.metrics import Metrics

        self.metrics = metrics = Metrics()
        assert self.runner is not None
        self.runner.metrics = metrics
        view = metrics.view
        view.store, view.inboxes = self.store, {i.inbox_id: i.path for i in self.config.inboxes}
        view.worker_up = lambda: bool(self.supervisor and self.supervisor.alive())
        view.worker_busy = lambda: bool(self.runner and self.runner.running)
        view.events_lost = lambda: self.watcher.events_lost if self.watcher else 0
        try:
            metrics.serve(self.config.metrics.listen, self.config.metrics.textfile)
        except OSError as exc:
            log.error("cannot serve metrics", listen=self.config.metrics.listen, error=str(exc))
            return False
        return True

    # -- an unreachable job database ---------------------------------------------------------

    def _store_unavailable(self, exc: JobStoreError) -> bool:
        """Log (once per outage), then wait before the next try, doubling the wait up to a cap.
        False when a stop was asked for meanwhile."""
        if self.store_down_since is None:
            self.store_down_since = time.monotonic()
            log.warning("job database unavailable; retrying", error=str(exc), retry_in_seconds=self._store_retry_s)
            self.notifier.status(f"job database unavailable: {exc}"[:200])
        deadline = time.monotonic() + self._store_retry_s
        self._store_retry_s = min(self._store_retry_s * 2, STORE_RETRY_MAX_S)
        while not self.stop_requested and (left := deadline - time.monotonic()) > 0:
            self._tick()
            ping_in = self.notifier.seconds_to_next_ping()
            time.sleep(min(left, 0.5, ping_in if ping_in is not None else 0.5))
        return not self.stop_requested

    def _store_available(self) -> None:
        if self.store_down_since is not None:
            log.info("job database reachable again", down_seconds=round(time.monotonic() - self.store_down_since, 1))
            self.store_down_since = None
            self._write_status(force=True)
        self._store_retry_s = STORE_RETRY_FIRST_S

    @staticmethod
    def _inboxes(cfg: DaemonConfig) -> list[Inbox]:
        return [Inbox(i.path, recursive=i.recursive, poll=i.poll) for i in cfg.inboxes]

    def _take_state_lock(self) -> None:
        """One daemon per state directory: a second one would claim the same jobs."""
        fd = os.open(self.config.state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another whisperd is already running with state directory {self.config.state_dir}") from None
        self._lock_fd = fd

    def _start_worker(self, engine: EngineSettings, reason: str = "startup") -> WorkerStartError | None:
        """Start (or restart) the worker for `engine`: the one place a worker start and its failure
        are handled. Returns the error, and each caller decides what it means for the daemon."""
        cfg = self.config
        if self.supervisor is None or self.supervisor.settings != engine:
            if self.supervisor is not None:
                self.supervisor.stop()
            self.supervisor = WorkerSupervisor(engine, cfg.log_format, cfg.log_level)
        if self.metrics:
            self.metrics.worker_started(reason)
        try:
            ready = self.supervisor.start(self._loading_tick)
        except WorkerStartError as exc:
            return exc
        finally:
            self._write_status(force=True)
        if self.metrics:
            self.metrics.engine_loaded(ready.engine)
        return None

    # -- signals -----------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        """The first signal lets the running job finish (up to stop_timeout_seconds); a second one
        (Ctrl-C again) hands it back to the queue at once."""
        if not self.stop_requested:
            self.stop_requested = True
            self.stop_deadline = time.monotonic() + self.config.stop_timeout_seconds
        else:
            self.stop_deadline = time.monotonic()
        self.wake.set()

    def _on_reload_signal(self, signum: int, _frame: object) -> None:
        self.reload_requested = True
        self.wake.set()

    # -- the watcher's side: enqueue only ---------------------------------------------------

    def on_file_ready(self, path: Path, st: os.stat_result) -> None:
        """Called by the watcher for every complete file; cheap: enqueue and wake the main loop.
        While the job database is unreachable the file is kept for `_queue_pending`."""
        try:
            self._enqueue(path, st)
        except JobStoreUnavailable as exc:
            with self._pending_lock:
                self._pending[path] = st
            log.debug("job database unavailable; the file is queued when it is back", path=str(path), error=str(exc))

    def _enqueue(self, path: Path, st: os.stat_result) -> None:
        assert self.store is not None
        try:
            formats = self.rules.effective(path).outputs
        except RuleError:
            formats = ()  # the job will fail with the rule error, where the user sees it
        if formats and self.store.latest_for_path(path) is None and outputs_up_to_date(path, st, formats):
            log.debug("outputs already up to date", path=str(path))
            return
        job = self.store.enqueue(path, st.st_size, st.st_mtime_ns)
        if job is not None:
            if self.metrics:
                self.metrics.job_enqueued()
            log.info("job queued", job_id=job.id, path=str(path), size=st.st_size)
            self.wake.set()

    def _queue_pending(self) -> None:
        """Queue what the watcher reported while the database was unreachable (JobStoreUnavailable
        leaves the rest for the next try)."""
        while True:
            with self._pending_lock:
                if not self._pending:
                    return
                path, st = next(iter(self._pending.items()))
            self._enqueue(path, st)
            with self._pending_lock:
                if self._pending.get(path) is st:
                    del self._pending[path]

    def on_unrecognised_file(self, path: str, reason: str) -> None:
        """A file that is not taken as a recording by its name: logged once, listed in `status`."""
        with self._unrecognised_lock:
            known = path in self.unrecognised
            self.unrecognised[path] = reason
            self.unrecognised.move_to_end(path)
            while len(self.unrecognised) > UNRECOGNISED_KEPT:
                self.unrecognised.popitem(last=False)
        if not known:
            log.warning("file not taken as a recording", path=path, reason=reason)

    # -- the main loop ----------------------------------------------------------------------

    def _tick(self) -> bool:
        """Runs about twice a second while waiting; False once a stop must interrupt the current work."""
        self.notifier.watchdog()
        self._write_status()
        if self.stop_requested and self.stop_deadline is not None:
            return time.monotonic() < self.stop_deadline
        return True

    def _loading_tick(self) -> bool:
        """Like `_tick`, but a stop aborts at once: there is no job to finish while a model loads."""
        return self._tick() and not self.stop_requested

    def _main_loop(self) -> None:
        assert self.store is not None and self.runner is not None
        runner = self.runner
        while not self.stop_requested:
            if self.reload_requested and not runner.busy:  # a new engine must not cut jobs short
                self._reload()
            if not runner.busy and not self._ensure_worker():
                break
            self._tick()
            assert self.supervisor is not None
            runner.at_once = self._jobs_at_once()
            try:
                self._queue_pending()
                self._reap_expired()
                job = self._claim() if self._may_claim() else None
            except JobStoreError as exc:  # unreachable; or refusing us (a role dropped): retried too
                if runner.busy:  # the jobs in the worker come first; their outcomes wait for the database
                    self._claims_paused_until = time.monotonic() + STORE_RETRY_MAX_S
                    runner.collect(self.supervisor)
                else:
                    self._store_unavailable(exc)
                continue
            self._store_available()
            if job is not None:
                runner.start_guarded(job, self.supervisor)
            elif runner.busy:
                runner.collect(self.supervisor)
            else:
                self.notifier.status(self._status_line())
                self.wake.wait(self._idle_wait())
                self.wake.clear()
        if self.supervisor is not None:
            runner.finish(self.supervisor)

    def _may_claim(self) -> bool:
        """Claim when the worker has room, not while a reload waits for it to empty, and, while jobs
        run, not again soon after the queue was found empty unless a file came in since."""
        assert self.runner is not None
        if not self.runner.has_room() or self.reload_requested:
            return False
        if not self.runner.busy:
            return True
        now = time.monotonic()
        if now < self._claims_paused_until:
            return False
        if self._claimed_nothing_at is None:  # the last claim got a job: there may be more
            return True
        return self.wake.is_set() or now - self._claimed_nothing_at > CLAIM_AGAIN_WHILE_BUSY_S

    def _claim(self) -> Job | None:
        assert self.store is not None and self.supervisor is not None
        self.wake.clear()  # before the query: a file queued after it wakes the next claim
        job = self.store.claim_next(worker_pid=self.supervisor.pid)
        self._claimed_nothing_at = time.monotonic() if job is None else None
        return job

    def _jobs_at_once(self) -> int:
        """From `jobs.at_once` and what the loaded engine can share (one where it shares nothing)."""
        sup = self.supervisor
        engine = sup.ready_info.engine if sup and sup.ready_info else {}
        return self.config.jobs.jobs_at_once(int(engine.get("jobs_at_once", 1)),
                                             bool(engine.get("shares_batches", False)))

    def _reap_expired(self) -> None:
        """Take back jobs whose host stopped renewing their lease; a few times per lease."""
        assert self.store is not None and self.runner is not None
        if time.monotonic() < self._next_reap:
            return
        self._next_reap = time.monotonic() + self._reap_interval()
        if taken := self.runner.reap_expired():
            log.info("jobs taken back from hosts whose lease expired", jobs=taken)

    def _reap_interval(self) -> float:
        assert self.store is not None
        return min(max(self.store.lease_seconds / 4, 0.5), 15.0)

    def _ensure_worker(self) -> bool:
        """Start a worker again after one was lost, before claiming: the model is warm when the next
        job comes, the job records the pid that really runs it, and status shows the truth.
        False when the loop must end (stopping, or the model no longer loads)."""
        if self.supervisor is not None and self.supervisor.alive():
            return True
        self.notifier.status("restarting the worker")
        error = self._start_worker(self.config.engine, "restart")
        if error is None:
            return True
        if not self.stop_requested:
            log.error("cannot restart the worker; exiting so the service manager can restart whisperd",
                      error=str(error))
            self.exit_code = EXIT_FAILURE
            self.stop_requested = True
        return False

    def _idle_wait(self) -> float:
        assert self.store is not None
        try:
            next_at = self.store.next_claimable_at()
        except JobStoreError:
            next_at = 0.0  # try again soon: the main loop backs off
        ping_in = self.notifier.seconds_to_next_ping()
        wait = 5.0 if ping_in is None else min(5.0, max(0.05, ping_in))
        wait = min(wait, max(0.05, self._next_reap - time.monotonic()))
        if next_at is not None:
            wait = min(wait, max(0.05, next_at - time.time()))
        return wait

    def _job_changed(self) -> None:
        if self.hooks:
            self.hooks.wake.set()
        self._write_status(force=True)
        self.notifier.status(self._status_line())

    def _job_progressed(self) -> None:
        """The worker's report (about once a second): the queue counts are not read again for it."""
        self._write_status(force=True)
        self.notifier.status(self._status_line(counts=self._counts))

    # -- reload and status ------------------------------------------------------------------

    def _reload(self) -> None:
        """SIGHUP: re-read the config; new inboxes and rules apply now, a new engine after a worker restart."""
        self.reload_requested = False
        self.notifier.reloading()
        try:
            new = load_config(self.config_path, self.overrides)
        except ConfigError as exc:
            log.error("reload failed; keeping the running configuration", error=str(exc))
            self.notifier.ready(f"reload failed: {exc}"[:200])
            return
        old = self.config
        changed = [key for key in RESTART_ONLY_SETTINGS if getattr(new, key) != getattr(old, key)]
        if changed:
            log.warning("these settings take effect after a restart", keys=changed)
            new = new.model_copy(update={key: getattr(old, key) for key in changed})
        self.config = new
        self.notifier.set_watchdog_seconds(new.watchdog_seconds)
        self.rules = InboxRules(new.inboxes)
        assert self.watcher is not None and self.runner is not None and self.store is not None
        self.runner.rules = self.rules
        self.store.set_inboxes({i.inbox_id: i.path for i in new.inboxes})
        if self.metrics:
            self.metrics.view.inboxes = {i.inbox_id: i.path for i in new.inboxes}
        self.runner.configure(new.jobs)
        if self.hooks:
            self.hooks.hooks = dict(new.hooks)
        self.watcher.update_inboxes(self._inboxes(new))
        if new.engine != old.engine:
            self._switch_engine(old.engine)
        log.info("configuration reloaded", inboxes=[str(i.path) for i in self.config.inboxes])
        self.notifier.ready(self._status_line())
        self._write_status(force=True)

    def _switch_engine(self, old: EngineSettings) -> None:
        """Load the new engine settings; if they cannot load, keep the old engine (and the rest of the new config)."""
        error = self._start_worker(self.config.engine, "reload")
        if error is None or self.stop_requested:
            return
        log.error("new engine settings cannot load; keeping the old ones", error=str(error))
        self.config = self.config.model_copy(update={"engine": old})
        # The old engine is started again by _ensure_worker, which exits cleanly if even it fails now.

    def _status_line(self, counts: dict[str, int] | None = None) -> str:
        """systemd's STATUS=: `transcribing talk.m4a: 42% (eta 1m10s); 3 queued, 10 done, 0 failed`."""
        if counts is None:
            try:
                counts = self._counts = self.store.counts() if self.store else {}
            except JobStoreError as exc:
                return f"job database unavailable: {exc}"[:200]
        return f"{self._running_text()}; {counts.get('queued', 0)} queued, {counts.get('done', 0)} done, " \
               f"{counts.get('failed', 0)} failed"

    def _running_text(self) -> str:
        """`transcribing talk.m4a: 42% (eta 1m10s)`, with `and N more` when several jobs run."""
        runner = self.runner
        if runner is None or runner.current is None:
            return "idle"
        more = f" and {len(runner.running) - 1} more" if len(runner.running) > 1 else ""
        if runner.progress is None:
            return f"transcribing {runner.current.path.name}{more}"
        percent, *eta = progress_parts(runner.progress.to_dict())
        return f"transcribing {runner.current.path.name}: {percent}" + "".join(f" ({part})" for part in eta) + more

    def _write_status(self, force: bool = False) -> None:
        """daemon.json in the state directory, for `whisperd status` from another process."""
        now = time.time()
        if not force and now - self._last_status_write < STATUS_REFRESH_SECONDS:
            return
        self._last_status_write = now
        sup = self.supervisor
        running = self._running_jobs()
        status = DaemonStatus(
            pid=os.getpid(), started_at=self.started_at, updated_at=now,
            ready=bool(sup and sup.ready_info and sup.alive()),
            worker_pid=sup.pid if sup else None,
            worker_starts=sup.starts if sup else 0,
            engine=dict(sup.ready_info.engine) if sup and sup.ready_info else None,
            current_job=next(iter(running), None),
            running_jobs=running,
            inboxes=[str(i.path) for i in self.config.inboxes],
            stopping=self.stop_requested,
            unrecognised_files=self._unrecognised_existing(),
            host_id=self.host_id or None,
            job_store=self.store.location if self.store else None,
            job_store_down_since=(time.time() - (time.monotonic() - self.store_down_since)
                                  if self.store_down_since is not None else None),
        )
        try:
            atomic_write_text(self.config.state_dir / STATUS_FILE, status.to_json())
        except OSError as exc:
            log.warning("cannot write status file", error=str(exc))

    def _running_jobs(self) -> list[dict[str, Any]]:
        """The jobs in the worker for daemon.json: progress is null until the worker's first report."""
        runner = self.runner
        if runner is None:
            return []
        return [{"id": r.job.id, "path": str(r.job.path), "progress": r.progress.to_dict() if r.progress else None}
                for r in runner.running.values()]

    def _unrecognised_existing(self) -> list[dict[str, str]]:
        """The remembered unrecognised files that are still there (renamed or removed ones drop out)."""
        with self._unrecognised_lock:
            items = list(self.unrecognised.items())
        return [{"path": p, "reason": r} for p, r in items[-20:] if os.path.lexists(p)]

    def _shutdown(self) -> None:
        self.notifier.stopping()
        log.info("daemon stopping")
        if self.watcher:
            self.watcher.stop()
        if self.supervisor:
            self.supervisor.stop()
        if self.metrics:
            self.metrics.close()
        if self.hooks:
            self.hooks.stop()
        if self.runner:
            self.runner.running.clear()
        self._write_status(force=True)
        if self.store:
            self.store.close()
        log.info("daemon stopped", exit_code=self.exit_code)
