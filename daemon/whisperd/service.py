"""`whisperd run`: the watcher feeds the job store, the main loop feeds the supervised worker.

Threads: watchdog's and the watcher's threads only enqueue; everything else (claiming, running,
recording results, signals, sd_notify) happens on the main thread, so state changes have one owner.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from whisperd.atomic import atomic_write_text, mode_like
from whisperd.audio import probe_duration
from whisperd.config import ConfigError, DaemonConfig, InboxConfig, load_config
from whisperd.jobstore import Job, JobStore, JobStoreError
from whisperd.logs import configure_logging, get_logger
from whisperd.naming import NameTooLongError, check_name_fits, error_file_for, output_paths, stale_temps_for
from whisperd.notify import Notifier
from whisperd.options import OUTPUT_FORMATS
from whisperd.recording import RecordingRefused, open_recording
from whisperd.rules import EffectiveRules, RuleError, RuleResolver
from whisperd.status import STATUS_FILE, STATUS_REFRESH_SECONDS
from whisperd.supervisor import JobOutcome, WorkerStartError, WorkerSupervisor
from whisperd.watcher import Inbox, Watcher, scan_inbox

log = get_logger("whisperd.daemon")
EXIT_FAILURE = 1  # systemd's Restart=on-failure starts us again
EXIT_CONFIG = 78  # EX_CONFIG: the unit's RestartPreventExitStatus keeps systemd from looping on it
# Settings the running watcher and job store were built from; a reload cannot change them.
RESTART_ONLY_SETTINGS = ("state_dir", "settle_seconds", "rescan_seconds", "log_format", "log_level")
UNRECOGNISED_KEPT = 100  # names of unrecognised files remembered for `status` (and logged once each)


def remove_stale_temp_outputs(audio: Path) -> None:
    """Temp files a killed worker left for this file's outputs (hidden, so no one else reads them).

    Every format is swept, not only the current rules' ones: the rules may have changed since
    the attempt that left them.
    """
    for stale in stale_temps_for(audio, OUTPUT_FORMATS):
        stale.unlink(missing_ok=True)


def remove_error_note(audio: Path) -> None:
    """The note of an earlier failure goes once the file is done (best effort: a name too long
    for a note never had one)."""
    try:
        error_file_for(audio).unlink(missing_ok=True)
    except OSError as exc:
        log.debug("cannot remove error note", path=str(audio), error=str(exc))


def outputs_up_to_date(audio: Path, st: os.stat_result, formats: tuple[str, ...]) -> bool:
    """Every output exists and is newer than the audio: done before (by us or by hand), skip it."""
    try:
        return all(p.stat().st_mtime_ns >= st.st_mtime_ns for p in output_paths(audio, formats).values())
    except OSError:
        return False


class EmptyFileSweep:
    """Finds zero-byte recordings, which the watcher never reports.

    The watcher skips empty files because a file being created is empty for a moment; but a file
    that *stays* empty would then sit in the inbox with no job and no explanation. A file seen
    empty and unchanged by two sweeps at least `grace_seconds` apart is handed on like any
    complete file, so it ends `failed` with a note beside it.
    """

    def __init__(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self.next_at = time.monotonic() + grace_seconds
        self._seen: dict[str, tuple[int, int]] = {}

    def due(self) -> bool:
        return time.monotonic() >= self.next_at

    def sweep(self, inboxes: list[Inbox]) -> list[tuple[Path, os.stat_result]]:
        self.next_at = time.monotonic() + self.grace_seconds
        now = time.time()
        seen: dict[str, tuple[int, int]] = {}
        found: list[tuple[Path, os.stat_result]] = []
        for inbox in inboxes:
            for path, st in scan_inbox(inbox):
                if st.st_size != 0:
                    continue
                key = (st.st_mtime_ns, st.st_ino)
                if self._seen.get(path) == key and now - st.st_mtime >= self.grace_seconds:
                    found.append((Path(path), st))
                seen[path] = key
        self._seen = seen
        return found


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
        self.rules = RuleResolver()
        self._rules_lock = threading.Lock()
        self.wake = threading.Event()
        self.stop_requested = False
        self.stop_deadline: float | None = None
        self.reload_requested = False
        self.exit_code = 0
        self.started_at = time.time()
        self.current_job: Job | None = None
        self._last_status_write = 0.0
        self._lock_fd: int | None = None
        self.store: JobStore | None = None
        self.watcher: Watcher | None = None
        self.supervisor: WorkerSupervisor | None = None
        self.empty_files: EmptyFileSweep | None = None
        self.unrecognised: OrderedDict[str, str] = OrderedDict()
        self._unrecognised_lock = threading.Lock()

    # -- wiring ------------------------------------------------------------------------------

    def run(self) -> int:
        if self.config_error is not None:
            print(f"whisperd: {self.config_error}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
        cfg = self.config
        configure_logging(cfg.log_format, cfg.log_level)
        try:
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
            self._take_state_lock()
        except OSError as exc:
            log.error("cannot use the state directory", state_dir=str(cfg.state_dir), error=str(exc))
            return EXIT_CONFIG
        except ConfigError as exc:
            log.error("cannot start", error=str(exc))
            return EXIT_FAILURE
        self._install_signal_handlers()
        try:
            self.store = JobStore(cfg.database_path)
            self.store.check_writable()
            recovered = self.store.requeue_running(max_attempts=cfg.jobs.max_attempts)
        except (sqlite3.Error, JobStoreError, OSError) as exc:
            message = (f"the job database {cfg.database_path} cannot be used: {exc}. Move it aside to start "
                       "with an empty queue (finished files are not redone: their outputs are newer), "
                       "or fix its permissions")
            log.error("cannot use the job database", path=str(cfg.database_path), error=str(exc))
            print(f"whisperd: {message}", file=sys.stderr, flush=True)
            self.notifier.status(message[:200])
            return EXIT_CONFIG
        log.info("daemon starting", pid=os.getpid(), config=str(self.config_path), state_dir=str(cfg.state_dir),
                 inboxes=[str(i.path) for i in cfg.inboxes], requeued_after_crash=recovered)
        self.watcher = Watcher(self._inboxes(cfg), self.on_file_ready, settle_seconds=cfg.settle_seconds,
                               rescan_seconds=cfg.rescan_seconds, on_unrecognised=self.on_unrecognised_file)
        self.watcher.start()
        self.empty_files = EmptyFileSweep(max(cfg.rescan_seconds, cfg.settle_seconds))
        self.supervisor = WorkerSupervisor(cfg.engine.settings(), cfg.log_format, cfg.log_level)
        self.notifier.status("loading model")
        self._write_status(force=True)
        try:
            self.supervisor.start(self._loading_tick)
        except WorkerStartError as exc:
            if not self.stop_requested:
                log.error("cannot load the model", error=str(exc))
            self._shutdown()
            return 0 if self.stop_requested else EXIT_CONFIG
        self.notifier.ready(self._status_line())
        self._write_status(force=True)
        try:
            self._main_loop()
        finally:
            self._shutdown()
        return self.exit_code

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

    def inbox_for(self, path: Path) -> InboxConfig | None:
        matches = [i for i in self.config.inboxes if path.is_relative_to(i.path)]
        return max(matches, key=lambda i: len(i.path.parts), default=None)

    def effective_rules(self, path: Path) -> EffectiveRules:
        inbox = self.inbox_for(path)
        if inbox is None:
            raise RuleError(f"{path} is not inside any configured inbox")
        with self._rules_lock:
            return self.rules.resolve(path, inbox.path, inbox.rules)

    def on_file_ready(self, path: Path, st: os.stat_result) -> None:
        """Called by the watcher for every complete file; cheap: enqueue and wake the main loop."""
        assert self.store is not None
        try:
            formats = self.effective_rules(path).outputs
        except RuleError:
            formats = ()  # the job will fail with the rule error, where the user sees it
        if formats and self.store.latest_for_path(path) is None and outputs_up_to_date(path, st, formats):
            log.debug("outputs already up to date", path=str(path))
            return
        job = self.store.enqueue(path, st.st_size, st.st_mtime_ns)
        if job is not None:
            log.info("job queued", job_id=job.id, path=str(path), size=st.st_size)
            self.wake.set()

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
        assert self.store is not None
        while not self.stop_requested:
            if self.reload_requested:
                self._reload()
            if not self._ensure_worker():
                break
            self._tick()
            self._sweep_empty_files()
            job = self.store.claim_next(worker_pid=self.supervisor.pid if self.supervisor else None)
            if job is None:
                self.notifier.status(self._status_line())
                self.wake.wait(self._idle_wait())
                self.wake.clear()
                continue
            self._process_guarded(job)

    def _ensure_worker(self) -> bool:
        """Start a worker again after one was lost, before claiming: the model is warm when the next
        job comes, the job records the pid that really runs it, and status shows the truth.
        False when the loop must end (stopping, or the model no longer loads)."""
        assert self.supervisor is not None
        if self.supervisor.alive():
            return True
        self.notifier.status("restarting the worker")
        try:
            self.supervisor.start(self._loading_tick)
        except WorkerStartError as exc:
            if self.stop_requested:
                return False
            log.error("cannot restart the worker; exiting so the service manager can restart whisperd",
                      error=str(exc))
            self.exit_code = EXIT_FAILURE
            self.stop_requested = True
            return False
        self._write_status(force=True)
        return True

    def _sweep_empty_files(self) -> None:
        if self.empty_files is None or not self.empty_files.due():
            return
        for path, st in self.empty_files.sweep(self._inboxes(self.config)):
            self.on_file_ready(path, st)

    def _idle_wait(self) -> float:
        assert self.store is not None
        next_at = self.store.next_claimable_at()
        ping_in = self.notifier.seconds_to_next_ping()
        wait = 5.0 if ping_in is None else min(5.0, max(0.05, ping_in))
        if self.empty_files is not None:
            wait = min(wait, max(0.05, self.empty_files.next_at - time.monotonic()))
        if next_at is not None:
            wait = min(wait, max(0.05, next_at - time.time()))
        return wait

    def _process_guarded(self, job: Job) -> None:
        """One job's unexpected error (a bug, a database hiccup) must not take the daemon down."""
        try:
            self.process(job)
        except Exception as exc:
            self.current_job = None
            log.exception("unexpected error while handling a job", job_id=job.id, path=str(job.path))
            error = f"internal error in whisperd: {type(exc).__name__}: {exc}"
            try:
                current = self.store.get(job.id) if self.store else None
                if current is not None and current.state == "running":
                    try:
                        self.fail(current, error)
                    except Exception:
                        self.store.mark_failed(job.id, error)  # never leave it `running` for ever
            except Exception:
                log.exception("cannot record the failure", job_id=job.id)

    def process(self, job: Job) -> None:
        assert self.store is not None and self.supervisor is not None
        path = job.path
        bound = log.bind(job_id=job.id, path=str(path))
        try:
            st = path.stat()
        except FileNotFoundError:
            self.store.mark_superseded(job.id, "the file was deleted before it was transcribed")
            bound.info("job dropped", result="deleted")
            return
        except OSError as exc:
            self.fail(job, f"{path.name}: cannot read ({exc.strerror or exc})")
            return
        if (st.st_size, st.st_mtime_ns) != (job.size, job.mtime_ns):
            self.store.mark_superseded(job.id, "the file changed; its new version is queued")
            self.store.enqueue(path, st.st_size, st.st_mtime_ns)
            bound.info("job dropped", result="changed")
            return
        if st.st_size == 0:
            self.fail(job, f"{path.name}: empty file (0 bytes): there is nothing to transcribe")
            return
        try:
            rules = self.effective_rules(path)
            options = rules.decode_options()
            for target in output_paths(path, rules.outputs).values():
                check_name_fits(target)
        except (RuleError, ValueError, NameTooLongError) as exc:
            self.fail(job, str(exc))
            return
        if self._finished_before_restart(job, st, rules.outputs):
            return
        inbox = self.inbox_for(path)
        try:
            with open_recording(path, inbox.path if inbox else None,
                                inbox.follow_links_outside if inbox else False) as recording:
                audio_seconds = probe_duration(recording.read_path)
        except FileNotFoundError:
            self.store.mark_superseded(job.id, "the file was deleted before it was transcribed")
            bound.info("job dropped", result="deleted")
            return
        except RecordingRefused as exc:
            self.fail(job, str(exc))
            return
        timeout = self.config.jobs.timeout_for(audio_seconds)
        remove_stale_temp_outputs(path)
        self.current_job = job
        self._write_status(force=True)
        self.notifier.status(self._status_line())
        bound.info("job started", audio_seconds=audio_seconds, attempt=job.attempts + 1,
                   language=options.language, task=options.task, rules=[str(s) for s in rules.sources])
        request = {"job_id": job.id, "path": str(path), "options": options, "outputs": rules.outputs,
                   "inbox_root": str(inbox.path) if inbox else None,
                   "follow_links_outside": bool(inbox and inbox.follow_links_outside),
                   "size": job.size, "mtime_ns": job.mtime_ns}
        try:
            outcome = self.supervisor.run_job(request, timeout, self._tick)
        except WorkerStartError as exc:
            outcome = JobOutcome("crashed", error=f"the worker could not start: {exc}")
        finally:
            self.current_job = None
        self._record(job, outcome, rules)

    def _finished_before_restart(self, job: Job, st: os.stat_result, formats: tuple[str, ...]) -> bool:
        """A job interrupted after its outputs were renamed into place (killed before it was recorded
        done) is recorded done now instead of being run again: its complete output set is there and
        newer than the recording. A partial set (killed between two renames) is redone."""
        assert self.store is not None
        interrupted = job.attempts > 0 or job.last_error is not None
        if not interrupted or not outputs_up_to_date(job.path, st, formats):
            return False
        outputs = [str(p) for p in output_paths(job.path, formats).values()]
        self.store.mark_done(job.id, None, None, None, extra={
            "outputs": outputs, "note": "outputs were already in place from the interrupted attempt"})
        remove_error_note(job.path)
        log.info("job done", job_id=job.id, path=str(job.path), result="already_written")
        self._write_status(force=True)
        return True

    def _record(self, job: Job, outcome: JobOutcome, rules: EffectiveRules) -> None:
        assert self.store is not None
        path = job.path
        bound = log.bind(job_id=job.id, path=str(path))
        if outcome.kind == "done":
            reply = outcome.reply
            self.store.mark_done(job.id, reply["audio_seconds"], reply["wall_seconds"], reply["language"],
                                 extra={"outputs": reply["outputs"], "worker_pid": reply["pid"],
                                        "worker_jobs_done": reply["jobs_done"],
                                        "language_probability": reply["language_probability"],
                                        "rules": [str(s) for s in rules.sources]})
            remove_error_note(path)
            bound.info("job done", result="done", audio_seconds=round(reply["audio_seconds"], 2),
                       wall_seconds=round(reply["wall_seconds"], 2), language=reply["language"],
                       worker_pid=reply["pid"], segments=reply["segments"])
        elif outcome.reply.get("gone"):
            self.store.mark_superseded(job.id, outcome.error)
            bound.info("job dropped", result="gone", error=outcome.error)
        elif outcome.kind == "interrupted":
            remove_stale_temp_outputs(path)
            self.store.requeue(job.id, count_attempt=False, error="requeued: whisperd stopped during the job")
            bound.info("job requeued", result="requeued")
        elif outcome.permanent:
            self.fail(job, outcome.error)
        else:
            remove_stale_temp_outputs(path)
            attempts = job.attempts + 1
            if attempts >= self.config.jobs.max_attempts:
                self.fail(job, f"{outcome.error} (gave up after {attempts} attempts)")
                return
            backoff = self.config.jobs.retry_backoff_seconds * 2 ** (attempts - 1)
            self.store.mark_retry(job.id, outcome.error, backoff)
            bound.warning("job will be retried", result=outcome.kind, error=outcome.error, attempt=attempts,
                          retry_in_seconds=backoff)
        self._write_status(force=True)

    def fail(self, job: Job, error: str) -> None:
        """Tell the user next to the file (removed again when a later run succeeds), then mark failed.

        The note comes first, so that whoever sees `failed` in the job store or the log finds it.
        It is best effort: a name too long for a note, an unwritable folder or a name that is not
        UTF-8 must never keep the job from being recorded failed.
        """
        assert self.store is not None
        attempts = job.attempts + 1  # mark_failed counts the failing attempt
        remove_stale_temp_outputs(job.path)
        self._write_error_note(job.path, error, attempts)
        failed = self.store.mark_failed(job.id, error)
        log.error("job failed", job_id=job.id, path=str(job.path), result="failed", error=error,
                  attempts=failed.attempts)
        self._write_status(force=True)

    @staticmethod
    def _write_error_note(path: Path, error: str, attempts: int) -> None:
        note = (
            f"whisperd could not transcribe {path.name}\n\n{error}\n\n"
            f"attempts: {attempts}\ntime: {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
            "Replace or touch the file to try again.\n"
        )
        try:
            mode = mode_like(os.stat(path).st_mode)
        except OSError:
            mode = 0o600
        try:
            atomic_write_text(error_file_for(path), note, mode)
        except Exception as exc:  # noqa: BLE001 - see the docstring of fail()
            log.warning("cannot write error file", path=str(path), error=f"{type(exc).__name__}: {exc}")

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
        with self._rules_lock:
            self.rules = RuleResolver()
        assert self.watcher is not None and self.supervisor is not None
        self.watcher.update_inboxes(self._inboxes(new))
        if new.engine != old.engine:
            self._switch_engine(old)
        log.info("configuration reloaded", inboxes=[str(i.path) for i in self.config.inboxes])
        self.notifier.ready(self._status_line())
        self._write_status(force=True)

    def _switch_engine(self, old: DaemonConfig) -> None:
        """Load the new engine settings; if they cannot load, keep the old engine (and the rest of the new config)."""
        assert self.supervisor is not None
        new = self.config
        self.supervisor.stop()
        self.supervisor = WorkerSupervisor(new.engine.settings(), new.log_format, new.log_level)
        try:
            self.supervisor.start(self._loading_tick)
        except WorkerStartError as exc:
            if self.stop_requested:
                return
            log.error("new engine settings cannot load; keeping the old ones", error=str(exc))
            self.config = new.model_copy(update={"engine": old.engine})
            self.supervisor = WorkerSupervisor(old.engine.settings(), old.log_format, old.log_level)
            # Started again by _ensure_worker, which exits cleanly if even the old settings fail now.

    def _status_line(self) -> str:
        counts = self.store.counts() if self.store else {}
        running = f"transcribing {self.current_job.path.name}" if self.current_job else "idle"
        return f"{running}; {counts.get('queued', 0)} queued, {counts.get('done', 0)} done, {counts.get('failed', 0)} failed"

    def _write_status(self, force: bool = False) -> None:
        """daemon.json in the state directory, for `whisperd status` from another process."""
        now = time.time()
        if not force and now - self._last_status_write < STATUS_REFRESH_SECONDS:
            return
        self._last_status_write = now
        sup = self.supervisor
        status = {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "updated_at": now,
            "ready": bool(sup and sup.ready_info and sup.alive()),
            "worker_pid": sup.pid if sup else None,
            "worker_starts": sup.starts if sup else 0,
            "engine": sup.ready_info.get("engine") if sup else None,
            "current_job": {"id": self.current_job.id, "path": str(self.current_job.path)} if self.current_job else None,
            "inboxes": [str(i.path) for i in self.config.inboxes],
            "stopping": self.stop_requested,
            "unrecognised_files": self._unrecognised_existing(),
        }
        try:
            atomic_write_text(self.config.state_dir / STATUS_FILE, json.dumps(status, indent=2) + "\n")
        except OSError as exc:
            log.warning("cannot write status file", error=str(exc))

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
        self.current_job = None
        self._write_status(force=True)
        if self.store:
            self.store.close()
        log.info("daemon stopped", exit_code=self.exit_code)
