"""Decode any audio (or video) file into the 16 kHz mono float32 waveform Whisper expects.

We use PyAV because its wheels bundle ffmpeg: the daemon needs no system ffmpeg, and
every format ffmpeg reads (wav, flac, mp3, ogg/vorbis, ogg/opus, m4a/aac, video files
with a sound track, ...) works the same way. The approach follows faster-whisper's
``decode_audio`` (demux -> decode -> ffmpeg resampler -> numpy) with these changes
that matter for a daemon fed by users' inbox folders:

* bad input raises :class:`AudioDecodeError`, whose message names the file and says
  what is wrong in words, instead of a bare ``av.error.*`` or an empty array;
* damage in the middle of a file does not throw away the good part: undecodable
  packets are skipped, a demuxer error ends decoding early, and what was decoded is
  returned with a ``logging`` warning (only a file that yields no audio raises);
* memory stays near one copy of the output: packets are read from disk one at a
  time, the resampler emits float32 directly (no s16 round trip), and its output is
  written into one array preallocated from the header's duration; and
  :func:`stream_audio` hands the same samples out in fixed-size blocks, so that a
  recording of a whole day never has to be in memory at once;
* multichannel audio is downmixed with a normalised matrix, (L + R) / 2 for stereo,
  as ``ffmpeg -ac 1`` does (see :class:`_ResampleGroup` for why not
  ``av.AudioResampler``);
* mono WAV and FLAC (16/24-bit or float) already at the target rate are read by
  libsndfile, which releases the GIL where PyAV holds it, so that files decoded side by
  side in threads scale (see :meth:`_Decoder._read_with_libsndfile`); the samples are
  the same, bit for bit, and damage is still handled by the PyAV path.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Generator, Iterator
from pathlib import Path

import av
import av.filter
import numpy as np

from whisperd.errors import WhisperdError
from whisperd.transcript import SAMPLING_RATE

try:
    import soundfile
except (ImportError, OSError):  # not installed, or no libsndfile: everything goes through PyAV
    soundfile = None

__all__ = ["MIN_DECODED_SECONDS", "AudioDecodeError", "decode_audio", "probe_duration", "stream_audio"]

log = logging.getLogger(__name__)

# Less decoded audio than this is an error, not a result: nothing can be said in it,
# and it is what a file cut off just after its header decodes to (a WAV truncated to
# 200 bytes still yields a few ms). An empty transcript would hide the damage.
MIN_DECODED_SECONDS = 0.1

# Input samples per resampler call (~1.4 s at 48 kHz, 0.5 MB as stereo float): see
# _ResampleGroup for why frames are batched at all.
_BATCH_SAMPLES = 1 << 16

# Samples per libsndfile read (~33 s at 16 kHz, 2 MB of float32): the GIL is released for
# each whole read, and stream_audio's memory stays small.
_LIBSNDFILE_BLOCK = 1 << 19

# What libsndfile reads exactly as the PyAV path does (integers scaled by 2^-(bits - 1), floats
# copied; tests/test_audio.py compares them). Not mp3/ogg/opus: their decoders differ from ffmpeg's.
_LIBSNDFILE_FORMATS = frozenset({"WAV", "WAVEX", "RF64", "W64", "FLAC"})
_LIBSNDFILE_SUBTYPES = frozenset({"PCM_16", "PCM_24", "FLOAT"})
# The formats' first bytes: files of libsndfile's two dozen other formats never reach its parsers.
_LIBSNDFILE_MAGIC = frozenset({b"RIFF", b"RF64", b"riff", b"fLaC"})
_LIBSNDFILE_UNKNOWN_LENGTH = (1 << 63) - 1  # libsndfile's frame count when the header has none
_LIBSNDFILE_ERRORS = (RuntimeError, OSError, ValueError, TypeError)  # soundfile.LibsndfileError is a RuntimeError

# Cap on trusting the header for preallocation (a damaged header can claim days);
# longer files simply grow the buffer.
_MAX_PREALLOCATED_SECONDS = 4 * 3600


class AudioDecodeError(WhisperdError):
    """A file could not be turned into audio; ``str(err)`` is ``"<file name>: <reason>"``.

    ``path`` is the file, ``reason`` the human explanation without the file name, so
    callers can log, show or store either part. Permanent: the same bytes fail the same way.
    """

    permanent = True

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")


def stream_audio(path: Path | str, sampling_rate: int = SAMPLING_RATE, block_samples: int = 1 << 20, *,
                 log_damage: bool = True) -> Iterator[np.ndarray]:
    """Decode ``path`` as :func:`decode_audio` does, handing out consecutive blocks of ``block_samples``.

    For recordings too long to hold in memory: peak memory is one block plus the decoder's
    own buffers, whatever the length of the file. The blocks are owned float32 arrays, all
    of ``block_samples`` except the last, and their concatenation is exactly what
    :func:`decode_audio` returns. Errors are the same, raised while iterating; a file that
    is too short raises before any block is handed out. ``log_damage=False`` leaves the
    damage warning out, for a second pass over a file that has been warned about once.
    """
    if block_samples < 1:
        raise ValueError(f"block_samples must be positive, got {block_samples}")
    decoder = _Decoder(Path(path), sampling_rate)
    enough = MIN_DECODED_SECONDS * sampling_rate
    held: list[np.ndarray] = []  # full blocks not handed out until the file is known to be long enough
    block = np.empty(block_samples, dtype=np.float32)
    filled = total = 0
    for piece in decoder.pieces():
        while piece.size:
            take = min(piece.size, block_samples - filled)
            block[filled : filled + take] = piece[:take]
            piece = piece[take:]
            filled += take
            total += take
            if filled == block_samples:
                np.clip(block, -1.0, 1.0, out=block)
                held.append(block)
                block = np.empty(block_samples, dtype=np.float32)
                filled = 0
                while held and total >= enough:
                    yield held.pop(0)
    decoder.check(total, log_damage)
    while held:
        yield held.pop(0)
    if filled:
        block.resize(filled, refcheck=False)
        yield np.clip(block, -1.0, 1.0, out=block)


def decode_audio(path: Path | str, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Decode the first audio stream of ``path`` to mono float32 in [-1, 1] at ``sampling_rate``.

    Channels are downmixed and the rate converted by ffmpeg (libswresample). Raises
    :class:`AudioDecodeError` for a missing, empty or non-media file, a file without
    an audio stream, and a file that yields less than :data:`MIN_DECODED_SECONDS` of
    audio. A file damaged part-way returns the audio decoded around the damage and
    logs a warning, because a partial transcript of a long recording beats none.
    The whole recording is held in memory; :func:`stream_audio` does not.
    """
    decoder = _Decoder(Path(path), sampling_rate)
    out: _Buffer | None = None
    for piece in decoder.pieces():
        if out is None:  # the header has been read: size the buffer from it
            seconds = min(decoder.declared or 30.0, _MAX_PREALLOCATED_SECONDS)
            out = _Buffer(int(seconds * sampling_rate * 1.01) + sampling_rate)
        out.append(piece)
    audio = out.finish() if out is not None else np.zeros(0, dtype=np.float32)
    decoder.check(audio.size, log_damage=True)
    return audio


