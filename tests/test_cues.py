"""Subtitle cues: the invariants on random input (hypothesis), and the choices on examples."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from whisperd.outputs.cues import Cue, build_cues, is_nospace_char, text_width
from whisperd.transcript import Segment, Word

MAX_CHARS = 42
MAX_MS = 7000
MERGE_GAP = 1.0


# ---------------------------------------------------------------- strategies

LATIN_WORDS = st.one_of(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGH", min_size=1, max_size=12),
    st.sampled_from(["the", "a", "of", "I", "and", "so", "Yes.", "OK,", "why?", "now!", "don't", "3.5", "(note",
                     "it)", "\"quoted\"", "Tom&Jerry", "<b>", "a-->b", "e.g.", "well—", "café", "naïve", "x;", "y:"]),
    st.builds(lambda w, p: w + p, st.text(alphabet="abcdefgh", min_size=1, max_size=10), st.sampled_from(".,?!;:")),
)
LONG_WORDS = st.builds(lambda n: "https://example.com/" + "path/" * n + "index.html", st.integers(5, 15))
CJK_CHARS = "今日は会議の最初議題として来期予算について話し合いたいと思います数字良好ですが採用未解決問題あり。、？！「」"
CJK_RUNS = st.text(alphabet=CJK_CHARS, min_size=1, max_size=60)
THAI_RUNS = st.sampled_from(["ภาษาไทย", "สวัสดีครับ", "ขอบคุณมาก", "ประชุมวันนี้"])


@dataclass
class Spec:
    """A generated segment, plus where each word's characters are (for the 'never before speech' check)."""

    segment: Segment
    word_chars: list[int]  # non-space characters of each word, in order (empty: no words)


def _nonspace(text: str) -> str:
    return "".join(text.split())


@st.composite
def segment_specs(draw: st.DrawFn, start: float, with_words: bool) -> Spec:
    kind = draw(st.sampled_from(["latin", "latin", "latin", "cjk", "mixed", "thai"]))
    if kind == "latin":
        tokens = draw(st.lists(st.one_of(LATIN_WORDS, LATIN_WORDS, LATIN_WORDS, LONG_WORDS), min_size=1, max_size=80))
        glue = " "
    elif kind == "cjk":
        tokens = [c for run in draw(st.lists(CJK_RUNS, min_size=1, max_size=4)) for c in run]
        glue = ""
    elif kind == "thai":
        tokens = draw(st.lists(THAI_RUNS, min_size=1, max_size=10))
        glue = ""
    else:
        tokens = draw(st.lists(st.one_of(LATIN_WORDS, CJK_RUNS, LONG_WORDS), min_size=1, max_size=30))
        glue = " "
    if glue == "" and with_words:
        # words of 1-4 characters, the way Whisper times CJK
        text = "".join(tokens)
        sizes = draw(st.lists(st.integers(1, 4), min_size=len(text), max_size=len(text)))
        tokens, i = [], 0
        for size in sizes:
            if i >= len(text):
                break
            tokens.append(text[i:i + size])
            i += size
    text = glue.join(tokens)
    duration = draw(st.one_of(st.floats(0.0, 0.3), st.floats(0.3, 30.0)))  # very short ones, too
    end = start + duration
    words: tuple[Word, ...] = ()
    word_chars: list[int] = []
    if with_words:
        # monotone word times inside the segment, with pauses; text with or without a leading space
        cuts = sorted(draw(st.lists(st.floats(start, end), min_size=2 * len(tokens), max_size=2 * len(tokens))))
        leading = draw(st.booleans()) and glue == " "
        words = tuple(
            Word(start=cuts[2 * i], end=cuts[2 * i + 1], text=(" " + tok if leading else tok), probability=0.9)
            for i, tok in enumerate(tokens)
        )
        word_chars = [len(_nonspace(tok)) for tok in tokens]
    return Spec(Segment(start=start, end=end, text=text, words=words), word_chars)


