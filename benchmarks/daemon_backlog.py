#!/usr/bin/env python
"""The daemon draining a backlog: N meetings already in the inbox when `whisperd run` starts.

    .venv/bin/python benchmarks/daemon_backlog.py --device cuda --precision fp16 --files 32 --at-once 1,auto

Each `--at-once` value is one run of the real daemon (watcher, job store, supervised worker) on a
fresh inbox and state directory, one after the other in this process tree. Reported per run: jobs
done, audio seconds, wall seconds from the first job's start to the last job's end (model load
excluded; from the job store's own timestamps), audio seconds per wall second, the most jobs that
were in the worker at once, WER over all transcripts, and the worker's peak RSS. Audio: the
meetings benchmarks/speed.py uses (built on first use, or `--audio FILE...`), repeated.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "support"))  # whisperd_support: meetings, WER

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]


def run_daemon(at_once: str, sources: list[Path], args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One daemon over a fresh inbox holding `args.files` copies of the sources; its numbers."""
    from whisperd_support.evaluation import error_rate
    from whisperd_support.evaluation.meeting import Meeting

    inbox, state = root / "inbox", root / "state"
    inbox.mkdir(parents=True)
    copies: dict[Path, Path] = {}
    for i in range(args.files):
        source = sources[i % len(sources)]
        copies[shutil.copyfile(source, inbox / f"{i:03d}-{source.name}")] = source
    config = {
        "inboxes": [{"path": str(inbox), "rules": {"language": "en", "outputs": ["txt", "srt"]}}],
        "state_dir": str(state), "settle_seconds": 0.5, "rescan_seconds": 2.0, "log_format": "json",
        "engine": {"backend": "transformers", "model": args.model, "device": args.device,
                   "precision": args.precision, "batch_size": args.batch_size},
        "jobs": {"at_once": at_once if at_once == "auto" else int(at_once)},
    }
    (root / "whisperd.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    log_path = root / "daemon.log"
    with log_path.open("wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "whisperd", "run", "--config", str(root / "whisperd.yaml")],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        rows, peak_rss = [], 0
        deadline = time.monotonic() + args.timeout
        try:
            while time.monotonic() < deadline and daemon.poll() is None:
                time.sleep(0.25)
                for child in psutil.Process(daemon.pid).children():
                    try:
                        peak_rss = max(peak_rss, child.memory_info().rss)
                    except psutil.Error:
                        pass
                rows = job_rows(state / "jobs.sqlite3")
                if len(rows) == args.files and all(r["state"] in ("done", "failed") for r in rows):
                    break
        finally:
            daemon.terminate()
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    if not rows or any(r["state"] not in ("done", "failed") for r in rows) or len(rows) < args.files:
        print(f"the run did not finish: {len(rows)} jobs, states {sorted(r['state'] for r in rows)}; the daemon's log ends:",
              *[line for line in log_path.read_text(errors="replace").splitlines()
                if '"inbox scan done"' not in line][-40:], sep="\n", file=sys.stderr)
    done = [r for r in rows if r["state"] == "done"]
    first = min((r["started_at"] for r in done), default=float("nan"))
    wall = max((r["finished_at"] for r in done), default=float("nan")) - first
    # When the last job started and the first one ended, from the first start: claiming and
    # starting jobs one by one shows in the first, a batch that drains unevenly in the second.
    last_start = max((r["started_at"] for r in done), default=float("nan")) - first
    first_end = min((r["finished_at"] for r in done), default=float("nan")) - first
    audio = sum(r["audio_seconds"] or 0.0 for r in done)
    references = {p: Meeting.load(p).reference for p in set(copies.values())}
    done_paths = [Path(os.fsdecode(r["path"])) for r in done]
    wer = error_rate([references[copies[p]] for p in done_paths],
                     [p.with_suffix(".txt").read_text(encoding="utf-8") for p in done_paths], "en") if done else None
    ready = next((e for e in events if e.get("event") == "worker ready"), {})
    return {
        "at_once": at_once, "jobs_at_once": ready.get("jobs_at_once"), "files": args.files, "done": len(done),
        "failed": [r["last_error"] for r in rows if r["state"] != "done"][:3], "audio_seconds": audio,
        "wall_seconds": wall, "rtf": audio / wall if done else None, "wer": wer,
        "most_in_worker": max((e.get("in_worker", 1) for e in events if e.get("event") == "job started"), default=0),
        "worker_peak_rss_mb": peak_rss / 2**20, "decoder": ready.get("decoder"),
        "last_start_s": last_start, "first_end_s": first_end,
    }


def job_rows(db: Path) -> list[dict[str, Any]]:
    if not db.exists():
        return []
    try:
        conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            cursor = conn.execute("SELECT path, state, started_at, finished_at, audio_seconds, last_error FROM jobs")
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]
        finally:
            conn.close()
    except sqlite3.Error:  # created but not migrated yet
        return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--model", default="openai/whisper-base")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--files", type=int, default=32)
    parser.add_argument("--at-once", default="1,auto", help="comma list: jobs.at_once per run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a run may take")
    parser.add_argument("--audio", nargs="*", help="meeting files (Meeting.save's) instead of building them")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    from whisperd_support.evaluation.meeting import meeting_path

    sources = [Path(p) for p in args.audio] if args.audio else [meeting_path(seed=0),
                                                                   meeting_path(seed=1, target_seconds=600)]
    results = []
    for at_once in args.at_once.split(","):
        with tempfile.TemporaryDirectory(prefix="whisperd-backlog-") as tmp:
            result = run_daemon(at_once, sources, args, Path(tmp))
        results.append(result)
        print(f"jobs.at_once {at_once:>4} (engine suggests {result['jobs_at_once']}, decoder {result['decoder']}):"
              f" {result['done']}/{result['files']} done, {result['audio_seconds']:.0f} s of audio in"
              f" {result['wall_seconds']:.2f} s = {result['rtf'] or 0:.0f}x real time, at most"
              f" {result['most_in_worker']} in the worker, WER {result['wer'] or float('nan'):.3f},"
              f" worker peak RSS {result['worker_peak_rss_mb']:.0f} MB; the last job started"
              f" {result['last_start_s']:.2f} s after the first, the first ended at {result['first_end_s']:.2f} s"
              + (f", failed: {result['failed']}" if result["failed"] else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0 if all(r["done"] == r["files"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
