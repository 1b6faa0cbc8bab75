"""Turn transcript segments into readable subtitle cues (for SRT and WebVTT).

Whisper segments are a poor fit for subtitles: they run up to 30 s, carry 200 characters, or
are 0.2 s fragments.  `build_cues` re-cuts the text into cues that follow the usual subtitle
conventions, and these rules hold for every input:

* at most `max_line_chars` (42) characters a line and `max_lines` (2) lines a cue; a Chinese,
  Japanese or Korean character (East Asian wide or full-width) counts as `wide_char_width` (2),
  since it takes the room of two Latin letters on screen - a line holds 21 of them;
* at most `max_duration` (7 s) on screen;
* cues in time order and never overlapping (``cue[i].end <= cue[i + 1].start``), each shown
  for a positive time;
* no cue starts before the speech it shows (its first word's time, or for a segment without
  word times, its share of the segment's time) - cues may only start later, never earlier;
* no cue is empty, and all the text appears, in order, once: no word is lost, duplicated or cut
  in two (text in scripts written without spaces - Chinese, Japanese, Thai... - may be broken
  between any two characters);
* a cue never spans a pause of `merge_gap` (1 s) or more, between two words (known from word
  timestamps) or two segments;
* when segments (or words) carry speakers, a cue never holds two speakers' words; with
  `speaker_labels`, the first cue after a change of speaker starts with the speaker's name
  ("Speaker 2: ..."), which counts towards the line length and is never left alone on a line.

The one exception to the line limit: a single word longer than `max_line_chars` (a URL, a long
file name) is never cut; it gets a line of its own and that line may be longer.

Where to cut, in order of preference: after a sentence end (. ? ! and 。？！), after clause
punctuation (, ; : and 、，；：), at a pause between words (only known from word timestamps),
at a boundary between two Whisper segments, then anywhere between words - never after
"the"/"a"/"of" if it can be helped, never before a closing punctuation mark or after an opening
one.  A two-line cue gets its line break at the best such point that also balances the lines
(the first line not much shorter than the second).  A cue is kept on one line when it fits.
All this is a small dynamic programme over the break points: the cut that minimises the total
cost of all cues wins, so one awkward cue never forces three others.

Times: with word timestamps, a cue runs from its first word's start to its last word's end;
without them, each piece of a segment gets a share of the segment's time proportional to its
characters.  A cue shorter than `min_duration`, or too short to read at `reading_cps`
characters a second, is lengthened into the silence after it, never beyond `max_duration` nor
past the end of the recording (`duration`).
A cue ends at least `gap` before the next one starts (two frames, so the eye sees the change),
even when that takes a few milliseconds off the end of its speech.  Times are whole milliseconds.

Over 500 lines as one idea: turning timed words and segments into readable cues (line
breaking, timing, speaker and pause rules interact, so they live together).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from whisperd.transcript import Segment

SENTENCE_END = frozenset(".?!…。？！｡‼⁇⁈⁉")
CLAUSE_END = frozenset(",;:、，；：—–")
CLOSERS = frozenset("\"'”’»)]}」』）】》〉〕〗〙〛｝］")
OPENERS = frozenset("“‘«([{「『（【《〈〔〖〘〚｛［")
# A line should not start with these (kinsoku shori for CJK, and stray punctuation elsewhere).
# ASCII quotes open as often as they close, and a dash may start a line: those are allowed.
NO_LINE_START = (SENTENCE_END | CLAUSE_END | CLOSERS | frozenset("・ー々ゝゞヽヾ〜%‰")) - frozenset("\"'—–")
# Ending a line or a cue on one of these leaves the reader hanging ("... the / meeting").
DANGLING = frozenset(
    "a an the of to in on at for with from by into about and or but nor my your our their his her its "
    "i we you they he she it is are was were be been this these those".split()
)
# Object pronouns belong with the verb before them ("walk / us through" reads badly).
CLINGING = frozenset("us them me him".split())
# Starting a line or a cue with one of these reads naturally.
LEADING = frozenset("and but or so because which who that when where if then although while".split())

# Costs of the break points; lower is better.  The order (sentence < clause < pause < plain word)
# is what matters, the numbers only weigh it against line balance and the count of cues.
COST_SENTENCE = 0.0
COST_SEGMENT = 1.0
COST_CLAUSE = 2.0
COST_WORD = 5.0
COST_INSIDE_WORD = 2.0       # extra, for a cut between two characters of one (CJK) word
COST_FORBIDDEN = 100.0       # before a closing mark / after an opening one: only if nothing else fits
COST_LABEL_ALONE = 1000.0    # a speaker's name with none of their words after it
COST_DANGLING = 2.5         # after "the", "of", "to"... or before "us", "them"...
COST_MIDLINE_SENTENCE = 1.0  # a sentence ending inside a line, not at its end
BONUS_LEADING = 0.5
PAUSE_MIN = 0.15             # seconds; shorter gaps between words are just articulation
PAUSE_BONUS_PER_S = 2.8
PAUSE_BONUS_MAX = 2.8        # keeps a pause alone below clause punctuation
CUE_COST = 2.0               # per cue: fewer, fuller cues unless a better break point pays for one more
LINE_BREAK_WEIGHT = 0.5      # a line break is a lighter interruption than a new cue
SHORT_CUE_CHARS = 12
SHORT_CUE_COST = 4.0
FLOOR_MS = 100               # the shortest time a cue is shown, even in degenerate input


@dataclass(frozen=True, slots=True)
class Cue:
    """One subtitle: shown from `start` to `end` (seconds), one or two lines of text."""

    start: float
    end: float
    lines: tuple[str, ...]
    speaker: str | None = None

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass(slots=True)
class _Atom:
    """The smallest unit that is never cut: a word, or one character of a script without spaces."""

    text: str
    space: bool          # a space separates it from the atom before (within a line)
    start: float
    end: float
    seg: int             # index of its segment
    word: int            # atoms of one word share this id (to prefer cuts between words)
    speaker: str | None = None
    label: bool = False  # the speaker's name put before a new speaker's text, not spoken text


def is_nospace_char(ch: str) -> bool:
    """Characters of scripts written without spaces between words: lines may break next to them."""
    o = ord(ch)
    return (
        0x2E80 <= o <= 0x9FFF      # CJK radicals, symbols & punctuation, kana, bopomofo, ideographs
        or 0xF900 <= o <= 0xFAFF   # CJK compatibility ideographs
        or 0xFE30 <= o <= 0xFE4F   # CJK compatibility forms
        or 0xFF00 <= o <= 0xFFEF   # half- and full-width forms
        or 0x20000 <= o <= 0x3FFFF  # CJK extensions
        or 0x0E00 <= o <= 0x0EFF   # Thai, Lao
        or 0x1000 <= o <= 0x109F   # Myanmar
        or 0x1780 <= o <= 0x17FF   # Khmer
    )


def text_width(text: str, wide: int = 2) -> int:
    """Room a text takes on screen, in Latin letters: East Asian wide/full-width characters count `wide`."""
    if wide == 1 or text.isascii():
        return len(text)
    return sum(wide if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def join_text(left: str, right: str) -> str:
    """Join two pieces of text with a space, unless both sides are in a script without spaces."""
    if not left:
        return right
    if not right:
        return left
    if is_nospace_char(left[-1]) and is_nospace_char(right[0]):
        return left + right
    return f"{left} {right}"


def _split_chars(text: str) -> list[str]:
    """Cut a piece of text into atoms: each no-space-script character alone, other runs whole.

    Combining marks (Thai vowels and tones, accents) stay with the character before them.
    """
    parts: list[str] = []
    glue = False  # the next character joins the last part
    for ch in text:
        nospace = is_nospace_char(ch)
        if parts and (unicodedata.category(ch).startswith("M") or (glue and not nospace)):
            parts[-1] += ch
        else:
            parts.append(ch)
        glue = not nospace
    return parts


def _pieces_to_atoms(pieces: list[tuple[str, bool, float, float]], seg: int, word_base: int) -> list[_Atom]:
    """Pieces (text, space before, start, end) -> atoms; pieces glued without space merge unless CJK."""
    atoms: list[_Atom] = []
    for n, (text, space, start, end) in enumerate(pieces):
        parts = _split_chars(text)
        total = sum(len(p) for p in parts)
        done = 0
        for i, part in enumerate(parts):
            a = start + (end - start) * done / total
            done += len(part)
            b = start + (end - start) * done / total
            first = i == 0
            if first and not space and atoms and (
                unicodedata.category(part[0]).startswith("M")
                or not (is_nospace_char(atoms[-1].text[-1]) or is_nospace_char(part[0]))
            ):
                # "don" + "'t", "3" + ".5", "example.com" + ",": one word, never cut; nor a combining mark
                prev = atoms[-1]
                prev.text += part
                prev.end = max(prev.end, b)
                continue
            atoms.append(_Atom(part, space if first else False, a, b, seg, word_base + n))
    return atoms


def align_words(text: str, words: Sequence) -> list[tuple[str, bool, float, float]] | None:
    """Find each word in the segment text; None when the words don't spell the text.

    Returns the text's own spelling of each word and whether whitespace precedes it there, so the
    cues show the segment text exactly, and word times decide where it is cut.
    """
    pieces: list[tuple[str, bool, float, float]] = []
    pos, n = 0, len(text)
    for w in words:
        chars = "".join(w.text.split())
        if not chars:
            continue
        space = False
        while pos < n and text[pos].isspace():
            pos += 1
            space = True
        begin = pos
        for ch in chars:
            while pos < n and text[pos].isspace():
                pos += 1
            if pos >= n or text[pos] != ch:
                return None
            pos += 1
        pieces.append((text[begin:pos], space, float(w.start), float(w.end)))
    if text[pos:].strip():
        return None
    return pieces


def _segment_atoms(seg: Segment, index: int, word_base: int) -> list[_Atom]:
    text = seg.text.strip()
    if not text:
        return []
    pieces = align_words(text, seg.words) if seg.words else None
    if pieces:
        atoms = _pieces_to_atoms(pieces, index, word_base)
        speakers = [w.speaker or seg.speaker for w in seg.words if "".join(w.text.split())]
        for atom in atoms:
            atom.speaker = speakers[atom.word - word_base]
        return atoms
    # No (usable) word times: cut the text at spaces and share the segment's time by characters.
    atoms = _pieces_to_atoms([(tok, True, 0.0, 0.0) for tok in text.split()], index, word_base)
    # A space counts as a character of the word after it, so the atoms leave no gaps: no false pauses.
    weights = [len(a.text) + (1 if a.space and i else 0) for i, a in enumerate(atoms)]
    total = sum(weights)
    start, end = float(seg.start), max(float(seg.end), float(seg.start))
    done = 0
    for atom, weight in zip(atoms, weights, strict=True):
        atom.start = start + (end - start) * done / total
        done += weight
        atom.end = start + (end - start) * done / total
        atom.speaker = seg.speaker
    return atoms


def _atoms(segments: Iterable[Segment]) -> list[_Atom]:
    atoms: list[_Atom] = []
    word_base = 0
    for index, seg in enumerate(segments):
        seg_atoms = _segment_atoms(seg, index, word_base)
        if not seg_atoms:
            continue
        word_base = seg_atoms[-1].word + 1
        if atoms:
            seg_atoms[0].space = not (is_nospace_char(atoms[-1].text[-1]) and is_nospace_char(seg_atoms[0].text[0]))
        else:
            seg_atoms[0].space = False
        atoms.extend(seg_atoms)
    # Sane times: finite, not negative, starts never going back, no atom ending before it starts.
    # Starts only ever move later, so a cue still never starts before its speech.
    last = 0.0
    for a in atoms:
        start = a.start if math.isfinite(a.start) else last
        a.start = max(start, last, 0.0)
        a.end = max(a.end if math.isfinite(a.end) else a.start, a.start)
        last = a.start
    return atoms


def _core(text: str) -> str:
    """The text without trailing closing quotes/brackets: 'said."' -> 'said.'."""
    i = len(text)
    while i > 0 and text[i - 1] in CLOSERS:
        i -= 1
    return text[:i]


def _break_cost(prev: _Atom, nxt: _Atom) -> float:
    """How good a place the boundary between `prev` and `nxt` is for a new line or cue."""
    if prev.label:
        return COST_LABEL_ALONE
    if nxt.text[0] in NO_LINE_START or prev.text[-1] in OPENERS:
        return COST_FORBIDDEN
    core = _core(prev.text)
    last = core[-1] if core else ""
    if last in SENTENCE_END:
        return COST_SENTENCE
    if last in CLAUSE_END:
        cost = COST_CLAUSE
    elif nxt.seg != prev.seg:
        cost = COST_SEGMENT
    else:
        cost = COST_WORD
        if nxt.word == prev.word:
            cost += COST_INSIDE_WORD
        if prev.text.lower() in DANGLING or _core(nxt.text).lower() in CLINGING:
            cost += COST_DANGLING
        if nxt.text.lower() in LEADING:
            cost -= BONUS_LEADING
    pause = nxt.start - prev.end
    if pause >= PAUSE_MIN:
        cost -= min(PAUSE_BONUS_MAX, PAUSE_BONUS_PER_S * pause)
    return max(cost, COST_SENTENCE + 0.1)


class _Chunk:
    """Atoms between two hard breaks, with prefix sums for line lengths."""

    def __init__(self, atoms: list[_Atom], max_line_chars: int, max_lines: int, max_duration: float,
                 min_duration: float, wide: int) -> None:
        self.atoms = atoms
        self.max_line = max_line_chars
        self.max_lines = max_lines
        self.max_duration = max_duration
        self.min_duration = min_duration
        self.len_prefix = [0]
        self.space_prefix = [0]
        for a in atoms:
            self.len_prefix.append(self.len_prefix[-1] + text_width(a.text, wide))
            self.space_prefix.append(self.space_prefix[-1] + (1 if a.space else 0))
        self.breaks = [0.0] + [_break_cost(atoms[k - 1], atoms[k]) for k in range(1, len(atoms))]
        self.sentence_prefix = [0]  # sentence ends before atom k, for k < index
        for k, cost in enumerate(self.breaks):
            self.sentence_prefix.append(self.sentence_prefix[-1] + (1 if k and cost == COST_SENTENCE else 0))

    def width(self, i: int, j: int) -> int:
        """Width of atoms i..j-1 on one line (characters, wide ones counted `wide`)."""
        return self.len_prefix[j] - self.len_prefix[i] + self.space_prefix[j] - self.space_prefix[i + 1]

    def sentences_inside(self, i: int, j: int) -> int:
        """Sentence ends between atoms of i..j-1 (not at its edges)."""
        return self.sentence_prefix[j] - self.sentence_prefix[i + 1]

    def line_ok(self, i: int, j: int) -> bool:
        # The single exception to the limit: one word that alone is longer than a line.
        return j - i == 1 or self.width(i, j) <= self.max_line

    def layout(self, i: int, j: int) -> tuple[float, int | None] | None:
        """(cost, line break index or None for one line) for a cue of atoms i..j-1; None if it can't fit."""
        if self.line_ok(i, j):
            return COST_MIDLINE_SENTENCE * self.sentences_inside(i, j), None
        if self.max_lines < 2:
            return None
        best: tuple[float, int | None] | None = None
        for k in range(i + 1, j):
            if not self.line_ok(i, k):
                break
            if not self.line_ok(k, j):
                continue
            top, bottom = self.width(i, k), self.width(k, j)
            cost = (LINE_BREAK_WEIGHT * self.breaks[k] + _balance_cost(top, bottom, self.max_line)
                    + COST_MIDLINE_SENTENCE * (self.sentences_inside(i, k) + self.sentences_inside(k, j)))
            if best is None or cost < best[0]:
                best = (cost, k)
        return best

    def solve(self) -> list[tuple[int, int, int | None]]:
        """Cut the chunk into cues: [(first atom, end atom, line break or None)] of least total cost."""
        n = len(self.atoms)
        best = [0.0] + [math.inf] * n
        choice: list[tuple[int, int | None]] = [(0, None)] * (n + 1)
        for j in range(1, n + 1):
            end = self.atoms[j - 1].end
            for i in range(j - 1, -1, -1):
                end = max(end, self.atoms[i].end)
                spoken_atoms = j - i - (1 if self.atoms[i].label else 0)  # a label is not speech
                if spoken_atoms > 1 and end - self.atoms[i].start > self.max_duration:
                    break
                lay = self.layout(i, j)
                if lay is None:
                    break  # adding atoms in front never makes a cue fit again
                cost = best[i] + CUE_COST + lay[0]
                if j < n:
                    cost += self.breaks[j]
                if i > 0 or j < n:  # a cue that is the whole chunk can't be longer
                    chars = self.width(i, j)
                    if chars < SHORT_CUE_CHARS:
                        cost += SHORT_CUE_COST * (SHORT_CUE_CHARS - chars) / SHORT_CUE_CHARS
                    spoken = end - self.atoms[i].start
                    if spoken < self.min_duration:
                        cost += SHORT_CUE_COST * (self.min_duration - spoken) / self.min_duration
                if cost < best[j]:
                    best[j] = cost
                    choice[j] = (i, lay[1])
        cues: list[tuple[int, int, int | None]] = []
        j = n
        while j > 0:
            i, k = choice[j]
            cues.append((i, j, k))
            j = i
        cues.reverse()
        return cues

    def line_text(self, i: int, j: int) -> str:
        parts = [self.atoms[i].text]
        for a in self.atoms[i + 1:j]:
            parts.append(f" {a.text}" if a.space else a.text)
        return "".join(parts)


