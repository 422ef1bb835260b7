#!/usr/bin/env python3
"""Compare the records two runs wrote in their process buckets, byte for byte but for times.

Made to check that a change to the code writing the records keeps their bytes: run
``emprocess demo --workdir A`` on the old code and ``--workdir B`` on the new, then

    python scripts/compare_records.py A/storage B/storage --source demo-stack --run demo

Every file under ``SOURCE_process/RUN/`` (JSON and CSV records, cache answers; not the
thumbnails or stored features, which are not records) must exist in both and be equal
after the values that differ from run to run are replaced by ``*``: the times
(``started``, ``finished``, ``first_started``), durations (``elapsed_s``, an answer's
``seconds``), Airflow's run id, and the digest in a stored features file's name (it
covers the slice object's update time). Key order, separators, indent and every other value
are compared as written. Exit status 0 when all are equal, 1 otherwise (each difference
printed).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

VOLATILE = [
    (re.compile(rb'("(?:started|finished|first_started|airflow_run_id)": )"[^"]*"'), rb'\1"*"'),
    (re.compile(rb'("(?:elapsed_s|seconds)": )(?:-?[0-9.eE+-]+|null)'), rb"\1*"),
    (re.compile(rb"(/align/features/[^\"/]*\.)[0-9a-f]{16}(\.feat)"), rb"\1*\2"),
]
"""(pattern, replacement) of the values that differ between two runs of the same input."""

SKIPPED = (".png", ".feat")
"""Suffixes of files that are not records (thumbnails, stored features)."""


def normalized(data: bytes) -> bytes:
    """``data`` with its run-to-run values replaced by ``*``."""
    for pattern, replacement in VOLATILE:
        data = pattern.sub(replacement, data)
    return data


def records(root: Path) -> dict[str, bytes]:
    """Every record file under ``root``, by relative path."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(SKIPPED)
    }


def compare(a_root: Path, b_root: Path) -> list[str]:
    """The differences between the records under two folders (empty: equal)."""
    a, b = records(a_root), records(b_root)
    problems = [f"only in {a_root}: {k}" for k in sorted(a.keys() - b.keys())]
    problems += [f"only in {b_root}: {k}" for k in sorted(b.keys() - a.keys())]
    for key in sorted(a.keys() & b.keys()):
        x, y = normalized(a[key]), normalized(b[key])
        if x != y:
            diff = difflib.unified_diff(
                x.decode(errors="replace").splitlines(),
                y.decode(errors="replace").splitlines(),
                lineterm="",
                n=0,
            )
            problems.append(f"differs: {key}\n" + "\n".join(list(diff)[2:12]))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path, help="storage root of the first run (WORKDIR/storage)")
    parser.add_argument("b", type=Path, help="storage root of the second run")
    parser.add_argument("--source", default="demo-stack", help="the runs' source bucket")
    parser.add_argument("--run", default="demo", help="the runs' id")
    args = parser.parse_args(argv)
    folder = Path(f"{args.source}_process") / args.run
    a_root, b_root = args.a / folder, args.b / folder
    for root in (a_root, b_root):
        if not root.is_dir():
            parser.error(f"{root} is not a folder")
    problems = compare(a_root, b_root)
    for problem in problems:
        print(problem)
    n = len(records(a_root))
    print(f"{n} records compared: " + ("all equal" if not problems else f"{len(problems)} differ"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
