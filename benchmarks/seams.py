#!/usr/bin/env python
"""Copies, loops and segments without time on recordings of pieces played 1.5 s apart.

    .venv/bin/python benchmarks/seams.py [--backend openvino,transformers] [--sequence NAME,...]

For each backend (OpenVINO int8, the CPU default; transformers fp32) and each sequence of
:mod:`whisperd_support.evaluation.sequences`: WER of the sequence's transcript and of its pieces
transcribed alone by the same engine (against the references, and for a piece without one its own
transcript alone), 6-word runs written more often than said, loops (a phrase 4+ times in a row
beyond what was said), segments under 0.2 s, what the guards mended, and wall seconds. The goal
for every sequence: 0 / 0 / 0, and WER no more than 0.02 above the pieces alone. `set` says whether
the sequence's clips chose thresholds (dev) or only check them (held-out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest.load_engine: the engine the tests use
sys.path.insert(0, str(ROOT / "support"))  # whisperd_support: clips and sequences

from whisperd_support.evaluation.sequences import SEQUENCES, build_sequence, judge  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="openvino,transformers")
    parser.add_argument("--sequence", default=",".join(SEQUENCES))
    args = parser.parse_args()
    from conftest import load_engine

    print("| backend | sequence | set | audio s | WER | WER pieces alone | repeated runs | loops | segments < 0.2 s | "
          "mended (loops / repeats / times) | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for backend in args.backend.split(","):
        engine = load_engine("int8" if backend == "openvino" else "fp32", backend=backend)
        for name in args.sequence.split(","):
            sequence = build_sequence(name)
            v = judge(engine, sequence)
            r = {"loops_collapsed": "-", "repeats_dropped": "-", "times_repaired": "-", **v.repairs}
            print(f"| {backend} | {name} | {sequence.set} | {sequence.duration:.0f} | {v.wer:.3f} | {v.wer_alone:.3f} | "
                  f"{v.repeated} | {v.loops} | {v.short} | {r['loops_collapsed']} / {r['repeats_dropped']} / "
                  f"{r['times_repaired']} | {v.seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