class _Decoder:
    """One pass of demuxing, decoding and resampling a file, and what went wrong on the way."""

    def __init__(self, path: Path, sampling_rate: int) -> None:
        self.path = path
        self.sampling_rate = sampling_rate
        self.declared: float | None = None
        self.skipped_packets = 0
        self.packet_error: Exception | None = None
        self.stopped_by: Exception | None = None

    def pieces(self) -> Iterator[np.ndarray]:
        """Mono float32 samples (not yet clipped), in order."""
        _check_readable(self.path)
        handed_out = yield from self._read_with_libsndfile()
        if handed_out is not None:
            # Not a file for libsndfile, or damaged part-way: PyAV decodes it from the start, so
            # that its damage accounting sees the whole file, and hands out what comes after.
            yield from _skip(self._read_with_pyav(), handed_out)

    def _read_with_libsndfile(self) -> Generator[np.ndarray, None, int | None]:
        """Read a mono WAV or FLAC at the target rate with libsndfile, in large blocks.

        Returns ``None`` once the whole file has been read, else the number of samples handed
        out (0 if the file is not one for libsndfile) for PyAV to go on from.

        PyAV holds the GIL for much of each of the small packets it demuxes and decodes (~2300
        in a 10-minute FLAC), so decoding in several threads at once stops scaling at about 4:
        a 600 s 16 kHz FLAC decoded by 1, 4, 8, 16, 32 threads at once took 0.18, 0.27, 1.24,
        2.22, 4.40 s on 16 cores. libsndfile, called through cffi, releases the GIL for each
        whole read: 0.19 s for 1 thread, 0.22 s for 16, 0.54 s for 32. Its samples are PyAV's
        bit for bit for the formats it is given (see ``_LIBSNDFILE_SUBTYPES``). Whatever it
        cannot open goes to PyAV, and so does the rest of a file it stops reading early: an
        error (a damaged FLAC frame), fewer samples than the header declares (a truncated
        file), or, in a FLAC, bytes it never read after the header's length (ffmpeg decodes
        on past it: two files glued together).
        """
        if soundfile is None:
            return 0
        try:  # O_NONBLOCK: a FIFO does not block here; not a regular file, it is left to PyAV
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return 0
        try:
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode) or os.pread(fd, 4, 0) not in _LIBSNDFILE_MAGIC:
                    return 0
                sound = soundfile.SoundFile(fd, closefd=False)
            except _LIBSNDFILE_ERRORS:
                return 0
            with sound:
                frames = sound.frames
                if not (sound.format in _LIBSNDFILE_FORMATS and sound.subtype in _LIBSNDFILE_SUBTYPES
                        and sound.channels == 1 and sound.samplerate == self.sampling_rate
                        and 0 < frames < _LIBSNDFILE_UNKNOWN_LENGTH):
                    return 0
                self.declared = frames / sound.samplerate
                done = 0
                while done < frames:
                    want = min(_LIBSNDFILE_BLOCK, frames - done)
                    try:
                        block = sound.read(want, dtype="float32")
                    except _LIBSNDFILE_ERRORS:
                        return done
                    if block.size != want:
                        return done
                    yield block
                    done += want
                if sound.format == "FLAC" and os.lseek(fd, 0, os.SEEK_CUR) < os.fstat(fd).st_size:
                    return done
                return None
        finally:
            os.close(fd)

    def _read_with_pyav(self) -> Iterator[np.ndarray]:
        """Demux, decode and resample with PyAV, skipping corrupt packets."""
        path = self.path
        try:
            container = av.open(str(path), mode="r", metadata_errors="ignore")
        except av.error.FFmpegError as exc:
            raise AudioDecodeError(path, _open_failure_reason(path, exc)) from exc

        with container:
            if not container.streams.audio:
                kinds = ", ".join(sorted({str(s.type) for s in container.streams})) or "no streams at all"
                raise AudioDecodeError(path, f"no audio stream (found: {kinds})")
            stream = container.streams.audio[0]
            self.declared = _declared_seconds(container, stream)

            group: _ResampleGroup | _AsIs | None = None
            try:
                for packet in container.demux(stream):
                    try:
                        frames = packet.decode()
                    except av.error.FFmpegError as exc:
                        # One corrupt packet (bad CRC, garbage between mp3 frames, ...):
                        # skip it like ffmpeg's command line does and keep going.
                        self.skipped_packets += 1
                        self.packet_error = exc
                        continue
                    for frame in frames:
                        if not isinstance(frame, av.AudioFrame):
                            continue
                        if group is None or not group.accepts(frame):
                            # First frame, or the parameters changed mid-stream
                            # (concatenated mp3s, HE-AAC switching, ...): a resampler is
                            # fixed to its first frame's, so finish it and start afresh.
                            if group is not None:
                                yield from group.finish()
                            group = _group_for(frame, self.sampling_rate)
                        yield from group.add(frame)
            except (av.error.FFmpegError, OSError) as exc:
                # The demuxer itself failed (truncated container, I/O error): nothing after
                # this point is reachable, so stop and keep what we have.
                self.stopped_by = exc
            if group is not None:
                yield from group.finish()

    def check(self, samples: int, log_damage: bool) -> None:
        """Raise if too little decoded; warn about damage the decoding went around."""
        decoded = samples / self.sampling_rate
        if decoded < MIN_DECODED_SECONDS:
            raise AudioDecodeError(self.path, _too_short_reason(decoded, self.declared, self.skipped_packets,
                                                                self.packet_error, self.stopped_by))
        problems = []
        if self.skipped_packets:
            problems.append(f"skipped {self.skipped_packets} corrupt packet(s)")
        if self.stopped_by is not None:
            problems.append(f"stopped early ({_ffmpeg_message(self.stopped_by)})")
        declared = self.declared
        if declared is not None and decoded < declared - max(1.0, 0.1 * declared):
            # Silent truncation (a copy cut short) shows only here. Header durations of
            # VBR mp3s without an index are bitrate estimates, hence the wide margin.
            problems.append(f"the header says {declared:.2f} s (truncated?)")
        if problems and log_damage:
            log.warning("%s: damaged audio, %s; using the %.2f s that decoded",
                        self.path.name, "; ".join(problems), decoded)


