#!/usr/bin/env python
"""Accuracy, subtitle timing and speed of whisperd's engine on the dev clips and the meeting.

    .venv/bin/python benchmarks/accuracy.py [--precision fp32,sym_int4] [--model openai/whisper-base]
        [--threads N] [--no-vad] [--decode-opt KEY=VALUE ...] [--engine-opt KEY=VALUE ...]
        [--meeting-seconds once,600] [--seed 0] [--json PATH]

For each precision, in a fresh Python process (ipex-llm patches transformers process-wide,
and peak RSS is per process): load the engine once, transcribe every clip of
``dev_clips.json`` in its own language, then the meeting of
:mod:`whisperd_support.evaluation.meeting`. Prints a markdown table per precision and a summary
across precisions; ``--json`` writes everything, per-clip hypotheses included.

Measured:
* per clip: error rate (WER, CER for zh/ja) and wall seconds of ``engine.transcribe``;
* per language: corpus error rate (errors summed over the clips, then divided);
* the meeting: WER; cue-start error against every clip's true speech onset (median, max,
  onsets with a cue starting within 0.5 s), cues parsed with the ``srt`` library from
  ``whisperd.outputs.render(transcript, "srt")``; words emitted inside the 60 s without
  speech; longest cue duration and line; audio seconds per wall second;
* model load seconds (``create_engine``, torch already imported), RSS after load, peak RSS.

Options not every build has (``vad`` on DecodeOptions, say) are looked up with
``dataclasses.fields`` at run time: ``--decode-opt``/``--engine-opt`` accept any field
that exists, and ``--no-vad`` is refused, not silently ignored, when there is no ``vad``
field. Decoding is seeded (``torch.manual_seed(0)`` before each file), so temperature
fallback is repeatable. Timings on a shared 2-core machine are noisy: ``--repeat`` runs the
meeting several times and reports the fastest.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "support"))  # whisperd_support: clips, meetings

import argparse
import ast
import dataclasses
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "daemon") not in sys.path:
    sys.path.insert(0, str(ROOT / "daemon"))

from whisperd.options import DecodeOptions, EngineSettings  # noqa: E402

DEFAULT_PRECISIONS = "fp32,sym_int4"


# -- options that may or may not exist -------------------------------------------------------


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _parse_value(raw: str, default: Any) -> Any:
    """Convert ``raw`` to the type of the field's default (bool, int, float, tuple of floats, str)."""
    low = raw.strip().lower()
    if low in ("none", "null"):
        return None
    if isinstance(default, bool):
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, tuple):
        return tuple(float(x) for x in raw.split(",") if x.strip())
    if isinstance(default, str):
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _apply_opts(cls: type, pairs: list[str], what: str) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise SystemExit(f"--{what}-opt {pair!r}: expected KEY=VALUE")
        if key not in fields:
            raise SystemExit(f"--{what}-opt {key}: {cls.__name__} has no such field; it has {', '.join(fields)}")
        try:
            out[key] = _parse_value(raw, _field_default(fields[key]))
        except ValueError as exc:
            raise SystemExit(f"--{what}-opt {key}: {exc}") from exc
    return out


def build_options(args: argparse.Namespace, precision: str) -> tuple[EngineSettings, dict[str, Any]]:
    """EngineSettings for ``precision`` and DecodeOptions keyword arguments (language added per clip)."""
    engine_kw = _apply_opts(EngineSettings, args.engine_opt, "engine")
    decode_kw = _apply_opts(DecodeOptions, args.decode_opt, "decode")
    decode_kw.pop("language", None)
    if args.no_vad:
        decode_fields = {f.name: f for f in dataclasses.fields(DecodeOptions)}
        engine_fields = {f.name: f for f in dataclasses.fields(EngineSettings)}
        if "vad" in decode_fields and isinstance(_field_default(decode_fields["vad"]), bool):
            decode_kw["vad"] = False
        elif "vad" in engine_fields and isinstance(_field_default(engine_fields["vad"]), bool):
            engine_kw["vad"] = False
        else:
            raise SystemExit("--no-vad: neither DecodeOptions nor EngineSettings has a boolean 'vad' field in this build")
    settings = EngineSettings(model=args.model, device=args.device, precision=precision)
    if args.threads:
        engine_kw.setdefault("threads", args.threads)
    settings = dataclasses.replace(settings, **engine_kw)
    DecodeOptions(language="en", **decode_kw)  # fail early on a bad combination
    return settings, decode_kw


