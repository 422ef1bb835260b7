"""``build_dag(width)``: the emprocess DAG of one fixed width, or the dynamic one.

Task graph (CONTRACTS.md), for a fixed width W::

    validate -> measure_window -> create_env -> align.start_align -> align.features_{0..W-1}
      -> align.check_features -> align.affine_{0..W-1} -> align.plan_gaps
      -> align.gap_pairs_{0..W-1} -> align.collect -> align.slicestats_{0..W-1}
      -> align.plan_intensity -> align.write_{0..W-1} -> align.finish_align
      -> ngingest.write_ngmeta
      -> ngingest.write_ng_shards_{0..W-1} -> ngingest.finish_ngwrite -> iswritten
      -> cleanup_images -> set_public_read -> write_status

``align.features_{i}`` (issue 19) extracts each slice's SIFT features once, so the
pairs match stored features instead of decoding both slices each.

Every request the workflow sends goes out from a batch task in the pool (issue 22): the
second align round across bad slices (``align.gap_pairs_{i}``, planned by
``align.plan_gaps``) and the per-slice measurements of ``intensity_correction: slice``
(``align.slicestats_{i}``, turned into gains and offsets by ``align.plan_intensity``) are
stages of their own, so ``collect`` only computes; ``validate`` reads the slices' headers
only, and ``measure_window`` asks the alignment service for the histograms an ``auto``
window of 12/16-bit slices is measured on. A run without gaps or without the
correction still has those tasks (the graph is fixed); they return at once.

The dynamic DAG (``width`` None) has the same graph with the six batch stages of
:data:`~emprocess.workflow.taskids.BATCH_TASKS` as mapped tasks, expanded over the worker
ids that ``align.start_align`` returns for the conf's width.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, Param, TaskGroup
from airflow.sdk.definitions.param import ParamsDict

from emprocess.workflow import (
    AIRFLOW_DEFAULT_MAX_ACTIVE_TASKS,
    DEFAULT_DYNAMIC_WIDTH,
    POOL,
    VERSION,
    WIDTHS,
    dag_id,
)
from emprocess.workflow import tasks as t
from emprocess.workflow.conf import MAX_WIDTH
from emprocess.workflow.notify import on_task_failure
from emprocess.workflow.params import param_specs

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "emprocess",
    "retries": 2,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
    "on_failure_callback": on_task_failure,
}
"""Task retries (a retried batch task skips the mini-tasks it already cached); a task
that failed for good mails the conf's ``email`` (:mod:`emprocess.workflow.notify`)."""

MAX_ACTIVE_RUNS = 4
"""Runs of one DAG at a time; with the widest DAG (128) they fill the pool's 512 slots."""


def max_active_tasks(width: int | None) -> int:
    """Tasks one run may have running or queued: its width (the dynamic DAG: the widest conf).

    Airflow's default (16 per run) would cap a width-32 run at 16 concurrent batch tasks.
    Outside the batch stages a run has one task at a time, so the width is the peak.
    """
    return max(width or MAX_WIDTH, AIRFLOW_DEFAULT_MAX_ACTIVE_TASKS)


def params(dynamic: bool) -> dict[str, Param]:
    """The trigger form: one ``Param`` per conf key, from :class:`RunConf`'s JSON schema."""
    specs = param_specs(dynamic=dynamic, default_width=DEFAULT_DYNAMIC_WIDTH)
    return {key: Param(**spec) for key, spec in specs.items()}


