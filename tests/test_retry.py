"""`whisperd retry`: failed jobs queued again through the job store (its contract tests, on both
backends, are in test_jobstore.py), from the command line and beside a running daemon."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from daemon_harness import clip, final_row, rows_for, running_daemon, wait_for, whisperd_cli, write_config, write_rules
from whisperd.cli import main
from whisperd.config import load_config
from whisperd.jobstore import open_job_store


def test_retry_paths_and_failed_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "inbox").mkdir()
    config = write_config(tmp_path / "whisperd.yaml", [{"path": "inbox"}], tmp_path / "state")
    inbox = tmp_path / "inbox"
    with open_job_store(load_config(config), host_id="h") as store:
        for name in ("a b.wav", "c.wav", "d.wav"):
            job = store.enqueue(inbox / name, 1, 1)
            assert job is not None
            if name != "d.wav":
                store.mark_failed(job.id, "broken rule file")

        assert main(["retry", "--config", str(config), str(inbox / "a b.wav"), str(inbox / "d.wav")]) == 1
        out, err = capsys.readouterr()
        assert f"queued again: {inbox / 'a b.wav'}" in out
        assert f"not retried: {inbox / 'd.wav'}: its latest job is queued" in err
        assert main(["retry", "--config", str(config), "--failed"]) == 0
        assert f"queued again: {inbox / 'c.wav'}" in capsys.readouterr().out
        assert main(["retry", "--config", str(config), "--failed"]) == 0
        assert capsys.readouterr().out.strip() == "no failed jobs"
        assert store.counts()["queued"] == 3


def test_retry_needs_paths_or_failed(tmp_path: Path) -> None:
    config = write_config(tmp_path / "whisperd.yaml", [{"path": "inbox"}], tmp_path / "state")
    for argv in (["retry", "--config", str(config)], ["retry", "--config", str(config), "--failed", "x.wav"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_retry_failed_after_fixing_a_broken_rule_file(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    rule_file = write_rules(inbox / "team", task="transcrbe")
    config = write_config(tmp_path / "whisperd.yaml", [{"path": "inbox", "rules": {"outputs": ["txt"]}}],
                          tmp_path / "state")
    with running_daemon(config, tmp_path / "daemon.log") as daemon:
        path = inbox / "team" / "memo.wav"
        shutil.copyfile(clip("en_goforward").path, path)
        failed = final_row(tmp_path / "state", path)
        assert failed.state == "failed" and "task" in (failed.last_error or "")
        write_rules(inbox / "team", task="transcribe")
        assert rule_file.exists()
        result = whisperd_cli("retry", "--config", str(config), "--failed")
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"queued again: {path}" in result.stdout
        wait_for(lambda: rows_for(tmp_path / "state", path)[-1].state == "done", 300, "the retried job to finish")
        daemon.wait_event("job done", 30, path=str(path))
        [row] = rows_for(tmp_path / "state", path)  # the same job, not a new one
        assert row.id == failed.id and row.attempts == 0
        assert path.with_suffix(".txt").read_text(encoding="utf-8").strip()
