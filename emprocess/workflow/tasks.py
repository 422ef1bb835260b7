"""The DAG's tasks: thin Airflow wrappers around :mod:`emprocess.workflow.stages`.

Imported at parse time, so only ``airflow.sdk`` and the standard library are imported
here at module level; each task imports what it needs when it runs. Tasks pass small
JSON: ``measure_window`` returns the run info (``validate``'s, its window settled),
``align.collect`` the canvas; the others pull those by task id, which keeps the graph's
edges exactly CONTRACTS.md's.

XComs go through the api-server, so they are few and small: a batch task writes one
(its timing record with its batch summary, a few hundred bytes, as its return value);
every other task writes its return value and a ``timing`` record. No task's result
is split into one XCom per key (``multiple_outputs=False``; Airflow would infer True
from a ``dict`` return type). ``write_status`` gathers the records into complete.json.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from airflow.sdk import TriggerRule, get_current_context, task

from emprocess.workflow import ALIGN_CONN_ID, EMWRITE_CONN_ID
from emprocess.workflow.taskids import COLLECT, MEASURE_WINDOW, VALIDATE, batch_task_of

if TYPE_CHECKING:
    from emprocess.workflow.stages import RunInfo

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

TIMING = "timing"


def service_url(conn_id: str) -> str:
    """Base URL of the service behind Airflow connection ``conn_id``."""
    from airflow.sdk import BaseHook

    from emprocess.workflow.batch import connection_base_url

    conn = BaseHook.get_connection(conn_id)
    url = connection_base_url(conn.conn_type, conn.host, conn.port, conn.schema)
    log.info("connection %s -> %s", conn_id, urlsplit(url).netloc)
    return url


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def is_batch_task(task_id: str) -> bool:
    """Whether ``task_id`` is a batch task (``align.affine_3``, mapped ``align.write``, ...)."""
    return batch_task_of(task_id) is not None


def timed(fn: F) -> F:
    """Record ``{task_id, map_index, started, finished, batch}``; turn input errors fatal.

    A batch task returns that record (its batch summary inside) as its only XCom; any
    other task pushes it as XCom ``timing`` beside its return value. An
    :class:`~emprocess.errors.InvalidInput` (bad conf, missing slices) or a batch that met
    a client error cannot succeed on retry, so it becomes ``AirflowFailException``.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from airflow.sdk.exceptions import AirflowFailException

        from emprocess.errors import InvalidInput
        from emprocess.workflow.batch import BatchError

        ti = get_current_context()["ti"]
        started = _now()
        try:
            result = fn(*args, **kwargs)
        except InvalidInput as e:
            raise AirflowFailException(str(e)) from e
        except BatchError as e:
            if e.client_error:
                raise AirflowFailException(str(e)) from e
            raise
        record = {
            "task_id": ti.task_id,
            "map_index": ti.map_index,
            "started": started,
            "finished": _now(),
            "batch": result if isinstance(result, dict) and "planned" in result else None,
        }
        if is_batch_task(ti.task_id):
            return record
        ti.xcom_push(key=TIMING, value=record)
        return result

    return wrapper  # type: ignore[return-value]


def _info() -> RunInfo:
    from airflow.sdk.exceptions import AirflowFailException

    from emprocess.workflow.stages import RunInfo

    ti = get_current_context()["ti"]
    data = ti.xcom_pull(task_ids=MEASURE_WINDOW)
    if data is None:
        # Only tasks that run whatever happened upstream (iswritten) get here.
        failed = MEASURE_WINDOW if ti.xcom_pull(task_ids=VALIDATE) else VALIDATE
        raise AirflowFailException(
            f"{failed} did not succeed, so there is no run to check: see the log of "
            f"{failed} for what is wrong with the run's conf or slices"
        )
    return RunInfo.model_validate(data)


def _canvas() -> dict[str, Any]:
    from airflow.sdk.exceptions import AirflowFailException

    canvas: dict[str, Any] | None = get_current_context()["ti"].xcom_pull(task_ids=COLLECT)
    if canvas is None:
        raise AirflowFailException(f"alignment did not finish: {COLLECT} left no canvas")
    return canvas


def _airflow_run_id() -> str:
    return str(get_current_context()["dag_run"].run_id)


# -- tasks ------------------------------------------------------------------------


@task(task_id="validate", retries=0, multiple_outputs=False)
@timed
def validate(dag_width: int | None) -> dict[str, Any]:
    """Check the conf against the schema and the slices in the source bucket."""
    from emprocess.workflow.stages import validate_run

    ctx = get_current_context()
    conf, dag_id = ctx["dag_run"].conf, ctx["dag"].dag_id
    return validate_run(conf, dag_width, dag_id, measure_window=False).to_json()


