"""The daemon's small parts without a daemon process: sd_notify messages, the watchdog timing,
the empty-file sweep, stale temp outputs, `whisperd status` formatting and `check-config` walking."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from whisperd.checks import rule_files
from whisperd.config import InboxConfig
from whisperd.jobstore import SqliteJobStore
from whisperd.naming import HOST_ID_ENV, TEMP_PREFIX, error_file_for, host_tag, temp_prefix_for, temp_tag
from whisperd.notify import Notifier
from whisperd.runner import remove_stale_temp_outputs
from whisperd.status import collect_status, format_status

pytestmark = pytest.mark.timeout(60)


# -- sd_notify ----------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def test_status_with_non_latin1_name_and_newline_arrives_whole(notify_socket: socket.socket) -> None:
    Notifier().ready("transcribing 会议\nREADY=0.wav; 0 queued")
    message = notify_socket.recv(4096).decode("utf-8").splitlines()
    assert message == ["READY=1", "STATUS=transcribing 会议 READY=0.wav; 0 queued", f"MAINPID={os.getpid()}"]


def test_abstract_socket_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"whisperd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        Notifier().stopping()
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
    finally:
        sock.close()


def test_nothing_is_sent_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready("idle")  # must not raise


@pytest.mark.parametrize(("usec", "pid", "configured", "expected"), [
    ("2000000", None, None, 1.0),  # half of systemd's interval
    ("2000000", None, 0.25, 0.25),  # the config may ping more often
    ("2000000", None, 30.0, 1.0),  # but never less often than half the interval
    ("2000000", "1", None, None),  # the watchdog is for another process
    (None, None, 5.0, None),  # no watchdog asked for: no pings
    ("0", None, None, None),
])
def test_watchdog_ping_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                                configured: float | None, expected: float | None) -> None:
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    assert Notifier(configured).ping_seconds == expected


def test_sleep_until_the_next_ping_is_due_not_a_whole_period(notify_socket: socket.socket,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    notifier = Notifier()
    notifier.watchdog()
    pinged = time.monotonic()
    assert notify_socket.recv(100) == b"WATCHDOG=1"
    time.sleep(0.6)
    notifier.watchdog()  # too early: no ping
    remaining = notifier.seconds_to_next_ping()
    assert remaining is not None and remaining == pytest.approx(max(0.0, 1.0 - (time.monotonic() - pinged)), abs=0.05)
    assert remaining < 0.45
    notifier.watchdog(force=True)
    assert notify_socket.recv(100) == b"WATCHDOG=1"


# -- the daemon's helpers -----------------------------------------------------------------------


def test_stale_temp_outputs_of_any_format_are_removed(tmp_path: Path) -> None:
    audio = tmp_path / "talk.wav"
    def temp(name: str, pid: int) -> Path:
        return tmp_path / f"{TEMP_PREFIX}{temp_tag(tmp_path / name)}.{pid}.x1y2z3"

    stale = [temp("talk.txt", 123), temp("talk.vtt", 9), temp("talk.error.txt", 7)]
    keep = [temp("other.txt", 1), tmp_path / "talk.txt", tmp_path / ".talk.txt.swp"]
    for p in stale + keep:
        p.write_text("x")
    remove_stale_temp_outputs(audio)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert error_file_for(audio) == tmp_path / "talk.error.txt"


def test_temp_names_carry_the_host_and_hosts_sweep_only_their_own_or_old_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    audio = tmp_path / "talk.wav"
    tag = temp_tag(tmp_path / "talk.txt")
    monkeypatch.setenv(HOST_ID_ENV, "host-a")
    assert temp_prefix_for(tmp_path / "talk.txt") == f"{TEMP_PREFIX}{tag}.{host_tag('host-a')}.{os.getpid()}."
    mine = tmp_path / f"{TEMP_PREFIX}{tag}.{host_tag('host-a')}.123.abc"
    legacy = tmp_path / f"{TEMP_PREFIX}{tag}.123.abc"  # written before temp names carried the host
    theirs_new = tmp_path / f"{TEMP_PREFIX}{tag}.{host_tag('host-b')}.456.def"
    theirs_old = tmp_path / f"{TEMP_PREFIX}{tag}.{host_tag('host-b')}.789.ghi"
    for p in (mine, legacy, theirs_new, theirs_old):
        p.write_text("x")
    past = time.time() - 300
    os.utime(theirs_old, (past, past))
    remove_stale_temp_outputs(audio, older_than=120)
    assert [p.exists() for p in (mine, legacy, theirs_new, theirs_old)] == [False, False, True, False]
    assert host_tag() == host_tag("host-a") != host_tag("host-b")


def test_check_config_skips_hidden_folders(tmp_path: Path) -> None:
    for folder in ("", "a", "a/b", ".git", "a/.trash"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / ".whisperd.yaml").write_text("task: transcribe\n")
    found = sorted(p.parent.relative_to(tmp_path).as_posix() for p in rule_files(InboxConfig(path=tmp_path)))
    assert found == [".", "a", "a/b"]
    assert list(rule_files(InboxConfig(path=tmp_path, recursive=False))) == [tmp_path / ".whisperd.yaml"]


# -- whisperd status ----------------------------------------------------------------------------


def test_status_of_a_state_dir_never_used(tmp_path: Path) -> None:
    report = collect_status(tmp_path)
    assert report["daemon"] is None and report["counts"] == {}
    assert format_status(report).splitlines()[1] == "daemon: never started here"


def test_status_lists_retried_jobs_and_failures(tmp_path: Path) -> None:
    with SqliteJobStore(tmp_path / "jobs.sqlite3") as store:
        retried = store.enqueue(tmp_path / "retried.wav", 10, 1)
        store.claim_next()
        store.mark_retry(retried.id, "the worker process died during the job", 0)
        store.claim_next()
        store.mark_done(retried.id, 12.0, 3.0, "en")
        bad = store.enqueue(tmp_path / "bad.wav", 5, 1)
        store.mark_failed(bad.id, "bad.wav: not an audio file")
        store.enqueue(tmp_path / "waiting.wav", 5, 1)
    (tmp_path / "daemon.json").write_text('{"pid": 999999999, "updated_at": 0}')
    report = collect_status(tmp_path)
    assert report["counts"]["done"] == 1 and report["counts"]["queued"] == 1
    assert report["daemon"]["alive"] is False
    [recent] = report["recent"]
    assert (recent["path"], recent["attempts"]) == (str(tmp_path / "retried.wav"), 1)
    text = format_status(report)
    assert "daemon: not running (last pid 999999999" in text
    assert "jobs: 1 queued, 0 running, 1 done, 1 failed, 0 superseded" in text
    assert (f"  {tmp_path / 'retried.wav'} (" in text
            and "12.0 s audio in 3.0 s, attempts 2 (1 failed: the worker process died during the job)" in text)
    assert f"  {tmp_path / 'bad.wav'} (" in text and "attempts 1): bad.wav: not an audio file" in text


def test_status_of_a_shared_store_names_the_hosts(tmp_path: Path) -> None:
    (tmp_path / "host-id").write_text("gpu-1\n")
    with SqliteJobStore(tmp_path / "jobs.sqlite3", host_id="gpu-1") as store:
        store.enqueue(tmp_path / "a.wav", 10, 1)
        store.claim_next()
        report = collect_status(tmp_path, open_store=lambda: SqliteJobStore(tmp_path / "jobs.sqlite3",
                                                                            host_id="gpu-2"))
    assert report["running"][0]["host"] == "gpu-1" and report["host_id"] == "gpu-1"
    report["job_store"] = "postgresql whisperd@db.lan/whisperd"  # as a shared store reports itself
    text = format_status(report)
    assert "job store: postgresql whisperd@db.lan/whisperd (shared by every host); this host: gpu-1" in text
    assert "jobs (all hosts): 0 queued, 1 running" in text
    assert f"running: {tmp_path / 'a.wav'} (attempt 1, host gpu-1)" in text


def test_status_survives_a_damaged_status_file(tmp_path: Path) -> None:
    (tmp_path / "daemon.json").write_text("{half")
    report = collect_status(tmp_path)
    assert "daemon.json" in report["daemon"]["error"]
    assert "daemon: unknown (" in format_status(report)


def test_check_config_with_a_postgresql_job_store(tmp_path: Path, pg_url: str) -> None:
    import psycopg
    import yaml

    from whisperd.checks import check_config

    (tmp_path / "inbox").mkdir()

    def config(url: str) -> Path:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"inboxes": [{"id": "in", "path": "inbox"}], "state_dir": "state",
                                        "job_store": {"backend": "postgresql", "url": url}}))
        return path

    assert check_config(config(pg_url)) == []  # empty database: the tables can be created
    with psycopg.connect(pg_url, autocommit=True) as raw:
        raw.execute("CREATE TABLE whisperd_schema (version integer NOT NULL)")
        raw.execute("INSERT INTO whisperd_schema VALUES (99)")
    [newer] = check_config(config(pg_url))
    assert "job_store:" in newer and "schema version 99 is newer" in newer
    [unreachable] = check_config(config(f"postgresql://whisperd@/x?host={tmp_path}"))
    assert "job_store: cannot connect to postgresql whisperd@" in unreachable