def doc_md(width: int | None) -> str:
    """The DAG's documentation in the Airflow UI."""
    specs = param_specs(dynamic=width is None, default_width=DEFAULT_DYNAMIC_WIDTH)
    rows = "\n".join(
        f"| `{key}` | {spec.get('default', '*required*')} | {spec['description']} |"
        for key, spec in specs.items()
    )
    if width is None:
        shape = (
            "Width comes from the conf key `width`: the six batch stages are mapped "
            "tasks expanded over that many workers."
        )
    else:
        shape = f"Fixed width {width}: each batch stage has {width} workers."
    shape += (
        f" A run may have {max_active_tasks(width)} tasks running at once; Airflow's "
        f"`[core] parallelism` and the pool `{POOL}` must allow as many."
    )
    return f"""# {dag_id(width)}

Aligns a stack of FIB-SEM slices and writes it as a neuroglancer volume
(emprocess workflow version {VERSION}). {shape}

Trigger with a conf; the volume appears at
`precomputed://gs://SOURCE_ng_ID/neuroglancer/jpeg`, and run records
(init.json, transforms, caches, complete.json) in `gs://SOURCE_process/ID/`.
Batch tasks use the pool `{POOL}` and the HTTP connections `ALIGN_CLOUD_RUN`
and `IMG_WRITE`.

| key | default | meaning |
| --- | --- | --- |
{rows}

Legacy keys `project_id` (for `project`), `rawPyramid` (for `createRawPyramid`) and
`mail` (for `email`) are accepted.
"""


def batch_stage(task_fn: Any, name: str, width: int | None, worker_ids: Any) -> Any:
    """One batch stage in the pool: ``{name}_{i}`` for i < ``width``, or with ``width``
    None the mapped task ``name`` expanded over ``worker_ids`` (start_align's XCom)."""
    if width is None:
        return task_fn.override(pool=POOL).expand(worker_id=worker_ids)
    return [task_fn.override(task_id=f"{name}_{i}", pool=POOL)(worker_id=i) for i in range(width)]


def build_dag(width: int | None) -> DAG:
    """The DAG ``emprocess_width{width}_v{VERSION}``, or with ``width`` None ``emprocess_v{VERSION}``."""
    if width is not None and width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    tags = ["emprocess", f"v{VERSION}", "dynamic" if width is None else f"width{width}"]
    with DAG(
        dag_id=dag_id(width),
        schedule=None,
        catchup=False,
        default_args=DEFAULT_ARGS,
        tags=tags,
        doc_md=doc_md(width),
        description="Align FIB-SEM slices and write a neuroglancer volume",
        max_active_runs=MAX_ACTIVE_RUNS,
        max_active_tasks=max_active_tasks(width),
    ) as dag:
        validate = t.validate(dag_width=width)
        window = t.measure_window.override(pool=POOL)()
        create_env = t.create_env()
        with TaskGroup("align"):
            start = t.start_align()
            features = batch_stage(t.features, "features", width, start)
            check_features = t.check_features()
            affines = batch_stage(t.affine, "affine", width, start)
            plan_gaps = t.plan_gaps()
            gap_pairs = batch_stage(t.gap_pairs, "gap_pairs", width, start)
            collect = t.collect()
            slicestats = batch_stage(t.slicestats, "slicestats", width, start)
            plan_intensity = t.plan_intensity()
            writes = batch_stage(t.write, "write", width, start)
            finish_align = t.finish_align()
        with TaskGroup("ngingest"):
            ngmeta = t.write_ngmeta.override(pool=POOL)()
            shards = batch_stage(t.write_ng_shards, "write_ng_shards", width, start)
            finish_ngwrite = t.finish_ngwrite()
        iswritten = t.iswritten()
        cleanup = t.cleanup_images()
        public = t.set_public_read()
        status = t.write_status()

        validate >> window >> create_env >> start
        start >> features
        features >> check_features
        check_features >> affines
        affines >> plan_gaps
        plan_gaps >> gap_pairs
        gap_pairs >> collect
        collect >> slicestats
        slicestats >> plan_intensity
        plan_intensity >> writes
        writes >> finish_align
        finish_align >> ngmeta
        ngmeta >> shards
        shards >> finish_ngwrite
        finish_ngwrite >> iswritten >> cleanup >> public >> status
    # Set after the tasks exist: Airflow deep-copies the DAG's params into every task
    # created under it (two thirds of the parse time of the 750 tasks of emprocess.py),
    # and at run time it merges the DAG's params into each task's anyway.
    dag.params = ParamsDict(params(dynamic=width is None))
    return dag


def build_all() -> list[DAG]:
    """Every DAG of ``emprocess.py``: one per fixed width (sorted), then the dynamic one."""
    return [*(build_dag(w) for w in sorted(WIDTHS)), build_dag(None)]
