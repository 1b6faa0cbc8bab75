"""Many files at once: 200 copies of a short clip dropped together, each transcribed exactly once.

Also records the resident memory of the daemon and its worker after 10 and after 200 jobs, the
numbers that show whether a long-running daemon leaks.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from daemon_harness import TEMP_OUTPUT_GLOB, clip, job_rows, running_daemon, wait_for, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

FILES = 200
MIB = 1024 * 1024


def done_count(state: Path) -> int:
    return sum(r.state == "done" for r in job_rows(state))


def test_200_files_dropped_at_once_are_each_done_once(tmp_path: Path) -> None:
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    # language: en spares each job the language detection pass; what is tested here is the queue.
    config = write_config(tmp_path / "whisperd.yaml", [{"path": "inbox", "rules": {"language": "en"}}], state)
    source = clip("en_cards_002").path  # 2 s
    with running_daemon(config, tmp_path / "daemon.log") as daemon:
        for i in range(FILES):
            shutil.copyfile(source, inbox / f"card_{i:03d}.wav")
        wait_for(lambda: done_count(state) >= 10, 600, "10 jobs done", interval=0.5)
        rss_10 = daemon.rss_bytes()
        wait_for(lambda: done_count(state) >= FILES or not daemon.proc or daemon.proc.poll() is not None,
                 3000, f"{FILES} jobs done", interval=1.0)
        daemon.check_alive("after the burst")
        daemon.wait_event("job done", count=FILES, timeout=60)
        rss_200 = daemon.rss_bytes()
        print(f"RSS after 10 jobs: daemon {rss_10['daemon'] / MIB:.0f} MiB, worker {rss_10['children'] / MIB:.0f} MiB; "
              f"after {FILES}: daemon {rss_200['daemon'] / MIB:.0f} MiB, worker {rss_200['children'] / MIB:.0f} MiB")

        rows = job_rows(state)
        assert len(rows) == FILES and {r.state for r in rows} == {"done"}
        assert len({r.path for r in rows}) == FILES
        done_events = Counter(e["path"] for e in daemon.named("job done"))
        assert len(done_events) == FILES and set(done_events.values()) == {1}
        assert len(list(inbox.glob("card_*.txt"))) == FILES and len(list(inbox.glob("card_*.srt"))) == FILES
        assert not list(inbox.glob(TEMP_OUTPUT_GLOB))
        assert len(daemon.named("worker ready")) == 1
        assert {r.worker_pid for r in rows} == daemon.worker_pids
        # No leak worth the name: 190 more jobs may not grow either process by more than a quarter.
        assert rss_200["daemon"] < rss_10["daemon"] * 1.25 + 20 * MIB
        assert rss_200["children"] < rss_10["children"] * 1.25 + 50 * MIB
