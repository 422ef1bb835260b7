"""Which cache objects answer which planned mini-tasks, and what a stage's times say.

A stage's plan comes from the run's conf with the workflow's own ``plan_*`` functions,
so the exact cache keys (``NAME.DIGEST.json``) of this code's requests are known; a
run made by code whose requests differ is still counted, by mini-task name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from emprocess.answers import AnswerCache
from emprocess.layout import (
    NGMETA,
    STAGE_AFFINE,
    STAGE_NGMETA,
    STAGE_NGSHARD,
    STAGE_WRITE,
    cube_name,
    pair_name,
    slice_task_name,
)
from emprocess.records import AnswerRecord
from emprocess.report.model import StageProgress
from emprocess.storage import ObjectInfo
from emprocess.workflow.batch import MiniTask
from emprocess.workflow.conf import RunConf
from emprocess.workflow.payloads import (
    neighbour_pairs,
    ngmeta_task,
    plan_align_pairs,
    plan_aligned_slices,
    plan_cube_starts,
    plan_ng_shards,
    plan_pair_tasks,
)

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """The planned mini-tasks of one stage: their names, and exact cache keys if known."""

    names: list[str] | None
    keys: dict[str, str] | None = None  # name -> NAME.DIGEST.json


@dataclass
class Counted:
    """The cache objects that answer a stage's planned mini-tasks, by name."""

    objects: dict[str, ObjectInfo]  # name -> cache object
    stale: int
    matched_by: str


def canvas_from_transforms(
    transforms: Mapping[int, Sequence[float]], slice_size_xy: Sequence[int]
) -> tuple[int, int]:
    """The canvas (width, height) collect fitted: the box of all transformed slice corners,
    as :func:`emprocess.workflow.compose.fit_canvas` computes it (for runs whose
    canvas.json is missing; transforms.json is already shifted to start at (0, 0))."""
    from emprocess.workflow.compose import fit_canvas

    return fit_canvas(transforms, (int(slice_size_xy[0]), int(slice_size_xy[1])))[1]


def _keys(tasks: Iterable[MiniTask]) -> dict[str, str]:
    return {t.name: t.cache_key() for t in tasks}


def plan_stages(
    conf: Mapping[str, Any],
    run_conf: RunConf | None,
    transforms: Mapping[int, list[float]] | None,
    bbox: tuple[int, int] | None,
    window: tuple[float, float] | None = None,
    fill: Mapping[int, int | None] | None = None,
    gap_pairs: Sequence[tuple[int, int]] = (),
) -> dict[str, Plan]:
    """Each stage's planned names, and with a parsable conf this code's exact cache keys.

    ``window`` is the run's intensity window (init.json ``intensity_window``): it is part
    of the alignment and /alignedslice requests, so of their cache keys. ``fill`` is
    align/fill.json (bad slice -> stand-in), which shapes the write requests.
    ``gap_pairs`` are the second align round's pairs (align/gaps.json), align pairs too.
    """
    minz, maxz = int(conf["minz"]), int(conf["maxz"])
    skip = bool(conf.get("skip_align", False) or conf.get("align_from"))
    k = int(conf.get("neighbors", 1) or 1)
    pairs = (
        [] if skip else [pair_name(a, b) for a, b in [*neighbour_pairs(minz, maxz, k), *gap_pairs]]
    )
    slices = [slice_task_name(z) for z in range(minz, maxz + 1)]
    cubes = None
    if bbox is not None:
        cubes = [cube_name(x, y, z) for x, y, z in plan_cube_starts(bbox, minz, maxz)]
    plans = {
        STAGE_AFFINE: Plan(pairs),
        STAGE_WRITE: Plan(slices),
        STAGE_NGMETA: Plan([NGMETA]),
        STAGE_NGSHARD: Plan(cubes),
    }
    if run_conf is None:
        return plans
    if not skip:
        plans[STAGE_AFFINE].keys = _keys(
            [*plan_align_pairs(run_conf, window), *plan_pair_tasks(run_conf, gap_pairs, window)]
        )
    if bbox is not None:
        if transforms is not None and len(transforms) == len(slices):
            written = plan_aligned_slices(run_conf, transforms, bbox, window, fill)
            plans[STAGE_WRITE].keys = _keys(written)
            # A cube's key covers the write requests of its tiles (as the DAG's).
            plans[STAGE_NGSHARD].keys = _keys(plan_ng_shards(run_conf, bbox, written))
        plans[STAGE_NGMETA].keys = _keys([ngmeta_task(run_conf, bbox)])
    for plan in plans.values():
        if plan.keys is not None:
            plan.names = list(plan.keys)  # the workflow's own names win
    return plans


