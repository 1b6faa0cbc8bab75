"""Folder rules without the daemon: defaults, nearest rule file wins, keys merge, edits re-read,
and error messages that name the file, the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from whisperd.rules import (
    DEFAULT_RULES,
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


def resolve(inbox: Path, relative: str, defaults: RuleSet = RuleSet(), resolver: RuleResolver | None = None):
    return (resolver or RuleResolver()).resolve(inbox / relative, inbox, defaults)


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
                                      word_timestamps=False)
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
    ("outputs: [txt, docx]\n", "outputs.1", "'txt', 'srt', 'vtt' or 'json' (got 'docx')"),
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
    ("- just\n- a list\n", "expected a mapping of keys (language, task, outputs, initial_prompt, word_timestamps), got list"),
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
