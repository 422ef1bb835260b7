"""What several ``emprocess`` commands share: the command's storage, a checked conf, the DAG."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from emprocess.settings import StorageEnv
    from emprocess.workflow.conf import RunConf

WORKERS_HELP = "gunicorn workers of each service (default: one per core, as memory allows)."
THREADS_HELP = "Request threads per batch task (default: twice the service workers)."


def storage_settings(**chosen: Any) -> StorageEnv:
    """The environment's storage settings with the fields in ``chosen`` replaced; a bad
    value stops the command with the variable's name."""
    from emprocess.errors import InvalidInput
    from emprocess.settings import StorageEnv, load

    try:
        return load(StorageEnv, **chosen)
    except InvalidInput as e:
        raise typer.BadParameter(str(e)) from None


def build_conf(**values: object) -> RunConf:
    """The run conf of the values given (None: not given), checked by the DAG's schema; a
    bad value stops the command with the schema's message."""
    from emprocess.errors import InvalidInput
    from emprocess.workflow.conf import parse_conf

    try:
        return parse_conf({k: v for k, v in values.items() if v is not None})
    except InvalidInput as e:
        raise typer.BadParameter(str(e)) from None


def dag_for(width: int) -> tuple[str, int | None]:
    """The DAG id for ``width`` and the conf's ``width`` key: None for a fixed-width DAG,
    ``width`` itself for the dynamic one."""
    from emprocess.workflow import WIDTHS, dag_id

    return (dag_id(width), None) if width in WIDTHS else (dag_id(None), width)
