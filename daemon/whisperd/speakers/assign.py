"""Give each transcript segment and word the speaker of the diarization turns it overlaps most."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import replace

from whisperd.speakers.embedding import Turn
from whisperd.transcript import Segment, Word


class _TurnIndex:
    """Turns sorted by start, with the latest end so far, to find the ones overlapping a span fast."""

    def __init__(self, turns: Sequence[Turn]) -> None:
        self.turns = sorted((t for t in turns if t.end > t.start), key=lambda t: (t.start, t.end))
        self.starts = [t.start for t in self.turns]
        self.reach: list[float] = []
        for t in self.turns:
            self.reach.append(max(t.end, self.reach[-1]) if self.reach else t.end)

    def speaker(self, start: float, end: float) -> str | None:
        """The speaker with the most time in [start, end]; for a span in no turn, the nearest turn's."""
        if not self.turns:
            return None
        end = max(end, start)
        i = bisect.bisect_left(self.starts, end) - 1  # last turn that starts before the span ends
        overlap: dict[str, float] = {}
        j = i
        while j >= 0 and self.reach[j] > start:
            t = self.turns[j]
            shared = min(t.end, end) - max(t.start, start)
            if shared > 0:
                overlap[t.speaker] = overlap.get(t.speaker, 0.0) + shared
            j -= 1
        if overlap:
            return max(overlap, key=lambda s: overlap[s])
        # Nothing overlaps (a word in a pause, or a zero-length span): the closest turn in time.
        middle = (start + end) / 2
        candidates = self.turns[max(i, 0):i + 2]
        return min(candidates, key=lambda t: max(t.start - middle, middle - t.end, 0.0)).speaker


def assign_speakers(segments: Sequence[Segment], turns: Sequence[Turn]) -> list[Segment]:
    """Segments with `speaker` set, words each by their own time; labels renumbered as they appear.

    A segment whose words belong to different speakers is cut where the speaker changes (when
    its words spell its text, so no text is lost); otherwise it goes to the speaker of most of its
    words.  Labels become "Speaker 1", "Speaker 2"... in the order they first appear in the
    transcript, so a transcript always starts with Speaker 1.  Without turns, segments are returned
    unchanged.
    """
    index = _TurnIndex(turns)
    if not index.turns:
        return list(segments)
    out: list[Segment] = []
    for seg in segments:
        if not seg.words:
            out.append(replace(seg, speaker=index.speaker(seg.start, seg.end)))
            continue
        words = tuple(replace(w, speaker=index.speaker(w.start, w.end)) for w in seg.words)
        out.extend(_split_by_speaker(replace(seg, words=words)))
    return _renumber(out)


def _majority(words: Sequence[Word]) -> str | None:
    weight: dict[str | None, float] = {}
    for w in words:
        weight[w.speaker] = weight.get(w.speaker, 0.0) + max(w.end - w.start, 0.0) + 1e-3
    return max(weight, key=lambda s: weight[s])


def _split_by_speaker(seg: Segment) -> list[Segment]:
    from whisperd.outputs.cues import align_words

    runs: list[list[int]] = []
    for k, w in enumerate(seg.words):
        if runs and seg.words[runs[-1][-1]].speaker == w.speaker:
            runs[-1].append(k)
        else:
            runs.append([k])
    pieces = align_words(seg.text, seg.words) if len(runs) > 1 else None
    spelled = [k for k, w in enumerate(seg.words) if "".join(w.text.split())]
    if not pieces or len(pieces) != len(spelled):
        return [replace(seg, speaker=_majority(seg.words))]
    # Where each word's text starts and ends in the segment text, to cut it without losing a character.
    text = seg.text
    offsets: dict[int, tuple[int, int]] = {}
    pos = 0
    for k, (piece, _, _, _) in zip(spelled, pieces, strict=True):
        begin = text.index(piece, pos)
        offsets[k] = (begin, begin + len(piece))
        pos = begin + len(piece)
    out: list[Segment] = []
    for n, run in enumerate(runs):
        spelled_run = [k for k in run if k in offsets]
        if not spelled_run:  # only blank words: they go with the run before
            if out:
                out[-1] = replace(out[-1], words=out[-1].words + tuple(seg.words[k] for k in run))
            continue
        begin = 0 if not out else offsets[spelled_run[0]][0]
        finish = len(text) if n == len(runs) - 1 else offsets[spelled_run[-1]][1]
        words = tuple(seg.words[k] for k in run)
        start = seg.start if not out else words[0].start
        end = seg.end if n == len(runs) - 1 else max(w.end for w in words)
        out.append(replace(seg, start=start, end=max(end, start), text=text[begin:finish].strip(), words=words,
                           speaker=words[0].speaker))
    return out


def _renumber(segments: list[Segment]) -> list[Segment]:
    names: dict[str, str] = {}

    def name(label: str | None) -> str | None:
        if label is None:
            return None
        return names.setdefault(label, f"Speaker {len(names) + 1}")

    out = []
    for seg in segments:
        words = tuple(replace(w, speaker=name(w.speaker)) for w in seg.words)
        out.append(replace(seg, speaker=name(seg.speaker), words=words))
    return out
