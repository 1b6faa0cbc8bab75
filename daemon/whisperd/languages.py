"""Language codes and names as Whisper knows them, so rules and flags can say `zh`, `chinese` or `Mandarin`."""

from __future__ import annotations

from whisperd.errors import WhisperdError
from whisperd.language_table import LANGUAGES, TO_LANGUAGE_CODE

AUTO = "auto"


class UnknownLanguageError(WhisperdError, ValueError):
    """A language that Whisper does not know; the message lists how to spell known ones."""

    permanent = True


def normalize_language(value: str | None) -> str:
    """Return a Whisper language code (`zh`), or `auto` for detection.

    Accepts codes (`zh`, `EN`), English names (`chinese`), and Whisper's aliases (`mandarin`).
    """
    if value is None:
        return AUTO
    key = value.strip().lower()
    if key in ("", AUTO, "detect"):
        return AUTO
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise UnknownLanguageError(
        f"unknown language {value!r}: use 'auto', a code such as 'en', 'zh', 'es', 'sv', "
        f"or a name such as 'english', 'chinese' ({len(LANGUAGES)} languages are known)"
    )


def language_name(code: str) -> str:
    return LANGUAGES.get(code, code)
