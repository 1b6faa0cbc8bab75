"""Small, pure measures of a transcript's timing and subtitles against a known ground truth.

Used with :mod:`whisperd_support.evaluation.meeting` (true speech onsets and a silent stretch) and
the SRT that :func:`whisperd.outputs.render` writes. Everything here takes plain numbers or
"timed text" items and returns numbers; nothing loads a model.

A timed-text item may be any of: a :class:`Cue`; a ``(start, end, text)`` tuple; an object
with ``start``/``end`` and ``text`` (``whisperd.transcript.Segment``) or ``content``
(``srt.Subtitle``). Times may be seconds (float) or ``datetime.timedelta``.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any, NamedTuple

__all__ = [
    "Cue",
    "OnsetStats",
    "as_cue",
    "audio_seconds_per_wall_second",
    "count_words",
    "cue_onset_errors",
    "cues_from_srt",
    "max_cue_duration",
    "max_line_length",
    "onset_hits",
    "onset_stats",
    "real_time_factor",
    "repeated_passages",
    "short_segments",
    "spoken_loops",
    "words_in_span",
]

ONSET_TOLERANCE_S = 0.5


class Cue(NamedTuple):
    """A piece of text on screen from ``start`` to ``end`` seconds."""

    start: float
    end: float
    text: str


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def as_cue(item: Any) -> Cue:
    """Any supported timed-text item as a :class:`Cue` (see the module docstring)."""
    if isinstance(item, Cue):
        return item
    if isinstance(item, tuple) and len(item) == 3:
        start, end, text = item
        return Cue(_seconds(start), _seconds(end), str(text))
    text = getattr(item, "text", None)
    if text is None:
        text = getattr(item, "content", None)
    if text is None or not hasattr(item, "start") or not hasattr(item, "end"):
        raise TypeError(f"not a timed-text item: {item!r}")
    return Cue(_seconds(item.start), _seconds(item.end), str(text))


def cues_from_srt(text: str) -> list[Cue]:
    """Parse SRT text (with the ``srt`` library) into cues, in file order."""
    import srt

    return [Cue(s.start.total_seconds(), s.end.total_seconds(), s.content) for s in srt.parse(text)]


# -- cue starts against true onsets --------------------------------------------------------


def cue_onset_errors(cue_starts: Iterable[float], onsets: Iterable[float]) -> list[float]:
    """For each true onset, the distance in seconds to the nearest cue start (``inf`` if there are no cues)."""
    starts = sorted(float(s) for s in cue_starts)
    return [min((abs(s - float(onset)) for s in starts), default=math.inf) for onset in onsets]


def onset_hits(cue_starts: Iterable[float], onsets: Iterable[float], tolerance: float = ONSET_TOLERANCE_S) -> list[bool]:
    """For each true onset, whether some cue starts within ``tolerance`` seconds of it (inclusive)."""
    return [error <= tolerance for error in cue_onset_errors(cue_starts, onsets)]


class OnsetStats(NamedTuple):
    errors: list[float]  # per onset, seconds to the nearest cue start
    median: float
    max: float
    within: int  # onsets with a cue start within `tolerance`
    count: int  # onsets
    tolerance: float


def onset_stats(cue_starts: Iterable[float], onsets: Sequence[float], tolerance: float = ONSET_TOLERANCE_S) -> OnsetStats:
    """Median and max of :func:`cue_onset_errors`, and how many onsets have a cue within ``tolerance``."""
    errors = cue_onset_errors(cue_starts, onsets)
    if not errors:
        return OnsetStats([], math.nan, math.nan, 0, 0, tolerance)
    return OnsetStats(
        errors,
        float(statistics.median(errors)),
        max(errors),
        sum(e <= tolerance for e in errors),
        len(errors),
        tolerance,
    )


# -- words emitted where nobody speaks -----------------------------------------------------


def count_words(text: str) -> int:
    """Whitespace-separated tokens that contain a letter or digit (a lone "-" or "..." is not a word)."""
    return sum(any(ch.isalnum() for ch in token) for token in text.split())


def _word_intervals(item: Any) -> list[tuple[float, float]]:
    """Time interval of every word of one item.

    Items with word timestamps (a non-empty ``words`` attribute of objects with
    ``start``/``end``/``text``) use them. Otherwise the item's words are spread evenly
    over its span: word ``i`` of ``n`` gets ``[start + i*d, start + (i+1)*d]`` with
    ``d = (end - start) / n``. Whisper's segment timestamps carry no finer information,
    and an even spread makes a cue that only grazes the span contribute only the words
    that plausibly fall inside it.
    """
    words = getattr(item, "words", None)
    if words:
        return [(_seconds(w.start), _seconds(w.end)) for w in words if count_words(str(w.text))]
    cue = as_cue(item)
    n = count_words(cue.text)
    if n == 0:
        return []
    step = max(cue.end - cue.start, 0.0) / n
    return [(cue.start + i * step, cue.start + (i + 1) * step) for i in range(n)]


def words_in_span(items: Iterable[Any], start: float, end: float) -> int:
    """Words whose (estimated) time interval overlaps ``[start, end]`` seconds.

    Overlap is strict (a word ending exactly at ``start`` or starting exactly at ``end``
    does not count); a zero-length word at time ``t`` counts when ``start <= t < end``.
    See :func:`_word_intervals` for how word times are obtained. Use it with a span where
    nothing is said: every word counted there was made up.
    """
    count = 0
    for item in items:
        for w_start, w_end in _word_intervals(item):
            if w_end > w_start:
                count += w_start < end and w_end > start
            else:
                count += start <= w_start < end
    return count


# -- text that was not said ------------------------------------------------------------------

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
PASSAGE_WORDS = 6  # a repeated passage: a run of this many words written again soon after
PASSAGE_REACH = 80  # ... within this many words
LOOP_COPIES = 4  # a loop: a phrase written this many times in a row, more often than said


def _words(text: str) -> list[str]:
    return _NON_WORD.sub(" ", text.lower()).split()


def repeated_passages(hypothesis: str, reference: str, n: int = PASSAGE_WORDS, within: int = PASSAGE_REACH) -> int:
    """Copies of a run of ``n`` words that follow an earlier copy within ``within`` words, beyond
    the reference's own such copies: a passage written again where it was said once.

    A copied passage of ``m >= n`` words counts ``m - n + 1`` times, so report it as "0 or not".
    Only nearby copies count (``within`` words, about half a minute of speech): a recording that
    plays the same clip again minutes later (the 10-minute meeting) says it again. Text is
    compared lower case without punctuation.
    """
    def nearby(words: list[str]) -> Counter[tuple[str, ...]]:
        last: dict[tuple[str, ...], int] = {}
        copies: Counter[tuple[str, ...]] = Counter()
        for i in range(len(words) - n + 1):
            gram = tuple(words[i:i + n])
            if gram in last and i - last[gram] <= within:
                copies[gram] += 1
            last[gram] = i
        return copies

    said = nearby(_words(reference))
    return sum(max(0, count - said.get(gram, 0)) for gram, count in nearby(_words(hypothesis)).items())


def spoken_loops(hypothesis: str, reference: str, copies: int = LOOP_COPIES, longest: int = 12) -> int:
    """Phrases (1 to ``longest`` words) written ``copies`` or more times in a row, and more than
    twice as many times in a row as the reference has them: the hallucination loop (one "words"
    more than the speaker's "words, words, words, words" is a recognition error, not a loop)."""
    def runs(words: list[str]) -> dict[tuple[str, ...], int]:
        found: dict[tuple[str, ...], int] = {}
        for length in range(1, longest + 1):
            i = 0
            while i + length <= len(words):
                phrase = tuple(words[i:i + length])
                count = 1
                while tuple(words[i + count * length:i + (count + 1) * length]) == phrase:
                    count += 1
                primitive = not any(length % k == 0 and phrase == phrase[:k] * (length // k) for k in range(1, length))
                if count >= 2 and primitive:
                    found[phrase] = max(found.get(phrase, 0), count)
                    i += count * length
                else:
                    i += 1
        return found

    said = runs(_words(reference))
    return sum(1 for phrase, count in runs(_words(hypothesis)).items()
               if count >= copies and count > 2 * said.get(phrase, 1))


def short_segments(items: Iterable[Any], shorter_than: float = 0.2) -> int:
    """Timed items (segments, cues) on screen for less than ``shorter_than`` seconds."""
    return sum(1 for c in map(as_cue, items) if c.end - c.start < shorter_than)


# -- subtitle shape -------------------------------------------------------------------------


def max_cue_duration(items: Iterable[Any]) -> float:
    """Longest time any cue stays on screen, in seconds (0.0 without cues)."""
    return max((max(c.end - c.start, 0.0) for c in map(as_cue, items)), default=0.0)


def max_line_length(items: Iterable[Any]) -> int:
    """Longest line, in characters, of any cue's text (lines split at newlines; 0 without cues)."""
    return max((len(line) for c in map(as_cue, items) for line in c.text.splitlines()), default=0)


# -- speed ----------------------------------------------------------------------------------


def real_time_factor(wall_seconds: float, audio_seconds: float) -> float:
    """Wall seconds per audio second (0.1 = ten times faster than real time); ``inf`` for no audio."""
    return wall_seconds / audio_seconds if audio_seconds > 0 else math.inf


def audio_seconds_per_wall_second(audio_seconds: float, wall_seconds: float) -> float:
    """Audio seconds transcribed per wall second (the inverse of the real-time factor); ``inf`` if no time passed."""
    return audio_seconds / wall_seconds if wall_seconds > 0 else math.inf
