"""The transcription core on a real Whisper model (whisper-base) and real recorded speech."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from whisperd.audio import decode_audio
from whisperd.engine import Engine, TranscriptionError
from whisperd.options import DecodeOptions
from whisperd_support.evaluation import DevClip, error_rate

LIBRIVOX = [f"en_librivox_ss01_{n}" for n in ("0870", "0880", "0890", "0920", "0930")]
MANDARIN = ["zh_aishell1_BAC009S0764W0121", "zh_aishell1_BAC009S0764W0122"]
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]")


def transcribe(engine: Engine, c: DevClip, **options: object):
    return engine.transcribe(decode_audio(c.path), DecodeOptions(**options))  # type: ignore[arg-type]


def test_english_librivox_wer(engine: Engine, clip: Callable[[str], DevClip]) -> None:
    clips = [clip(i) for i in LIBRIVOX]
    hyps = [transcribe(engine, c, language="en").text for c in clips]
    wer = error_rate([c.reference for c in clips], hyps, "en")
    print(f"{engine.settings.backend} {engine.settings.precision}: LibriVox WER {wer:.3f}")
    assert wer <= 0.12, list(zip(hyps, [c.reference for c in clips]))


def test_sym_int4_really_uses_ipex_llm_low_bit_layers(engine_int4: Engine) -> None:
    from ipex_llm.transformers.low_bit_linear import LowBitLinear

    model = engine_int4.model  # type: ignore[attr-defined]
    decoder = [m for m in model.model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    encoder = [m for m in model.model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    # Every projection of the decoder is quantised; the encoder and the tied output head stay
    # dense (transformers_backend.NOT_QUANTISED says why).
    assert decoder and all(isinstance(m, LowBitLinear) for m in decoder)
    assert encoder and not any(isinstance(m, LowBitLinear) for m in encoder)
    assert not isinstance(model.proj_out, LowBitLinear)
    assert type(model.model.decoder.layers[0].fc1).__name__ == "LowBitLinear"


def test_fp32_is_plain_torch(engine_fp32: Engine) -> None:
    model = engine_fp32.model  # type: ignore[attr-defined]
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert next(model.parameters()).dtype == torch.float32


def test_mandarin_character_error_rate(engine: Engine, clip: Callable[[str], DevClip]) -> None:
    """CER after mapping traditional to simplified characters and dropping punctuation and spaces."""
    clips = [clip(i) for i in MANDARIN]
    hyps = [transcribe(engine, c, language="zh").text for c in clips]
    cer = error_rate([c.reference for c in clips], hyps, "zh")
    print(f"{engine.settings.backend} {engine.settings.precision}: Mandarin CER {cer:.3f}")
    assert cer <= 0.35, hyps


def test_mandarin_translated_to_english(each_backend: Engine, clip: Callable[[str], DevClip]) -> None:
    """Greedy. whisper-base is unsure of this translation: every temperature fails the log-probability
    gate, and the last attempt, sampled at 1.0, is kept (as generate() keeps it). What one such
    sample says is chance; the fallback is tested in test_static_decoder.py."""
    result = transcribe(each_backend, clip(MANDARIN[0]), language="chinese", task="translate", temperatures=(0.0,))
    assert result.language == "zh" and result.task == "translate"
    assert not CJK.search(result.text), result.text
    assert len(re.findall(r"[A-Za-z]+", result.text)) >= 3, result.text


@pytest.mark.parametrize(("clip_id", "expected"), [("es_mls_13697_11991_000000", "es"), ("sv_nst_u0016003", "sv")])
def test_auto_detects_language(each_backend: Engine, clip: Callable[[str], DevClip], clip_id: str,
                               expected: str) -> None:
    result = transcribe(each_backend, clip(clip_id), language="auto")
    assert result.language == expected
    assert result.language_probability is not None and 0.5 < result.language_probability <= 1.0


def test_long_audio_is_not_truncated(engine: Engine, clip: Callable[[str], DevClip]) -> None:
    """52 s: two speakers, one after the other; both halves must be in the text, times past 30 s."""
    c = clip("en_mfa_michaelandsickmichael")
    result = transcribe(engine, c, language="en")
    assert result.segments[-1].end > 45.0
    assert any(s.start > 30.0 for s in result.segments)
    first_half = " ".join(s.text for s in result.segments if s.end <= 27.5)
    second_half = " ".join(s.text for s in result.segments if s.start >= 26.0)
    assert error_rate([clip("en_mfa_acoustic_corpus").reference], [first_half], "en") < 0.25
    assert error_rate([clip("en_mfa_cold_corpus").reference], [second_half], "en") < 0.25
    assert error_rate([c.reference], [result.text], "en") < 0.15
    starts = [s.start for s in result.segments]
    assert starts == sorted(starts) and all(0 <= s.start <= s.end <= result.duration for s in result.segments)


def test_english_only_model_refuses_other_languages(clip: Callable[[str], DevClip]) -> None:
    from conftest import load_engine

    tiny_en = load_engine("fp32", model="openai/whisper-tiny.en")
    audio = decode_audio(clip("en_goforward").path)
    assert "forward" in tiny_en.transcribe(audio, DecodeOptions(language="auto")).text.lower()
    with pytest.raises(TranscriptionError, match="English-only"):
        tiny_en.transcribe(audio, DecodeOptions(language="zh"))
    with pytest.raises(TranscriptionError, match="cannot translate"):
        tiny_en.transcribe(audio, DecodeOptions(language="en", task="translate"))


def test_empty_audio_gives_an_empty_transcript(each_backend: Engine) -> None:
    import numpy as np

    result = each_backend.transcribe(np.zeros(0, dtype=np.float32), DecodeOptions(language="en"))
    assert result.segments == () and result.duration == 0.0


@pytest.mark.parametrize(("clip_id", "language"), [("en_librivox_ss01_0870", "en"), (MANDARIN[0], "zh")])
def test_word_timestamps_on_request(each_backend: Engine, clip: Callable[[str], DevClip], clip_id: str,
                                   language: str) -> None:
    c = clip(clip_id)
    result = transcribe(each_backend, c, language=language, word_timestamps=True)
    words = [w for s in result.segments for w in s.words]
    assert all(s.words for s in result.segments)
    joiner = "" if language == "zh" else " "
    assert joiner.join(w.text for w in words) == joiner.join(s.text for s in result.segments)
    for seg in result.segments:
        assert all(seg.start <= w.start <= w.end <= seg.end for w in seg.words)
    assert [w.start for w in words] == sorted(w.start for w in words)
    # Spread over the speech, not piled up at one end of it (as when aligned against the padding).
    spoken = result.segments[-1].end - result.segments[0].start
    assert words[len(words) // 2].start - words[0].start > 0.25 * spoken
    assert words[-1].start - words[0].start > 0.6 * spoken
    # Off by default.
    assert all(not s.words for s in transcribe(each_backend, c, language=language).segments)


def pink_noise(seconds: float, dbfs: float, seed: int = 0):
    """Room-like noise: white noise shaped to 1/f, scaled to the given RMS level."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
    noise = np.fft.irfft(spectrum, n)
    noise *= 10 ** (dbfs / 20) / np.sqrt(np.mean(noise**2))
    return noise.astype(np.float32)


