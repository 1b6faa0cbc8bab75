"""WER/CER scoring: known values on small strings, and what normalisation forgives."""

from __future__ import annotations

import subprocess
import sys

import pytest

from whisperd_support.evaluation import ErrorRate, error_rate, load_manifest, normalize_text, score

# --- known error rates ------------------------------------------------------------


def test_identical_is_zero() -> None:
    assert error_rate(["the cat sat on the mat"], ["the cat sat on the mat"], "en") == 0.0


def test_one_substitution_in_six_words() -> None:
    result = score(["the cat sat on the mat"], ["the cat sit on the mat"], "en")
    assert result == ErrorRate("word", substitutions=1, deletions=0, insertions=0, hits=5)
    assert result.rate == pytest.approx(1 / 6)
    assert result.reference_length == 6


def test_deletion_and_insertion_counts() -> None:
    result = score(["one two three four"], ["one three four five six"], "sv")
    assert (result.substitutions, result.deletions, result.insertions) == (0, 1, 2)
    assert result.rate == pytest.approx(3 / 4)


def test_error_rate_can_exceed_one() -> None:
    assert error_rate(["yes"], ["no no no"], "es") == pytest.approx(3.0)


def test_corpus_level_not_mean_of_utterances() -> None:
    # Utterance WERs are 0 and 1 (mean 0.5), but the corpus has 2 errors in 6 words.
    refs = ["alpha beta gamma delta", "epsilon zeta"]
    assert error_rate(refs, ["alpha beta gamma delta", ""], "de") == pytest.approx(2 / 6)


def test_empty_hypothesis_is_all_deletions() -> None:
    result = score(["he might even have been made amiable himself"], [""], "en")
    assert (result.deletions, result.rate) == (8, 1.0)


def test_only_empty_references() -> None:
    assert error_rate(["[laughter]"], [""], "en") == 0.0
    assert error_rate(["[laughter]"], ["ha ha"], "en") == 1.0


def test_input_checks() -> None:
    with pytest.raises(ValueError):
        error_rate(["a", "b"], ["a"], "en")
    with pytest.raises(ValueError):
        error_rate([], [], "en")
    with pytest.raises(TypeError):
        error_rate("a b", "a b", "en")  # type: ignore[arg-type]


# --- English normalisation (Whisper's EnglishTextNormalizer) -----------------------


@pytest.mark.parametrize(
    ("reference", "hypothesis"),
    [
        ("Hello, World!", "hello world"),
        ("HE BEGAN A CONFUSED COMPLAINT", "He began a confused complaint."),
        ("go forward ten meters", "Go forward 10 meters."),
        ("two thousand and twenty four", "2024"),
        ("mister smith paid twenty dollars", "Mr. Smith paid $20."),
        ("ten percent", "10%"),
        ("the colour grey", "the color gray"),
        ("it's gonna rain", "it is going to rain"),
        ("um this is me uh talking", "This is me talking."),
        ("[laughter] montreal [laughter] forced [laughter] aligner [laughter]", "Montreal forced aligner."),
    ],
)
def test_english_normalisation_forgives_form(reference: str, hypothesis: str) -> None:
    assert normalize_text(reference, "en") == normalize_text(hypothesis, "en")
    assert error_rate([reference], [hypothesis], "en") == 0.0


def test_english_normalisation_keeps_real_errors() -> None:
    assert error_rate(["four queen of clubs"], ["for queen of clubs"], "en") == pytest.approx(1 / 4)
    assert error_rate(["eight of spades"], ["eight of spades seven"], "en") == pytest.approx(1 / 3)


def test_tags_are_stripped_in_every_language() -> None:
    assert normalize_text("[laughter] hola <unk> mundo [noise]", "es") == "hola mundo"
    assert normalize_text("[笑] 你好", "zh") == "你好"
    assert error_rate(["[laughter] montreal forced aligner"], ["montreal forced"], "en") == pytest.approx(1 / 3)


def test_region_suffix_is_ignored() -> None:
    assert normalize_text("Colour, 10!", "en-GB") == normalize_text("color ten", "en")
    assert normalize_text("情況", "zh-TW") == "情况"


# --- other languages (Whisper's BasicTextNormalizer) --------------------------------


def test_basic_normalisation_case_and_punctuation_only() -> None:
    assert normalize_text("Testar en två tre fyra fem sex sju åtta.", "sv") == "testar en två tre fyra fem sex sju åtta"
    assert normalize_text("¿Qué tal?  ¡Muy bien!", "es") == "qué tal muy bien"
    # Diacritics are letters, not decoration: "atta" is a different word from "åtta".
    assert error_rate(["sju åtta"], ["sju atta"], "sv") == pytest.approx(1 / 2)
    # No English number or spelling rules outside English.
    assert normalize_text("dos mil", "es") == "dos mil"


# --- Chinese and Japanese: character error rate ------------------------------------


def test_chinese_traditional_vs_simplified_is_cer_zero() -> None:
    simplified = "甚至出现交易几乎停滞的情况"
    traditional = "甚至出現交易幾乎停滯的情況"
    assert error_rate([simplified], [traditional], "zh") == 0.0
    assert error_rate([traditional], [simplified], "zh") == 0.0


def test_chinese_spaces_and_punctuation_dropped() -> None:
    assert normalize_text("甚至出現交易， 幾乎停滯的情況。", "zh") == "甚至出现交易几乎停滞的情况"  # noqa: RUF001
    assert error_rate(["一二线城市虽然也处于调整中"], ["一二线城市，虽然也处于调整中。"], "zh") == 0.0  # noqa: RUF001


def test_chinese_is_scored_by_characters() -> None:
    result = score(["一二线城市虽然也处于调整中"], ["一二线城市虽然也处在调整"], "zh")
    assert result.unit == "character"
    assert (result.substitutions, result.deletions, result.insertions, result.hits) == (1, 1, 0, 11)
    assert result.rate == pytest.approx(2 / 13)


def test_japanese_is_scored_by_characters() -> None:
    reference = "真っ昼間なのにキャンプの外れの電柱に電球がともっていた"
    assert error_rate([reference], ["真っ昼間なのに、キャンプの外れの 電柱に電球がともっていた。"], "ja") == 0.0
    # Half-width katakana and full-width Latin are folded (NFKC).
    assert normalize_text("ｷｬﾝﾌﾟ ＡＢＣ", "ja") == "キャンプabc"  # noqa: RUF001
    result = score([reference], [reference.replace("電球", "電気")], "ja")
    assert (result.unit, result.substitutions, result.reference_length) == ("character", 1, len(reference))


# --- the dev clip references ----------------------------------------------------------


@pytest.mark.parametrize("entry", load_manifest(), ids=lambda e: e.id)
def test_every_manifest_reference_normalises_to_words(entry) -> None:
    assert entry.set in ("dev", "held-out")
    if not entry.reference:  # no published transcript: never scored for WER, and the notes say so
        assert "no word transcript" in entry.notes
        return
    normalised = normalize_text(entry.reference, entry.language)
    assert normalised and "[" not in normalised
    assert error_rate([entry.reference], [entry.reference], entry.language) == 0.0
    if entry.language in ("zh", "ja"):
        assert " " not in normalised


def test_importing_evaluation_does_not_import_scoring_dependencies() -> None:
    code = (
        "import sys, whisperd_support.evaluation; "
        "loaded = {'jiwer', 'whisper_normalizer', 'zhconv'} & set(sys.modules); "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