# -- machine ---------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers", "ipex-llm", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# -- one precision (child process) -----------------------------------------------------------


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def run_precision(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    started = time.perf_counter()
    import torch

    import_s = time.perf_counter() - started
    if args.threads:
        torch.set_num_threads(args.threads)
    threads_start = torch.get_num_threads()
    if not args.verbose:
        import transformers

        transformers.logging.set_verbosity_error()

    from whisperd.audio import decode_audio
    from whisperd.engine import create_engine
    from whisperd.outputs import render
    from whisperd_support.evaluation import fetch_clips, score
    from whisperd_support.evaluation.meeting import build_meeting
    from whisperd_support.evaluation.metrics import (
        audio_seconds_per_wall_second,
        cues_from_srt,
        max_cue_duration,
        max_line_length,
        onset_stats,
        words_in_span,
    )

    settings, decode_kw = build_options(args, precision)
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    engine = create_engine(settings)
    load_s = time.perf_counter() - t0
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)  # ipex-llm calls basicConfig(INFO) at import
    rss_loaded = _rss_mb()
    threads_loaded = torch.get_num_threads()

    clips = [] if args.no_clips else fetch_clips(args.clips.split(",") if args.clips else None)
    decoded = {c.id: decode_audio(c.path) for c in clips}

    def transcribe(audio: Any, language: str) -> tuple[Any, float]:
        torch.manual_seed(0)
        t = time.perf_counter()
        transcript = engine.transcribe(audio, DecodeOptions(language=language, **decode_kw))
        return transcript, time.perf_counter() - t

    # Warm-up (one-time kernel selection, lazy imports): not counted anywhere.
    warm = clips[0] if clips else None
    warmup_s = transcribe(decoded[warm.id], warm.language)[1] if warm else 0.0

    clip_rows = []
    for c in clips:
        transcript, wall = transcribe(decoded[c.id], c.language)
        result = score([c.reference], [transcript.text], c.language)
        clip_rows.append({
            "id": c.id, "language": c.language, "audio_s": round(len(decoded[c.id]) / 16000, 3),
            "wall_s": round(wall, 3), "unit": result.unit, "rate": result.rate,
            "errors": result.errors, "ref_len": result.reference_length,
            "reference": c.reference, "hypothesis": transcript.text,
        })
        print(f"  [{precision}] {c.id}: {result.rate:.3f} in {wall:.2f} s", file=sys.stderr, flush=True)

    languages: dict[str, Any] = {}
    for lang in dict.fromkeys(r["language"] for r in clip_rows):
        rows = [r for r in clip_rows if r["language"] == lang]
        result = score([r["reference"] for r in rows], [r["hypothesis"] for r in rows], lang)
        languages[lang] = {
            "unit": result.unit, "rate": result.rate, "clips": len(rows),
            "audio_s": round(sum(r["audio_s"] for r in rows), 2), "wall_s": round(sum(r["wall_s"] for r in rows), 2),
        }

    meetings = []
    for target in args.meeting_targets:
        meeting = build_meeting(seed=args.seed, target_seconds=target)
        walls = []
        transcript = None
        for _ in range(max(1, args.repeat)):
            t, wall = transcribe(meeting.audio, "en")
            if transcript is None:
                transcript = t
            walls.append(wall)
        assert transcript is not None
        wall = min(walls)
        srt_text = render(transcript, "srt")
        cues = cues_from_srt(srt_text)
        onsets = onset_stats([c.start for c in cues], meeting.onsets)
        s0, s1 = meeting.silence
        in_silence = [c for c in cues if c.start < s1 and c.end > s0]
        wer = score([meeting.reference], [transcript.text], "en")
        meetings.append({
            "target_seconds": target, "seed": args.seed, "audio_s": meeting.duration_s,
            "silence": list(meeting.silence), "clips": len(meeting.clips),
            "wer": wer.rate, "errors": wer.errors, "ref_len": wer.reference_length,
            "substitutions": wer.substitutions, "deletions": wer.deletions, "insertions": wer.insertions,
            "wall_s": round(wall, 3), "wall_s_all": [round(w, 3) for w in walls],
            "audio_s_per_wall_s": audio_seconds_per_wall_second(meeting.duration_s, wall),
            "cues": len(cues),
            "onset_error_median_s": onsets.median, "onset_error_max_s": onsets.max,
            "onsets_within": onsets.within, "onsets": onsets.count, "onset_tolerance_s": onsets.tolerance,
            "onset_errors_s": [round(e, 3) for e in onsets.errors],
            "words_in_silence": words_in_span(cues, s0, s1),
            "cues_in_silence": [[round(c.start, 2), round(c.end, 2), c.text] for c in in_silence],
            "max_cue_s": max_cue_duration(cues), "max_line_chars": max_line_length(cues),
            "hypothesis": transcript.text, "srt": srt_text,
        })
        print(f"  [{precision}] meeting {meeting.duration_s:.0f} s: WER {wer.rate:.3f} in {wall:.1f} s",
              file=sys.stderr, flush=True)

    describe = engine.describe() if hasattr(engine, "describe") else {}
    return {
        "precision": precision,
        "engine_settings": dataclasses.asdict(settings),
        "decode_options": {k: v for k, v in dataclasses.asdict(DecodeOptions(language="en", **decode_kw)).items()
                           if k != "language"},
        "engine": {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v)) for k, v in describe.items()},
        "torch_threads": torch.get_num_threads(),
        "torch_threads_start": threads_start, "torch_threads_after_load": threads_loaded,
        "import_torch_s": round(import_s, 3),
        "load_s": round(load_s, 3), "warmup_s": round(warmup_s, 3),
        "rss_before_load_mb": round(rss_before, 1), "rss_after_load_mb": round(rss_loaded, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "clips": clip_rows, "languages": languages, "meetings": meetings,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }


def print_precision(run: dict[str, Any]) -> None:
    p = run["precision"]
    print(f"\n### {p}: load {run['load_s']:.2f} s, warm-up {run['warmup_s']:.2f} s, "
          f"RSS after load {run['rss_after_load_mb']:.0f} MB, peak RSS {run['peak_rss_mb']:.0f} MB, "
          f"torch threads {run['torch_threads']}")
    if run["torch_threads_start"] != run["torch_threads"]:
        print(f"WARNING: torch threads went from {run['torch_threads_start']} (start) to {run['torch_threads_after_load']} "
              f"(after load) to {run['torch_threads']} (after decoding): something called torch.set_num_threads")
    opts = run["decode_options"]
    shown = {k: opts[k] for k in ("vad", "beam_size", "condition_on_previous_text", "drop_repeated_segments") if k in opts}
    print(f"decode options: {shown}\n")
    if run["clips"]:
        print("| clip | lang | audio s | wall s | rate |")
        print("|---|---|---:|---:|---:|")
        for r in run["clips"]:
            unit = "CER" if r["unit"] == "character" else "WER"
            print(f"| {r['id']} | {r['language']} | {r['audio_s']:.1f} | {r['wall_s']:.2f} | {r['rate']:.3f} {unit} |")
        print("\n| language | clips | audio s | wall s | corpus rate |")
        print("|---|---:|---:|---:|---:|")
        for lang, v in run["languages"].items():
            unit = "CER" if v["unit"] == "character" else "WER"
            print(f"| {lang} | {v['clips']} | {v['audio_s']:.1f} | {v['wall_s']:.2f} | {v['rate']:.3f} {unit} |")
    for m in run["meetings"]:
        print(f"\nmeeting ({m['audio_s']:.1f} s, {m['clips']} clips, silence {m['silence'][0]:.1f}-{m['silence'][1]:.1f} s):")
        print("| WER | S/D/I | cue-start err median / max s | onsets with cue <= 0.5 s | words in silence | "
              "cues | max cue s | max line chars | wall s | audio s / wall s |")
        print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {m['wer']:.3f} | {m['substitutions']}/{m['deletions']}/{m['insertions']} | "
              f"{_fmt(m['onset_error_median_s'], 2)} / {_fmt(m['onset_error_max_s'], 2)} | "
              f"{m['onsets_within']}/{m['onsets']} | {m['words_in_silence']} | {m['cues']} | {m['max_cue_s']:.1f} | "
              f"{m['max_line_chars']} | {m['wall_s']:.1f} | {m['audio_s_per_wall_s']:.1f} |")
        for start, end, text in m["cues_in_silence"]:
            print(f"  cue overlapping the silence: {start:.2f}-{end:.2f} {text!r}")
    sys.stdout.flush()


