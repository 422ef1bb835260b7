"""Read one run's records from its process bucket (and nothing else) into a :class:`RunReport`.

What is read, all under ``gs://SOURCE_process/RUN_ID/``: init.json (the conf: totals),
align/canvas.json (the canvas collect chose; for older runs recomputed from
align/transforms.json), align/qc.csv (QC), complete.json (finished), one listing per
cache prefix (align/affine_cache/, align/write_cache/, neuroglancer/cache/): the creation
time of each cache object is when its mini-task finished, and failures/ (the batch
helper's records of mini-tasks that finally failed). With ``read_records`` each counted
cache object is read too (attempts, request seconds, QC before collect): one read per
mini-task, so it costs more on big runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from emprocess import storage
from emprocess.answers import AnswerCache
from emprocess.errors import EmprocessError, InvalidBucketName, InvalidInput, NotFound
from emprocess.layout import (
    AFFINE_CACHE,
    CANVAS,
    COMPLETE,
    FAILURES,
    FILL,
    INIT,
    NG_CACHE,
    NGMETA,
    QC,
    STAGE_AFFINE,
    STAGE_NGMETA,
    STAGE_NGSHARD,
    STAGE_WRITE,
    TRANSFORMS,
    WRITE_CACHE,
    RunLayout,
    parse_pair_name,
)
from emprocess.records import (
    AnswerRecord,
    CompleteRecord,
    FailureRecord,
    RunRecords,
    failure_name,
    parse_record,
)
from emprocess.records import (
    MalformedRecord as MalformedRecord,  # raised by load_run: importable from here too
)
from emprocess.report.model import (
    FAILED,
    FINISHED,
    RUNNING,
    STALLED,
    FailureNote,
    PairQC,
    RunReport,
    duration,
    iso,
)
from emprocess.report.progress import (
    Counted,
    canvas_from_transforms,
    count_answers,
    plan_stages,
    stage_progress,
)
from emprocess.report.qc import qc_from_answers, qc_from_rows
from emprocess.report.quality import read_quality
from emprocess.storage import ObjectInfo
from emprocess.workflow.conf import RunConf, parse_conf

log = logging.getLogger(__name__)

DEFAULT_MIN_INLIERS = 50
DEFAULT_MAX_RESIDUAL_PX = 2.0
DEFAULT_STALL_AFTER_S = 1800.0
"""A run with no new record for this long (and no complete.json) is stalled."""

AUTO_RECORDS_MAX = 5000
"""``read_records=None`` reads the cache records only when there are at most this many."""

FAILURES_SHOWN = 10
"""Failure records read (for their message) per stage."""

STAGES: tuple[tuple[str, str, str], ...] = (
    (STAGE_AFFINE, "align pairs", AFFINE_CACHE),
    (STAGE_WRITE, "aligned slices", WRITE_CACHE),
    (STAGE_NGMETA, "ngmeta (info)", NG_CACHE),
    (STAGE_NGSHARD, "ng shards", NG_CACHE),
)
"""(stage, label, cache prefix) in run order; stage names are the batch helper's."""

T = TypeVar("T")


class RunNotFound(NotFound):
    """The process bucket has no init.json for the run."""


def _bucket_of(source: str) -> str:
    name = source.removeprefix("gs://").strip("/")
    try:
        return storage.check_bucket_name(name)
    except InvalidBucketName as e:
        raise InvalidInput(f"source {source!r} is not a bucket name: {e}") from None


def _check_run_id(run_id: str) -> str:
    if not run_id or "/" in run_id or run_id in {".", ".."}:
        raise InvalidInput(f"run id {run_id!r} must be one non-empty path segment")
    return run_id


def _read(
    records: RunRecords, key: str, read: Callable[[], T | None], times: list[datetime]
) -> T | None:
    """Record ``key`` read by ``read`` (None when absent); its update time goes to ``times``."""
    info = records.listed(key)
    if info is None:
        return None
    times.append(info.updated)
    return read()


def _pmap(fn: Callable[[str], T], items: Sequence[str], threads: int) -> list[T]:
    if threads <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(fn, items))


