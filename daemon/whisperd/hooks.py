"""Completion hooks: a program run, or a signed webhook called, when a job is done or failed.

Delivery is at least once and survives a crash: the runner records each event in the job store's
outbox in the transaction that finishes the job (whisperd.jobstore), and a background thread of
this host delivers what is due. Delivering never blocks transcription and never changes a job.

Exec hooks get an argv list (no shell, no templating: a file named ``$(reboot).wav`` is only ever
data), the event in ``WHISPERD_*`` variables (byte-exact paths) and as JSON on stdin; they run in a
process group of their own, which is killed at the timeout. Webhooks are POSTed as JSON, signed per
the Standard Webhooks spec, without following redirects, and retried with backoff on network errors,
408, 429 and 5xx; the delivery id is the same on every retry.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whisperd import __version__
from whisperd.config import HookConfig
from whisperd.jobstore import HookDelivery, HookEvent, Job, JobStore, JobStoreError
from whisperd.logs import get_logger

if TYPE_CHECKING:
    from whisperd.metrics import Metrics

log = get_logger("whisperd.hooks")
OUTPUT_KEPT = 4096  # bytes of a hook's output kept for the log
IDLE_POLL_S = 5.0
RETRY_STATUSES = frozenset({408, 429})
SERVICE_MANAGER_ENV = (b"NOTIFY_SOCKET", b"WATCHDOG_", b"LISTEN_", b"WHISPERD_")


def job_event(event: str, job: Job, *, outputs: list[str] | None = None, error: str | None = None) -> dict[str, Any]:
    """The event as JSON-ready data. A path that is not UTF-8 is kept as ``\\udcXX`` escapes, which
    `os.fsencode` turns back into the exact bytes."""
    return {"event": event, "job_id": job.id, "audio_path": os.fsdecode(os.fsencode(job.path)),
            "outputs": outputs or [], "language": job.language, "audio_seconds": job.audio_seconds,
            "wall_seconds": job.wall_seconds, "attempts": job.attempts, "error": error, "time": time.time()}


def events_for(hooks: Mapping[str, HookConfig], event: dict[str, Any]) -> list[HookEvent]:
    """The outbox entries of one event: one per hook that subscribes to it."""
    return [(name, event) for name, hook in sorted(hooks.items()) if event["event"] in hook.on]


def hook_env(payload: Mapping[str, Any], delivery_id: str) -> dict[bytes, bytes]:
    """The daemon's environment (less systemd's sockets, which are the daemon's alone) plus the
    event; paths as their exact bytes."""
    def text(value: Any) -> bytes:
        return b"" if value is None else str(value).encode("utf-8", "surrogateescape")

    outputs = json.dumps(list(payload.get("outputs") or []))
    env = {k: v for k, v in os.environb.items() if not k.startswith(SERVICE_MANAGER_ENV)}
    env.update({
        b"WHISPERD_EVENT": text(payload.get("event")),
        b"WHISPERD_DELIVERY_ID": text(delivery_id),
        b"WHISPERD_JOB_ID": text(payload.get("job_id")),
        b"WHISPERD_AUDIO_PATH": os.fsencode(payload.get("audio_path") or ""),
        b"WHISPERD_OUTPUTS": outputs.encode("ascii"),
        b"WHISPERD_LANGUAGE": text(payload.get("language")),
        b"WHISPERD_AUDIO_SECONDS": text(payload.get("audio_seconds")),
        b"WHISPERD_ERROR": text(payload.get("error")),
    })
    return env


def run_exec(argv: list[str], payload: Mapping[str, Any], delivery_id: str, timeout: float) -> tuple[str | None, bytes]:
    """Run one exec hook; ``(error or None, its output truncated)``."""
    body = json.dumps(dict(payload)).encode("ascii")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=hook_env(payload, delivery_id), cwd="/", start_new_session=True)
    except OSError as exc:
        return f"cannot run {argv[0]}: {exc}", b""
    try:
        output, _ = proc.communicate(body, timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: a shell script's children too
        except ProcessLookupError:
            pass
        output, _ = proc.communicate()
        return f"timed out after {timeout:g} s; its process group was killed", output[:OUTPUT_KEPT]
    if proc.returncode != 0:
        return f"exited with status {proc.returncode}", output[:OUTPUT_KEPT]
    return None, output[:OUTPUT_KEPT]


def signing_key(secret_file: Path) -> bytes:
    """A Standard Webhooks secret (``whsec_`` + base64) or, otherwise, the file's bytes as they are."""
    secret = secret_file.read_bytes().strip()
    return base64.b64decode(secret[6:]) if secret.startswith(b"whsec_") else secret