def print_summary(runs: list[dict[str, Any]]) -> None:
    if not runs:
        return
    langs = list(dict.fromkeys(lang for r in runs for lang in r["languages"]))
    print("\n## Summary\n")
    header = ["precision", "load s", "peak RSS MB", *[f"{lang} {'CER' if lang in ('zh', 'ja') else 'WER'}" for lang in langs],
              "clips wall s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in runs:
        cells = [r["precision"], f"{r['load_s']:.2f}", f"{r['peak_rss_mb']:.0f}"]
        cells += [_fmt(r["languages"].get(lang, {}).get("rate")) for lang in langs]
        cells.append(f"{sum(c['wall_s'] for c in r['clips']):.1f}")
        print("| " + " | ".join(cells) + " |")
    if any(r["meetings"] for r in runs):
        print("\n| precision | meeting s | WER | cue-start median / max s | within 0.5 s | words in silence | "
              "max cue s | max line | audio s / wall s |")
        print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
        for r in runs:
            for m in r["meetings"]:
                print(f"| {r['precision']} | {m['audio_s']:.0f} | {m['wer']:.3f} | {_fmt(m['onset_error_median_s'], 2)} / "
                      f"{_fmt(m['onset_error_max_s'], 2)} | {m['onsets_within']}/{m['onsets']} | {m['words_in_silence']} | "
                      f"{m['max_cue_s']:.1f} | {m['max_line_chars']} | {m['audio_s_per_wall_s']:.1f} |")


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default=DEFAULT_PRECISIONS, help="comma-separated (default %(default)s)")
    ap.add_argument("--model", default="openai/whisper-base")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (EngineSettings.threads)")
    ap.add_argument("--no-vad", action="store_true", help="decode without VAD (needs a 'vad' option in this build)")
    ap.add_argument("--decode-opt", action="append", default=[], metavar="KEY=VALUE", help="any DecodeOptions field")
    ap.add_argument("--engine-opt", action="append", default=[], metavar="KEY=VALUE", help="any EngineSettings field")
    ap.add_argument("--clips", default="", help="comma-separated clip ids (default: all of dev_clips.json)")
    ap.add_argument("--no-clips", action="store_true", help="only the meeting")
    ap.add_argument("--meeting-seconds", default="once",
                    help="comma-separated meeting lengths: 'once' (every clip once) and/or seconds, e.g. once,600; "
                         "'none' for no meeting (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="meeting seed")
    ap.add_argument("--repeat", type=int, default=1, help="transcribe the meeting N times, report the fastest")
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    ap.add_argument("--in-process", action="store_true", help="run every precision in this process (peak RSS then accumulates)")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    targets: list[float | None] = []
    for item in (x.strip().lower() for x in args.meeting_seconds.split(",")):
        if item in ("", "none"):
            continue
        targets.append(None if item in ("once", "0") else float(item))
    args.meeting_targets = targets
    for p in args.precisions:  # validate options before spending minutes
        build_options(args, p)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    if args.worker:
        run = _run_worker(args)
        if args.json:
            args.json.write_text(json.dumps(run, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        return 0

    info = machine_info()
    print(f"machine: {info['cpu']}, {info['logical_cores']} logical cores ({info['usable_cores']} usable), "
          f"{info.get('memory_gib', '?')} GiB, load average {info['load_average']}")
    print(f"libraries: {library_versions()}; python {info['python']}")
    print(f"model {args.model} on {args.device}, precisions {args.precisions}, threads "
          f"{args.threads or 'torch default'}, meeting seed {args.seed}")
    sys.stdout.flush()

    runs = []
    for precision in args.precisions:
        if args.in_process:
            run = _run_worker(args, precision)
        else:
            run = _run_child(argv, precision)
        runs.append(run)
        print_precision(run)
    print_summary(runs)
    if args.json:
        result = {"machine": info, "libraries": library_versions(), "argv": argv, "runs": runs}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


def _run_worker(args: argparse.Namespace, precision: str | None = None) -> dict[str, Any]:
    return run_precision(args, precision or args.precisions[0])


def _run_child(argv: list[str], precision: str) -> dict[str, Any]:
    """Run one precision in a fresh interpreter; its progress goes to our stderr."""
    rest, skip = [], False
    for a in argv:  # drop --precision/--json: the child gets its own
        if skip:
            skip = False
            continue
        if a in ("--precision", "--json"):
            skip = True
            continue
        if a.startswith(("--precision=", "--json=")):
            continue
        rest.append(a)
    with tempfile.TemporaryDirectory(prefix="whisperd-bench-") as tmp:
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *rest, "--worker", "--precision", precision, "--json", str(out)]
        proc = subprocess.run(cmd, stdout=sys.stderr, check=False)
        if proc.returncode != 0 or not out.is_file():
            raise SystemExit(f"benchmark for {precision} failed (exit {proc.returncode})")
        return json.loads(out.read_text(encoding="utf-8"))


if __name__ == "__main__":
    sys.exit(main())
