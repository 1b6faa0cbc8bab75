"""The static-cache decoder against transformers' generate(), the same code that runs under CUDA
graphs on a GPU (here eagerly on the CPU), and windows of several recordings in shared batches."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.whisper.generation_whisper import WhisperGenerationMixin

from whisperd.audio import decode_audio
from whisperd.engine import Engine, create_engine
from whisperd.engine.shared_batches import SharedBatches
from whisperd.engine.window_rules import Attempt, Pass, Thresholds, decode_passes, judge, split_segments
from whisperd.options import DecodeOptions, EngineSettings
from whisperd_support.evaluation import DevClip, error_rate

TIMESTAMP_BEGIN = 50364
EOS = 50257


@pytest.fixture(scope="module")
def generate_engine() -> Engine:
    return create_engine(EngineSettings(device="cpu", precision="fp32", backend="transformers", decoder="generate"))


def same_segments(a: Engine, b: Engine, audio: np.ndarray, options: DecodeOptions) -> None:
    first, second = a.transcribe(audio, options), b.transcribe(audio, options)
    assert [(s.start, s.end, s.text) for s in first.segments] == [(s.start, s.end, s.text) for s in second.segments]
    assert first.language == second.language


# -- the rules on token lists, against transformers' own -------------------------------------------

tokens = st.lists(st.one_of(st.integers(0, 500), st.integers(TIMESTAMP_BEGIN, TIMESTAMP_BEGIN + 1500)),
                  min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(tokens, st.integers(0, 2999))
def test_segment_cuts_match_transformers(sequence: list[int], seek: int) -> None:
    ours, consumed = split_segments(sequence, seek, TIMESTAMP_BEGIN)
    left = 3000 - seek
    theirs, offset = WhisperGenerationMixin._retrieve_segment(
        seek_sequence=torch.tensor(sequence), seek_outputs=[{}], time_offset=torch.tensor([seek], dtype=torch.float64) * 0.02 / 2,
        timestamp_begin=TIMESTAMP_BEGIN, seek_num_frames=torch.tensor([left]), time_precision=0.02,
        time_precision_features=0.01, input_stride=2, prev_idx=0, idx=0, return_token_timestamps=False,
        decoder_input_ids=torch.zeros(1, 3, dtype=torch.long))
    assert int(offset) == consumed
    assert [tuple(int(t) for t in s["tokens"]) for s in theirs] == [s.tokens for s in ours]
    flat = [float(t) for s in theirs for t in (s["start"], s["end"])]
    assert flat == pytest.approx([t for s in ours for t in (s.start, s.end)])


def test_quality_gates() -> None:
    gates = Thresholds(compression_ratio=2.4, logprob=-1.0, no_speech=0.6)
    varied = tuple(range(100, 140))
    assert judge(Attempt(varied, -0.3, 0.1), gates, 51865) == (False, False)
    assert judge(Attempt(varied, -1.5, 0.1), gates, 51865) == (True, False)  # unsure: a higher temperature
    assert judge(Attempt(varied, -1.5, 0.9), gates, 51865) == (False, True)  # unsure and silent: skipped
    assert judge(Attempt((100, 101) * 40, -0.3, 0.1), gates, 51865) == (True, False)  # a loop compresses well
    assert judge(Attempt((100, 101) * 40, -0.3, 0.1), Thresholds(None, None, None), 51865) == (False, False)


class Waves:
    """A `PassQueue` over a function that decodes a list of passes at once: everything pending
    goes in one call, then everything those passes led to, and so on (to see which passes run)."""

    def __init__(self, run: Callable[[list[Pass]], list[Attempt]]) -> None:
        self._run = run
        self._pending: list[Pass] = []

    def submit(self, passes: Sequence[Pass]) -> None:
        self._pending.extend(passes)

    def completed(self) -> Iterator[tuple[Pass, Attempt]]:
        while self._pending:
            wave, self._pending = self._pending, []
            yield from zip(wave, self._run(wave))


def test_fallback_reruns_only_the_windows_that_failed() -> None:
    """Window 1 fails at temperature 0 and passes at 0.2; window 0 passes at once; both end on a
    single timestamp, so each is decoded in one pass."""
    calls: list[list[tuple[int, int, int]]] = []

    def run(passes):  # noqa: ANN001, ANN202
        calls.append([(p.window, p.seek, p.attempt) for p in passes])
        return [Attempt((TIMESTAMP_BEGIN, 400, TIMESTAMP_BEGIN + 50, EOS),
                        -2.0 if (p.window, p.attempt) == (1, 0) else -0.2, 0.0) for p in passes]

    found = decode_passes(2, Waves(run), (0.0, 0.2, 0.4), Thresholds(2.4, -1.0, 0.6), TIMESTAMP_BEGIN, EOS, 51865)
    assert calls == [[(0, 0, 0), (1, 0, 0)], [(1, 0, 1)]]
    assert [[(s.start, s.end) for s in window] for window in found] == [[(0.0, 1.0)], [(0.0, 1.0)]]


# -- the decoder against generate(), on real speech ------------------------------------------------


def test_same_segments_as_generate(engine_fp32: Engine, generate_engine: Engine,
                                   clip: Callable[[str], DevClip]) -> None:
    assert engine_fp32.describe()["decoder"] == "static"
    speech = clip("en_goforward")
    same_segments(engine_fp32, generate_engine, decode_audio(speech.path), DecodeOptions(language="en"))
    same_segments(engine_fp32, generate_engine, decode_audio(speech.path),
                  DecodeOptions(language="en", initial_prompt="Go forward, move ahead."))


@pytest.mark.slow
def test_same_segments_as_generate_on_a_meeting(engine_fp32: Engine, generate_engine: Engine) -> None:
    """Six speakers over 3.5 minutes: many windows, timestamps continued inside windows."""
    from whisperd_support.evaluation.meeting import Meeting, meeting_path

    meeting = Meeting.load(meeting_path(seed=0))
    same_segments(engine_fp32, generate_engine, meeting.audio, DecodeOptions(language="en"))


@pytest.mark.slow
def test_same_segments_as_generate_in_other_languages(engine_fp32: Engine, generate_engine: Engine,
                                                      clip: Callable[[str], DevClip]) -> None:
    """Language detection, then a multilingual prefix; and translation. Greedy only: base is unsure
    of these, and a fallback samples (differently in each implementation)."""
    speech = clip("zh_aishell1_BAC009S0764W0121")
    greedy = {"temperatures": (0.0,)}
    same_segments(engine_fp32, generate_engine, decode_audio(speech.path), DecodeOptions(language="auto", **greedy))
    same_segments(engine_fp32, generate_engine, decode_audio(speech.path),
                  DecodeOptions(language="zh", task="translate", **greedy))


def test_temperature_fallback_is_sampled(engine_fp32: Engine, clip: Callable[[str], DevClip]) -> None:
    """A log-probability gate no decode can pass sends every window through every temperature;
    the last attempt is kept, as in generate()."""
    speech = clip("en_goforward")
    strict = DecodeOptions(language="en", temperatures=(0.0, 0.6, 1.0), logprob_threshold=0.0, no_speech_threshold=None)
    result = engine_fp32.transcribe(decode_audio(speech.path), strict)
    assert result.text.strip()
    greedy = engine_fp32.transcribe(decode_audio(speech.path), DecodeOptions(language="en"))
    assert error_rate([speech.reference], [greedy.text], "en") < 0.1


def test_sampled_passes_give_the_same_transcript_every_run_and_beside_other_recordings(
        engine_fp32: Engine, clip: Callable[[str], DevClip]) -> None:
    """Each pass samples from its own seed (window, start, attempt): neither another run nor the
    rows decoded beside it change what it draws."""
    audio = decode_audio(clip("en_goforward").path)
    strict = DecodeOptions(language="en", temperatures=(0.0, 0.6, 1.0), logprob_threshold=0.0, no_speech_threshold=None)
    first, second = (engine_fp32.transcribe(audio, strict) for _ in range(2))
    assert [(s.start, s.end, s.text) for s in first.segments] == [(s.start, s.end, s.text) for s in second.segments]
    other = decode_audio(clip("zh_aishell1_BAC009S0764W0121").path)
    beside = list(engine_fp32.transcribe_many([other, audio], strict))[1]
    assert not isinstance(beside, Exception)
    assert [(s.start, s.end, s.text) for s in beside.segments] == [(s.start, s.end, s.text) for s in first.segments]


def test_the_sampling_draws_are_uniform_and_differ_by_seed_and_position() -> None:
    from whisperd.engine.static_decoder import _uniform

    seeds = torch.arange(2000).repeat_interleave(100)
    positions = torch.arange(100).repeat(2000)
    u = _uniform(seeds, positions)
    assert float(u.min()) > 0 and float(u.max()) < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    assert float(counts.min()) > 0.95 * len(u) / 20 and float(counts.max()) < 1.05 * len(u) / 20
    assert len(torch.unique(u)) > 0.99 * len(u)
    assert torch.equal(_uniform(seeds[:5], positions[:5]), u[:5])


# -- several recordings in shared batches ----------------------------------------------------------


class Countdown:
    """A batch of `slots` rows where row n finishes after n advances with the result 10 n: the
    scheduling without a model (the model's own rows are tested below)."""

    def __init__(self, slots: int, broken_at: int | None = None, advance_seconds: float = 0.0) -> None:
        self.slots, self.broken_at, self.advance_seconds = slots, broken_at, advance_seconds
        self.left: dict[object, int] = {}
        self.rows: dict[object, int] = {}
        self.admitted: list[tuple[list[int], int]] = []  # (rows, rows already in flight)

    @property
    def room(self) -> int:
        return self.slots - len(self.left)

    @property
    def occupied(self) -> int:
        return len(self.left)

    def admit(self, rows, tags) -> None:  # noqa: ANN001 - the RowDecoder protocol
        self.admitted.append((list(rows), len(self.left)))
        for row, tag in zip(rows, tags):
            self.left[tag], self.rows[tag] = row, row

    def advance(self) -> list[tuple[object, int]]:
        if self.broken_at is not None and self.broken_at in self.rows.values():
            raise RuntimeError("device lost")
        time.sleep(self.advance_seconds)
        done = []
        for tag in list(self.left):
            self.left[tag] -= 1
            if self.left[tag] <= 0:
                done.append((tag, self.rows.pop(tag) * 10))
                del self.left[tag]
        return done

    def drop(self) -> None:
        self.left.clear()
        self.rows.clear()


def in_threads(work: Callable[[int], None], firsts: Sequence[int]) -> None:
    """work(n) for each n, each in a thread of its own, all side by side; returns when all are done."""
    threads = [threading.Thread(target=work, args=(n,)) for n in firsts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)


def test_shared_batches_start_when_every_member_has_rows_and_route_results() -> None:
    decoder = Countdown(100)
    batches: SharedBatches[int, int] = SharedBatches(decoder, 100)
    results: dict[int, list[int]] = {}
    entered = threading.Barrier(3)

    def member(first: int) -> None:
        with batches.member():
            entered.wait()
            time.sleep(0.05 * first)  # arrive one after another: the batch waits for the last
            results[first] = batches.decode([first + 1, first + 2])

    in_threads(member, (0, 2, 4))
    assert results == {0: [10, 20], 2: [30, 40], 4: [50, 60]}
    assert decoder.admitted == [([1, 2, 3, 4, 5, 6], 0)]


def test_a_batch_from_idle_does_not_wait_for_a_member_standing_by() -> None:
    """A transcription waiting for its turn to scan holds no batch back: the two with rows start
    one, and the third's rows come in a later admission."""
    decoder = Countdown(100)
    batches: SharedBatches[int, int] = SharedBatches(decoder, 100)
    results: dict[int, list[int]] = {}
    entered, turn = threading.Barrier(3), threading.Event()

    def member(first: int) -> None:
        with batches.member():
            entered.wait()
            if first == 4:
                with batches.standing_by():
                    assert turn.wait(10)  # until the others' rows are back
            results[first] = batches.decode([first + 1, first + 2])
            if first == 2:
                turn.set()

    in_threads(member, (0, 2, 4))
    assert results == {0: [10, 20], 2: [30, 40], 4: [50, 60]}
    assert [sorted(rows) for rows, _ in decoder.admitted] == [[1, 2, 3, 4], [5, 6]]


def test_a_row_joins_the_batch_in_flight_and_comes_back_before_a_longer_one() -> None:
    """Continuous batching: a short row's follow-up does not wait for the long row beside it."""
    decoder = Countdown(4, advance_seconds=0.02)  # the long row takes a second
    stream = SharedBatches(decoder, 4).stream()
    stream.submit([50, 1], ["long", "short"])
    order = []
    for tag, result in stream.completed():
        order.append((tag, result))
        if tag == "short":
            stream.submit([2], ["follow-up"])
    assert order == [("short", 10), ("follow-up", 20), ("long", 500)]
    assert decoder.admitted[1] == ([2], 1)  # admitted beside the long row still in flight


def test_more_rows_than_slots_wait_for_free_slots() -> None:
    decoder = Countdown(2)
    assert SharedBatches(decoder, 2).decode([3, 1, 1, 2]) == [30, 10, 10, 20]
    assert max(len(rows) + before for rows, before in decoder.admitted) <= 2


def test_a_result_for_an_unknown_row_fails_the_rows_in_flight_instead_of_hanging_them() -> None:
    class Confused(Countdown):
        confused = True

        def advance(self) -> list[tuple[object, int]]:
            done = super().advance()
            if done and self.confused:
                self.confused = False
                return [("no such row", 0), *done]
            return done

    batches: SharedBatches[int, int] = SharedBatches(Confused(8), 8)
    with pytest.raises(KeyError):
        batches.decode([7, 3])
    assert batches.decode([2]) == [20]


def test_a_failure_reaches_every_caller_in_flight_and_decoding_goes_on() -> None:
    decoder = Countdown(8, broken_at=7)
    batches: SharedBatches[int, int] = SharedBatches(decoder, 8)
    with pytest.raises(RuntimeError, match="device lost"):
        batches.decode([1, 7])
    assert batches.decode([2]) == [20]


def test_several_recordings_share_batches_and_keep_their_own_transcripts(
        engine_fp32: Engine, clip: Callable[[str], DevClip]) -> None:
    recordings = [decode_audio(clip("en_goforward").path), decode_audio(clip("zh_aishell1_BAC009S0764W0121").path),
                  np.zeros(16000 * 3, dtype=np.float32)]
    alone = [engine_fp32.transcribe(audio, DecodeOptions()) for audio in recordings]
    counters = engine_fp32.backend.shared_batches.counters
    counters.most_rows_at_once = 0
    together = list(engine_fp32.transcribe_many(recordings, DecodeOptions()))
    assert [t.text for t in together] == [t.text for t in alone]
    assert [t.language for t in together] == [t.language for t in alone]
    # The two speech clips need one window each: with both in flight they share the batch.
    assert counters.most_rows_at_once == 2


def test_recordings_side_by_side_take_turns_to_scan(
        engine_fp32: Engine, clip: Callable[[str], DevClip], monkeypatch: pytest.MonkeyPatch) -> None:
    """With one turn to scan, files transcribed side by side scan one after another (a file
    waiting for its turn holds no batch back) and keep the transcripts they have alone."""
    paths = [clip("en_goforward").path, clip("zh_aishell1_BAC009S0764W0121").path, clip("en_goforward").path]
    alone = [engine_fp32.transcribe_path(path, DecodeOptions()).text for path in paths]
    # The real engine and scan throughout: the bound is narrowed to one turn (on two cores it is
    # two), and the scan is wrapped to count how many run at once.
    monkeypatch.setattr(engine_fp32, "_scan_slots", threading.BoundedSemaphore(1))
    scanning, most_at_once = [0], [0]
    scan = engine_fp32._scan

    def counted_scan(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the engine's own scan, counted
        scanning[0] += 1
        most_at_once[0] = max(most_at_once[0], scanning[0])
        try:
            return scan(*args, **kwargs)
        finally:
            scanning[0] -= 1

    monkeypatch.setattr(engine_fp32, "_scan", counted_scan)
    together = list(engine_fp32.transcribe_many(paths, DecodeOptions(), at_once=3))
    assert [t.text for t in together] == alone
    assert most_at_once[0] == 1


def test_rows_admitted_into_a_batch_in_flight_decode_as_they_do_alone(
        engine_fp32: Engine, clip: Callable[[str], DevClip]) -> None:
    """Each row has its own position: one that joins late, one that moves to another bucket and
    one in a slot freed by another give the tokens they give decoded alone."""
    backend = engine_fp32.backend
    static, prefix = backend.static, backend._prefix("en", DecodeOptions(language="en"))
    audio = decode_audio(clip("en_goforward").path)
    windows = [audio[:16000 * 8], audio[16000 * 2:16000 * 12], np.zeros(16000 * 5, dtype=np.float32)]
    features = backend.log_mel(windows).to(backend.feature_dtype)
    alone = [static.decode(features[i:i + 1], [prefix], [0.0])[0].tokens for i in range(len(windows))]
    static.admit(features[:1], [prefix], [0.0], ["first"])
    assert static._live.batch == 1  # an empty batch starts at the bucket its rows need
    found = dict(static.advance(3))
    static.admit(features[1:3], [prefix] * 2, [0.0] * 2, ["second", "third"])  # into a bucket of 4
    while static.occupied:
        found.update(static.advance())
    assert [found[tag].tokens for tag in ("first", "second", "third")] == alone
    assert alone[0] and alone[1] != alone[0]
    # Every bucket is a view of one storage: moving between them allocates nothing.
    base = static._storage.self_k.data_ptr()
    assert all(view.self_k.data_ptr() == base for view in static._views.values())
    assert static._storage.batch == max(static._views)


def test_a_row_moved_to_a_smaller_bucket_goes_on_as_before(engine_fp32: Engine, clip: Callable[[str], DevClip]) -> None:
    """Two short rows finish first; the long one in slot 2 moves to slot 0 of a bucket of 1."""
    backend = engine_fp32.backend
    static, prefix = backend.static, backend._prefix("en", DecodeOptions(language="en"))
    audio = decode_audio(clip("en_goforward").path)
    features = backend.log_mel([audio[:16000 * 6], audio[16000:16000 * 7], audio[16000 * 2:]]).to(backend.feature_dtype)
    alone = static.decode(features[2:3], [prefix], [0.0], fixed_tokens=40)[0].tokens
    static.admit(features[:2], [prefix] * 2, [0.0] * 2, ["short", "short too"], fixed_tokens=8)
    static.admit(features[2:3], [prefix], [0.0], ["long"], fixed_tokens=40)
    assert static._occupants.index("long") == 2
    found = {}
    while static.occupied:
        found.update(static.advance())
        if "short" in found and static.occupied:
            assert static._live.batch == 1 and static._occupants == ["long"]
    assert found["long"].tokens == alone and len(alone) == 40


def test_rows_in_flight_are_capped_by_free_device_memory(engine_fp32: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """whisper-base in fp32 keeps 48 MB of caches a row; 60 % of the free memory is theirs."""
    from whisperd.engine import static_decoder

    static = engine_fp32.backend.static
    per_row = static_decoder.bytes_per_row(len(static.layers), static.d_model, static.audio_ctx, static.max_len,
                                           static.dtype)
    assert per_row == 2 * 6 * 512 * (448 + 1500) * 4
    for free_bytes, rows in ((10 * 2**30, 128), (2**30, 8), (10**6, 1)):
        monkeypatch.setattr(static_decoder, "_free_memory", lambda device, free=free_bytes: free)
        decoder = static_decoder.StaticCacheDecoder(engine_fp32.backend.model, static.rules, max_batch=128)
        assert decoder.max_batch == rows


def test_an_admission_loads_its_rows_in_power_of_two_groups(engine_fp32: Engine, clip: Callable[[str], DevClip],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Seven windows admitted at once load as groups of 4, 2 and 1 (the sizes a GPU captures) and
    decode as they do loaded in one group."""
    from whisperd.engine.static_decoder import _power_of_two_groups

    assert _power_of_two_groups(45, 32) == [32, 8, 4, 1]
    assert _power_of_two_groups(64, 32) == [32, 32] and _power_of_two_groups(0, 32) == []
    backend = engine_fp32.backend
    static, prefix = backend.static, backend._prefix("en", DecodeOptions(language="en"))
    audio = decode_audio(clip("en_goforward").path)
    windows = [audio[16000 * i:16000 * (i + 6)] for i in range(7)]
    features = backend.log_mel(windows).to(backend.feature_dtype)
    whole = [a.tokens for a in static.decode(features, [prefix] * 7, [0.0] * 7, fixed_tokens=12)]
    # The real loads throughout: the largest group is narrowed so that 7 windows split on the CPU,
    # and each load is wrapped to record its size (the graphs themselves need CUDA).
    groups: list[int] = []
    load_group = static._load_group
    monkeypatch.setattr(static, "LOAD_GROUP", 4)
    monkeypatch.setattr(static, "_load_group", lambda f, i, fl: (groups.append(f.shape[0]), load_group(f, i, fl)))
    grouped = [a.tokens for a in static.decode(features, [prefix] * 7, [0.0] * 7, fixed_tokens=12)]
    assert groups == [4, 2, 1]
    assert grouped == whole and len(set(whole)) > 1
