"""The DAG's task ids: the one place that spells them (the DAG, trigger, report, benchmarks).

No Airflow import: the CLI's trigger and the benchmarks read these without Airflow's
task machinery. A batch task of a fixed-width DAG is ``{id}_{i}`` for worker i; in the
dynamic DAG it is the mapped task ``{id}`` with map index i.
"""

from __future__ import annotations

VALIDATE = "validate"
MEASURE_WINDOW = "measure_window"
COLLECT = "align.collect"
PLAN_GAPS = "align.plan_gaps"
PLAN_INTENSITY = "align.plan_intensity"

FEATURES = "align.features"
AFFINE = "align.affine"
GAP_PAIRS = "align.gap_pairs"
SLICESTATS = "align.slicestats"
WRITE = "align.write"
SHARDS = "ngingest.write_ng_shards"

BATCH_TASKS: tuple[str, ...] = (FEATURES, AFFINE, GAP_PAIRS, SLICESTATS, WRITE, SHARDS)
"""Task ids (before ``_{i}``) of the batch stages, in graph order: each runs in the pool
``http_requests`` with one task per worker, and its one XCom is its timing record."""


def batch_task_of(task_id: str) -> str | None:
    """The batch stage of ``task_id`` (``align.affine_3`` -> ``align.affine``), or None."""
    stage = task_id.rstrip("0123456789").rstrip("_")
    return stage if stage in BATCH_TASKS else None
