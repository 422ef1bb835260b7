"""Per-slice intensity correction of a run: measure every slice, decide the mapping once, record it.

With ``intensity_correction: slice``, the batch tasks ``align.slicestats_{i}`` (after
``collect``, which fixes the transforms) measure each slice's mean and spread in the
canvas's common area (one POST /slicestats mini-task per slice, worker i sending those
with index % width == i, cached under ``align/stats_cache/`` like every stage's answers);
``align.plan_intensity`` then reads the answers, plans each slice's gain and offset
(:func:`emprocess.kernels.normalise.plan_gain_offset`) and records them in
``align/intensity.csv``; the write stage sends each slice's pair in its /alignedslice
request. Without the option those tasks return at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from emprocess.errors import EmprocessError, InvalidInput
from emprocess.kernels.normalise import SliceStats, common_area, footprint, plan_gain_offset
from emprocess.layout import INTENSITY, STAGE_SLICESTATS, STATS_CACHE, slice_task_name
from emprocess.models import SliceStatsRequest
from emprocess.records.tables import IntensityRow
from emprocess.settings import HttpEnv
from emprocess.workflow.batch import (
    BatchSummary,
    MiniTask,
    read_answered,
    run_batch,
)
from emprocess.workflow.conf import RunConf

log = logging.getLogger(__name__)

STAGE = STAGE_SLICESTATS


def run_common_area(
    transforms: Mapping[int, Sequence[float]],
    slice_size_xy: tuple[int, int],
    bbox_xy: Sequence[int] | None = None,
) -> tuple[int, int, int, int]:
    """Canvas box (x0, y0, x1, y1) every slice covers; with ``bbox_xy``, the whole canvas
    when there is no such box (a drift larger than the slice: each slice is then measured
    on its own pixels wherever they are)."""
    w, h = slice_size_xy
    try:
        return common_area([footprint(t, w, h) for t in transforms.values()])
    except InvalidInput:
        if bbox_xy is None:
            raise
        log.warning("the slices have no common area: measuring the whole canvas")
        return 0, 0, int(bbox_xy[0]), int(bbox_xy[1])


def plan_slice_stats(
    conf: RunConf,
    transforms: Mapping[int, Sequence[float]],
    area: Sequence[int],
) -> list[MiniTask]:
    """One POST /slicestats per slice z (its own pixels at its transform); index = z - minz."""
    return [
        MiniTask(
            index=z - conf.minz,
            name=slice_task_name(z),
            path="/slicestats",
            payload=SliceStatsRequest(
                img=conf.slice_name(z),
                dest=conf.source,
                transform=[float(v) for v in transforms[z]],
                area=[int(v) for v in area],
            ).payload(),
        )
        for z in range(conf.minz, conf.maxz + 1)
    ]


def measure_slices(
    conf: RunConf,
    transforms: Mapping[int, Sequence[float]],
    slice_size_xy: tuple[int, int],
    base_url: str,
    settings: HttpEnv | None = None,
    bbox_xy: Sequence[int] | None = None,
    worker_id: int = 0,
    width: int = 1,
) -> dict[str, Any]:
    """Batch task ``slicestats_{i}``: measure this worker's slices (POST /slicestats).

    Nothing is sent when the run does not correct (``intensity_correction`` "none").

    Returns:
        The batch summary (:class:`~emprocess.workflow.batch.BatchSummary` as JSON).
    """
    if conf.intensity_correction == "none":
        return BatchSummary(STAGE, worker_id, width, 0).to_json()
    area = run_common_area(transforms, slice_size_xy, bbox_xy)
    return run_batch(
        plan_slice_stats(conf, transforms, area),
        base_url=base_url,
        cache_url=conf.layout.process_url(STATS_CACHE),
        worker_id=worker_id,
        width=width,
        stage=STAGE,
        settings=settings,
        failure_url=conf.layout.failure_url(STAGE),
    ).to_json()


def record_intensity(
    conf: RunConf,
    transforms: Mapping[int, Sequence[float]],
    slice_size_xy: tuple[int, int],
    bbox_xy: Sequence[int] | None = None,
) -> dict[str, Any] | None:
    """``plan_intensity``: plan the gains and offsets from the measurements, write
    align/intensity.csv. Computes only; None when the run does not correct.

    Returns:
        ``{"area": [x0, y0, x1, y1], "gain": [min, max], "offset": [min, max]}``.

    Raises:
        EmprocessError: naming the slices that have not been measured.
    """
    if conf.intensity_correction == "none":
        return None
    area = run_common_area(transforms, slice_size_xy, bbox_xy)
    tasks = plan_slice_stats(conf, transforms, area)
    cache = conf.layout.process_url(STATS_CACHE)
    answers = read_answered(tasks, cache, "slices' measurements", "align.slicestats")
    stats = {
        z: SliceStats(
            float(answers[slice_task_name(z)]["mean"]),
            float(answers[slice_task_name(z)]["std"]),
            int(answers[slice_task_name(z)]["pixels"]),
        )
        for z in range(conf.minz, conf.maxz + 1)
    }
    table = plan_gain_offset(stats)
    conf.layout.records.write_intensity(
        IntensityRow(
            z=z, mean=s.mean, std=s.std, pixels=s.pixels, gain=table[z][0], offset=table[z][1]
        )
        for z, s in sorted(stats.items())
    )
    gains = [g for g, _ in table.values()]
    offsets = [o for _, o in table.values()]
    summary = {
        "area": list(area),
        "gain": [min(gains), max(gains)],
        "offset": [min(offsets), max(offsets)],
    }
    log.info("intensity correction of %d slices: %s", len(table), summary)
    return summary


def measure_intensity(
    conf: RunConf,
    transforms: Mapping[int, Sequence[float]],
    slice_size_xy: tuple[int, int],
    base_url: str,
    settings: HttpEnv | None = None,
    bbox_xy: Sequence[int] | None = None,
) -> dict[str, Any] | None:
    """Both steps in one process (tests, tools): :func:`measure_slices` as one worker,
    then :func:`record_intensity`."""
    measure_slices(conf, transforms, slice_size_xy, base_url, settings, bbox_xy)
    return record_intensity(conf, transforms, slice_size_xy, bbox_xy)


def read_gain_offset(conf: RunConf) -> dict[int, tuple[float, float]] | None:
    """Slice z -> (gain, offset) from align/intensity.csv; None when the run does not correct.

    Raises:
        EmprocessError: when the run corrects but align.plan_intensity has not recorded the table.
    """
    if conf.intensity_correction == "none":
        return None
    rows = conf.layout.records.read_intensity()
    if rows is None:
        raise EmprocessError(
            f"intensity_correction {conf.intensity_correction!r} but "
            f"{conf.layout.process_url(INTENSITY)} is missing: "
            "align.plan_intensity writes it from the slices' measurements"
        )
    return {r.z: (r.gain, r.offset) for r in rows}