def count_answers(stage: str, by_key: Mapping[str, ObjectInfo], plan: Plan) -> Counted:
    """Match the listed cache objects (by key relative to the cache prefix,
    :meth:`AnswerCache.listing`) to the plan: by exact key if they match, else by name."""
    if plan.names is None:  # totals unknown: count whatever answers are there, by name
        objects = _latest_by_name(by_key, None)
        return Counted(objects, 0, "name")
    wanted = set(plan.names)
    by_name = _latest_by_name(by_key, wanted)
    if plan.keys is not None:
        exact = {name: by_key[key] for name, key in plan.keys.items() if key in by_key}
        if exact or not by_name:
            return Counted(exact, len(by_key) - len(exact), "key")
        log.warning(
            "%s: %d cache objects answer the planned mini-tasks by name but none by exact "
            "key; the run was made by code sending other requests: counting by name",
            stage, len(by_name),
        )  # fmt: skip
    return Counted(by_name, len(by_key) - len(by_name), "name")


def _latest_by_name(
    by_key: Mapping[str, ObjectInfo], wanted: set[str] | None
) -> dict[str, ObjectInfo]:
    out: dict[str, ObjectInfo] = {}
    for rel, info in by_key.items():
        name = AnswerCache.name_of(rel)
        if name is None or (wanted is not None and name not in wanted):
            continue
        if name not in out or info.updated > out[name].updated:
            out[name] = info
    return out


def _rate_per_min(times: Sequence[datetime]) -> float | None:
    if len(times) < 2:
        return None
    span_s = (times[-1] - times[0]).total_seconds()
    return (len(times) - 1) / span_s * 60.0 if span_s > 0 else None


def stage_progress(
    stage: str,
    label: str,
    cache_url: str,
    counted: Counted,
    plan: Plan,
    *,
    running: bool,
    now: datetime,
    failures: int | None,
    records: Mapping[str, AnswerRecord] | None,
    skipped: bool,
) -> StageProgress:
    """A stage's progress: counts, rate over its finish times, ETA (only while ``running``).

    Args:
        failures: unanswered mini-tasks with failure records, or None when unknown.
        records: the counted cache records by name, or None when they were not read.
    """
    times = tuple(sorted(i.updated for i in counted.objects.values()))
    total = None if plan.names is None else len(plan.names)
    done = len(times)
    rate = _rate_per_min(times)
    eta = None
    if running and rate and total is not None and done < total:
        eta = now + timedelta(minutes=(total - done) / rate)
    if total is not None and done >= total:
        failures = 0  # every planned mini-task has its answer
    retried = attempts = mean_s = None
    if records is not None:
        tries = [r.attempts for r in records.values()]
        retried, attempts = sum(1 for n in tries if n > 1), sum(tries)
        secs = [r.elapsed_s for r in records.values() if r.elapsed_s is not None]
        mean_s = round(sum(secs) / len(secs), 3) if secs else None
    return StageProgress(
        name=stage,
        label=label,
        cache_url=cache_url,
        done=done,
        total=total,
        finish_times=times,
        rate_per_min=rate,
        eta=eta,
        retried=retried,
        attempts=attempts,
        mean_request_s=mean_s,
        failures=failures,
        stale=counted.stale,
        matched_by=counted.matched_by,
        skipped=skipped,
    )
