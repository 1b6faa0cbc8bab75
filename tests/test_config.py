"""The daemon config: validation messages by key, paths relative to the config file, job timeouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from whisperd.config import ConfigError, DaemonConfig, JobConfig, load_config
from whisperd.rules import RuleSet


def write(path: Path, data: object) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "c.yaml", {"inboxes": [{"path": "/srv/inbox"}]}))
    assert isinstance(config, DaemonConfig)
    [inbox] = config.inboxes
    assert (inbox.path, inbox.recursive, inbox.poll, inbox.rules) == (Path("/srv/inbox"), True, False, RuleSet())
    assert config.state_dir == Path("/var/lib/whisperd")
    assert config.database_path == Path("/var/lib/whisperd/jobs.sqlite3")
    assert (config.settle_seconds, config.rescan_seconds, config.stop_timeout_seconds) == (2.0, 300.0, 60.0)
    assert (config.engine.device, config.engine.precision, config.log_format) == ("auto", "auto", "json")


def test_relative_paths_are_relative_to_the_config_file_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    config = load_config(write(folder / "c.yaml", {"inboxes": [{"path": "inbox"}, {"path": "../shared/in"}],
                                                   "state_dir": "state"}))
    assert [i.path for i in config.inboxes] == [folder / "inbox", tmp_path / "shared" / "in"]
    assert config.state_dir == folder / "state"
    assert all(i.path.is_absolute() for i in config.inboxes)


def test_home_is_expanded(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "c.yaml", {"inboxes": [{"path": "~/inbox"}]}))
    assert config.inboxes[0].path == Path.home().resolve() / "inbox"


def test_the_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "config.example.yaml"
    config = load_config(example)
    assert config.inboxes[0].path == example.parent / "inbox"
    assert config.inboxes[0].rules.outputs == ("txt", "srt")


@pytest.mark.parametrize(("data", "expected"), [
    ({"inboxes": []}, "key 'inboxes': List should have at least 1 item"),
    ({}, "key 'inboxes': Field required"),
    ({"inboxes": [{"path": "x", "rules": {"task": "nope"}}]},
     "key 'inboxes.0.rules.task': Input should be 'transcribe' or 'translate' (got 'nope')"),
    ({"inboxes": [{"path": "x"}], "engine": {"precision": "int3"}}, "key 'engine.precision': use one of auto, fp32"),
    ({"inboxes": [{"path": "x"}], "engine": {"device": "gpu"}},
     "key 'engine.device': use one of auto, xpu, cuda, cpu (got 'gpu')"),
    ({"inboxes": [{"path": "x"}], "jobs": {"max_attempts": 0}},
     "key 'jobs.max_attempts': Input should be greater than or equal to 1"),
    ({"inboxes": [{"path": "x"}], "settle_seconds": -1}, "key 'settle_seconds': Input should be greater than or equal to 0"),
    ({"inboxes": [{"path": "x"}], "log_format": "xml"}, "key 'log_format': Input should be 'json' or 'console'"),
    ({"inboxes": [{"path": "x"}], "inbox": "typo"}, "key 'inbox': unknown key"),
])
def test_validation_errors_name_the_file_and_the_key(tmp_path: Path, data: dict, expected: str) -> None:
    path = write(tmp_path / "c.yaml", data)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert expected in str(caught.value)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", {"inboxes": [{"path": "x"}], "engine": {"device": "gpu"},
                                        "jobs": {"max_attempts": 0}})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "engine.device" in str(caught.value) and "jobs.max_attempts" in str(caught.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("inboxes: [\n", "not valid YAML"),
    ("- a list\n", "expected a mapping with at least 'inboxes'"),
    ("", "expected a mapping with at least 'inboxes'"),
])
def test_unusable_files(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_cli_overrides_replace_engine_keys_only_when_given(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", {"inboxes": [{"path": "x"}], "engine": {"model": "openai/whisper-small",
                                                                              "threads": 2}})
    config = load_config(path, {"model": "openai/whisper-base", "precision": "fp32", "device": None})
    assert (config.engine.model, config.engine.precision, config.engine.device, config.engine.threads) == (
        "openai/whisper-base", "fp32", "auto", 2)
    with pytest.raises(ConfigError, match="engine.precision"):
        load_config(path, {"precision": "int3"})


def test_job_store_defaults_to_sqlite_and_inbox_ids_to_their_path(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "c.yaml", {"inboxes": [{"path": "/srv/a"}, {"path": "/srv/b", "id": "b"}]}))
    assert (config.job_store.backend, config.job_store.url, config.job_store.lease_seconds) == ("sqlite", None, 120)
    assert [i.inbox_id for i in config.inboxes] == ["/srv/a", "b"]


def test_postgresql_job_store(tmp_path: Path) -> None:
    data = {"inboxes": [{"id": "meetings", "path": "/mnt/share/meetings", "poll": True}],
            "job_store": {"backend": "postgresql", "url": "postgresql://whisperd@db.lan/whisperd", "lease_seconds": 60}}
    config = load_config(write(tmp_path / "c.yaml", data))
    assert config.job_store.url == "postgresql://whisperd@db.lan/whisperd" and config.job_store.lease_seconds == 60


@pytest.mark.parametrize(("data", "expected"), [
    ({"inboxes": [{"path": "x"}], "job_store": {"backend": "postgresql", "url": "postgresql://db/w"}},
     "key 'inboxes.0.id': required with job_store.backend: postgresql"),
    ({"inboxes": [{"path": "x", "id": "a"}], "job_store": {"backend": "postgresql"}},
     "key 'job_store.url': required with backend: postgresql"),
    ({"inboxes": [{"path": "x", "id": "a"}], "job_store": {"backend": "postgresql", "url": "postgresql://db/w?nosuchoption=1"}},
     "key 'job_store.url': not a libpq URL"),
    ({"inboxes": [{"path": "x"}], "job_store": {"url": "postgresql://db/w"}},
     "key 'job_store.url': only used with backend: postgresql"),
    ({"inboxes": [{"path": "x", "id": "a"}, {"path": "y", "id": "a"}]}, "key 'inboxes.1.id': 'a' is also inbox 0's id"),
    ({"inboxes": [{"path": "x", "id": "no spaces"}]}, "key 'inboxes.0.id': String should match pattern"),
    ({"inboxes": [{"path": "x"}], "job_store": {"backend": "mysql"}}, "key 'job_store.backend'"),
    ({"inboxes": [{"path": "x"}], "job_store": {"lease_seconds": 0}}, "key 'job_store.lease_seconds'"),
])
def test_job_store_validation(tmp_path: Path, data: dict, expected: str) -> None:
    path = write(tmp_path / "c.yaml", data)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ") and expected in str(caught.value)


def test_job_timeout_scales_with_audio_length() -> None:
    jobs = JobConfig(timeout_base_seconds=60, timeout_per_audio_second=1.5)
    assert jobs.timeout_for(100.0) == 60 + 150
    assert jobs.timeout_for(0.5) == pytest.approx(60.75)
    # Unknown length (the probe failed): allow for an hour of audio rather than kill a long job.
    assert jobs.timeout_for(None) == 60 + 1.5 * 3600
    assert JobConfig().timeout_for(60.0) == 120 + 2 * 60
