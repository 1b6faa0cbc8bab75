"""A throwaway PostgreSQL server for the tests, from Debian's `postgresql` package.

`initdb` refuses to run as root, so under root the server runs as the `postgres` user (runuser);
it listens on a unix socket in a fresh temp folder only (no TCP port), with fsync off: about a
second to start. scripts/setup.sh --test installs the package where it is missing.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

ROLE = "whisperd"


class PostgresUnavailable(RuntimeError):
    """No server can be started here; the message says why."""


def find_bindir() -> Path:
    """The newest installed server's bin folder (/usr/lib/postgresql/<version>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise PostgresUnavailable("no /usr/lib/postgresql/*/bin/initdb: install Debian's postgresql package "
                                  "(scripts/setup.sh --test does)")
    return Path(found[-1]).parent


class PostgresServer:
    """One server in its own temp folder: `start`, `stop` (and start again), `destroy`."""

    _names = itertools.count(1)

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="whisperd-pg-"))
        self.data = self.root / "data"
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no postgres user to run the server") from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", ROLE, "--no-sync", "-E", "UTF8")

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([*self.as_postgres, str(self.bindir / tool), *args], capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            raise PostgresUnavailable(f"{tool} failed ({result.returncode}): {output}")

    def start(self) -> PostgresServer:
        options = f"-k {self.root} -c listen_addresses='' -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-l", str(self.root / "server.log"),
                  "-o", options, "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """`fast` ends every session (what a restart of the service does); `immediate` is a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-m", mode, "stop")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{ROLE}@/{dbname}?host={self.root}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"t{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except PostgresUnavailable:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> PostgresServer:
    server = PostgresServer()
    try:
        return server.start()
    except BaseException:
        server.destroy()
        raise


def _server_for_tests() -> Iterator[PostgresServer]:
    """A started server, destroyed afterwards. PostgreSQL runs on these machines (setup installs it),
    so a server that cannot start fails the tests that need it, saying why, rather than skipping them."""
    try:
        server = start_server()
    except (PostgresUnavailable, OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"PostgreSQL server could not start: {exc}")
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One server for the session; tests that stop it use `own_postgres_server` instead."""
    yield from _server_for_tests()


@pytest.fixture
def own_postgres_server() -> Iterator[PostgresServer]:
    """A server of the test's own, which it may stop and start."""
    yield from _server_for_tests()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """A fresh database on the session's server."""
    return postgres_server.new_database()
