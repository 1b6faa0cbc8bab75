"""Per-folder rules: inbox defaults, overridden by `.whisperd.yaml` files from the inbox down (nearest wins).

A rule file is read again whenever it changes, so edits apply to the next job without a restart.
A broken rule file fails the jobs under its folder with a message naming the file and the key.

Rule files are written by whoever can drop files into an inbox, so reading one must stay cheap
whatever it holds: a rule file must be a regular file (not a link, FIFO or device) of at most
MAX_RULE_FILE_BYTES of UTF-8 YAML without aliases, and string values are short. Anything else
is refused with a one-line RuleError of bounded length.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import reprlib
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from pydantic.fields import FieldInfo

from whisperd.errors import WhisperdError
from whisperd.languages import normalize_language
from whisperd.options import OUTPUT_FORMATS, DecodeOptions

RULE_FILE_NAME = ".whisperd.yaml"
OutputFormat = Literal[OUTPUT_FORMATS]  # type: ignore[valid-type]  # built from the one list of formats at run time

# A rule file holds a handful of short keys; 64 KiB leaves room for comments and keeps parsing
# (pure-Python YAML, under the daemon's rules lock) to milliseconds.
MAX_RULE_FILE_BYTES = 64 * 1024
# Whisper uses at most ~224 tokens of prompt (half its 448-token context); 1000 characters is
# already more than that, and a longer prompt only costs memory in the backend.
MAX_PROMPT_CHARS = 1000
MAX_LANGUAGE_CHARS = 40  # the longest name is "haitian creole"
MAX_OUTPUTS = 8  # four formats; a list of thousands would be written thousands of times
# Rule files are a mapping of scalars and short lists. Composing YAML recurses per level, and
# pure-Python YAML takes about 20 us a value: stopping early keeps any file to milliseconds.
MAX_NESTING = 8
MAX_YAML_VALUES = 1000
# Notes added to a value's "too long" error, by key.
LENGTH_NOTES = {
    "initial_prompt": "Whisper uses at most about 224 tokens of prompt; list names and terms, not whole texts",
}
MAX_PROBLEMS_SHOWN = 3


class RuleError(WhisperdError, ValueError):
    """A rule file (or the config's defaults) that cannot be used; the message names file and key.

    Permanent for the job: the file is failed with this message; editing the rule file (or
    touching the recording) queues it again."""

    permanent = True


class Rules(BaseModel):
    """Every rule key and its default: the one declaration.

    Folder files and inbox defaults use `RuleSet` (the same keys, each optional, derived below),
    `whisperd transcribe` makes its flags from these fields (whisperd.cli), and keys that name a
    DecodeOptions field are passed to the engine by name. Adding a rule key is adding a field here
    (and a DecodeOptions field, or another use, that reads it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    language: str = Field("auto", max_length=MAX_LANGUAGE_CHARS,
                          description="auto, or a code or name: en, zh, chinese, es, sv, ...")
    task: Literal["transcribe", "translate"] = Field("transcribe", description="transcribe, or translate to English")
    outputs: tuple[OutputFormat, ...] = Field(("txt", "srt"), max_length=MAX_OUTPUTS,
                                              description=f"comma list of output formats: {', '.join(OUTPUT_FORMATS)}")
    initial_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS,
        description=f"spelling hints for the model, at most {MAX_PROMPT_CHARS} characters "
                    "(Whisper reads only about 224 tokens of it)")
    # Word times from the model's cross-attention: cues start and end on words, the .json lists
    # them. Off by default: about 20 % slower, and segment times already put cue onsets within
    # 0.5 s on the meeting benchmark.
    word_timestamps: bool = Field(False, description="time every word (cues start and end on words; ~20 % slower)")
    speakers: str = Field("off", description="label who speaks: off, auto (find how many), or the number of speakers")

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str | None) -> str | None:
        return None if value is None else normalize_language(value)

    @field_validator("speakers", mode="before")
    @classmethod
    def _speakers(cls, value: Any) -> Any:
        if value is None:
            return None
        text = str(value).strip().lower()
        if text in ("off", "auto", "false", "true") or (text.isdigit() and 1 <= int(text) <= 64):
            return {"false": "off", "true": "auto"}.get(text, text)
        raise ValueError("use off, auto, or a number of speakers from 1 to 64")

    @field_validator("outputs", mode="before")
    @classmethod
    def _outputs_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(v.strip().lower() for v in value.split(",") if v.strip())
        return value

    def merged_over(self, base: BaseModel) -> Any:
        """This rule set's keys win; unset keys come from `base`."""
        return base.model_copy(update=self.model_dump(exclude_none=True))


def _all_optional(model: type[BaseModel], name: str) -> Any:
    """`model` with every field optional and None by default (unset: falls through to the folder above);
    the constraints and validators stay those of `model`."""
    fields: dict[str, Any] = {}
    for key, info in model.model_fields.items():
        annotation: Any = info.annotation
        fields[key] = (annotation | None, FieldInfo.merge_field_infos(info, default=None))
    return create_model(name, __base__=model, __doc__="Keys a folder may set; unset keys (None) fall through.",
                        **fields)