def _failures(
    layout: RunLayout, done: Mapping[str, set[str]], threads: int
) -> tuple[dict[str, int], list[FailureNote]]:
    """Failure records of mini-tasks that still have no answer, per stage."""
    failures = layout.process_url(FAILURES) + "/"
    prefix = storage.parse_url(failures).key
    outstanding: dict[str, list[ObjectInfo]] = {}
    for info in storage.list_objects(failures):
        stage, _, fn = info.key[len(prefix) :].partition("/")
        name = failure_name(fn)
        if stage in done and name and name not in done[stage]:
            outstanding.setdefault(stage, []).append(info)
    counts = {stage: len(infos) for stage, infos in outstanding.items()}
    shown = [info for infos in outstanding.values() for info in infos[:FAILURES_SHOWN]]

    def read(key: str) -> str:
        url = storage.bucket_url(bucket, key)
        try:
            return parse_record(FailureRecord, storage.read_bytes(url), url).error
        except EmprocessError as e:
            log.warning("cannot read failure record %s: %s", key, e)
            return "(no message)"

    bucket = layout.process
    errors = _pmap(read, [info.key for info in shown], threads)
    notes = []
    for info, error in zip(shown, errors, strict=True):
        stage, _, fn = info.key[len(prefix) :].partition("/")
        notes.append(FailureNote(stage, failure_name(fn), error[:500], info.updated))
    return counts, notes


def _read_cache_records(
    bucket: str, counted: Mapping[str, Counted], threads: int
) -> dict[str, dict[str, AnswerRecord]]:
    """Each counted cache object's record, by stage and mini-task name (unreadable ones
    left out, with a warning)."""

    def read(key: str) -> AnswerRecord | None:
        url = storage.bucket_url(bucket, key)
        try:
            return parse_record(AnswerRecord, storage.read_bytes(url), url)
        except EmprocessError as e:
            log.warning("cannot read cache record %s: %s", key, e)
            return None

    out = {}
    for stage, c in counted.items():
        names = sorted(c.objects)
        docs = _pmap(read, [c.objects[n].key for n in names], threads)
        out[stage] = {n: d for n, d in zip(names, docs, strict=True) if d is not None}
    return out


def _judge_state(
    complete: CompleteRecord | None,
    last_activity: datetime,
    now: datetime,
    stall_after_s: float,
    failure_counts: Mapping[str, int],
) -> tuple[str, str]:
    """(state, reason): finished with complete.json; stalled or failed after a long silence."""
    idle_s = (now - last_activity).total_seconds()
    if complete is not None:
        return FINISHED, (
            f"complete.json written; finished {complete.finished} after "
            f"{duration(complete.elapsed_s)}"
        )
    if idle_s <= stall_after_s:
        return RUNNING, f"last record {duration(max(0.0, idle_s))} ago"
    reason = (
        f"no new record for {duration(idle_s)} (last at {iso(last_activity)}): the run "
        "failed or stalled; see its tasks in Airflow"
    )
    if failure_counts:
        return (
            FAILED,
            reason + f"; unanswered mini-tasks with failure records: {dict(failure_counts)}",
        )
    return STALLED, reason


