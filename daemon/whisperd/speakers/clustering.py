"""Group window embeddings by speaker, and turn the groups into speaker turns.

Two stages, because one does not do both jobs:

1. split: average-linkage clustering on cosine distance with a strict threshold.  Windows of one
   speaker land in several clusters (a hoarse passage, a laugh, "um"/"uh" between words), but
   windows of two speakers seldom share one;
2. merge: a cluster of a single window goes to the most similar larger cluster, then clusters
   whose mean embeddings are close are joined.  Mean embeddings are far steadier than single
   1.5 s windows, so this threshold can be loose without joining two people.  A single stage cut
   at one threshold either split one speaker's fillers off as a ghost speaker or joined real
   speakers.

With the speaker count given, the merging runs until that many clusters are left (or the split is
cut finer if it found fewer).  Then, in time order (`absorb_sandwiched`, only when the count was
not given): a would-be speaker heard for a moment only in the middle of someone else's speech is
that someone.

Thresholds were chosen on the dev meeting and panel of benchmarks/diarization.py, where every
value of SPLIT_DISTANCE from 0.4 to 0.7 and of MERGE_SIMILARITY from 0.35 to 0.45 gives the same
result; the middle of both ranges is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from whisperd.speakers.embedding import FRAME_SHIFT, EmbeddedWindow, Turn
from whisperd.transcript import SAMPLING_RATE

SPLIT_DISTANCE = 0.5      # stage 1: cosine distance (1 - similarity) within which windows may join
MERGE_SIMILARITY = 0.4    # stage 2: mean embeddings at least this similar are one speaker
MIN_CLUSTER_WINDOWS = 2   # one window alone (1.5 s) is not a speaker of its own
JOIN_GAP_SECONDS = 0.5    # shorter pauses between one speaker's turns are joined
# A "speaker" with this many windows or fewer (about 3 s of speech), heard only in the middle of
# one other speaker's speech (less than SANDWICH_GAP_SECONDS on either side), is that speaker: a
# cough, a laugh or a hoarse word.  Someone who speaks up between two other people is kept.
SANDWICH_MAX_WINDOWS = 3
SANDWICH_GAP_SECONDS = 1.0


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def _centroids(vectors: np.ndarray, labels: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    return _normalise(np.stack([vectors[labels == i].mean(axis=0) for i in ids]))


def _split(vectors: np.ndarray, *, distance: float | None = None, count: int | None = None) -> np.ndarray:
    from scipy.cluster.hierarchy import fcluster, linkage

    if len(vectors) < 2:
        return np.zeros(len(vectors), dtype=int)
    tree = linkage(vectors, method="average", metric="cosine")
    if count is not None:
        return fcluster(tree, t=count, criterion="maxclust") - 1
    return fcluster(tree, t=distance, criterion="distance") - 1


def _absorb_small(vectors: np.ndarray, labels: np.ndarray, min_windows: int, keep: int = 1) -> np.ndarray:
    """Windows of clusters smaller than `min_windows` go to the most similar large cluster."""
    ids, sizes = np.unique(labels, return_counts=True)
    large = [i for i, n in zip(ids, sizes, strict=True) if n >= min_windows]
    if len(large) < keep or len(large) == len(ids):
        return labels
    centres = _centroids(vectors, labels, large)
    labels = labels.copy()
    small = ~np.isin(labels, large)
    labels[small] = np.asarray(large)[np.argmax(vectors[small] @ centres.T, axis=1)]
    return labels


def _merge(vectors: np.ndarray, labels: np.ndarray, *, similarity: float | None = None,
           count: int | None = None) -> np.ndarray:
    """Join the two clusters with the closest mean embeddings, again and again, while they are at
    least `similarity` alike (or while there are more than `count`)."""
    labels = labels.copy()
    while True:
        ids = list(np.unique(labels))
        if len(ids) < 2 or (count is not None and len(ids) <= count):
            return labels
        centres = _centroids(vectors, labels, ids)
        sims = centres @ centres.T
        np.fill_diagonal(sims, -np.inf)
        a, b = np.unravel_index(int(np.argmax(sims)), sims.shape)
        if count is None and sims[a, b] < similarity:
            return labels
        labels[labels == ids[b]] = ids[a]


def cluster_embeddings(vectors: np.ndarray, num_speakers: int | None = None, *,
                       split_distance: float = SPLIT_DISTANCE, merge_similarity: float = MERGE_SIMILARITY,
                       min_cluster_windows: int = MIN_CLUSTER_WINDOWS) -> np.ndarray:
    """A speaker index for each L2-normalised embedding (rows of `vectors`), 0, 1, ... by first row.

    `num_speakers`: the number of speakers if known; None finds it.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    if num_speakers is not None and num_speakers < 1:
        raise ValueError("num_speakers must be at least 1")
    if len(vectors) == 0:
        return np.zeros(0, dtype=int)
    labels = _split(vectors, distance=split_distance)
    if num_speakers is None:
        labels = _absorb_small(vectors, labels, min_cluster_windows)
        labels = _merge(vectors, labels, similarity=merge_similarity)
    else:
        if len(np.unique(labels)) < num_speakers:
            labels = _split(vectors, count=num_speakers)
        labels = _absorb_small(vectors, labels, min_cluster_windows, keep=num_speakers)
        labels = _merge(vectors, labels, count=num_speakers)
    _, first = np.unique(labels, return_index=True)
    order = {labels[i]: n for n, i in enumerate(sorted(first))}
    return np.array([order[x] for x in labels], dtype=int)