@task(task_id="measure_window", multiple_outputs=False)
@timed
def measure_window() -> dict[str, Any]:
    """The run info of ``validate`` with its intensity window settled: an ``auto`` window of
    12/16-bit slices from the alignment service's histograms of sampled slices (POST
    /histogram, cached); any other run's info passes through unchanged, nothing sent."""
    from emprocess.workflow.stages import RunInfo
    from emprocess.workflow.window import settle_window

    info = RunInfo.model_validate(get_current_context()["ti"].xcom_pull(task_ids=VALIDATE))
    url = service_url(ALIGN_CONN_ID) if info.window_pending else ""
    return settle_window(info, url).to_json()


@task(task_id="create_env", multiple_outputs=False)
@timed
def create_env() -> dict[str, Any]:
    """Create the run's buckets and RUN_ID/init.json (idempotent)."""
    from emprocess.workflow.stages import create_env as create

    return create(_info(), _airflow_run_id())


@task(task_id="start_align", multiple_outputs=False)
@timed
def start_align() -> list[int]:
    """Open the align stage; returns the worker ids (the dynamic DAG maps over them)."""
    info = _info()
    log.info("%d pairs over %d workers", info.conf.maxz - info.conf.minz, info.width)
    return list(range(info.width))


def _align_url(info: RunInfo) -> str:
    """The alignment service's URL for a run that aligns its own pairs; "" otherwise (the
    align tasks then send nothing: skip_align, or align_from an earlier run)."""
    aligns = not (info.conf.skip_align or info.conf.align_from)
    return service_url(ALIGN_CONN_ID) if aligns else ""


@task(task_id="features", multiple_outputs=False)
@timed
def features(worker_id: int) -> dict[str, Any]:
    """Extract and store this worker's slices' features once (POST /features)."""
    from emprocess.workflow.stages import extract_slice_features

    info = _info()
    url = _align_url(info)
    return extract_slice_features(info, worker_id, url)


@task(task_id="check_features", multiple_outputs=False)
@timed
def check_features() -> dict[str, Any]:
    """Every slice has its features before the pairs are sent."""
    from emprocess.workflow.stages import check_features as check

    return check(_info())


@task(task_id="affine", multiple_outputs=False)
@timed
def affine(worker_id: int) -> dict[str, Any]:
    """Align this worker's pairs z -> z+1 (POST / of the alignment service)."""
    from emprocess.workflow.stages import align_pairs

    info = _info()
    url = _align_url(info)
    return align_pairs(info, worker_id, url)


@task(task_id="plan_gaps", multiple_outputs=False)
@timed
def plan_gaps() -> dict[str, Any]:
    """Plan the second align round (pairs across bad slices) into align/gaps.json."""
    from emprocess.workflow.gaps import plan_gaps as plan

    return plan(_info())


@task(task_id="gap_pairs", multiple_outputs=False)
@timed
def gap_pairs(worker_id: int) -> dict[str, Any]:
    """Align this worker's pairs across bad slices (POST / of the alignment service)."""
    from emprocess.workflow.gaps import align_gap_pairs, has_gap_round

    info = _info()
    url = service_url(ALIGN_CONN_ID) if has_gap_round(info.conf) else ""
    return align_gap_pairs(info, worker_id, url)


@task(task_id="collect", multiple_outputs=False)
@timed
def collect() -> dict[str, Any]:
    """Solve the global transforms from the pairs' answers (sends nothing); returns the canvas."""
    from emprocess.workflow.stages import collect_alignment

    return collect_alignment(_info())


@task(task_id="slicestats", multiple_outputs=False)
@timed
def slicestats(worker_id: int) -> dict[str, Any]:
    """Measure this worker's slices (POST /slicestats of the emwrite service) when the
    run's ``intensity_correction`` is "slice"; otherwise return at once."""
    from emprocess.workflow.corrections import measure_slices
    from emprocess.workflow.stages import read_transforms

    info = _info()
    conf = info.conf
    if conf.intensity_correction == "none":
        return measure_slices(
            conf, {}, info.slice_size_xy, "", worker_id=worker_id, width=info.width
        )
    return measure_slices(
        conf,
        read_transforms(conf),
        info.slice_size_xy,
        service_url(EMWRITE_CONN_ID),
        bbox_xy=_canvas()["bbox"],
        worker_id=worker_id,
        width=info.width,
    )


@task(task_id="plan_intensity", multiple_outputs=False)
@timed
def plan_intensity() -> dict[str, Any] | None:
    """Each slice's gain and offset from the measurements, into align/intensity.csv
    (None when the run does not correct)."""
    from emprocess.workflow.corrections import record_intensity
    from emprocess.workflow.stages import read_transforms

    info = _info()
    conf = info.conf
    if conf.intensity_correction == "none":
        return None
    return record_intensity(conf, read_transforms(conf), info.slice_size_xy, _canvas()["bbox"])


