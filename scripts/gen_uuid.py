#!/usr/bin/env python3
"""Print a unique run id RUN_NAME_<12 hex digits> for the run conf key "id"."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emprocess.errors import EmprocessError
from emprocess.tools import MAX_RUN_NAME_CHARS, gen_uuid


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, print the id; 0 on success, 2 for a bad name."""
    parser = argparse.ArgumentParser(
        prog=Path(__file__).name,
        description=__doc__,
        epilog="The id becomes part of the bucket names SOURCE_tmp_ID, SOURCE_ng_ID and "
        "SOURCE_chunk_ID, so NAME may hold only lowercase letters, digits, '-' and '_' "
        f"(at most {MAX_RUN_NAME_CHARS} characters).",
    )
    parser.add_argument("name", metavar="NAME", help="the run name, e.g. mouse-cortex-1")
    parser.add_argument(
        "--source",
        metavar="BUCKET",
        help="the source bucket; also check that the run's bucket names are valid",
    )
    args = parser.parse_args(argv)
    try:
        print(gen_uuid(args.name, source=args.source))
    except EmprocessError as e:
        parser.error(str(e))  # exits 2, as argparse does for every bad argument
    return 0


if __name__ == "__main__":
    sys.exit(main())