def _balance_cost(top: int, bottom: int, max_line: int) -> float:
    """Two lines of about equal length; a top line much shorter than the bottom one costs more.

    A line that is one over-long word counts as a full line: that imbalance can't be helped.
    """
    top, bottom = min(top, max_line), min(bottom, max_line)
    cost = 3.0 * abs(top - bottom) / max_line
    if bottom > top:
        cost += 6.0 * max(0.0, (bottom - top) / max_line - 0.1)
    return cost


def build_cues(
    segments: Iterable[Segment],
    *,
    max_line_chars: int = 42,
    max_lines: int = 2,
    max_duration: float = 7.0,
    min_duration: float = 0.8,
    gap: float = 0.08,
    merge_gap: float = 1.0,
    reading_cps: float = 17.0,
    duration: float | None = None,
    wide_char_width: int = 2,
    speaker_labels: bool = False,
) -> list[Cue]:
    """Subtitle cues for `segments` (see the module docstring for the rules they follow).

    max_line_chars, max_lines: the shape of a cue (one or two lines).
    wide_char_width: what a CJK (East Asian wide/full-width) character counts towards max_line_chars
        and reading speed; 1 counts plain characters.
    max_duration: the longest a cue stays on screen, in seconds.
    min_duration, reading_cps: a cue is lengthened into following silence until it has been on
        screen this long and long enough to read its characters at this speed.
    gap: the least time between a cue's end and the next cue's start (where the cue can spare it).
    merge_gap: a pause (s) between words or segments at or beyond which their text never shares a cue.
    speaker_labels: start the first cue after each change of speaker with "<speaker>: " (for formats
        without voice markup, such as SRT).  Cues never mix speakers either way; `Cue.speaker` says whose.
    duration: the recording's length, if known: no cue is lengthened past it.
    """
    if max_line_chars < 1:
        raise ValueError("max_line_chars must be at least 1")
    if wide_char_width < 1:
        raise ValueError("wide_char_width must be at least 1")
    if max_lines not in (1, 2):
        raise ValueError("max_lines must be 1 or 2")
    if not max_duration > FLOOR_MS / 1000:
        raise ValueError(f"max_duration must be more than {FLOOR_MS / 1000} s")
    atoms = _atoms(segments)
    if not atoms:
        return []

    # Hard breaks: a pause of merge_gap or more, and a change of speaker.
    chunks: list[list[_Atom]] = [[atoms[0]]]
    last_end = atoms[0].end
    for prev, atom in zip(atoms, atoms[1:]):
        if atom.start - last_end >= merge_gap or atom.speaker != prev.speaker:
            chunks.append([])
        chunks[-1].append(atom)
        last_end = max(last_end, atom.end)
    if speaker_labels:
        _label_speaker_changes(chunks)

    raw: list[tuple[int, int, tuple[str, ...], int, str | None]] = []  # speech start/end ms, lines, width, speaker
    for chunk_atoms in chunks:
        chunk = _Chunk(chunk_atoms, max_line_chars, max_lines, max_duration, min_duration, wide_char_width)
        for i, j, k in chunk.solve():
            lines = (chunk.line_text(i, j),) if k is None else (chunk.line_text(i, k), chunk.line_text(k, j))
            start = _ms_ceil(chunk_atoms[i].start)
            end = _ms_floor(max(a.end for a in chunk_atoms[i:j]))
            width = sum(text_width(line, wide_char_width) for line in lines)
            raw.append((start, end, lines, width, chunk_atoms[i].speaker))

    limit_ms = _ms_floor(duration) if duration is not None and duration > 0 else None
    return _time_cues(raw, max_duration, min_duration, gap, reading_cps, limit_ms)