@st.composite
def transcripts(draw: st.DrawFn, words: bool | None = None) -> list[Spec]:
    n = draw(st.integers(1, 8))
    specs: list[Spec] = []
    t = draw(st.floats(0.0, 100.0))
    for _ in range(n):
        with_words = draw(st.booleans()) if words is None else words
        spec = draw(segment_specs(t, with_words))
        specs.append(spec)
        t = spec.segment.end + draw(st.one_of(st.just(0.0), st.floats(0.0, 0.9), st.floats(1.1, 5.0)))
    return specs


# ---------------------------------------------------------------- the invariants


def speech_span(spec: Spec) -> tuple[float, float]:
    seg = spec.segment
    if seg.words:
        return seg.words[0].start, max(w.end for w in seg.words)
    return seg.start, seg.end


def check_invariants(specs: list[Spec], cues: list[Cue], wide: int = 2) -> None:
    segments = [s.segment for s in specs]
    source = [(si, ci, ch) for si, seg in enumerate(segments) for ci, ch in enumerate(_nonspace(seg.text))]

    # nothing lost, nothing duplicated, in order
    shown = "".join(_nonspace("".join(c.lines)) for c in cues)
    assert shown == "".join(ch for _, _, ch in source)
    all_text = " ".join(seg.text for seg in segments)
    if not any(is_nospace_char(ch) for ch in all_text):
        # words are never cut or glued together
        assert [tok for c in cues for line in c.lines for tok in line.split()] == all_text.split()

    pos = 0
    for n, cue in enumerate(cues):
        # shape
        assert 1 <= len(cue.lines) <= 2, cue
        for line in cue.lines:
            assert line and line == line.strip(), cue
            if text_width(line, wide) > MAX_CHARS:  # CJK characters count 2 (by default)
                # the one exception: a single word longer than a line, alone on its line
                assert not any(ch.isspace() or is_nospace_char(ch) for ch in line), cue
        # time on screen
        start_ms, end_ms = round(cue.start * 1000), round(cue.end * 1000)
        assert 0 < end_ms - start_ms <= MAX_MS, cue
        if n + 1 < len(cues):
            assert cue.end <= cues[n + 1].start, (cue, cues[n + 1])
        # never before its speech: its first character's word (or segment) has started
        chars = len(_nonspace("".join(cue.lines)))
        si, ci, _ = source[pos]
        spec = specs[si]
        if spec.word_chars:
            w, seen = 0, spec.word_chars[0]
            while seen <= ci:
                w += 1
                seen += spec.word_chars[w]
            assert cue.start >= spec.segment.words[w].start - 1e-9, cue
        else:
            assert cue.start >= spec.segment.start - 1e-9, cue
        # segments share a cue only across less than MERGE_GAP of silence
        in_cue = sorted({source[p][0] for p in range(pos, pos + chars)})
        for b in in_cue[1:]:
            latest_end = max(speech_span(specs[k])[1] for k in range(b) if specs[k].segment.text.strip())
            assert speech_span(specs[b])[0] - latest_end <= MERGE_GAP + 1e-9, cue
        pos += chars
    assert pos == len(source)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(transcripts())
