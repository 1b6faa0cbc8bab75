"""What a reader must never get, whatever the backend decoded: loops, copies, segments without time.

Whisper's own gates (compression ratio, log-probability, no-speech, temperature fallback) act per
window inside a backend, and not every backend has them all. These guards act on the decoded text
once it is placed in the file, the same for every backend:

- **Loops** (`collapse_loops`): a segment whose text still fails the compression-ratio gate after
  every temperature has a phrase repeated over and over ("yeah, yeah, yeah, ..." 222 times). Each
  run of three or more copies is collapsed to one; what still fails is cut to its longest start
  that passes.
- **Copies at seams** (`repeated_run`): text decoded at a seam (a window's first segment, or speech
  decoded again because the first text seemed to skip it) that repeats the text before it: all of
  it, or a run of REPEATED_RUN_WORDS words. The audio rarely repeats a whole passage; Whisper often
  does when its timestamps collapsed and the speech it did transcribe looked untranscribed.
- **Time** (`give_time`): segments that overlap the next one, or are shorter than their words can be
  said, get time from their neighbours' slack instead of being squeezed to nothing.

Each repair is counted (`whisperd.transcript.Repairs`), and the counts go into the transcript, so a user and a metric
can see that something was mended.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
import zlib
from collections.abc import Sequence
from dataclasses import replace

from whisperd.transcript import Segment, Word

#: Copies of a phrase in a row from which a failing segment's phrase counts as a loop. Speech says
#: "yeah, yeah, yeah"; a loop says it dozens of times, and only text that fails the gate is touched.
LOOP_COPIES = 3
#: The longest phrase (in words, or characters for scripts without spaces) looked for as a loop.
LOOP_PHRASE_UNITS = 24
#: A run of this many words at a seam that repeats the text just before it is a copy.
REPEATED_RUN_WORDS = 6
#: A seam's text this much made of the preceding text's words, in order, is a copy as a whole.
REPEAT_FRACTION = 0.8
#: The preceding text a seam is compared with: what ends in the last LOOKBACK_SECONDS (a window), at
#: most PRECEDING_WORDS words.
LOOKBACK_SECONDS = 30.0
PRECEDING_WORDS = 120
#: The shortest time any segment is given; a lone short word may have less (LONE_WORD_SECONDS).
MIN_SEGMENT_SECONDS = 0.5
LONE_WORD_SECONDS = 0.25
LONE_WORD_CHARS = 4
#: Upper bound of speaking rate, characters a second (people say 10-15; fast speech 20): the time a
#: text takes at least.
FAST_CHARS_PER_SECOND = 20.0

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
_SENTENCE_END = re.compile(r"(?<=[.?!。？！])\s*")


def comparable(text: str) -> str:
    """Lower case, punctuation as spaces: how two texts are compared for sameness."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def text_compression_ratio(text: str) -> float:
    """Bytes of the text over bytes zlib makes of them (OpenAI Whisper's gate): loops compress well."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def spoken_length(text: str) -> float:
    """Characters, a wide (CJK) character counted as 3: roughly proportional to the time to say it."""
    return sum(3.0 if unicodedata.east_asian_width(ch) in "WF" else 1.0 for ch in text if not ch.isspace())


def fails_gate(text: str, threshold: float | None) -> bool:
    return threshold is not None and text_compression_ratio(text) > threshold


# -- loops ------------------------------------------------------------------------------


def _units(text: str) -> tuple[list[str], str]:
    """Words, or characters for text written without spaces (Chinese, Japanese, Thai), and the
    separator that joins them back."""
    words = text.split()
    if len(words) > 1 or len(text) <= LOOP_PHRASE_UNITS:
        return words, " "
    return list(text), ""


def collapse_loops(text: str, threshold: float | None) -> tuple[str, int]:
    """`text` with its loops collapsed, if it fails the compression gate; and how many copies went.

    A run of LOOP_COPIES or more copies of one phrase becomes one copy (the first, as it was
    written). If the result still fails the gate, it is cut to its longest start that passes.
    Text that passes the gate comes back as it is.
    """
    if not fails_gate(text, threshold):
        return text, 0
    units, sep = _units(text)
    keys = [comparable(u) or u for u in units]
    out: list[str] = []
    removed = 0
    i = 0
    while i < len(units):
        best_length, best_copies = 0, 0
        for length in range(1, min(LOOP_PHRASE_UNITS, (len(units) - i) // LOOP_COPIES) + 1):
            phrase = keys[i:i + length]
            copies = 1
            while keys[i + copies * length:i + (copies + 1) * length] == phrase:
                copies += 1
            if copies >= LOOP_COPIES and length * copies > best_length * best_copies:
                best_length, best_copies = length, copies
        if best_copies:
            out.extend(units[i:i + best_length])
            removed += best_copies - 1
            i += best_length * best_copies
        else:
            out.append(units[i])
            i += 1
    collapsed = sep.join(out)
    while fails_gate(collapsed, threshold) and len(out) > 1:
        out.pop()
        removed += 1
        collapsed = sep.join(out)
    return collapsed, removed


def collapse_segment_loops(segment: Segment, threshold: float | None) -> tuple[Segment, int]:
    """The segment with `collapse_loops` applied to its text (and its words cut to match)."""
    text, removed = collapse_loops(segment.text, threshold)
    if not removed:
        return segment, 0
    words = segment.words
    if words:
        kept = len(text.split())
        words = words[:kept] if kept < len(words) else words
    return replace(segment, text=text, words=words, compression_ratio=text_compression_ratio(text)), removed


# -- copies at seams ----------------------------------------------------------------------


def _keyed(text: str) -> tuple[list[str], list[str]]:
    """(tokens as written, their comparable keys), leaving out tokens that are only punctuation."""
    tokens = [t for t in text.split() if comparable(t)]
    return tokens, [comparable(t) for t in tokens]


def _sentences(text: str) -> list[str]:
    return [comparable(part) for part in _SENTENCE_END.split(text) if comparable(part)]


def repeated_run(text: str, preceding: str, anywhere: bool = False) -> tuple[str, bool]:
    """`text` less what repeats `preceding`, and whether anything was taken out.

    Each run of REPEATED_RUN_WORDS or more words found in the preceding text is cut out, and all of
    it goes once REPEAT_FRACTION of its words are such runs. Shorter text goes only when the
    preceding text ends with it ("Thanks." after "Alright, thanks.": the context before a stretch
    decoded again, transcribed twice), when it is the preceding text's last sentence ("We are
    angry." after "... We are angry."), or with `anywhere`, any sentence of it: people say "yes"
    twice, windows should not.
    """
    tokens, keys = _keyed(text)
    before = comparable(preceding).split()
    if not keys or not before:
        return text, False
    sentences = _sentences(preceding)
    said = comparable(text)
    said_words = said.split()
    if said in (sentences if anywhere else sentences[-1:]) or before[-len(said_words):] == said_words:
        return "", True
    # One key may hold two words ("cold-hearted"): compare word by word, remember the token.
    words = [(index, word) for index, key in enumerate(keys) for word in key.split()]
    matcher = difflib.SequenceMatcher(a=before, b=[w for _, w in words], autojunk=False)
    runs = [b for b in matcher.get_matching_blocks() if b.size >= REPEATED_RUN_WORDS]
    if not runs:
        return text, False
    if sum(b.size for b in runs) >= REPEAT_FRACTION * len(words):
        return "", True
    cut = {words[j][0] for b in runs for j in range(b.b, b.b + b.size)}
    return " ".join(t for index, t in enumerate(tokens) if index not in cut), True


def preceding_text(segments: Sequence[Segment], since: float, before: str = "") -> str:
    """`before`, then the text of the segments that end after `since`; at most PRECEDING_WORDS words."""
    recent = [seg.text for seg in segments if seg.end > since]
    return " ".join(" ".join([before, *recent]).split()[-PRECEDING_WORDS:])


def drop_repeats(segments: Sequence[Segment], seams: Sequence[bool], before: str = "") -> tuple[list[Segment], int]:
    """Segments in time order, those at a seam (`seams[i]`) less what repeats the text just before
    them (`before`, then what was kept of the last LOOKBACK_SECONDS); and how many were cut or
    dropped. A short sentence repeats only the sentence just before it, or with `before` (the text
    of the window that a stretch was decoded again from) any sentence of that window. Only recent
    text counts: a copy comes from the window before, and people do say a sentence again later."""
    out: list[Segment] = []
    dropped = 0
    for seg, seam in zip(segments, seams):
        if seam:
            preceding = preceding_text(out, seg.start - LOOKBACK_SECONDS, before)
            text, changed = repeated_run(seg.text, preceding, anywhere=bool(before))
            if changed:
                dropped += 1
                if not text:
                    continue
                seg = replace(seg, text=text, words=())
        out.append(seg)
    return out, dropped


# -- time ----------------------------------------------------------------------------------


def min_seconds(text: str) -> float:
    """The least time a segment's text is shown for: as long as it takes to say, at least
    MIN_SEGMENT_SECONDS (LONE_WORD_SECONDS for one short word)."""
    stripped = text.strip()
    floor = LONE_WORD_SECONDS if len(stripped.split()) <= 1 and len(stripped) <= LONE_WORD_CHARS else MIN_SEGMENT_SECONDS
    return max(floor, spoken_length(stripped) / FAST_CHARS_PER_SECOND)


def give_time(segments: list[Segment], duration: float) -> tuple[list[Segment], int]:
    """Segments in time order, not overlapping, each as long as its text needs where there is room.

    A segment that starts inside the one before it cuts that one short, if that one keeps the time
    its own text needs (a stretched segment before speech decoded again); otherwise it starts
    where that one ends. A segment shorter than its text needs takes the time of its words, then
    the silence after it, then the silence before it, then the spare time of the segment before.
    Returns the segments and how many got time they did not have.
    """
    out: list[Segment] = []
    repaired = 0
    for seg in segments:
        start, end = seg.start, seg.end
        if out and start < out[-1].end:
            previous = out[-1]
            if previous.start + min_seconds(previous.text) <= start:
                out[-1] = replace(previous, end=start, words=_clip_words(previous, previous.start, start))
            else:
                start = previous.end
        start = min(max(start, 0.0), duration)
        end = min(max(end, start), duration)
        out.append(replace(seg, start=start, end=end) if (start, end) != (seg.start, seg.end) else seg)
    needed = [min_seconds(seg.text) for seg in out]
    short = [seg.end - seg.start < need for seg, need in zip(out, needed)]
    for i, seg in enumerate(out):
        if not short[i]:
            continue
        start, end = seg.start, seg.end
        if seg.words:
            start, end = min(start, seg.words[0].start), max(end, seg.words[-1].end)
        floor = out[i - 1].end if i else 0.0
        # Up to the next segment that has its time, less what the short ones before it need.
        j = next((k for k in range(i + 1, len(out)) if not short[k]), len(out))
        ceiling = (out[j].start if j < len(out) else duration) - sum(needed[i + 1:j])
        start = max(start, floor)
        end = min(max(end, start + needed[i]), max(ceiling, min(end, start + needed[i]), start))
        start = min(start, max(floor, end - needed[i]))
        if end - start < needed[i] and i:
            previous = out[i - 1]
            spare = previous.end - (previous.start + needed[i - 1])
            if spare > 0:
                start = max(end - needed[i], start - spare)
                out[i - 1] = replace(previous, end=start, words=_clip_words(previous, previous.start, start))
        if (start, end) != (seg.start, seg.end):
            out[i] = replace(seg, start=start, end=end, words=_clip_words(seg, start, end))
            repaired += 1
    return out, repaired


def _clip_words(seg: Segment, start: float, end: float) -> tuple[Word, ...]:
    """The segment's words with their times kept inside [start, end]."""
    return tuple(replace(w, start=min(max(w.start, start), end), end=min(max(w.end, start), end)) for w in seg.words)
