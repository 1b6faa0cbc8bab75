"""The text guards on their own: loops, copies at seams, segments without time (no model needed)."""

from __future__ import annotations

from whisperd.engine.guards import (
    collapse_loops,
    drop_repeats,
    give_time,
    min_seconds,
    repeated_run,
    text_compression_ratio,
)
from whisperd.engine.pipeline import clean_segments
from whisperd.transcript import Segment, Word

GATE = 2.4


def test_a_loop_is_collapsed_to_one_copy_and_then_passes_the_gate() -> None:
    loop = "So we agreed on Tuesday. " + "Yeah, " * 222 + "and then we left."
    assert text_compression_ratio(loop) > GATE
    text, removed = collapse_loops(loop, GATE)
    assert text == "So we agreed on Tuesday. Yeah, and then we left."
    assert removed == 221
    assert text_compression_ratio(text) <= GATE


def test_a_loop_of_a_longer_phrase_and_in_a_script_without_spaces() -> None:
    text, _ = collapse_loops("a'r ddoddau'r " * 70, GATE)
    assert text == "a'r ddoddau'r"
    chinese, removed = collapse_loops("我们开会" + "的的" * 100, GATE)
    assert chinese.startswith("我们开会的") and chinese.count("的") <= 2 and removed


def test_speech_that_repeats_a_little_is_left_alone() -> None:
    for said in ("Yeah, yeah, yeah, I know.", "here are some more words, words, words, words, words.",
                 "No no no no, that is not what I meant at all, not at all."):
        assert collapse_loops(said, GATE) == (said, 0)
    assert collapse_loops("Yeah, " * 50, None) == ("Yeah, " * 50, 0)  # gate off: the caller's choice


def test_what_no_phrase_explains_is_cut_to_what_passes() -> None:
    words = "alpha beta gamma delta alpha beta delta gamma alpha gamma beta delta ".split() * 20
    text, removed = collapse_loops(" ".join(words), GATE)
    assert removed and text_compression_ratio(text) <= GATE
    assert " ".join(words).startswith(text)


def test_a_seam_that_repeats_the_passage_before_it_is_dropped() -> None:
    before = "Okay, I heard of these. This is Diane in New Jersey. I'm Sheila and Texas originally from Chicago."
    assert repeated_run("This is Diane in New Jersey.", before) == ("", True)
    assert repeated_run("this is diane in new jersey i'm sheila and texas", before) == ("", True)
    assert repeated_run("So what do you do for a living?", before) == ("So what do you do for a living?", False)
    # A copied run of six words goes, what is new stays.
    text, changed = repeated_run("I'm Sheila and Texas originally from Chicago, and I teach school.", before)
    assert changed and text == "and I teach school."
    assert repeated_run("anything", "") == ("anything", False)
    # A short sentence goes only right after itself (or anywhere in the window a stretch came from).
    assert repeated_run("We are angry.", "yes, we're angry. We are angry.") == ("", True)
    assert repeated_run("Yes.", "Yes. We went home then.") == ("Yes.", False)
    assert repeated_run("Thanks.", "And I think this is probably good. Alright, thanks.") == ("", True)
    assert repeated_run("Yes.", "Yes. We went home then.", anywhere=True) == ("", True)


def test_only_seams_are_compared() -> None:
    said = Segment(0.0, 3.0, "He was not an ill disposed young man.")
    again = Segment(10.0, 13.0, "He was not an ill disposed young man.")
    kept, dropped = drop_repeats([said, again], [False, False])
    assert kept == [said, again] and dropped == 0
    kept, dropped = drop_repeats([said, again], [False, True])
    assert kept == [said] and dropped == 1
    kept, dropped = drop_repeats([again], [True], before="he was not an ill disposed young man")
    assert kept == [] and dropped == 1


def test_a_stretched_segment_gives_way_to_the_speech_decoded_again() -> None:
    """The pile-up a re-decoded hole made: every segment after the stretched one at its end."""
    stretched = Segment(85.62, 112.42, "8 of spades, 4 of clubs, 7 of hearts.")
    hole = [Segment(91.42, 92.22, "Oh my goodness!"), Segment(93.4, 100.98, "So this is the sick corpus."),
            Segment(111.9, 112.9, "Thank you.")]
    timed, repaired = give_time([stretched, *hole], 120.0)
    assert timed[0].end == 91.42
    assert [(s.start, s.end) for s in timed[1:]] == [(s.start, s.end) for s in hole]
    assert repaired == 0


def test_no_segment_is_shorter_than_its_words_can_be_said() -> None:
    piled = [Segment(6.58, 6.58, "Okay, I heard of these."), Segment(6.58, 6.58, "This is Diane in New Jersey."),
             Segment(6.58, 6.6, "Hi."), Segment(9.0, 12.0, "I'm Sheila and Texas originally from Chicago.")]
    timed, repaired = give_time(piled, 20.0)
    for seg in timed:
        assert seg.end - seg.start >= min_seconds(seg.text) - 1e-9, seg
    assert all(a.end <= b.start for a, b in zip(timed, timed[1:]))
    assert repaired == 3
    assert min_seconds("Hi.") == 0.25 and min_seconds("Okay, I heard of these.") == 19 / 20


def test_words_give_a_short_segment_its_time() -> None:
    words = (Word(2.0, 2.4, "Good"), Word(2.4, 3.1, "morning."))
    timed, _ = give_time([Segment(2.18, 2.18, "Good morning.", words=words)], 10.0)
    assert (timed[0].start, timed[0].end) == (2.0, 3.1)


def test_clean_segments_counts_what_it_mended() -> None:
    segments = [Segment(0.0, 23.0, "Yeah, " * 200), Segment(23.0, 23.0, "Okay then, see you tomorrow.")]
    cleaned, repairs = clean_segments(segments, 30.0, drop_repeats=True)
    assert cleaned[0].text == "Yeah," and repairs.loops_collapsed == 1
    assert cleaned[0].compression_ratio is not None and cleaned[0].compression_ratio <= GATE
    assert cleaned[1].end - cleaned[1].start >= min_seconds(cleaned[1].text) - 1e-9 and repairs.times_repaired == 1


def test_a_strict_fallback_gate_does_not_cut_ordinary_sentences() -> None:
    """A gate set below Whisper's 2.4 makes windows fall back sooner; the loop guard stays at 2.4."""
    said = Segment(0.0, 6.0, "And Mr. John Dashwood had then leisure to consider how much there might be prudently.")
    cleaned, repairs = clean_segments([said], 10.0, drop_repeats=True, compression_threshold=0.5)
    assert cleaned[0].text == said.text and repairs.loops_collapsed == 0
