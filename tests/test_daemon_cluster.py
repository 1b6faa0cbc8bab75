"""Several hosts, one inbox, one PostgreSQL job store: real daemon processes, the real model.

Each daemon has its own state directory, so each is a host of its own (its own host id, claims,
leases and temp-file tag); they share the inbox folder and a database on a throwaway server
(pg_harness). They run the short dev clip, and one thread each, to fit a 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from daemon_harness import (
    TEMP_OUTPUT_GLOB,
    DaemonProcess,
    clip,
    long_recording,
    transcript_error,
    wait_for,
    whisperd_cli,
    write_config,
)
from pg_harness import PostgresServer
from whisperd.naming import TEMP_PREFIX, host_tag, temp_tag

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

INBOX_ID = "meetings"


@dataclass(frozen=True)
class PgRow:
    id: int
    rel_path: str
    state: str
    attempts: int
    owner: str | None
    token: int
    last_error: str | None
    extra: dict[str, Any]


def pg_rows(url: str) -> list[PgRow]:
    """Every job row, oldest first ([] before the first daemon created the table)."""
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            rows = conn.execute("SELECT id, rel_path, state, attempts, owner, token, last_error, extra"
                                " FROM jobs ORDER BY id").fetchall()
    except psycopg.errors.UndefinedTable:
        return []
    return [PgRow(r[0], os.fsdecode(bytes(r[1])), r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows]


def all_done(url: str, names: list[str]) -> list[PgRow] | None:
    rows = pg_rows(url)
    done = {r.rel_path for r in rows if r.state == "done"}
    return rows if done >= set(names) and not any(r.state in ("queued", "running") for r in rows) else None


class Host:
    """One daemon (a host): its config, state directory and process."""

    def __init__(self, tmp_path: Path, name: str, inbox: Path, url: str, lease: float) -> None:
        self.name = name
        self.state = tmp_path / f"state-{name}"
        self.config = write_config(
            tmp_path / f"{name}.yaml", [{"id": INBOX_ID, "path": str(inbox), "poll": True}], self.state,
            job_store={"backend": "postgresql", "url": url, "lease_seconds": lease},
            engine={"threads": 1, "streams": 1})
        self.daemon = DaemonProcess(self.config, tmp_path / f"{name}.log")

    @property
    def host_id(self) -> str:
        return (self.state / "host-id").read_text().strip()

    def started(self, path: Path) -> list[dict[str, Any]]:
        return self.daemon.named("job started", path=str(path))


def start_hosts(tmp_path: Path, inbox: Path, url: str, n: int, lease: float) -> list[Host]:
    hosts = [Host(tmp_path, f"host{i}", inbox, url, lease) for i in range(n)]
    for h in hosts:
        h.daemon.start()
    for h in hosts:
        h.daemon.wait_ready()
    return hosts


def stop_hosts(hosts: list[Host]) -> None:
    for h in hosts:
        h.daemon.kill_all()


def drop(inbox: Path, source: Path, names: list[str]) -> None:
    """Files appear at once, complete (renamed in from a staging folder on the same disk)."""
    staging = inbox.parent / "staging"
    staging.mkdir(exist_ok=True)
    for name in names:
        shutil.copyfile(source, staging / name)
    for name in names:
        os.rename(staging / name, inbox / name)


def outputs_of(inbox: Path, names: list[str]) -> dict[Path, tuple[int, int]]:
    """(inode, mtime_ns) of every output: a file written twice would change both."""
    out = {}
    for name in names:
        for suffix in (".txt", ".srt"):
            st = (inbox / name).with_suffix(suffix).stat()
            out[(inbox / name).with_suffix(suffix)] = (st.st_ino, st.st_mtime_ns)
    return out


def test_three_hosts_drain_one_inbox_exactly_once(tmp_path: Path, postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    source = clip("en_goforward")
    names = [f"{i:03}.wav" for i in range(100)]
    hosts = start_hosts(tmp_path, inbox, url, 3, lease=30)
    try:
        started = time.monotonic()
        drop(inbox, source.path, names)
        rows = wait_for(lambda: all_done(url, names), 1200, "all 100 files transcribed", interval=1.0)
        elapsed = time.monotonic() - started
        before = outputs_of(inbox, names)
        # Every row: one per file, done at the first attempt, claimed once.
        assert sorted(r.rel_path for r in rows) == names, "a file got a second job"
        assert all((r.state, r.attempts, r.token) == ("done", 0, 1) for r in rows)
        per_host = Counter(r.owner for r in rows)
        assert set(per_host) == {h.host_id for h in hosts}, f"not every host worked: {per_host}"
        # Every file started and finished exactly once across the three daemons' logs.
        for name in names:
            assert sum(len(h.started(inbox / name)) for h in hosts) == 1, name
            assert sum(len(h.daemon.named("job done", path=str(inbox / name))) for h in hosts) == 1, name
        # Outputs: newer than the recording, not rewritten by any host afterwards (a few rescans).
        audio_mtime = (inbox / names[0]).stat().st_mtime_ns
        assert all(mtime >= audio_mtime for _, mtime in before.values())
        time.sleep(5.0)
        assert outputs_of(inbox, names) == before
        assert not list(inbox.glob(TEMP_OUTPUT_GLOB)), "temp outputs left behind"
        for name in names[:3]:
            assert transcript_error(source, (inbox / name).with_suffix(".txt")) <= 0.2
        for h in hosts:
            h.daemon.check_alive("at the end")
        status = whisperd_cli("status", "--config", str(hosts[0].config))
        assert status.returncode == 0, status.stderr
        assert "jobs (all hosts): 0 queued, 0 running, 100 done, 0 failed" in status.stdout, status.stdout
        assert f"this host: {hosts[0].host_id}" in status.stdout
        print(f"3 hosts, 100 x {source.path.name}: {elapsed:.1f} s, {100 / elapsed:.2f} files/s; "
              f"jobs per host {sorted(per_host.values())}")
    finally:
        stop_hosts(hosts)


def test_a_killed_host_s_job_is_finished_by_another_after_its_lease(tmp_path: Path,
                                                                    postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    lease = 5.0
    hosts = start_hosts(tmp_path, inbox, url, 2, lease=lease)
    try:
        recording = long_recording()  # ten minutes: still running when the kill lands
        target = inbox / "long.wav"
        shutil.copyfile(recording.path, target)
        victim = wait_for(lambda: [h for h in hosts if h.started(target)], 300, "the long job to start")[0]
        survivor = next(h for h in hosts if h is not victim)
        time.sleep(1.0)  # into the inference, a lease renewal or two
        victim_id = victim.host_id
        victim.daemon.send(signal.SIGKILL)  # its worker dies with it (PR_SET_PDEATHSIG)
        killed_at = time.monotonic()
        victim.daemon.wait_exit(10)
        # What it could have left: a temp output it was writing (another host sweeps it only once
        # it is older than the lease; its own would be swept at once).
        stale = inbox / f"{TEMP_PREFIX}{temp_tag(target.with_suffix('.txt'))}.{host_tag(victim_id)}.4242.k1ll3d"
        stale.write_text("half a transcr")
        [row] = pg_rows(url)
        assert (row.state, row.owner, row.token) == ("running", victim_id, 1)
        taken = survivor.daemon.wait_event("job started", timeout=120, path=str(target))
        takeover = time.monotonic() - killed_at
        survivor.daemon.wait_event("job done", timeout=600, path=str(target))
        [row] = pg_rows(url)
        assert (row.state, row.owner, row.token, row.attempts) == ("done", survivor.host_id, 2, 1)
        assert f"host {victim_id} stopped renewing its lease" in (row.last_error or "")
        assert taken["attempt"] == 2
        assert survivor.daemon.named("jobs taken back from hosts whose lease expired")
        assert not list(inbox.glob(TEMP_OUTPUT_GLOB)), "temp files left behind"
        assert sorted(p.name for p in inbox.iterdir()) == ["long.srt", "long.txt", "long.wav"]
        error = transcript_error(recording, target.with_suffix(".txt"))
        assert error <= 0.2
        print(f"lease {lease:.0f} s: the surviving host started the killed host's job {takeover:.1f} s "
              f"after the kill; WER {error:.3f}")
        # The lease runs from the victim's last renewal (every third of the lease), not from the kill.
        assert lease * 2 / 3 - 0.5 <= takeover < lease + 15
    finally:
        stop_hosts(hosts)


def test_database_restart_while_jobs_run(tmp_path: Path, own_postgres_server: PostgresServer) -> None:
    server = own_postgres_server
    url = server.new_database()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    source = clip("en_goforward")
    first = [f"a{i:02}.wav" for i in range(30)]
    during = [f"b{i:02}.wav" for i in range(6)]
    hosts = start_hosts(tmp_path, inbox, url, 3, lease=30)
    try:
        drop(inbox, source.path, first)
        wait_for(lambda: sum(r.state == "done" for r in pg_rows(url)) >= 6, 600, "the first jobs to finish")
        server.stop("fast")  # every session ends; jobs in progress finish without their database
        down_at = time.monotonic()
        drop(inbox, source.path, during)  # seen by the watchers while the database is down
        wait_for(lambda: all(h.daemon.named("job database unavailable; retrying")
                             or h.daemon.named("job database unavailable; waiting to record") for h in hosts),
                 60, "every host to notice")
        time.sleep(max(0.0, 6.0 - (time.monotonic() - down_at)))
        server.start()
        back_at = time.monotonic()
        rows = wait_for(lambda: all_done(url, first + during), 900, "the queue to drain", interval=1.0)
        drained = time.monotonic() - back_at
        assert sorted(r.rel_path for r in rows) == sorted(first + during), "a file got a second job"
        assert all((r.state, r.attempts) == ("done", 0) for r in rows), [r for r in rows if r.attempts]
        for name in first + during:
            assert sum(len(h.started(inbox / name)) for h in hosts) == 1, f"{name} was transcribed twice"
            assert (inbox / name).with_suffix(".txt").is_file()
        for h in hosts:
            h.daemon.check_alive("after the database restart")
            assert h.daemon.named("job database reachable again")
        assert not list(inbox.glob(TEMP_OUTPUT_GLOB))
        held = sum(len(h.daemon.named("job database unavailable; waiting to record")) for h in hosts)
        print(f"database down {back_at - down_at:.1f} s; queue drained {drained:.1f} s after it came back; "
              f"{held} finished job(s) held their outcome until then; per host "
              f"{sorted(Counter(r.owner for r in rows).values())}")
        report = json.loads(whisperd_cli("status", "--config", str(hosts[0].config), "--json").stdout)
        assert report["counts"]["done"] == len(first + during) and report["error"] is None
    finally:
        stop_hosts(hosts)


def test_a_host_started_while_the_database_is_down_waits_for_it(tmp_path: Path,
                                                               own_postgres_server: PostgresServer) -> None:
    server = own_postgres_server
    url = server.new_database()
    server.stop("fast")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    host = Host(tmp_path, "late", inbox, url, lease=30)
    host.daemon.start()
    try:
        waiting = host.daemon.wait_event("job database unavailable; retrying", timeout=120)
        assert "No such file or directory" in waiting["error"] or "connection" in waiting["error"]
        shutil.copyfile(clip("en_goforward").path, inbox / "early.wav")
        time.sleep(3.0)
        host.daemon.check_alive("while the database is down")
        server.start()
        host.daemon.wait_event("job database reachable again", timeout=60)
        host.daemon.wait_ready()
        host.daemon.wait_event("job done", path=str(inbox / "early.wav"))
        [row] = pg_rows(url)
        assert (row.rel_path, row.state, row.attempts) == ("early.wav", "done", 0)
        host.daemon.send(signal.SIGTERM)
        assert host.daemon.wait_exit(60) == 0
    finally:
        host.daemon.kill_all()
