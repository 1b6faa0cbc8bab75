"""Per-folder rules: inbox defaults, overridden by `.whisperd.yaml` files from the inbox down (nearest wins).

A rule file is read again whenever it changes, so edits apply to the next job without a restart.
A broken rule file fails the jobs under its folder with a message naming the file and the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from whisperd.languages import normalize_language
from whisperd.options import DecodeOptions

RULE_FILE_NAME = ".whisperd.yaml"
OutputFormat = Literal["txt", "srt", "vtt", "json"]


class RuleError(ValueError):
    """A rule file (or the config's defaults) that cannot be used; the message names file and key."""


class RuleSet(BaseModel):
    """Keys a folder may set. Unset keys (None) fall through to the folder above."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    language: str | None = None
    task: Literal["transcribe", "translate"] | None = None
    outputs: tuple[OutputFormat, ...] | None = None
    initial_prompt: str | None = None
    # Word times from the model's cross-attention: cues start and end on words, the .json lists
    # them. Off by default: about 20 % slower, and segment times already put cue onsets within
    # 0.5 s on the meeting benchmark.
    word_timestamps: bool | None = None

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str | None) -> str | None:
        return None if value is None else normalize_language(value)

    @field_validator("outputs", mode="before")
    @classmethod
    def _outputs_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    def merged_over(self, base: RuleSet) -> RuleSet:
        """This rule set's keys win; unset keys come from `base`."""
        return base.model_copy(update=self.model_dump(exclude_none=True))


DEFAULT_RULES = RuleSet(language="auto", task="transcribe", outputs=("txt", "srt"), initial_prompt=None,
                        word_timestamps=False)


@dataclass(frozen=True, slots=True)
class EffectiveRules:
    """The rules that apply to one file, and the files they came from (for logs and errors)."""

    rules: RuleSet
    sources: tuple[Path, ...]

    def decode_options(self) -> DecodeOptions:
        return DecodeOptions(
            language=self.rules.language or "auto",
            task=self.rules.task or "transcribe",
            initial_prompt=self.rules.initial_prompt,
            word_timestamps=bool(self.rules.word_timestamps),
        )

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self.rules.outputs or DEFAULT_RULES.outputs or ())


def describe_validation_error(source: str, exc: ValidationError, allowed_keys: tuple[str, ...] = ()) -> str:
    """One line per problem: `file: key 'task': input should be 'transcribe' or 'translate' (got 'x')`."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + (f"; allowed keys are {', '.join(allowed_keys)}" if allowed_keys else "")
        got = err.get("input")
        suffix = f" (got {got!r})" if err["type"] not in ("extra_forbidden", "missing") and not isinstance(got, dict) else ""
        parts.append(f"{source}: key '{key}': {msg}{suffix}")
    return "; ".join(parts)


def parse_rules(data: Any, source: str) -> RuleSet:
    if data is None:
        return RuleSet()
    if not isinstance(data, dict):
        raise RuleError(f"{source}: expected a mapping of keys ({', '.join(RuleSet.model_fields)}), got {type(data).__name__}")
    try:
        return RuleSet.model_validate(data)
    except ValidationError as exc:
        raise RuleError(describe_validation_error(source, exc, tuple(RuleSet.model_fields))) from None


class RuleResolver:
    """Finds and merges the rule files that apply to a path, re-reading a file only when it changed."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[tuple[int, int], RuleSet | RuleError]] = {}

    def load(self, rule_file: Path) -> RuleSet | None:
        try:
            st = rule_file.stat()
        except FileNotFoundError:
            self._cache.pop(rule_file, None)
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._cache.get(rule_file)
        if cached is None or cached[0] != stamp:
            cached = (stamp, self._read(rule_file))
            self._cache[rule_file] = cached
        result = cached[1]
        if isinstance(result, RuleError):
            raise result
        return result

    @staticmethod
    def _read(rule_file: Path) -> RuleSet | RuleError:
        try:
            data = yaml.safe_load(rule_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            return RuleError(f"{rule_file}: cannot read: {exc}")
        except yaml.YAMLError as exc:
            return RuleError(f"{rule_file}: not valid YAML: {exc}".replace("\n", " "))
        try:
            return parse_rules(data, str(rule_file))
        except RuleError as exc:
            return exc

    def resolve(self, audio_path: Path, inbox_root: Path, inbox_defaults: RuleSet) -> EffectiveRules:
        """Defaults < inbox defaults < rule files from the inbox root down to the file's folder."""
        rules = inbox_defaults.merged_over(DEFAULT_RULES)
        sources: list[Path] = []
        for folder in folders_between(inbox_root, audio_path.parent):
            rule_file = folder / RULE_FILE_NAME
            found = self.load(rule_file)
            if found is not None:
                rules = found.merged_over(rules)
                sources.append(rule_file)
        return EffectiveRules(rules, tuple(sources))


def folders_between(root: Path, folder: Path) -> list[Path]:
    """root, root/a, root/a/b ... down to `folder` (which must be inside root)."""
    root = Path(os.path.abspath(root))
    folder = Path(os.path.abspath(folder))
    try:
        rel = folder.relative_to(root)
    except ValueError:
        return [folder]
    out = [root]
    for part in rel.parts:
        out.append(out[-1] / part)
    return out

