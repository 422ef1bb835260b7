#!/usr/bin/env python3
"""Number an image folder's files as symlinks DEST/img.00000.png, img.00001.png, ...

Files are taken in natural order ("slice2" before "slice10"). Running it again is
harmless; a file in DEST that is in the way is an error and nothing is created.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from emprocess.errors import EmprocessError
from emprocess.tools import create_symlinks, plan_symlinks


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, make the links; 0 on success, 1 on failure, 2 for bad arguments."""
    parser = argparse.ArgumentParser(
        prog=Path(__file__).name,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="folder holding the images")
    parser.add_argument("dest", metavar="DEST", help="folder for the links (created if missing)")
    parser.add_argument(
        "--template",
        default="img.%05d.png",
        help="printf template of the link names, one integer field (default: %(default)s)",
    )
    parser.add_argument(
        "--first-z", type=int, default=0, help="number of the first slice (default: 0)"
    )
    parser.add_argument(
        "--pattern", default="*", help="glob selecting the images in SRC (default: *)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the links it would make, make none"
    )
    args = parser.parse_args(argv)
    if args.first_z < 0:
        parser.error(f"--first-z must be >= 0, got {args.first_z}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.dry_run:
            links = [
                (str(link), str(target))
                for link, target in plan_symlinks(
                    args.src, args.dest, args.template, args.first_z, args.pattern
                )
            ]
        else:
            links = create_symlinks(args.src, args.dest, args.template, args.first_z, args.pattern)
    except EmprocessError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    for link, target in links:
        print(f"{link} -> {target}")
    z0 = args.first_z
    print(
        f"{len(links)} slices: image {args.template!r}, minz {z0}, maxz {z0 + len(links) - 1}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
