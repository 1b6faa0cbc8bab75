"""Command line: `whisperd transcribe`, `fetch-model`, `import-model` (and the daemon commands)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from whisperd.logs import quiet_library_warnings
from whisperd.options import (
    BACKENDS,
    DEVICES,
    OPENVINO_DEVICES,
    OPENVINO_PRECISIONS,
    OUTPUT_FORMATS,
    PRECISIONS,
    TASKS,
    DecodeOptions,
    EngineSettings,
)


def parse_formats(value: str) -> tuple[str, ...]:
    formats = tuple(f.strip().lower() for f in value.split(",") if f.strip())
    unknown = [f for f in formats if f not in OUTPUT_FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"output formats must be a comma list of {', '.join(OUTPUT_FORMATS)}")
    return formats


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id, transformers dir or CTranslate2 dir (default openai/whisper-base)")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="auto (default: openvino on the CPU, transformers on CUDA and Intel GPUs), "
                             "transformers or openvino")
    parser.add_argument("--device", help=f"transformers: {', '.join(DEVICES)}; openvino: {', '.join(OPENVINO_DEVICES)}")
    parser.add_argument("--precision",
                        help=f"transformers: {', '.join(PRECISIONS)}; openvino: {', '.join(OPENVINO_PRECISIONS)}")
    parser.add_argument("--threads", type=int, help="CPU threads for inference (default: all cores)")
    parser.add_argument("--cpu-embedding", action="store_true", default=None, help="keep embeddings on the CPU (Intel iGPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whisperd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("transcribe", help="transcribe files once and write outputs next to them")
    tr.add_argument("files", nargs="+", type=Path)
    add_engine_arguments(tr)
    tr.add_argument("--language", default="auto", help="auto, a code (zh) or a name (chinese)")
    tr.add_argument("--task", choices=TASKS, default="transcribe")
    tr.add_argument("--initial-prompt")
    tr.add_argument("--word-timestamps", action="store_true",
                    help="time every word (cues start and end on words; about 20%% slower)")
    tr.add_argument("--output-format", type=parse_formats, default=("txt", "srt"), help="comma list: txt,srt,vtt,json")

    fm = sub.add_parser("fetch-model", help="obtain a model and print its local transformers directory")
    fm.add_argument("name")

    run = sub.add_parser("run", help="run the daemon: watch the inboxes and transcribe what arrives")
    run.add_argument("--config", type=Path, required=True)
    add_engine_arguments(run)

    st = sub.add_parser("status", help="queue counts, the running job and recent failures")
    st.add_argument("--config", type=Path, help="daemon config (its state_dir is read)")
    st.add_argument("--state-dir", type=Path, help="read this state directory instead")
    st.add_argument("--failures", type=int, default=10, help="how many recent failures to list")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    cc = sub.add_parser("check-config", help="validate a daemon config and the rule files under its inboxes")
    cc.add_argument("config", type=Path)

    im = sub.add_parser("import-model", help="convert a CTranslate2 (faster-whisper) model to a transformers directory")
    im.add_argument("ct2_dir", type=Path)
    im.add_argument("out_dir", type=Path)
    return parser


def cmd_transcribe(args: argparse.Namespace) -> int:
    from whisperd.audio import AudioDecodeError
    from whisperd.engine import create_engine
    from whisperd.engine import TranscriptionError
    from whisperd.transcribe_file import transcribe_file

    options = DecodeOptions(language=args.language, task=args.task, initial_prompt=args.initial_prompt,
                            word_timestamps=args.word_timestamps)
    settings = EngineSettings().with_overrides(
        model=args.model, device=args.device, precision=args.precision, threads=args.threads,
        cpu_embedding=args.cpu_embedding, backend=args.backend,
    )
    engine = create_engine(settings)
    failed = 0
    for path in args.files:
        try:
            result = transcribe_file(engine, path, options, args.output_format)
        except (AudioDecodeError, TranscriptionError, OSError) as exc:
            failed += 1
            print(f"FAILED {path}: {exc}", flush=True)
            continue
        print(f"ok {result.summary()}", flush=True)
    return 1 if failed else 0


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from whisperd.models import fetch_model

    print(fetch_model(args.name))
    return 0


def cmd_import_model(args: argparse.Namespace) -> int:
    from whisperd.models import import_ct2_model

    print(import_ct2_model(args.ct2_dir, args.out_dir))
    return 0


def engine_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {k: getattr(args, k) for k in ("model", "device", "precision", "threads", "cpu_embedding", "backend")
            if getattr(args, k, None) is not None}


def cmd_run(args: argparse.Namespace) -> int:
    from whisperd.service import Daemon

    return Daemon(args.config, engine_overrides(args)).run()


def cmd_status(args: argparse.Namespace) -> int:
    from whisperd.config import load_config
    from whisperd.status import collect_status, format_status

    if args.state_dir is None and args.config is None:
        print("whisperd: error: give --config or --state-dir", file=sys.stderr)
        return 2
    state_dir = args.state_dir or load_config(args.config).state_dir
    report = collect_status(state_dir, failures=args.failures)
    print(json.dumps(report, indent=2, default=str) if args.json else format_status(report))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from whisperd.checks import check_config

    problems = check_config(args.config)
    for line in problems:
        print(line)
    if not problems:
        print(f"{args.config}: ok")
    return 1 if problems else 0


COMMANDS = {
    "transcribe": cmd_transcribe,
    "run": cmd_run,
    "status": cmd_status,
    "check-config": cmd_check_config,
    "fetch-model": cmd_fetch_model,
    "import-model": cmd_import_model,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":  # the daemon sets up structured logging from its config
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        quiet_library_warnings()
    try:
        return COMMANDS[args.command](args)
    except (ValueError, LookupError, OSError) as exc:
        # Settings errors (bad precision for the device, unknown language, missing model) end here.
        print(f"whisperd: error: {exc}", file=sys.stderr)
        return 2