def probe_duration(path: Path | str) -> float | None:
    """Duration in seconds from the container header, without decoding; ``None`` if unknown.

    Meant for timeouts and queue estimates, so it never raises: a file that cannot be
    opened, or a stream that carries no duration, gives ``None``. For formats without
    an index (e.g. mp3 without a Xing header, raw ADTS) ffmpeg estimates from the
    bitrate, which can be off by a few percent.
    """
    try:
        with av.open(str(path), mode="r", metadata_errors="ignore") as container:
            stream = container.streams.audio[0] if container.streams.audio else None
            seconds = _declared_seconds(container, stream)
    except (av.error.FFmpegError, OSError, ValueError):
        return None
    return seconds


def _check_readable(path: Path) -> None:
    """Turn the common filesystem problems into clear errors before ffmpeg sees them."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise AudioDecodeError(path, "file not found") from None
    except OSError as exc:
        raise AudioDecodeError(path, f"cannot read file ({exc.strerror or exc})") from exc
    if path.is_dir():
        raise AudioDecodeError(path, "is a directory, not an audio file")
    if st.st_size == 0 and path.is_file():
        raise AudioDecodeError(path, "empty file (0 bytes)")


# Leading bytes of common containers, to tell "damaged X" from "not media at all"
# when ffmpeg gives the same InvalidDataError for both.
_MAGIC: list[tuple[int, bytes, str]] = [
    (4, b"ftyp", "MP4/M4A/MOV"),
    (0, b"RIFF", "WAV/RIFF"),
    (0, b"OggS", "Ogg"),
    (0, b"fLaC", "FLAC"),
    (0, b"ID3", "MP3"),
    (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
    (0, b"FORM", "AIFF"),
    (0, b"caff", "CAF"),
    (0, b"#!AMR", "AMR"),
    (0, b"0&\xb2u", "ASF/WMA"),
]


def _open_failure_reason(path: Path, exc: av.error.FFmpegError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:
        head = b""
    kind = next((name for offset, magic, name in _MAGIC if head[offset : offset + len(magic)] == magic), None)
    if kind is not None:
        # Typically a recording cut off before it was finalised (an MP4 whose index
        # was never written) or a partial copy.
        return f"damaged or incomplete {kind} file (ffmpeg could not read its header: {_ffmpeg_message(exc)})"
    if isinstance(exc, (av.error.InvalidDataError, av.error.DemuxerNotFoundError, av.error.EOFError)):
        return "not an audio file (ffmpeg could not find a known format)"
    return f"cannot open ({_ffmpeg_message(exc)})"


def _too_short_reason(
    decoded: float,
    declared: float | None,
    skipped_packets: int,
    packet_error: Exception | None,
    stopped_by: Exception | None,
) -> str:
    what = "no audio could be decoded" if decoded == 0 else f"only {decoded * 1000:.0f} ms of audio could be decoded"
    if declared is not None and declared >= MIN_DECODED_SECONDS:
        return f"{what} although the header says {declared:.2f} s (truncated or damaged file)"
    if stopped_by is not None:
        return f"{what} ({_ffmpeg_message(stopped_by)})"
    if packet_error is not None:
        return f"{what} ({skipped_packets} bad packet(s): {_ffmpeg_message(packet_error)})"
    return f"{what} (empty recording, or a truncated file)"


def _ffmpeg_message(exc: Exception) -> str:
    """The human part of a PyAV error, without the errno and file name it repeats."""
    strerror = getattr(exc, "strerror", None)
    return strerror or str(exc) or type(exc).__name__


def _declared_seconds(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream | None
) -> float | None:
    """Duration the file claims: the audio stream's own if it has one, else the container's."""
    if stream is not None and stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    else:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _skip(pieces: Iterator[np.ndarray], count: int) -> Iterator[np.ndarray]:
    """``pieces`` without their first ``count`` samples."""
    for piece in pieces:
        if count < piece.size:
            yield piece[count:]
            count = 0
        else:
            count -= piece.size


class _Buffer:
    """Growable float32 array, sized up front from the header's duration.

    Writing frames straight into one preallocated array (grown and finally trimmed
    in place with ``ndarray.resize``, which glibc does by ``mremap`` for large
    arrays) keeps peak memory near one copy of the output. Collecting chunks and
    concatenating them would need two.
    """

    def __init__(self, capacity: int) -> None:
        self.array = np.empty(max(capacity, 1), dtype=np.float32)
        self.size = 0

    def append(self, samples: np.ndarray) -> None:
        end = self.size + samples.size
        if end > self.array.size:
            self.array.resize(max(end, int(self.array.size * 1.5)), refcheck=False)
        self.array[self.size : end] = samples
        self.size = end

    def finish(self) -> np.ndarray:
        audio, self.array = self.array, np.empty(0, dtype=np.float32)
        audio.resize(self.size, refcheck=False)
        np.clip(audio, -1.0, 1.0, out=audio)  # float decoders (aac, vorbis, opus) can overshoot
        return audio


def _group_for(frame: av.AudioFrame, sampling_rate: int) -> _ResampleGroup | _AsIs:
    """Frames that are already mono 16-bit or float at the right rate need no resampler."""
    if _AsIs.fits(frame, sampling_rate):
        return _AsIs(frame)
    return _ResampleGroup(frame, sampling_rate)


class _AsIs:
    """Mono s16 or float frames at the target rate, converted in NumPy: what ``aresample`` does to
    them (s16 divided by 32768, float unchanged), bit for bit, in a third of the time. Recorders
    and the benchmarks' FLAC files are often exactly this."""

    FORMATS = ("s16", "s16p", "flt", "fltp")

    def __init__(self, frame: av.AudioFrame) -> None:
        self.key = _ResampleGroup._key(frame)

    @classmethod
    def fits(cls, frame: av.AudioFrame, sampling_rate: int) -> bool:
        return (frame.format.name in cls.FORMATS and frame.layout.nb_channels == 1
                and frame.sample_rate == sampling_rate)

    def accepts(self, frame: av.AudioFrame) -> bool:
        return _ResampleGroup._key(frame) == self.key

    def add(self, frame: av.AudioFrame) -> Iterator[np.ndarray]:
        samples = frame.to_ndarray().reshape(-1)
        if samples.dtype == np.int16:
            yield samples.astype(np.float32) * np.float32(1 / 32768)
        else:
            yield samples.astype(np.float32, copy=False)

    def finish(self) -> Iterator[np.ndarray]:
        return iter(())