@pytest.mark.parametrize("kind", ["silence", "noise"])
def test_no_speech_gives_no_text(engine_fp32: Engine, kind: str) -> None:
    """Whisper invents 'Thank you.' on silence; VAD keeps such stretches away from the model."""
    import numpy as np

    audio = np.zeros(20 * 16000, dtype=np.float32) if kind == "silence" else pink_noise(20, -40)
    result = engine_fp32.transcribe(audio, DecodeOptions(language="auto"))
    assert result.segments == ()
    assert result.language == "und" and result.duration == 20.0


def test_silence_around_speech_stays_silent(engine_fp32: Engine, clip: Callable[[str], DevClip]) -> None:
    """15 s of noise, a sentence, 15 s of noise: text only where the sentence is."""
    import numpy as np

    c = clip("en_librivox_ss01_0870")
    speech = decode_audio(c.path)
    audio = np.concatenate([pink_noise(15, -45, 1), speech, pink_noise(15, -45, 2)])
    audio[15 * 16000 : 15 * 16000 + len(speech)] += pink_noise(len(speech) / 16000, -45, 3)[: len(speech)]
    result = engine_fp32.transcribe(audio, DecodeOptions(language="auto"))
    assert result.language == "en"
    assert error_rate([c.reference], [result.text], "en") <= 0.1
    onset, offset = 15.0, 15.0 + len(speech) / 16000
    for seg in result.segments:
        assert onset - 0.5 <= seg.start and seg.end <= offset + 0.5, seg
    assert abs(result.segments[0].start - onset) <= 0.5


def test_vad_off_decodes_the_whole_file_sequentially(engine_fp32: Engine, clip: Callable[[str], DevClip]) -> None:
    c = clip("en_mfa_michaelandsickmichael")
    result = transcribe(engine_fp32, c, language="en", vad=False)
    assert result.settings["vad"] is False
    assert result.segments[-1].end > 45.0
    assert error_rate([c.reference], [result.text], "en") < 0.15


def test_repeated_segments_are_dropped() -> None:
    from whisperd.engine.pipeline import clean_segments
    from whisperd.transcript import Segment

    segments = [Segment(0, 2, "Thanks for watching!"), Segment(2, 4, "thanks for watching"),
                Segment(4, 6, "Thanks for watching!"), Segment(6, 8, "Bye.")]
    assert [s.text for s in clean_segments(segments, 10.0, drop_repeats=True)[0]] == ["Thanks for watching!", "Bye."]
    assert len(clean_segments(segments, 10.0, drop_repeats=False)[0]) == 4