def sign(key: bytes, delivery_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(key, f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx is then an HTTPError: the receiver's URL is wrong, not a place to follow


def post_webhook(url: str, key: bytes, payload: Mapping[str, Any], delivery_id: str,
                 timeout: float) -> tuple[str | None, bool]:
    """POST one event; ``(error or None, whether to retry)``."""
    body = json.dumps(dict(payload)).encode("ascii")
    stamp = int(time.time())
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"whisperd/{__version__}", "webhook-id": delivery_id,
        "webhook-timestamp": str(stamp), "webhook-signature": sign(key, delivery_id, stamp, body)})
    opener = urllib.request.build_opener(_NoRedirects)
    try:
        with opener.open(request, timeout=timeout) as reply:
            reply.read(OUTPUT_KEPT)
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}", exc.code in RETRY_STATUSES or exc.code >= 500
    except (urllib.error.URLError, OSError) as exc:
        return f"network error: {getattr(exc, 'reason', exc)}", True
    return None, False


class HookDispatcher:
    """Delivers this host's due outbox entries on a thread of its own, one at a time."""

    def __init__(self, store: JobStore, hooks: Mapping[str, HookConfig], metrics: Metrics | None = None) -> None:
        self.store = store
        self.hooks = dict(hooks)
        self.metrics = metrics
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="whisperd-hooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop between deliveries; one in progress stays pending and is sent again at the next start."""
        self._stop.set()
        self.wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for delivery in self.store.due_deliveries():
                    if self._stop.is_set():
                        return
                    self.deliver(delivery)
                next_at = self.store.next_delivery_at()
            except JobStoreError as exc:
                log.debug("hook deliveries wait for the job database", error=str(exc))
                next_at = None
            wait = IDLE_POLL_S if next_at is None else min(IDLE_POLL_S, max(0.05, next_at - time.time()))
            self.wake.wait(wait)
            self.wake.clear()

    def deliver(self, delivery: HookDelivery) -> None:
        hook = self.hooks.get(delivery.hook)
        retry_in: float | None = None
        bound = log.bind(hook=delivery.hook, delivery_id=delivery.id, job_id=delivery.job_id)
        if hook is None:
            error: str | None = "the hook is no longer configured"
        elif hook.exec is not None:
            error, output = run_exec(hook.exec, delivery.payload, delivery.id, hook.timeout_seconds)
            if output:
                bound.info("hook output", output=output.decode("utf-8", "backslashreplace"))
        else:
            assert hook.webhook is not None
            try:
                key = signing_key(hook.webhook.secret_file)
            except (OSError, ValueError) as exc:
                error, retry = f"cannot read the secret: {exc}", True
            else:
                error, retry = post_webhook(hook.webhook.url, key, delivery.payload, delivery.id, hook.timeout_seconds)
            if retry and delivery.attempts + 1 < hook.max_attempts:
                retry_in = hook.retry_backoff_seconds * 2 ** delivery.attempts
        result = "delivered" if error is None else "retry" if retry_in is not None else "failed"
        if error is None:
            bound.info("hook delivered", attempt=delivery.attempts + 1)
        elif retry_in is not None:
            bound.warning("hook delivery failed; retrying", error=error, retry_in_seconds=retry_in)
        else:
            bound.error("hook delivery failed", error=error, attempts=delivery.attempts + 1)
        if self.metrics:
            self.metrics.hook_delivery(delivery.hook, result)
        try:
            self.store.delivery_attempted(delivery.id, error=error, retry_in=retry_in)
        except JobStoreError as exc:  # sent again once the database is back: at least once
            bound.warning("cannot record the hook delivery", error=str(exc))
