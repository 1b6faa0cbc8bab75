"""Prometheus metrics: the config section, the collector over a real job store, and the /metrics
endpoint of a running daemon (two good files and one that fails), parsed with prometheus_client."""

from __future__ import annotations

import shutil
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon_harness import clip, final_row, running_daemon, wait_for, write_config, write_rules
from whisperd.config import ConfigError, load_config, parse_listen
from whisperd.jobstore import SqliteJobStore
from whisperd.metrics import Metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("listen, expected", [("127.0.0.1:9857", ("127.0.0.1", 9857)), (":9857", ("127.0.0.1", 9857)),
                                              ("[::1]:80", ("::1", 80)), ("localhost:1", ("localhost", 1))])
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9857", "127.0.0.1:0", "127.0.0.1:http", "example.org:9857"])
def test_a_bad_listen_address_is_a_config_error_naming_the_key(tmp_path: Path, listen: str) -> None:
    config = write_config(tmp_path / "c.yaml", [{"path": "inbox"}], tmp_path / "state", metrics={"listen": listen})
    with pytest.raises(ConfigError, match="metrics.listen"):
        load_config(config)


def test_metrics_are_off_unless_configured_and_the_textfile_is_relative_to_the_config(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path / "a.yaml", [{"path": "in"}], tmp_path / "s")).metrics is None
    cfg = load_config(write_config(tmp_path / "b.yaml", [{"path": "in"}], tmp_path / "s",
                                   metrics={"textfile": "prom/whisperd.prom"}))
    assert cfg.metrics is not None and cfg.metrics.textfile == tmp_path / "prom" / "whisperd.prom"


def test_collector_reads_the_store_at_scrape_time_and_textfile_is_written(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", host_id="h", inboxes={"main": tmp_path})
    metrics = Metrics()
    metrics.view.store, metrics.view.inboxes = store, {"main": tmp_path, "gone": tmp_path / "missing"}
    try:
        first = store.enqueue(tmp_path / "a.wav", 1, 1, now=1000.0)
        store.enqueue(tmp_path / "b.wav", 1, 1, now=1001.0)
        assert first is not None
        claimed = store.claim_next(now=1004.0)
        assert claimed is not None
        metrics.job_started(claimed)
        done = store.mark_done(claimed.id, 30.0, 6.0, "en", now=1010.0)
        metrics.attempt("done")
        metrics.job_finished(done)
        prom = tmp_path / "whisperd.prom"
        metrics.serve(None, prom)
        text = wait_for(lambda: prom.exists() and prom.read_text(), 10, "the textfile")
        found = samples(text)
        assert value(found, "whisperd_jobs", state="queued") == 1
        assert value(found, "whisperd_jobs", state="done") == 1
        assert value(found, "whisperd_oldest_queued_job_timestamp_seconds") == 1001.0
        assert value(found, "whisperd_job_queue_wait_seconds_sum") == 4.0
        assert value(found, "whisperd_audio_seconds_total") == 30.0
        assert value(found, "whisperd_processing_seconds_total") == 6.0
        assert value(found, "whisperd_last_job_finished_timestamp_seconds") == 1010.0
        assert value(found, "whisperd_inbox_up", inbox="main") == 1
        assert value(found, "whisperd_inbox_up", inbox="gone") == 0
        assert not list(tmp_path.glob("whisperd.prom.*"))  # written through a temp file, renamed over
    finally:
        metrics.close()
        store.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scrape_a_running_daemon_after_two_good_files_and_one_bad(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_rules(inbox / "broken", task="transcrbe")
    port = free_port()
    config = write_config(tmp_path / "whisperd.yaml", [{"id": "main", "path": "inbox", "rules": {"outputs": ["txt"]}}],
                          tmp_path / "state", metrics={"listen": f"127.0.0.1:{port}"})
    source = clip("en_goforward")
    started = time.time()
    with running_daemon(config, tmp_path / "daemon.log") as daemon:
        paths = [inbox / "one.wav", inbox / "two.wav", inbox / "broken" / "three.wav"]
        for path in paths:
            shutil.copyfile(source.path, path)
        rows = [final_row(tmp_path / "state", p) for p in paths]
        assert [r.state for r in rows] == ["done", "done", "failed"]
        daemon.wait_event("job failed", 30)

        def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                return samples(reply.read().decode("utf-8"))

        found = wait_for(lambda: (s := scrape()) and value(s, "whisperd_worker_busy") == 0 and s, 30, "an idle worker")
    assert value(found, "whisperd_jobs_enqueued_total") == 3
    assert value(found, "whisperd_job_attempts_total", outcome="done") == 2
    assert value(found, "whisperd_job_attempts_total", outcome="error") == 0
    assert value(found, "whisperd_jobs_finished_total", state="done") == 2
    assert value(found, "whisperd_jobs_finished_total", state="failed") == 1
    assert value(found, "whisperd_job_duration_seconds_count") == 2
    assert value(found, "whisperd_job_queue_wait_seconds_count") == 2
    assert value(found, "whisperd_audio_seconds_total") == pytest.approx(2 * 2.8, abs=0.5)
    assert value(found, "whisperd_processing_seconds_total") > 0
    assert value(found, "whisperd_jobs", state="done") == 2
    assert value(found, "whisperd_jobs", state="failed") == 1
    assert value(found, "whisperd_jobs", state="queued") == 0
    assert value(found, "whisperd_oldest_queued_job_timestamp_seconds") == 0
    assert started < value(found, "whisperd_last_job_finished_timestamp_seconds") <= time.time()
    assert value(found, "whisperd_worker_up") == 1
    assert value(found, "whisperd_worker_starts_total", reason="startup") == 1
    assert value(found, "whisperd_inbox_up", inbox="main") == 1
    assert value(found, "whisperd_watcher_events_lost_total") == 0
    build = [labels for (name, labels) in found if name == "whisperd_build_info"]
    assert len(build) == 1 and dict(build[0])["model"].endswith("whisper-base"), build
    assert not any("/" in v for (_name, labels) in found for _k, v in labels if _k != "model"), "a path in a label"