def load_run(
    source: str,
    run_id: str,
    *,
    now: datetime | None = None,
    min_inliers: int = DEFAULT_MIN_INLIERS,
    max_residual_px: float = DEFAULT_MAX_RESIDUAL_PX,
    stall_after_s: float = DEFAULT_STALL_AFTER_S,
    read_records: bool | None = None,
    threads: int = 16,
) -> RunReport:
    """Describe run ``run_id`` from ``SOURCE_process`` alone: progress, state and QC.

    Args:
        source: the run's source bucket (conf ``source``), with or without ``gs://``.
        run_id: the run's id (conf ``id``).
        now: the time to judge the state and ETAs against (default: now, UTC).
        min_inliers: flag pairs whose model has fewer inlier matches.
        max_residual_px: flag pairs whose mean inlier residual is larger (pixels as
            matched, i.e. at 1/downsample_factor).
        stall_after_s: with no new record for this long (and no complete.json) the run
            counts as stalled.
        read_records: also read every counted cache object (attempts, request seconds,
            QC before collect): one read per mini-task. None (the default) reads them when
            there are at most ``AUTO_RECORDS_MAX``.
        threads: concurrent reads.

    Raises:
        RunNotFound: when the process bucket has no RUN_ID/init.json.
        BucketNotFound: when SOURCE_process does not exist.
        InvalidInput: for a source or run id that cannot name a bucket or folder.
    """
    bucket = _bucket_of(source)
    run_id = _check_run_id(run_id)
    now = now or datetime.now(UTC)
    layout = RunLayout(bucket, run_id)
    process = layout.process_url()
    run_records = layout.records
    times: list[datetime] = []
    init = _read(run_records, INIT, run_records.read_init, times)
    if init is None:
        raise RunNotFound(
            f"no {process}/init.json ({storage.backend_description()}): the run has not "
            "passed create_env yet, or the source or run id is wrong"
        )
    conf: dict[str, Any] = dict(init.conf)
    if "minz" not in conf or "maxz" not in conf:
        raise InvalidInput(f"{process}/init.json has no conf minz/maxz: {sorted(conf)}")
    run_conf: RunConf | None
    try:
        run_conf = parse_conf(conf)
    except InvalidInput as e:
        log.warning("conf of %s does not parse with this code (%s); counting by name", run_id, e)
        run_conf = None
    complete = _read(run_records, COMPLETE, run_records.read_complete, times)
    canvas = _read(run_records, CANVAS, run_records.read_canvas, times)
    transforms = _read(run_records, TRANSFORMS, run_records.read_transforms, times)
    qc_rows = _read(run_records, QC, run_records.read_qc, times)

    slice_qc = [row.to_json() for row in run_records.read_slices() or []]
    summary = canvas.alignment if canvas is not None else None
    if summary is None and complete is not None:
        summary = complete.alignment
    alignment = None if summary is None else summary.to_json()

    bbox: tuple[int, int] | None = None
    if canvas is not None:
        bbox = canvas.bbox_xy
    elif complete is not None and complete.bbox:
        bbox = (complete.bbox[0], complete.bbox[1])
    elif transforms and init.slice_size_xy:
        bbox = canvas_from_transforms(transforms, init.slice_size_xy)
    iw = init.intensity_window
    window = (iw[0], iw[1]) if iw is not None and len(iw) == 2 else None
    fill = run_records.read_fill() if run_records.listed(FILL) is not None else None
    gaps = run_records.read_gaps()
    gap_pairs = [] if gaps is None else list(gaps.pairs)
    plans = plan_stages(conf, run_conf, transforms, bbox, window, fill, gap_pairs)

    listings: dict[str, dict[str, ObjectInfo]] = {}  # ngmeta and ngshard share one prefix
    counted: dict[str, Counted] = {}
    for stage, _, prefix in STAGES:
        if prefix not in listings:
            listings[prefix] = AnswerCache(layout.process_url(prefix)).listing()
        listing = listings[prefix]
        if prefix == NG_CACHE:
            is_meta = stage == STAGE_NGMETA
            listing = {
                k: i for k, i in listing.items() if (AnswerCache.name_of(k) == NGMETA) == is_meta
            }
        counted[stage] = count_answers(stage, listing, plans[stage])
        times.extend(i.updated for i in counted[stage].objects.values())

    failure_counts, failure_notes = _failures(
        layout, {s: set(c.objects) for s, c in counted.items()}, threads
    )
    times.extend(f.when for f in failure_notes)
    last_activity = max(times)
    answered = sum(len(c.objects) for c in counted.values())
    if read_records is None:
        read_records = answered <= AUTO_RECORDS_MAX
        if not read_records:
            log.info("%d cache records: not read (read_records=True reads them)", answered)
    records = _read_cache_records(layout.process, counted, threads) if read_records else {}
    state, reason = _judge_state(complete, last_activity, now, stall_after_s, failure_counts)
    stages = tuple(
        stage_progress(
            stage,
            label,
            layout.process_url(prefix) + "/",
            counted[stage],
            plans[stage],
            running=state == RUNNING,
            now=now,
            failures=failure_counts.get(stage),
            records=records.get(stage),
            skipped=stage == STAGE_AFFINE and bool(conf.get("skip_align", False)),
        )
        for stage, label, prefix in STAGES
    )

    qc: list[PairQC] = []
    qc_source = None
    if qc_rows is not None:
        qc, qc_source = qc_from_rows(qc_rows, min_inliers, max_residual_px), "qc.csv"
    elif records.get(STAGE_AFFINE):
        pairs = {name: parse_pair_name(name) for name in records[STAGE_AFFINE]}
        answers = {  # the (z, z + 1) pairs, as qc.csv's first rows
            pairs[name][0]: r.response
            for name, r in records[STAGE_AFFINE].items()
            if r.response is not None and pairs[name][1] == pairs[name][0] + 1
        }
        qc, qc_source = qc_from_answers(answers, min_inliers, max_residual_px), "affine_cache"

    report = RunReport(
        source=bucket,
        run_id=run_id,
        process_url=process,
        backend=storage.backend_description(),
        generated=now,
        state=state,
        state_reason=reason,
        last_activity=last_activity,
        init=init.to_json(),
        complete=None if complete is None else complete.to_json(),
        bbox_xy=bbox,
        stages=stages,
        qc=tuple(qc),
        qc_source=qc_source,
        min_inliers=min_inliers,
        max_residual_px=max_residual_px,
        failures=tuple(failure_notes),
        slice_qc=tuple(slice_qc),
        alignment=alignment,
        slice_ncc=read_quality(layout),
    )
    log.info(
        "run %s: %s; %s",
        run_id, state, ", ".join(f"{s.name} {s.done}/{s.total}" for s in stages),
    )  # fmt: skip
    return report
