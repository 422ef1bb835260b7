"""The Airflow workflow: DAG ids, run configuration, fan-out helper and task bodies.

Only :mod:`emprocess.workflow.conf` (with :mod:`~emprocess.workflow.slicenames` and
:mod:`~emprocess.workflow.params`), :mod:`emprocess.workflow.tasks` and
:mod:`emprocess.workflow.dag` are imported when Airflow parses ``emprocess.py``;
everything that needs numpy, requests or storage clients is imported inside the
task callables, so parsing stays cheap.
"""

from __future__ import annotations

VERSION = "0.4"
"""Version of the task graph and its results; part of every DAG id (0.1 was the original)."""

WIDTHS: tuple[int, ...] = (1, 4, 32, 64, 128)
"""The fixed pipeline widths: concurrent batch workers per stage, one DAG each."""

DEFAULT_DYNAMIC_WIDTH = 32
"""Width of the dynamic DAG when the run's conf gives none."""

POOL = "http_requests"
"""Airflow pool every batch task runs in."""

POOL_SLOTS = 512
"""Slots the pool should have (the original's figure): four runs of the widest fixed DAG."""

AIRFLOW_DEFAULT_MAX_ACTIVE_TASKS = 16
"""Airflow's ``[core] max_active_tasks_per_dag``; no DAG here allows fewer tasks per run."""

ALIGN_CONN_ID = "ALIGN_CLOUD_RUN"
EMWRITE_CONN_ID = "IMG_WRITE"


def dag_id(width: int | None) -> str:
    """``emprocess_width{W}_v{VERSION}``, or ``emprocess_v{VERSION}`` for the dynamic DAG."""
    if width is None:
        return f"emprocess_v{VERSION}"
    return f"emprocess_width{width}_v{VERSION}"
