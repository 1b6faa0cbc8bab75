"""`whisperd check-config`, and `whisperd run` refusing configurations that cannot work.

`run` must exit with 78 (EX_CONFIG) for those: the unit's RestartPreventExitStatus=78 is what keeps
systemd from restarting a daemon every 10 s that can never start.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon_harness import MODEL, whisperd_cli, write_config, write_rules

EX_CONFIG = 78


def make_config(tmp_path: Path, **settings: object) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    return write_config(tmp_path / "whisperd.yaml", [{"path": "inbox"}], tmp_path / "state", **settings), inbox


@pytest.mark.timeout(120)
def test_check_config_accepts_a_good_config(tmp_path: Path) -> None:
    config, inbox = make_config(tmp_path)
    write_rules(inbox / "team", language="sv", task="transcribe", outputs=["txt", "vtt"])
    result = whisperd_cli("check-config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{config}: ok"


@pytest.mark.timeout(120)
def test_check_config_flags_bad_rule_files_and_a_bad_precision(tmp_path: Path) -> None:
    config, inbox = make_config(tmp_path, engine={"model": MODEL, "device": "cpu", "precision": "nf4"})
    bad_task = write_rules(inbox / "a", task="transcrbe")
    bad_key = write_rules(inbox / "a" / "b", langauge="en")
    write_rules(inbox / ".hidden", task="nonsense")  # never read by the daemon, so not reported
    result = whisperd_cli("check-config", str(config))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(f"{config}: engine:" in line and "'nf4'" in line and "Intel GPU" in line for line in lines), lines
    assert any(line.startswith(f"{bad_task}: key 'task'") and "'transcribe' or 'translate'" in line for line in lines), lines
    assert any(line.startswith(f"{bad_key}: key 'langauge': unknown key") and "language" in line
               for line in lines), lines
    assert not any(".hidden" in line for line in lines), lines
    assert len(lines) == 3, lines


@pytest.mark.timeout(60)
def test_check_config_reports_an_invalid_config_by_key(tmp_path: Path) -> None:
    config, _ = make_config(tmp_path, settle_seconds=-1, engine={"device": "gpu"})
    result = whisperd_cli("check-config", str(config))
    assert result.returncode == 1
    assert "key 'settle_seconds'" in result.stdout and "key 'engine.device'" in result.stdout


@pytest.mark.timeout(60)
def test_run_with_an_invalid_config_exits_ex_config(tmp_path: Path) -> None:
    config, _ = make_config(tmp_path, rescan_seconds=0)
    result = whisperd_cli("run", "--config", str(config))
    assert result.returncode == EX_CONFIG
    assert "rescan_seconds" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_with_an_unusable_precision_exits_ex_config(tmp_path: Path) -> None:
    config, _ = make_config(tmp_path)
    result = whisperd_cli("run", "--config", str(config), "--model", MODEL, "--device", "cpu",
                          "--precision", "nf4", timeout=240)
    assert result.returncode == EX_CONFIG, result.stdout[-2000:] + result.stderr[-2000:]
    assert "cannot load the model" in result.stdout and "nf4" in result.stdout
