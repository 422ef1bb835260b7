"""``python -m emprocess.cli``: the ``emprocess`` command (how tests and local runs start services)."""

from emprocess.cli import main

main()