class _ResampleGroup:
    """Frames of one format, batched through an ``AudioFifo`` into one resampling graph.

    The graph holds the ``aresample`` filter that ``av.AudioResampler`` also ends up
    with, plus one option ``av.AudioResampler`` cannot pass: ``rematrix_maxval=1``.
    Without it, libswresample does not normalise its downmix matrix for float output,
    so stereo becomes 0.707 * (L + R): 3 dB louder than the (L + R) / 2 that
    ``ffmpeg -ac 1`` (OpenAI Whisper) and faster-whisper's s16 path produce, and
    clipped when both channels are loud. With it, float output gets the same
    normalised mix, unquantised.

    Batching (as faster-whisper does) matters with PyAV < 17.1, which leaks ~100 bytes
    per graph pull that ends in EAGAIN (PyAV issue #2282, fixed by PR #2283):
    resampling every 20 ms frame leaks ~15 MB per hour of audio decoded (measured
    with av 16.0.1), which a long-running daemon cannot afford. Batches of
    ``_BATCH_SAMPLES`` make it negligible (~0.3 MB/hour) and are faster; larger
    ones only raise peak memory.
    """

    def __init__(self, frame: av.AudioFrame, sampling_rate: int) -> None:
        self.key = self._key(frame)
        self.fifo = av.AudioFifo()
        self.graph = av.filter.Graph()
        source = self.graph.add(
            "abuffer",
            sample_rate=str(frame.sample_rate),
            sample_fmt=frame.format.name,
            channel_layout=frame.layout.name,
            time_base=f"1/{frame.sample_rate}",
        )
        convert = self.graph.add("aresample", f"osr={sampling_rate}:ochl=mono:osf=flt:rematrix_maxval=1.0")
        sink = self.graph.add("abuffersink")
        source.link_to(convert)
        convert.link_to(sink)
        self.graph.configure()

    @staticmethod
    def _key(frame: av.AudioFrame) -> tuple[str, str, int]:
        return frame.format.name, frame.layout.name, frame.sample_rate

    def accepts(self, frame: av.AudioFrame) -> bool:
        return self._key(frame) == self.key

    def add(self, frame: av.AudioFrame) -> Iterator[np.ndarray]:
        frame.pts = None  # timestamps are irrelevant here; the fifo would reject gaps
        self.fifo.write(frame)
        if self.fifo.samples >= _BATCH_SAMPLES:
            yield from self._convert(self.fifo.read())

    def finish(self) -> Iterator[np.ndarray]:
        """Convert what is left, then flush the resampler's buffered tail."""
        if self.fifo.samples:
            yield from self._convert(self.fifo.read())
        yield from self._convert(None)

    def _convert(self, frame: av.AudioFrame | None) -> Iterator[np.ndarray]:
        self.graph.push(frame)
        while True:
            try:
                converted = self.graph.pull()
            except (av.error.BlockingIOError, av.error.EOFError):  # needs more input / drained
                return
            assert isinstance(converted, av.AudioFrame)
            yield converted.to_ndarray().reshape(-1)  # "flt" mono: one packed plane
