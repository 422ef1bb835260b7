#!/usr/bin/env python3
"""Print a unique run id NAME_<12 hex digits>: ``emprocess gen-uuid`` under its old name."""

from emprocess.cli import run_as_script


def main(argv: list[str] | None = None) -> None:
    """``emprocess gen-uuid ARGV``; exits 0, or 2 for a bad name."""
    run_as_script("gen-uuid", argv, "gen_uuid.py")


if __name__ == "__main__":
    main()