def _label_speaker_changes(chunks: list[list[_Atom]]) -> None:
    """Put "<speaker>:" before the first words of every chunk whose speaker differs from the last one's."""
    previous: str | None = None
    for chunk in chunks:
        first = chunk[0]
        if first.speaker is not None and first.speaker != previous:
            first.space = True
            chunk.insert(0, _Atom(f"{first.speaker}:", False, first.start, first.start, first.seg, -1,
                                  first.speaker, label=True))
        previous = first.speaker


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def _ms_ceil(seconds: float) -> int:
    """Round a start up to the millisecond, so rounding never shows a cue before its speech."""
    return math.ceil(seconds * 1000 - 1e-6)


def _ms_floor(seconds: float) -> int:
    """Round an end down to the millisecond, so rounding never runs past the recording."""
    return math.floor(seconds * 1000 + 1e-6)


def _time_cues(raw: list[tuple[int, int, tuple[str, ...], int, str | None]], max_duration: float, min_duration: float,
               gap: float, reading_cps: float, limit_ms: int | None) -> list[Cue]:
    max_ms, min_ms, gap_ms = int(max_duration * 1000), _ms(min_duration), _ms(gap)
    cues: list[Cue] = []
    prev_end = 0
    for n, (speech_start, speech_end, lines, width, speaker) in enumerate(raw):
        start = max(speech_start, prev_end)
        wanted = max(speech_end, start + min_ms, start + (_ms(width / reading_cps) if reading_cps > 0 else 0))
        end = min(wanted, start + max_ms)
        if n + 1 < len(raw):
            # Lengthen only into silence, and leave `gap` before the next cue even when speech runs
            # on (the usual two frames, so the eye sees a new subtitle come).
            end = min(end, raw[n + 1][0] - gap_ms)
        if limit_ms is not None:
            end = min(end, max(limit_ms, speech_end))  # lengthened up to the end of the recording, no further
        # Degenerate times (all words at one instant, speech at the very end): still visible a moment.
        floor = FLOOR_MS if limit_ms is None or start + FLOOR_MS <= limit_ms else 1
        end = max(end, start + floor)
        cues.append(Cue(start=start / 1000, end=end / 1000, lines=lines, speaker=speaker))
        prev_end = end
    return cues
