"""Folder rules without the daemon: defaults, nearest rule file wins, keys merge, edits re-read,
and error messages that name the file, the key and what is allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from whisperd.rules import (
    DEFAULT_RULES,
    MAX_RULE_FILE_BYTES,
    RULE_FILE_NAME,
    RuleError,
    RuleResolver,
    RuleSet,
    folders_between,
    parse_rules,
)


def write_rules(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rule_file = folder / RULE_FILE_NAME
    rule_file.write_text(text, encoding="utf-8")
    return rule_file


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    root = tmp_path / "inbox"
    root.mkdir()
    return root


def resolve(inbox: Path, relative: str, defaults: RuleSet | None = None, resolver: RuleResolver | None = None):
    return (resolver or RuleResolver()).resolve(inbox / relative, inbox, defaults or RuleSet())


def test_without_rule_files_the_built_in_defaults_apply(inbox: Path) -> None:
    effective = resolve(inbox, "a/b/talk.wav")
    assert effective.rules == DEFAULT_RULES and effective.sources == ()
    options = effective.decode_options()
    assert (options.language, options.task, options.initial_prompt) == ("auto", "transcribe", None)
    assert effective.outputs == ("txt", "srt")


def test_inbox_defaults_override_the_built_in_ones(inbox: Path) -> None:
    defaults = RuleSet(language="sv", outputs=("vtt",))
    effective = resolve(inbox, "talk.wav", defaults)
    assert (effective.rules.language, effective.rules.task, effective.outputs) == ("sv", "transcribe", ("vtt",))


def test_word_timestamps_are_off_unless_a_rule_turns_them_on(inbox: Path) -> None:
    assert not resolve(inbox, "talk.wav").decode_options().word_timestamps
    write_rules(inbox / "subtitled", "word_timestamps: true\n")
    assert resolve(inbox, "subtitled/talk.wav").decode_options().word_timestamps


def test_nearest_rule_file_wins_and_keys_merge(inbox: Path) -> None:
    top = write_rules(inbox, "language: zh\ntask: translate\noutputs: [txt]\n")
    mid = write_rules(inbox / "team", "task: transcribe\ninitial_prompt: Glossary\n")
    leaf = write_rules(inbox / "team" / "spanish", "language: spanish\n")
    effective = resolve(inbox, "team/spanish/weekly/talk.wav", RuleSet(outputs=("json",)))
    assert effective.rules == RuleSet(language="es", task="transcribe", outputs=("txt",), initial_prompt="Glossary",
                                      word_timestamps=False, speakers="off")
    assert effective.sources == (top, mid, leaf)
    # A sibling folder sees only what is above it.
    sibling = resolve(inbox, "other/talk.wav")
    assert (sibling.rules.language, sibling.rules.task, sibling.sources) == ("zh", "translate", (top,))


def test_rule_files_outside_the_inbox_are_ignored(tmp_path: Path, inbox: Path) -> None:
    write_rules(tmp_path, "language: zh\n")  # above the inbox root
    assert resolve(inbox, "talk.wav").rules.language == "auto"
    assert folders_between(inbox, inbox / "a" / "b") == [inbox, inbox / "a", inbox / "a" / "b"]


def test_edited_rule_file_is_read_again(inbox: Path) -> None:
    resolver = RuleResolver()
    rule_file = write_rules(inbox, "language: en\n")
    assert resolve(inbox, "x.wav", resolver=resolver).rules.language == "en"
    rule_file.write_text("language: sv\n")  # same size, in place
    assert resolve(inbox, "x.wav", resolver=resolver).rules.language == "sv"
    rule_file.write_text("language: sv\noutputs: txt, vtt\n")
    assert resolve(inbox, "x.wav", resolver=resolver).outputs == ("txt", "vtt")
    rule_file.unlink()
    assert resolve(inbox, "x.wav", resolver=resolver).rules == DEFAULT_RULES


def test_broken_rule_file_is_fixed_by_editing_it(inbox: Path) -> None:
    resolver = RuleResolver()
    rule_file = write_rules(inbox, "task: transcrbe\n")
    with pytest.raises(RuleError):
        resolve(inbox, "x.wav", resolver=resolver)
    with pytest.raises(RuleError):  # cached errors are raised again, not forgotten
        resolve(inbox, "x.wav", resolver=resolver)
    rule_file.write_text("task: translate\n")
    assert resolve(inbox, "x.wav", resolver=resolver).rules.task == "translate"


@pytest.mark.parametrize(("text", "key", "allowed"), [
    ("task: transcrbe\n", "task", "'transcribe' or 'translate' (got 'transcrbe')"),
    ("language: klingon\n", "language", "unknown language 'klingon': use 'auto', a code such as 'en'"),
    ("outputs: [txt, docx]\n", "outputs.1", "'txt', 'srt', 'vtt', 'json' or 'rttm' (got 'docx')"),
    ("langauge: en\n", "langauge", "unknown key; allowed keys are language, task, outputs, initial_prompt"),
])
def test_errors_name_the_file_the_key_and_what_is_allowed(inbox: Path, text: str, key: str, allowed: str) -> None:
    rule_file = write_rules(inbox / "sub", text)
    with pytest.raises(RuleError) as caught:
        resolve(inbox, "sub/talk.wav")
    message = str(caught.value)
    assert message.startswith(f"{rule_file}: key '{key}': ")
    assert allowed in message


@pytest.mark.parametrize(("text", "expected"), [
    ("task: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n",
     "expected a mapping of keys (language, task, outputs, initial_prompt, word_timestamps, speakers), got list"),
])
def test_unreadable_rule_files_name_the_file(inbox: Path, text: str, expected: str) -> None:
    rule_file = write_rules(inbox, text)
    with pytest.raises(RuleError) as caught:
        resolve(inbox, "talk.wav")
    assert str(caught.value).startswith(f"{rule_file}: ") and expected in str(caught.value)
    assert "\n" not in str(caught.value), "one line, for logs and the .error.txt note"


def test_a_broken_file_fails_only_its_own_subtree(inbox: Path) -> None:
    write_rules(inbox / "broken", "task: nope\n")
    resolver = RuleResolver()
    with pytest.raises(RuleError):
        resolve(inbox, "broken/deeper/talk.wav", resolver=resolver)
    assert resolve(inbox, "fine/talk.wav", resolver=resolver).rules.task == "transcribe"


def test_empty_rule_file_changes_nothing(inbox: Path) -> None:
    rule_file = write_rules(inbox, "")
    effective = resolve(inbox, "talk.wav")
    assert effective.rules == DEFAULT_RULES and effective.sources == (rule_file,)


def test_language_names_and_outputs_shorthand_are_normalised() -> None:
    rules = parse_rules(yaml.safe_load("language: Mandarin\noutputs: 'txt,srt'\n"), "inline")
    assert rules.language == "zh" and rules.outputs == ("txt", "srt")


# -- rule files written by someone hostile ----------------------------------------------------
#
# Anyone who can drop a file into an inbox can write a rule file. Whatever it holds, reading it
# must end quickly, in little memory, with a short RuleError naming the file, never hang or grow.

# "Billion laughs": nine levels of nine aliases, 9**9 strings once expanded (by repr, say).
ALIAS_BOMB = "\n".join([
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
    *(f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]" for p, c in zip("abcdefgh", "bcdefghi")),
    "language: *i",
]) + "\n"

CHILD_LOAD = """
import json, resource, sys, time
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from whisperd.rules import RuleError, RuleResolver
start = time.monotonic()
try:
    RuleResolver().load(Path(sys.argv[1]))
    error = None
