"""systemd/whisperd.service: `systemd-analyze verify` accepts it, and the settings whisperd relies
on are there (notify + watchdog, restarts, hardening that still reaches the Intel GPU)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "whisperd.service"
WHISPERD = Path(sys.executable).with_name("whisperd")


def unit_settings() -> dict[str, list[str]]:
    """Each `Key=value` of the unit as a list (keys such as DeviceAllow may repeat)."""
    settings: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def test_unit_has_the_settings_whisperd_relies_on() -> None:
    s = unit_settings()
    assert one(s, "Type") == "notify"  # READY=1 once the model is loaded
    assert one(s, "NotifyAccess") == "main"
    assert int(one(s, "WatchdogSec")) >= 30
    assert one(s, "Restart") == "on-failure"
    assert "78" in one(s, "RestartPreventExitStatus").split()  # EX_CONFIG: do not loop on a bad config
    assert one(s, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(s, "KillMode") == "mixed"  # SIGTERM to the daemon only; it stops the worker itself
    # Stopping waits for the running job (stop_timeout_seconds, 60 s by default) and some slack.
    assert int(one(s, "TimeoutStopSec")) > 60
    assert one(s, "NoNewPrivileges") == "yes"
    assert one(s, "ProtectSystem") == "strict"
    assert s.get("ReadWritePaths"), "outputs are written next to the audio: inboxes must be writable"
    assert one(s, "PrivateTmp") == "yes"
    assert one(s, "StateDirectory") == "whisperd"
    # The Intel GPU: real /dev, DRM device class allowed, the render group for /dev/dri/renderD*.
    assert s.get("PrivateDevices", ["no"]) == ["no"]
    assert "char-drm rw" in s.get("DeviceAllow", [])
    assert {"render", "video"} <= set(one(s, "SupplementaryGroups").split())
    assert "MemoryDenyWriteExecute" not in s, "oneDNN and ipex-llm generate code at run time"
    assert one(s, "ExecStart").split()[1:3] == ["run", "--config"]


def test_unit_parses_as_ini_with_the_usual_sections() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]
    assert parser["Install"]["WantedBy"] == "multi-user.target"


def verify(unit: Path) -> tuple[int, list[str]]:
    """`systemd-analyze verify`, and the lines of its output about this unit (it may also print
    notes about the host's own units, which are not ours to judge)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package 'systemd'; scripts/setup.sh installs it)")
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=100)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return result.returncode, [line for line in lines if unit.name in line or "whisperd" in line]


def user_missing(line: str) -> bool:
    """The service user is created at install time; on a test machine it may not exist yet."""
    lower = line.lower()
    return ("user" in lower or "group" in lower) and any(w in lower for w in ("not found", "unknown", "does not exist",
                                                                              "no such"))


def installable_copy(tmp_path: Path, replace: tuple[str, str] | None = None) -> Path:
    """The unit with ExecStart pointing at this venv and a real config, so verify can check them."""
    assert WHISPERD.is_file(), f"{WHISPERD} is missing: is whisperd installed in this venv?"
    config = tmp_path / "config.yaml"
    config.write_text("inboxes:\n  - path: /srv/whisperd/inbox\n")
    text = UNIT.read_text().replace(one(unit_settings(), "ExecStart"), f"{WHISPERD} run --config {config}")
    if replace:
        text = text.replace(*replace)
    unit = tmp_path / "whisperd.service"
    unit.write_text(text)
    return unit


@pytest.mark.timeout(120)
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    code, lines = verify(installable_copy(tmp_path))
    problems = [line for line in lines if not user_missing(line)]
    assert not problems, "\n".join(problems)
    assert code == 0 or lines, f"verify failed (exit {code}) without saying why"


@pytest.mark.timeout(120)
def test_systemd_analyze_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above means something: a typo in the unit makes verify complain."""
    code, lines = verify(installable_copy(tmp_path, ("Type=notify", "Type=notifyy")))
    assert any("notifyy" in line for line in lines), lines
