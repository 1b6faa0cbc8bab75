#!/usr/bin/env python
"""Peak memory of `whisperd transcribe` on long recordings: it must not grow with their length.

    .venv/bin/python benchmarks/memory.py                    # 1 h and 10 h, Opus
    .venv/bin/python benchmarks/memory.py --hours 1 --format flac
    .venv/bin/python benchmarks/memory.py --hours 2 --whisperd-args "--backend transformers"

The recording is mostly quiet room noise (pink, -50 dBFS) with real speech every hour: the
3.5-minute meeting of whisperd_support.evaluation.meeting (several speakers, 60 s without speech inside)
starts 5 minutes into each hour. It is written to disk a minute at a time, never held whole, and
cached in ~/.cache/whisperd/bench (the 10 h Opus file is ~100 MB; building it takes a few minutes).

`whisperd transcribe` (the default engine: backend auto, i.e. OpenVINO int8 on a CPU) runs in a
child process on links in a temporary folder, where its outputs go: first the meeting alone, as a
worker that has done a job before holds the model runtime's buffers (a few hundred MB that a
fresh process allocates only after the speech scan), then the long recording. Its resident
memory, children included, is sampled every 0.2 s; the kernel's high-water mark for the child
(ru_maxrss) is printed beside it, as it catches peaks between samples. Printed per length: audio
seconds, wall seconds of the long recording, audio seconds per wall second, peak RSS in MB (the
whole run), and how many of the hourly meetings the transcript has (the meeting's "go forward"
line, once per copy). `--no-warm-up` leaves the first job out.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "support"))  # whisperd_support: clips, meetings

import argparse
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import psutil

RATE = 16000
MINUTE = 60 * RATE
SPEECH_AT_SECONDS = 300  # into each hour
NOISE_DBFS = -50.0
BUILD_VERSION = 1
ENCODERS = {"opus": ("libopus", 24_000), "flac": ("flac", None)}


def recording_path(hours: float, fmt: str) -> Path:
    from whisperd import paths

    return paths.cache_dir() / "bench" / f"long-{hours:g}h-v{BUILD_VERSION}.{fmt}"


def build_recording(hours: float, fmt: str) -> Path:
    """The long recording, from the cache or written now (a minute at a time)."""
    import av
    from scipy.signal import lfilter

    from whisperd_support.evaluation.meeting import build_meeting

    path = recording_path(hours, fmt)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    speech = build_meeting(seed=0).audio  # float32 on the 16-bit grid, with its own room noise
    total = int(hours * 3600 * RATE)
    starts = [h * 3600 * RATE + SPEECH_AT_SECONDS * RATE for h in range(int(np.ceil(hours)))]
    starts = [s for s in starts if s + len(speech) <= total]
    # Pink noise: white noise through Kellet's 1/f filter, its state carried from minute to minute.
    b = [0.049922035, -0.095993537, 0.050612699, -0.004408786]
    a = [1.0, -2.494956002, 2.017265875, -0.522189400]
    state = np.zeros(3)
    rng = np.random.default_rng(0)
    gain = 10 ** (NOISE_DBFS / 20) / 0.0405  # the filter's output RMS for unit white noise is ~0.0405
    codec, bit_rate = ENCODERS[fmt]
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    started = time.perf_counter()
    with av.open(str(partial), "w", format="ogg" if fmt == "opus" else "flac") as container:
        stream = container.add_stream(codec, rate=RATE, layout="mono")
        if bit_rate:
            stream.bit_rate = bit_rate
        fifo = av.AudioFifo()
        for position in range(0, total, MINUTE):
            n = min(MINUTE, total - position)
            noise, state = lfilter(b, a, rng.standard_normal(n), zi=state)
            chunk = (noise * gain).astype(np.float32)
            for start in starts:  # the meeting replaces the noise where it plays
                lo, hi = max(start, position), min(start + len(speech), position + n)
                if lo < hi:
                    chunk[lo - position:hi - position] = speech[lo - start:hi - start]
            pcm = np.clip(np.round(chunk * 32768), -32768, 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = RATE, position, Fraction(1, RATE)
            fifo.write(frame)
            size = stream.codec_context.frame_size or 4096
            while fifo.samples >= size:
                container.mux(stream.encode(fifo.read(size)))
        if fifo.samples:
            container.mux(stream.encode(fifo.read()))
        container.mux(stream.encode(None))
    partial.rename(path)
    print(f"built {path} ({path.stat().st_size / 2**20:.0f} MB) in {time.perf_counter() - started:.0f} s",
          flush=True)
    return path


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants (0 for those already gone)."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(path: Path, warm_up: Path | None, whisperd_args: list[str]) -> dict[str, float]:
    """`whisperd transcribe` on `path` (after `warm_up`) in a child, its RSS sampled every 0.2 s."""
    with tempfile.TemporaryDirectory(prefix="whisperd-memory-") as folder:
        links = []
        for source in [warm_up, path] if warm_up else [path]:
            links.append(Path(folder) / source.name)
            links[-1].symlink_to(source)
        link = links[-1]
        command = [sys.executable, "-m", "whisperd", "transcribe", *map(str, links), "--output-format", "txt",
                   *whisperd_args]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(child.stdout or []), daemon=True)
        reader.start()
        peak = 0
        process = psutil.Process(child.pid)
        warm_done = None  # when the first output appeared: the long recording starts then
        while child.poll() is None:
            try:
                peak = max(peak, tree_rss(process))
            except psutil.Error:
                pass
            if warm_done is None and warm_up and links[0].with_suffix(".txt").exists():
                warm_done = time.perf_counter()
            time.sleep(0.2)
        wall = time.perf_counter() - (warm_done or started)
        reader.join()
        if child.returncode != 0:
            raise SystemExit(f"whisperd exited with {child.returncode}:\n{''.join(output)[-3000:]}")
        high_water = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        text = link.with_suffix(".txt").read_text()
    return {
        "wall_seconds": wall,
        "peak_rss_mb": peak / 2**20,
        # The largest child so far: only meaningful when it grew past the previous runs' peak.
        "max_rss_mb": high_water / 1024 if high_water > before else float("nan"),
        "meetings_heard": text.lower().count("forward"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", default="1,10", help="comma-separated lengths in hours (default 1,10)")
    parser.add_argument("--format", choices=sorted(ENCODERS), default="opus")
    parser.add_argument("--build-only", action="store_true", help="write the recordings, do not transcribe")
    parser.add_argument("--whisperd-args", default="", help="extra arguments for `whisperd transcribe`")
    parser.add_argument("--no-warm-up", action="store_true", help="transcribe the long recording only")
    args = parser.parse_args()
    warm_up = None
    if not args.no_warm_up:
        from whisperd_support.evaluation.meeting import meeting_path

        warm_up = meeting_path(seed=0)
    for hours in [float(h) for h in args.hours.split(",")]:
        path = build_recording(hours, args.format)
        if args.build_only:
            continue
        result = run(path, warm_up, shlex.split(args.whisperd_args))
        audio = hours * 3600
        print(f"{hours:g} h {args.format}: audio {audio:.0f} s, wall {result['wall_seconds']:.0f} s, "
              f"{audio / result['wall_seconds']:.0f} audio s per wall s, peak RSS {result['peak_rss_mb']:.0f} MB "
              f"(sampled; child high-water mark {result['max_rss_mb']:.0f} MB), "
              f"meetings heard {result['meetings_heard']}/{int(hours)}", flush=True)


if __name__ == "__main__":
    main()