if TYPE_CHECKING:
    # For the type checker a RuleSet has the keys of Rules; at run time each may also be None.
    RuleSet = Rules
else:
    RuleSet = _all_optional(Rules, "RuleSet")
DEFAULT_RULES = RuleSet(**Rules().model_dump())


@dataclass(frozen=True, slots=True)
class EffectiveRules:
    """The rules that apply to one file, and the files they came from (for logs and errors)."""

    rules: RuleSet
    sources: tuple[Path, ...]

    def decode_options(self) -> DecodeOptions:
        """The rule keys that are decode options, by name."""
        return decode_options_from(Rules(**self.rules.merged_over(DEFAULT_RULES).model_dump()))

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self.rules.outputs or DEFAULT_RULES.outputs or ())


def decode_options_from(rules: Rules) -> DecodeOptions:
    names = {f.name for f in dataclasses.fields(DecodeOptions)}
    return DecodeOptions(**{k: v for k, v in rules.model_dump().items() if k in names})


_short_repr = reprlib.Repr()
_short_repr.maxlevel = 2
_short_repr.maxstring = _short_repr.maxother = _short_repr.maxlong = 60
_short_repr.maxlist = _short_repr.maxtuple = _short_repr.maxdict = _short_repr.maxset = 4


def bounded_repr(value: Any, limit: int = 80) -> str:
    """repr() of at most `limit` characters, computed without walking the whole value: a value
    from a rule file can be huge, or (through YAML aliases) a small text standing for billions."""
    return bounded(_short_repr.repr(value), limit)


def bounded(text: str, limit: int = 80) -> str:
    """`text` on one line and cut to `limit` characters, for messages that quote input."""
    text = " ".join(text[:limit * 4].split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe_validation_error(source: str, exc: ValidationError, allowed_keys: tuple[str, ...] = ()) -> str:
    """`file: key 'task': input should be 'transcribe' or 'translate' (got 'x'); key ...`, on one line.

    Keys and values are quoted only in part, and only the first few problems are listed, so the
    message stays short whatever the input (it goes into logs, the job store and .error.txt notes).
    """
    errors = exc.errors(include_url=False)
    parts = []
    for err in errors[:MAX_PROBLEMS_SHOWN]:
        key = bounded(".".join(str(p) for p in err["loc"]) or "(top level)", 60)
        msg = bounded(err["msg"].removeprefix("Value error, "), 200)
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + (f"; allowed keys are {', '.join(allowed_keys)}" if allowed_keys else "")
        elif err["type"] == "string_too_long" and err["loc"] and err["loc"][-1] in LENGTH_NOTES:
            msg = f"{msg} ({LENGTH_NOTES[str(err['loc'][-1])]})"
        got = err.get("input")
        if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict):
            suffix = ""
        elif err["type"] == "string_too_long" and isinstance(got, str):
            suffix = f" (got {len(got)} characters)"
        else:
            suffix = f" (got {bounded_repr(got)})"
        parts.append(f"key '{key}': {msg}{suffix}")
    if len(errors) > MAX_PROBLEMS_SHOWN:
        parts.append(f"and {len(errors) - MAX_PROBLEMS_SHOWN} more problems")
    return f"{source}: " + "; ".join(parts)


def parse_rules(data: Any, source: str) -> RuleSet:
    if data is None:
        return RuleSet()
    if not isinstance(data, dict):
        raise RuleError(f"{source}: expected a mapping of keys ({', '.join(RuleSet.model_fields)}), got {type(data).__name__}")
    try:
        return RuleSet.model_validate(data)
    except ValidationError as exc:
        raise RuleError(describe_validation_error(source, exc, tuple(RuleSet.model_fields))) from None


class _Refused(Exception):
    """Valid YAML that rule files do not allow; the message says where."""

    def __init__(self, problem: str, mark: yaml.Mark) -> None:
        super().__init__(f"line {mark.line + 1}: {problem}")