def absorb_sandwiched(windows: Sequence[EmbeddedWindow], labels: np.ndarray, *,
                      max_windows: int = SANDWICH_MAX_WINDOWS, gap: float = SANDWICH_GAP_SECONDS) -> np.ndarray:
    """Give a small cluster's windows to the speaker around them when it only ever occurs inside
    one other speaker's speech (see SANDWICH_MAX_WINDOWS)."""
    labels = np.asarray(labels).copy()
    if len(windows) < 3:
        return labels
    order = np.argsort([w.start for w in windows], kind="stable")
    starts = np.array([windows[k].start for k in order])
    ends = np.maximum.accumulate(np.array([windows[k].end for k in order]))
    seq = labels[order]
    limit = gap * SAMPLING_RATE
    ids, sizes = np.unique(seq, return_counts=True)
    for cluster in ids[sizes <= max_windows]:
        runs = _runs(seq == cluster)
        targets = []
        for a, b in runs:  # windows a..b-1 of the time order
            if a == 0 or b == len(seq):
                break
            before, after = seq[a - 1], seq[b]
            paused = starts[a] - ends[a - 1] >= limit or starts[b] - ends[b - 1] >= limit
            if before != after or paused:
                break
            targets.append(before)
        else:
            for (a, b), target in zip(runs, targets, strict=True):
                seq[a:b] = target
    labels[order] = seq
    return labels


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index ranges where `mask` is true."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def make_turns(speech: Sequence[tuple[int, int]], windows: Sequence[EmbeddedWindow], labels: np.ndarray,
               *, join_gap: float = JOIN_GAP_SECONDS, resolution: int = FRAME_SHIFT) -> list[Turn]:
    """Speaker turns over the speech spans (samples): each instant takes the speaker of the window
    that covers it with the nearest centre, or of the nearest window when none covers it.

    Turns of one speaker less than `join_gap` seconds apart are one turn (a breath is not the end
    of a turn).  Speakers are named "Speaker 1", "Speaker 2"... in order of first appearance.
    """
    spans = _union(speech)
    if not spans:
        return []
    if not len(windows):
        return _named([(a, b, 0) for a, b in spans], join_gap)
    starts = np.array([w.start for w in windows], dtype=np.int64)
    ends = np.array([w.end for w in windows], dtype=np.int64)
    order = np.argsort(starts + ends, kind="stable")
    starts, ends, labels = starts[order], ends[order], np.asarray(labels)[order]
    centres = (starts + ends) / 2
    reach = int((ends - starts).max())
    raw: list[tuple[int, int, int]] = []  # (start, end, cluster)
    for a, b in spans:
        # Only windows that can cover the span, and the nearest one on either side.
        lo = max(int(np.searchsorted(centres, a - reach, "left")) - 1, 0)
        hi = min(int(np.searchsorted(centres, b + reach, "right")) + 1, len(centres))
        points = np.arange(a, b, resolution, dtype=np.int64)[:, None] + resolution // 2
        distance = np.abs(points - centres[None, lo:hi])
        covering = (points >= starts[None, lo:hi]) & (points < ends[None, lo:hi])
        distance[~covering] += 2 * (b - a + reach) + 1  # a covering window wins over any other
        who = labels[lo:hi][np.argmin(distance, axis=1)]
        cuts = [0, *(np.flatnonzero(np.diff(who)) + 1), len(who)]
        for i, j in zip(cuts, cuts[1:]):
            raw.append((a + i * resolution, min(b, a + j * resolution), int(who[i])))
    return _named(raw, join_gap)


def _named(raw: list[tuple[int, int, int]], join_gap: float) -> list[Turn]:
    gap = int(round(join_gap * SAMPLING_RATE))
    merged: list[tuple[int, int, int]] = []
    for s, e, k in raw:
        if merged and merged[-1][2] == k and s - merged[-1][1] <= gap:
            merged[-1] = (merged[-1][0], e, k)
        else:
            merged.append((s, e, k))
    names: dict[int, str] = {}
    return [Turn(s / SAMPLING_RATE, e / SAMPLING_RATE, names.setdefault(k, f"Speaker {len(names) + 1}"))
            for s, e, k in merged]


def _union(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        elif b > a:
            out.append((a, b))
    return out