except RuleError as exc:
    error = str(exc)
# VmHWM, not ru_maxrss: the latter keeps the high-water mark of the (large) pytest process it forked from.
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"error": error, "seconds": time.monotonic() - start, "max_rss_mb": peak_kb / 1024}))
"""


def load_in_child(rule_file: Path, timeout: float = 60) -> dict[str, Any]:
    """RuleResolver.load in a child process held to 1 GiB of address space, so that a regression
    (reading /dev/zero, expanding aliases, parsing 50 MB) fails the test instead of the machine."""
    try:
        done = subprocess.run([sys.executable, "-c", CHILD_LOAD, str(rule_file)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {rule_file.name} did not finish within {timeout:.0f} s")
    assert done.returncode == 0, f"the child failed:\n{done.stderr[-2000:]}"
    return json.loads(done.stdout)


def call_with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    """fn() in a thread; a call still running after `timeout` fails the test instead of hanging it."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(_outcome(fn)), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s"
    return result[0]


def _outcome(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # returned, to be checked by the test's own thread
        return exc


def assert_refused(outcome: dict[str, Any], rule_file: Path, wording: str) -> str:
    message = outcome["error"]
    assert message is not None, f"{rule_file.name} was accepted"
    assert message.startswith(f"{rule_file}: ") and wording in message, message
    assert len(message) < 500 and "\n" not in message, message
    assert outcome["seconds"] < 2, f"took {outcome['seconds']:.1f} s"
    assert outcome["max_rss_mb"] < 300, f"peak RSS {outcome['max_rss_mb']:.0f} MB"
    return message


def test_alias_bomb_is_refused_quickly_in_little_memory(inbox: Path) -> None:
    rule_file = write_rules(inbox, ALIAS_BOMB)
    assert_refused(load_in_child(rule_file), rule_file, "aliases are not allowed in rule files")


def test_even_a_harmless_alias_is_refused(inbox: Path) -> None:
    rule_file = write_rules(inbox, "base: &lang en\nlanguage: *lang\n")
    with pytest.raises(RuleError, match="aliases are not allowed in rule files"):
        RuleResolver().load(rule_file)


def test_fifo_rule_file_is_refused_without_waiting_for_a_writer(inbox: Path) -> None:
    rule_file = inbox / RULE_FILE_NAME
    os.mkfifo(rule_file)
    try:
        outcome = call_with_timeout(lambda: RuleResolver().load(rule_file), timeout=5)
    finally:
        # A regression still waits in open(); a writer that closes at once lets it go.
        try:
            os.close(os.open(rule_file, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert isinstance(outcome, RuleError), outcome
    assert str(outcome).startswith(f"{rule_file}: ") and "regular file" in str(outcome)
    with pytest.raises(RuleError):  # and every job under it fails the same way
        resolve(inbox, "sub/talk.wav")


def test_rule_file_linked_to_dev_zero_is_refused(inbox: Path) -> None:
    rule_file = inbox / RULE_FILE_NAME
    rule_file.symlink_to("/dev/zero")
    assert_refused(load_in_child(rule_file), rule_file, "not a link")


def test_rule_file_linked_to_a_valid_rule_file_is_refused(tmp_path: Path, inbox: Path) -> None:
    target = tmp_path / "elsewhere.yaml"
    target.write_text("language: en\n", encoding="utf-8")
    rule_file = inbox / RULE_FILE_NAME
    rule_file.symlink_to(target)
    with pytest.raises(RuleError) as caught:
        resolve(inbox, "talk.wav")
    assert str(caught.value).startswith(f"{rule_file}: ") and "regular file" in str(caught.value)


def test_dangling_link_is_refused_rather_than_ignored(inbox: Path) -> None:
    rule_file = inbox / RULE_FILE_NAME
    rule_file.symlink_to(inbox / "missing.yaml")
    with pytest.raises(RuleError, match="not a link"):
        resolve(inbox, "talk.wav")


def test_50_mb_rule_file_is_refused_by_its_size(inbox: Path) -> None:
    rule_file = write_rules(inbox, "language: en\n")
    with rule_file.open("a", encoding="utf-8") as fh:
        line = "# " + "x" * 1021 + "\n"
        for _ in range(50 * 1024):
            fh.write(line)
    assert rule_file.stat().st_size >= 50 * 1024 * 1024
    message = assert_refused(load_in_child(rule_file), rule_file, "too large")
    assert f"{MAX_RULE_FILE_BYTES // 1024} KiB" in message


def test_rule_file_at_the_size_cap_is_still_read(inbox: Path) -> None:
    text = "language: en\n"
    rule_file = write_rules(inbox, text + "#" * (MAX_RULE_FILE_BYTES - len(text) - 1) + "\n")
    assert rule_file.stat().st_size == MAX_RULE_FILE_BYTES
    assert resolve(inbox, "talk.wav").rules.language == "en"


def test_rule_file_that_is_not_utf8_is_refused(inbox: Path) -> None:
    rule_file = inbox / RULE_FILE_NAME
    rule_file.write_bytes(b"initial_prompt: caf\xe9\n")
    with pytest.raises(RuleError, match="UTF-8"):
        resolve(inbox, "talk.wav")


def test_fifo_replaced_by_a_regular_file_is_read(inbox: Path) -> None:
    resolver = RuleResolver()
    rule_file = inbox / RULE_FILE_NAME
    os.mkfifo(rule_file)
    with pytest.raises(RuleError):
        resolve(inbox, "talk.wav", resolver=resolver)
    rule_file.unlink()
    write_rules(inbox, "language: sv\n")
    assert resolve(inbox, "talk.wav", resolver=resolver).rules.language == "sv"


def test_megabyte_initial_prompt_is_refused_naming_the_key(inbox: Path) -> None:
    rule_file = write_rules(inbox, "initial_prompt: " + "word " * 200_000 + "\n")
    with pytest.raises(RuleError) as caught:
        RuleResolver().load(rule_file)
    message = str(caught.value)
    # Refused for its size (the file), or for its length (the key): never handed to the model.
    assert message.startswith(f"{rule_file}: ") and len(message) < 500, message


def test_long_initial_prompt_is_refused_naming_the_key_and_the_limit(inbox: Path) -> None:
    rule_file = write_rules(inbox, "initial_prompt: " + "word " * 2_000 + "\n")
    with pytest.raises(RuleError) as caught:
        RuleResolver().load(rule_file)
    message = str(caught.value)
    assert message.startswith(f"{rule_file}: key 'initial_prompt': ") and "1000 characters" in message
    assert "224 tokens" in message and len(message) < 500, message


def test_initial_prompt_of_1000_characters_is_fine(inbox: Path) -> None:
    write_rules(inbox, f"initial_prompt: {'x' * 1000}\n")
    assert resolve(inbox, "talk.wav").rules.initial_prompt == "x" * 1000


def test_long_language_value_is_refused_briefly(inbox: Path) -> None:
    rule_file = write_rules(inbox, f"language: {'k' * 50_000}\n")
    with pytest.raises(RuleError) as caught:
        RuleResolver().load(rule_file)
    assert str(caught.value).startswith(f"{rule_file}: key 'language': ") and len(str(caught.value)) < 500


@pytest.mark.parametrize("text", [
    "language: [" + ", ".join(["klingon"] * 900) + "]\n",  # a big value in the (got ...) part
    "? " + "x" * 50_000 + "\n: 1\n",  # a big unknown key (explicit: YAML caps implicit keys at 1024)
    "outputs: [" + ", ".join(["docx"] * 900) + "]\n",  # hundreds of errors
    "task: " + "[" * 5000 + "]" * 5000 + "\n",  # nesting deep enough to exhaust the stack
    "language: 1" + "0" * 20_000 + "\n",  # an integer too long for int()
    f"!{'t' * 20_000} x\n",  # a long tag in the YAML error
])
def test_messages_stay_short_whatever_the_file_holds(inbox: Path, text: str) -> None:
    rule_file = write_rules(inbox, text)
    with pytest.raises(RuleError) as caught:
        RuleResolver().load(rule_file)
    message = str(caught.value)
    assert message.startswith(f"{rule_file}: ") and len(message) < 500 and "\n" not in message, message[:1000]


def test_thousands_of_values_are_refused_before_they_are_parsed(inbox: Path) -> None:
    rule_file = write_rules(inbox, "outputs: [" + ", ".join(["txt"] * 13_000) + "]\n")
    assert rule_file.stat().st_size <= MAX_RULE_FILE_BYTES
    outcome = call_with_timeout(lambda: RuleResolver().load(rule_file), timeout=2)
    assert isinstance(outcome, RuleError) and "more than 1000 values" in str(outcome), outcome


def test_outputs_list_is_bounded(inbox: Path) -> None:
    rule_file = write_rules(inbox, "outputs: [" + ", ".join(["txt"] * 20) + "]\n")
    with pytest.raises(RuleError) as caught:
        RuleResolver().load(rule_file)
    assert str(caught.value).startswith(f"{rule_file}: key 'outputs': ") and "at most 8 items" in str(caught.value)
