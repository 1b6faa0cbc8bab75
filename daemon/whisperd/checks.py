"""`whisperd check-config`: everything that can be checked without loading a model."""

from __future__ import annotations

from pathlib import Path

from whisperd.config import ConfigError, load_config
from whisperd.devices import UnsupportedSettingError, check_settings
from whisperd.rules import RULE_FILE_NAME, RuleError, RuleResolver


def check_config(path: Path) -> list[str]:
    """Problems, one line each; empty when the config and every rule file under its inboxes are usable."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return [str(exc)]
    problems: list[str] = []
    try:
        check_settings(config.engine.device, config.engine.precision)
    except UnsupportedSettingError as exc:
        problems.append(f"{path}: engine: {exc}")
    resolver = RuleResolver()
    for inbox in config.inboxes:
        if not inbox.path.is_dir():
            problems.append(f"{path}: inbox {inbox.path} does not exist (it will be watched once it appears)")
            continue
        pattern = f"**/{RULE_FILE_NAME}" if inbox.recursive else RULE_FILE_NAME
        for rule_file in sorted(inbox.path.glob(pattern)):
            try:
                resolver.load(rule_file)
            except RuleError as exc:
                problems.append(str(exc))
    return problems