@task(task_id="write", multiple_outputs=False)
@timed
def write(worker_id: int) -> dict[str, Any]:
    """Warp, CLAHE and tile this worker's slices (POST /alignedslice)."""
    from emprocess.workflow.stages import write_slices

    return write_slices(_info(), _canvas(), worker_id, service_url(EMWRITE_CONN_ID))


@task(task_id="finish_align", multiple_outputs=False)
@timed
def finish_align() -> dict[str, Any]:
    """Close the align stage: every slice must have been written; record the quality along z."""
    from emprocess.workflow.quality import record_quality
    from emprocess.workflow.stages import check_slices_written, read_transforms

    info, canvas = _info(), _canvas()
    done = check_slices_written(info, canvas)
    transforms = read_transforms(info.conf)
    done["quality"] = record_quality(info.conf, transforms, info.slice_size_xy, canvas["bbox"])
    return done


@task(task_id="write_ngmeta", multiple_outputs=False)
@timed
def write_ngmeta() -> dict[str, Any]:
    """Write the neuroglancer ``info`` files (POST /ngmeta)."""
    from emprocess.workflow.stages import write_ngmeta as ngmeta

    return ngmeta(_info(), _canvas(), service_url(EMWRITE_CONN_ID))


@task(task_id="write_ng_shards", multiple_outputs=False)
@timed
def write_ng_shards(worker_id: int) -> dict[str, Any]:
    """Build this worker's 1024^3 cubes (POST /ngshard)."""
    from emprocess.workflow.stages import write_ng_shards as shards

    return shards(_info(), _canvas(), worker_id, service_url(EMWRITE_CONN_ID))


@task(task_id="finish_ngwrite", multiple_outputs=False)
@timed
def finish_ngwrite() -> dict[str, Any]:
    """Close the ngingest stage with a count of the cubes."""
    from emprocess.workflow.payloads import plan_cube_starts

    conf = _info().conf
    cubes = len(plan_cube_starts(_canvas()["bbox"], conf.minz, conf.maxz))
    log.info("%d cubes requested", cubes)
    return {"cubes": cubes}


@task.short_circuit(task_id="iswritten", trigger_rule=TriggerRule.ALL_DONE, retries=0)
@timed
def iswritten() -> bool:
    """Whether the volume is complete, judged by its outputs once ngingest is done either way.

    Runs even when an ngingest task failed. A complete volume lets cleanup, public
    read and the status record go ahead; an incomplete one fails this task, naming
    what is missing, so the run ends failed (not "success" with skipped tasks) and the
    tmp bucket keeps its tiles for a re-run.
    """
    from airflow.sdk.exceptions import AirflowFailException

    from emprocess.workflow.stages import check_written

    ok, message = check_written(_info(), _canvas())
    if not ok:
        raise AirflowFailException(message)
    log.info(message)
    return True


@task(task_id="cleanup_images", multiple_outputs=False)
@timed
def cleanup_images() -> str:
    """Put a lifecycle delete rule on the tmp bucket."""
    from emprocess.workflow.stages import cleanup_images as cleanup

    return cleanup(_info())


@task(task_id="set_public_read", multiple_outputs=False)
@timed
def set_public_read() -> str:
    """Make the neuroglancer bucket public-read, only when conf ``public`` is true."""
    from emprocess.workflow.stages import set_public_read as make_public

    return make_public(_info())


@task(task_id="write_status", multiple_outputs=False)
@timed
def write_status() -> dict[str, Any]:
    """Write RUN_ID/complete.json and email the conf's address when SMTP is configured."""
    from emprocess.workflow.stages import write_status as status

    ctx = get_current_context()
    ti, ids = ctx["ti"], list(ctx["dag"].task_ids)
    batch_ids = [i for i in ids if is_batch_task(i)]
    records = ti.xcom_pull(task_ids=[i for i in ids if i not in batch_ids], key=TIMING) or []
    records += ti.xcom_pull(task_ids=batch_ids) or []
    records = [r for r in records if r]
    doc = status(_info(), _canvas(), records, _airflow_run_id())
    email = doc["conf"].get("email")
    doc["email"] = send_status_email(email, doc) if email else "no email in conf"
    return {k: doc[k] for k in ("neuroglancer", "bbox", "elapsed_s", "email")}


def send_status_email(to: str, doc: dict[str, Any]) -> str:
    """Send the "run complete" message through Airflow's SMTP connection, if there is one."""
    from emprocess.workflow.notify import send_mail
    from emprocess.workflow.stages import status_email

    subject, body = status_email(doc)
    return send_mail(to, subject, body)