def test_invariants_hold_for_any_segments(specs: list[Spec]) -> None:
    check_invariants(specs, build_cues([s.segment for s in specs]))
    # and with the recording's length given, no cue is lengthened past it; only cues crowded into its
    # last 0.1 s (degenerate times) may pass it, by a millisecond or two each, to stay visible and in order
    duration = max(s.segment.end for s in specs)
    cues = build_cues([s.segment for s in specs], duration=duration)
    check_invariants(specs, cues)
    if duration > 0:  # 0: length unknown
        for c in cues:
            assert c.end <= duration + 1e-9 or (c.start > duration - 0.1 and c.end <= duration + 0.002 * len(cues))
    # counting CJK characters as one each: the same rules, longer CJK lines
    check_invariants(specs, build_cues([s.segment for s in specs], wide_char_width=1), wide=1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(transcripts(words=False))
def test_invariants_hold_without_words(specs: list[Spec]) -> None:
    check_invariants(specs, build_cues([s.segment for s in specs]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(transcripts(words=True))
def test_invariants_hold_with_words(specs: list[Spec]) -> None:
    check_invariants(specs, build_cues([s.segment for s in specs]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.floats(-5, 50), st.floats(-5, 50), st.lists(LATIN_WORDS, min_size=1, max_size=20),
                          st.lists(st.tuples(st.floats(-5, 60), st.floats(-5, 60)), max_size=25)),
                min_size=1, max_size=6))
def test_messy_times_still_give_valid_cues(raw: list) -> None:
    """Overlapping segments, end before start, word times out of order or not matching the text."""
    segments = []
    for start, end, tokens, times in raw:
        words = tuple(Word(a, b, tok) for (a, b), tok in zip(times, tokens))
        segments.append(Segment(start=start, end=end, text=" ".join(tokens), words=words))
    cues = build_cues(segments)
    assert _nonspace("".join("".join(c.lines) for c in cues)) == _nonspace("".join(s.text for s in segments))
    for cue, nxt in zip(cues, cues[1:] + [None]):
        assert 1 <= len(cue.lines) <= 2 and all(cue.lines)
        assert 0 < round(cue.end * 1000) - round(cue.start * 1000) <= MAX_MS
        assert cue.start >= 0
        if nxt is not None:
            assert cue.end <= nxt.start


# ---------------------------------------------------------------- examples

SIXTY = ("so what we want to do this quarter is look again at the way we plan our releases because the last two "
         "went out late and the support team had to deal with a lot of questions from customers who did not know "
         "what had changed or when the next version would be ready for them to try out soon").split()


def test_sixty_words_in_twenty_seconds_make_three_or_more_short_cues() -> None:
    assert len(SIXTY) == 60
    step = 20 / 60
    words = tuple(Word(i * step, i * step + step * 0.8, " " + w) for i, w in enumerate(SIXTY))
    for seg in (Segment(0.0, 20.0, " ".join(SIXTY)), Segment(0.0, 20.0, " ".join(SIXTY), words=words)):
        cues = build_cues([seg])
        assert len(cues) >= 3
        assert all(c.end - c.start <= 7.0 + 1e-9 for c in cues)
        assert all(len(line) <= MAX_CHARS for c in cues for line in c.lines)
        assert " ".join(" ".join(c.lines) for c in cues).split() == SIXTY


def test_two_lines_are_balanced_and_the_top_not_much_shorter() -> None:
    text = "we should probably move the weekly planning meeting to thursday afternoons"
    cues = build_cues([Segment(0.0, 5.0, text)])
    assert len(cues) == 1 and len(cues[0].lines) == 2
    top, bottom = (len(line) for line in cues[0].lines)
    assert abs(top - bottom) <= 10
    assert top >= bottom - 6


def test_text_that_fits_stays_on_one_line() -> None:
    cues = build_cues([Segment(0.0, 2.0, "That sounds good to me.")])
    assert [c.lines for c in cues] == [("That sounds good to me.",)]


def test_sentence_end_is_preferred_to_balance() -> None:
    text = ("The budget is approved. Now we need to talk about hiring for the new team in Berlin and the timeline "
            "for it")
    cues = build_cues([Segment(0.0, 6.5, text)])
    ends = [line for c in cues for line in c.lines]
    assert "The budget is approved." in ends or any(c.lines[0].endswith("approved.") for c in cues)
    assert ends[0].endswith("approved.")


def test_cue_breaks_at_a_sentence_end_rather_than_mid_sentence() -> None:
    first = "I think the plan for the launch is fine and we should go ahead with it."
    second = "Next we need to look at the numbers for the second quarter in detail."
    cues = build_cues([Segment(0.0, 12.0, f"{first} {second}")])
    assert [" ".join(c.lines) for c in cues] == [first, second]


def test_clause_punctuation_is_preferred_to_a_plain_word_boundary() -> None:
    text = "When the numbers come in next week, we will decide whether to hire two more people"
    cues = build_cues([Segment(0.0, 5.0, text)])
    assert cues[0].lines[0].endswith("week,")


def test_a_long_pause_between_words_is_preferred_to_a_plain_boundary() -> None:
    tokens = "we could ship the first version in march and then spend april fixing the reports nobody likes".split()
    words, t = [], 0.0
    for tok in tokens:
        if tok == "and":
            t += 1.0  # the speaker stops to think before "and"
        words.append(Word(t, t + 0.25, " " + tok))
        t += 0.3
    seg = Segment(0.0, t, " ".join(tokens), words=tuple(words))
    cues = build_cues([seg])
    breaks = [line for c in cues for line in c.lines]
    assert breaks[0].endswith("march")


def test_cues_never_start_before_the_first_word() -> None:
    words = (Word(2.5, 2.9, " Hello"), Word(3.0, 3.4, " there."))
    cues = build_cues([Segment(0.0, 4.0, "Hello there.", words=words)])
    assert cues[0].start >= 2.5


def test_a_short_cue_is_lengthened_into_silence_but_not_into_the_next() -> None:
    alone = build_cues([Segment(1.0, 1.2, "Yes.")])
    assert alone[0].start == 1.0 and alone[0].end >= 1.8 - 1e-9
    close = build_cues([Segment(1.0, 1.2, "Yes."), Segment(1.5, 3.5, "Then we agree on the plan for March.")],
                       merge_gap=0.2)
    assert len(close) == 2
    assert 1.2 <= close[0].end <= close[1].start - 0.08 + 1e-9
    assert close[1].start == 1.5


def test_segments_merge_only_across_short_silence() -> None:
    near = build_cues([Segment(0.0, 0.6, "Right."), Segment(0.9, 2.0, "Let's start.")])
    assert [c.lines for c in near] == [("Right. Let's start.",)]
    far = build_cues([Segment(0.0, 0.6, "Right."), Segment(2.0, 3.0, "Let's start.")])
    assert [c.lines for c in far] == [("Right.",), ("Let's start.",)]


def test_a_url_longer_than_a_line_gets_its_own_line() -> None:
    url = "https://intranet.example.com/projects/planning/2025/q3/minutes.html"
    cues = build_cues([Segment(0.0, 6.0, f"The notes are at {url} as usual")])
    lines = [line for c in cues for line in c.lines]
    assert url in lines
    assert all(len(line) <= MAX_CHARS for line in lines if line != url)


def test_cjk_is_split_between_characters_at_punctuation() -> None:
    text = ("今日は会議の最初の議題として来期の予算について話し合いたいと思います。"
            "数字は良好ですが、採用についていくつか未解決の問題があり、来週までに結論を出す必要があります。")
    cues = build_cues([Segment(0.0, 12.0, text)])
    lines = [line for c in cues for line in c.lines]
    assert all(len(line) <= MAX_CHARS // 2 for line in lines)  # a CJK character takes the room of two
    assert "".join(lines) == text
    assert " " not in "".join(lines)
    assert cues[0].lines[-1].endswith("。")  # the first sentence is a cue of its own
    assert not any(line[0] in "。、" for line in lines)


def test_cjk_width_can_be_plain_characters() -> None:
    text = "我们今天开会主要讨论下个季度的预算问题大家都看过了财务部门发过来的报告吧"
    wide = build_cues([Segment(0.0, 6.0, text)])
    narrow = build_cues([Segment(0.0, 6.0, text)], wide_char_width=1)
    assert max(len(line) for c in wide for line in c.lines) <= 21
    assert max(len(line) for c in narrow for line in c.lines) > 21
    assert all(len(line) <= MAX_CHARS for c in narrow for line in c.lines)
    assert text_width("日本語 ok") == 9 and text_width("日本語 ok", 1) == 6


def test_cjk_segments_join_without_a_space() -> None:
    cues = build_cues([Segment(0.0, 1.0, "はい。"), Segment(1.2, 2.0, "始めましょう。")])
    assert [c.lines for c in cues] == [("はい。始めましょう。",)]


def test_glued_words_are_never_cut() -> None:
    words = (Word(0.0, 0.3, " I"), Word(0.3, 0.5, " don"), Word(0.5, 0.7, "'t"), Word(0.7, 1.0, " know."))
    cues = build_cues([Segment(0.0, 1.0, "I don't know.", words=words)])
    assert [c.lines for c in cues] == [("I don't know.",)]


def test_words_that_do_not_spell_the_text_fall_back_to_the_text() -> None:
    words = (Word(0.0, 0.5, " Hello"), Word(0.5, 1.0, " world"))
    cues = build_cues([Segment(0.0, 2.0, "Hello there, world.", words=words)])
    assert [c.lines for c in cues] == [("Hello there, world.",)]


def test_empty_input_and_blank_segments_give_no_cues() -> None:
    assert build_cues([]) == []
    assert build_cues([Segment(0.0, 1.0, "   "), Segment(1.0, 2.0, "")]) == []


def test_one_line_mode() -> None:
    cues = build_cues([Segment(0.0, 6.0, " ".join(SIXTY[:20]))], max_lines=1)
    assert all(len(c.lines) == 1 and len(c.lines[0]) <= MAX_CHARS for c in cues)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError):
        build_cues([], max_lines=3)
    with pytest.raises(ValueError):
        build_cues([], max_line_chars=0)
    with pytest.raises(ValueError):
        build_cues([], wide_char_width=0)


def test_long_meeting_is_fast_enough() -> None:
    import time

    text = " ".join(SIXTY[:30]) + "."
    segments = [Segment(i * 10.0, i * 10.0 + 9.5, text) for i in range(720)]  # two hours
    started = time.perf_counter()
    cues = build_cues(segments)
    assert time.perf_counter() - started < 30  # ~2 s here; a quadratic cut would take minutes
    assert len(cues) >= 720 * 2


# ---------------------------------------------------------------- pauses and speakers


def test_a_pause_of_a_second_between_words_ends_the_cue() -> None:
    words, t = [], 0.0
    for tok in "we agreed on that . then after lunch we".split():
        if tok == ".":
            words[-1] = Word(words[-1].start, words[-1].end, words[-1].text + ".")
            t += 1.0  # a full second of silence inside one segment
            continue
        words.append(Word(t, t + 0.25, " " + tok))
        t += 0.3
    seg = Segment(0.0, t, "we agreed on that. then after lunch we", words=tuple(words))
    cues = build_cues([seg])
    assert [c.lines for c in cues] == [("we agreed on that.",), ("then after lunch we",)]
    assert cues[1].start >= words[4].start


def test_a_change_of_speaker_ends_the_cue_even_without_a_pause() -> None:
    segments = [Segment(0.0, 1.0, "Ready?", speaker="Speaker 1"), Segment(1.0, 1.6, "Yes.", speaker="Speaker 2"),
                Segment(1.7, 3.0, "Then let's go.", speaker="Speaker 2")]
    cues = build_cues(segments)
    assert [(c.lines, c.speaker) for c in cues] == [(("Ready?",), "Speaker 1"),
                                                    (("Yes. Then let's go.",), "Speaker 2")]
    # word speakers win over the segment's: one segment, two people
    words = (Word(0.0, 0.4, " Ready?", speaker="Speaker 1"), Word(0.5, 0.9, " Yes.", speaker="Speaker 2"))
    mixed = build_cues([Segment(0.0, 1.0, "Ready? Yes.", words=words, speaker="Speaker 1")])
    assert [(c.lines, c.speaker) for c in mixed] == [(("Ready?",), "Speaker 1"), (("Yes.",), "Speaker 2")]
    assert all(c.speaker is None for c in build_cues([Segment(0.0, 1.0, "Ready?")]))


def test_speaker_labels_start_each_new_speakers_first_cue_and_count_as_text() -> None:
    long = " ".join(SIXTY[:24])
    segments = [Segment(0.0, 6.0, long, speaker="Speaker 1"), Segment(6.2, 7.0, "Right.", speaker="Speaker 2"),
                Segment(9.0, 10.0, "And one more thing.", speaker="Speaker 2"),
                Segment(10.2, 11.0, "Sure.", speaker="Speaker 1")]
    cues = build_cues(segments, speaker_labels=True)
    texts = [" ".join(c.lines) for c in cues]
    assert texts[0].startswith("Speaker 1: so what we want")
    assert not any(t.startswith("Speaker") for t in texts[1:-3])  # Speaker 1 goes on: no label
    assert texts[-3:] == ["Speaker 2: Right.", "And one more thing.", "Speaker 1: Sure."]  # same speaker after a pause
    assert all(len(line) <= MAX_CHARS for c in cues for line in c.lines)
    assert not any(line.endswith(":") for c in cues for line in c.lines)  # a label is never alone
    assert [c.speaker for c in cues][-3:] == ["Speaker 2", "Speaker 2", "Speaker 1"]
    # without speakers, labels change nothing
    plain = [Segment(s.start, s.end, s.text) for s in segments]
    assert build_cues(plain, speaker_labels=True) == build_cues(plain)


SPEAKERS = st.sampled_from(["Speaker 1", "Speaker 2", "Speaker 3"])


@st.composite
def spoken_transcripts(draw: st.DrawFn) -> list[Spec]:
    """Transcripts whose segments, and some of whose words, carry speakers."""
    specs = draw(transcripts())
    out = []
    for spec in specs:
        seg = spec.segment
        words = tuple(Word(w.start, w.end, w.text, w.probability, draw(st.one_of(st.none(), SPEAKERS)))
                      for w in seg.words)
        out.append(Spec(Segment(seg.start, seg.end, seg.text, words=words, speaker=draw(SPEAKERS)), spec.word_chars))
    return out


def _char_sources(specs: list[Spec]) -> list[tuple[str, float, float]]:
    """(speaker, start, end) of the word (or segment) each non-space character belongs to.

    A combining mark (Thai vowel and tone marks) stays with the character before it, whatever word
    the timestamps put it in: a character is never shown apart from its marks.
    """
    out = []
    for spec in specs:
        seg = spec.segment
        if spec.word_chars:
            for word, count in zip(seg.words, spec.word_chars, strict=True):
                out += [(word.speaker or seg.speaker, word.start, word.end)] * count
        else:
            out += [(seg.speaker, seg.start, seg.end)] * len(_nonspace(seg.text))
    chars = "".join(_nonspace(s.segment.text) for s in specs)
    for i in range(1, len(out)):
        if unicodedata.category(chars[i]).startswith("M"):
            out[i] = (out[i - 1][0], out[i - 1][1], max(out[i - 1][2], out[i][2]))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spoken_transcripts(), st.booleans())
def test_cues_never_mix_speakers_nor_span_a_long_pause(specs: list[Spec], labels: bool) -> None:
    cues = build_cues([s.segment for s in specs], speaker_labels=labels)
    sources = _char_sources(specs)
    pos, previous = 0, None
    for cue in cues:
        lines = list(cue.lines)
        label = f"{cue.speaker}:"
        if labels and cue.speaker != previous:
            assert lines[0].startswith(label + " ") or lines[0] == label and len(lines) == 2, cue
            lines[0] = lines[0][len(label):].strip()
        previous = cue.speaker
        chars = len(_nonspace("".join(lines)))
        mine = sources[pos:pos + chars]
        assert {speaker for speaker, _, _ in mine} == {cue.speaker}, cue
        latest = mine[0][2]
        for (_, start, end), (_, prev_start, _) in zip(mine[1:], mine):
            if start != prev_start:  # the next word or segment
                assert start - latest < MERGE_GAP + 1e-9, cue
            latest = max(latest, end)
        assert cue.start >= mine[0][1] - 1e-9, cue
        pos += chars
    assert pos == len(sources)
    if not labels:
        check_invariants(specs, cues)
