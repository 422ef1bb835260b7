#!/usr/bin/env python3
"""Number an image folder's files as links img.00000.png, ...: ``emprocess symlinks``."""

from emprocess.cli import run_as_script


def main(argv: list[str] | None = None) -> None:
    """``emprocess symlinks ARGV``; exits 0, or 2 for bad arguments or a conflict."""
    run_as_script("symlinks", argv, "create_symlinks.py")


if __name__ == "__main__":
    main()
