"""Word/character error rates the way Whisper results are usually reported.

Raw transcripts differ from references in ways that are not recognition errors:
case, punctuation, "Mr." vs "mister", "10" vs "ten", British vs American spelling,
fillers ("um", "uh") and annotation tags ("[laughter]"). Both sides are therefore
normalised first with OpenAI's Whisper normalisers (packaged as
``whisper_normalizer``): the English one for English, the basic one (lower case, no
punctuation or symbols) for everything else. Chinese and Japanese do not put spaces
between words, so they are scored by characters (CER), Chinese after mapping
traditional to simplified characters so that script choice is not an error.

jiwer, whisper_normalizer and zhconv are imported inside the functions: they are
test/benchmark dependencies, and importing ``whisperd_support.evaluation`` must not need them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["CHARACTER_LANGUAGES", "ErrorRate", "error_rate", "normalize_text", "score", "strip_tags"]

# Languages written without spaces between words: scored by characters. zh/ja are
# the ones in our clips; yue, th, lo, my and km follow Whisper's own evaluation.
CHARACTER_LANGUAGES = frozenset({"zh", "ja", "yue", "th", "lo", "my", "km"})
_CHINESE = frozenset({"zh", "yue"})

# "[laughter]", "[noise]", "<unk>", "<sil>": annotations, not words.
_TAG = re.compile(r"\[[^\]]*\]|<[^>]*>")


@dataclass(frozen=True)
class ErrorRate:
    """Corpus-level alignment counts; ``rate`` is (S + D + I) / N."""

    unit: str  # "word" or "character"
    substitutions: int
    deletions: int
    insertions: int
    hits: int

    @property
    def reference_length(self) -> int:
        return self.substitutions + self.deletions + self.hits

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        n = self.reference_length
        if n == 0:  # only empty references: any output at all is fully wrong (as jiwer does)
            return 0.0 if self.errors == 0 else 1.0
        return self.errors / n


def _base_language(language: str) -> str:
    """Primary language subtag: zh-TW, zh_Hant and ZH all give zh."""
    return re.split(r"[-_]", language.strip().lower(), maxsplit=1)[0]


def strip_tags(text: str) -> str:
    """Remove bracketed annotations such as ``[laughter]`` or ``<unk>``."""
    return _TAG.sub(" ", text)


@functools.cache
def _english() -> Callable[[str], str]:
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()  # loads a spelling table: build once


@functools.cache
def _basic() -> Callable[[str], str]:
    from whisper_normalizer.basic import BasicTextNormalizer

    return BasicTextNormalizer()


def normalize_text(text: str, language: str) -> str:
    """Normalise ``text`` for scoring in ``language`` (ISO 639-1 code, region suffix ignored).

    English: Whisper's EnglishTextNormalizer (case, punctuation, contractions, numbers
    to digits, American spelling, fillers removed). Other languages: Whisper's
    BasicTextNormalizer (case, punctuation and symbols). Chinese is additionally
    converted to simplified characters. For character-scored languages all
    whitespace is dropped, so only the characters themselves are compared.
    """
    lang = _base_language(language)
    text = strip_tags(text)
    if lang in _CHINESE:
        import zhconv

        text = zhconv.convert(text, "zh-cn")
    text = _english()(text) if lang == "en" else _basic()(text)
    if lang in CHARACTER_LANGUAGES:
        return re.sub(r"\s+", "", text)
    return " ".join(text.split())


def score(references: Sequence[str], hypotheses: Sequence[str], language: str) -> ErrorRate:
    """Corpus-level WER (or CER for :data:`CHARACTER_LANGUAGES`) counts after normalisation.

    Corpus level means errors and reference lengths are summed over all pairs before
    dividing, so long utterances weigh more than short ones (the usual convention;
    averaging per-clip rates would let a two-word clip swing the result).
    """
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise TypeError("references and hypotheses must be sequences of strings, not a single string")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("nothing to score: no references")
    import jiwer

    refs = [normalize_text(r, language) for r in references]
    hyps = [normalize_text(h, language) for h in hypotheses]
    if _base_language(language) in CHARACTER_LANGUAGES:
        chars = jiwer.process_characters(refs, hyps)
        return ErrorRate("character", chars.substitutions, chars.deletions, chars.insertions, chars.hits)
    words = jiwer.process_words(refs, hyps)
    return ErrorRate("word", words.substitutions, words.deletions, words.insertions, words.hits)


def error_rate(references: Sequence[str], hypotheses: Sequence[str], language: str) -> float:
    """Corpus-level WER, or CER for Chinese/Japanese (see :func:`score`), as a fraction (0.1 = 10 %)."""
    return score(references, hypotheses, language).rate