class RuleFileLoader(yaml.SafeLoader):
    """SafeLoader without aliases and with bounded nesting.

    One alias stands for a whole subtree, so a few lines of aliases of aliases ("billion laughs")
    stand for billions of values, expanded by anything that walks them (a repr() in a message).
    Rule files need neither aliases nor depth (composing recurses once per level) nor thousands
    of values (each costs parse time under the daemon's rules lock).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._values = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        where = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            raise _Refused("aliases are not allowed in rule files; write the value out", where)
        if self._depth >= MAX_NESTING:
            raise _Refused(f"nested more than {MAX_NESTING} levels deep", where)
        self._values += 1
        if self._values > MAX_YAML_VALUES:
            raise _Refused(f"more than {MAX_YAML_VALUES} values; a rule file needs a handful", where)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
MUST_BE_REGULAR = "a rule file must be a regular file"


def check_rule_file_stat(rule_file: Path, st: os.stat_result) -> None:
    """Refuse anything but a small regular file (`st` from lstat or fstat: links are not followed).

    A FIFO blocks its reader until someone writes, a link to /dev/zero never ends, and a link
    could make the daemon read files its users cannot; a big file stalls every folder.
    """
    if not stat.S_ISREG(st.st_mode):
        if stat.S_ISLNK(st.st_mode):
            raise RuleError(f"{rule_file}: is a symbolic link; {MUST_BE_REGULAR}, not a link")
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "a special file")
        raise RuleError(f"{rule_file}: is {kind}; {MUST_BE_REGULAR}")
    if st.st_size > MAX_RULE_FILE_BYTES:
        raise RuleError(f"{rule_file}: too large ({st.st_size} bytes); "
                        f"rule files may be at most {MAX_RULE_FILE_BYTES // 1024} KiB")


def read_rule_text(rule_file: Path) -> str:
    """The text of a rule file, read without following a link, without waiting and with bounded size."""
    try:
        fd = os.open(rule_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a link since it was checked
            raise RuleError(f"{rule_file}: is a symbolic link; {MUST_BE_REGULAR}, not a link") from None
        raise RuleError(f"{rule_file}: cannot read: {exc.strerror}") from None
    try:
        check_rule_file_stat(rule_file, os.fstat(fd))
        chunks: list[bytes] = []
        left = MAX_RULE_FILE_BYTES + 1  # one more, to notice a file that grew since fstat
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise RuleError(f"{rule_file}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_RULE_FILE_BYTES:
        raise RuleError(f"{rule_file}: too large (it grew while being read); "
                        f"rule files may be at most {MAX_RULE_FILE_BYTES // 1024} KiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RuleError(f"{rule_file}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def load_rule_file(rule_file: Path) -> RuleSet:
    """Read, parse and validate one rule file; every problem is a RuleError naming the file."""
    text = read_rule_text(rule_file)
    try:
        data = yaml.load(text, Loader=RuleFileLoader)  # noqa: S506 (RuleFileLoader is a SafeLoader)
    except _Refused as exc:
        raise RuleError(f"{rule_file}: {exc}") from None
    except (yaml.YAMLError, ValueError, OverflowError) as exc:  # int() and datetime() raise ValueError
        raise RuleError(f"{rule_file}: not valid YAML: {bounded(str(exc), 300)}") from None
    return parse_rules(data, str(rule_file))


class RuleResolver:
    """Finds and merges the rule files that apply to a path, re-reading a file only when it changed."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[tuple[int, ...], RuleSet | RuleError]] = {}

    def load(self, rule_file: Path) -> RuleSet | None:
        """The file's rules, None when there is no such file; RuleError when it cannot be used.

        Keyed by lstat (a link is a refused file of its own, not the file it points to), and the
        outcome is cached, errors too: a hostile file costs one read per change.
        """
        try:
            st = os.lstat(rule_file)
        except (FileNotFoundError, NotADirectoryError):
            self._cache.pop(rule_file, None)
            return None
        except OSError as exc:
            raise RuleError(f"{rule_file}: cannot read: {exc.strerror}") from None
        stamp = (st.st_dev, st.st_ino, st.st_mode, st.st_mtime_ns, st.st_size)
        cached = self._cache.get(rule_file)
        if cached is None or cached[0] != stamp:
            cached = (stamp, self._read(rule_file, st))
            self._cache[rule_file] = cached
        result = cached[1]
        if isinstance(result, RuleError):
            raise result
        return result

    @staticmethod
    def _read(rule_file: Path, st: os.stat_result) -> RuleSet | RuleError:
        try:
            check_rule_file_stat(rule_file, st)  # before opening: never open a device or a link
            return load_rule_file(rule_file)
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


class InboxSettings(Protocol):
    """The parts of an inbox's configuration that rules need (whisperd.config.InboxConfig)."""

    @property
    def path(self) -> Path: ...

    @property
    def rules(self) -> RuleSet: ...

    @property
    def follow_links_outside(self) -> bool: ...


class InboxRules:
    """The configured inboxes and their rule files: which inbox a path is in, and its rules.

    Shared by the watcher's thread and the main loop; one lock guards the resolver's cache.
    Reading a rule file never blocks (see `read_rule_text`), so the lock is held only briefly.
    """

    def __init__(self, inboxes: Sequence[InboxSettings]) -> None:
        self.inboxes = tuple(inboxes)
        self._resolver = RuleResolver()
        self._lock = threading.Lock()

    def inbox_for(self, path: Path) -> InboxSettings | None:
        """The innermost configured inbox that holds `path`."""
        matches = [i for i in self.inboxes if path.is_relative_to(i.path)]
        return max(matches, key=lambda i: len(i.path.parts), default=None)

    def effective(self, path: Path) -> EffectiveRules:
        inbox = self.inbox_for(path)
        if inbox is None:
            raise RuleError(f"{path} is not inside any configured inbox")
        with self._lock:
            return self._resolver.resolve(path, inbox.path, inbox.rules)


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

