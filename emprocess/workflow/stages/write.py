"""The write stages: aligned slices as tiles (``write_{i}``, ``finish_align``), then the
neuroglancer volume from them (``write_ngmeta``, ``write_ng_shards_{i}``, ``iswritten``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from emprocess import storage
from emprocess.errors import EmprocessError
from emprocess.layout import (
    NG_CACHE,
    NGMETA,
    STAGE_NGMETA,
    STAGE_NGSHARD,
    STAGE_WRITE,
    WRITE_CACHE,
    slice_task_name,
    tiles_key,
)
from emprocess.settings import HttpEnv
from emprocess.volume import TiledSlices, info_url
from emprocess.workflow.batch import MiniTask, cached_keys, select_worker
from emprocess.workflow.payloads import (
    Share,
    cube_slices,
    ngmeta_task,
    plan_aligned_slices,
    plan_ng_shards,
    shard_slices,
)
from emprocess.workflow.stages.align import read_fill, read_transforms
from emprocess.workflow.stages.common import RunInfo, _names, _send


def write_plan(
    info: RunInfo, canvas: Mapping[str, Any], zs: Iterable[int] | None = None
) -> list[MiniTask]:
    """The run's /alignedslice requests (of slices ``zs`` only, if given), from its
    transforms.json, fill.json and canvas."""
    from emprocess.workflow.corrections import read_gain_offset

    conf = info.conf
    return plan_aligned_slices(
        conf,
        read_transforms(conf),
        canvas["bbox"],
        info.intensity_window,
        read_fill(conf),
        zs,
        read_gain_offset(conf),
    )


def shard_plan(info: RunInfo, canvas: Mapping[str, Any], share: Share = None) -> list[MiniTask]:
    """The run's /ngshard requests (one batch task's, with ``share``), each keyed on the
    write requests of the tiles it reads: only those of its cubes' slices are planned."""
    bbox = canvas["bbox"]
    written = write_plan(
        info, canvas, None if share is None else shard_slices(info.conf, bbox, share)
    )
    return plan_ng_shards(info.conf, bbox, written, share)


def write_slices(
    info: RunInfo,
    canvas: Mapping[str, Any],
    worker_id: int,
    base_url: str,
    settings: HttpEnv | None = None,
) -> dict[str, Any]:
    """Batch task ``write_{i}``: /alignedslice for this worker's slices (only those planned)."""
    conf = info.conf
    select_worker([], worker_id, info.width)  # a worker outside the width is refused
    tasks = write_plan(info, canvas, range(conf.minz + worker_id, conf.maxz + 1, info.width))

    def redo(cached: list[MiniTask]) -> set[str]:
        return tiles_to_rewrite(info, canvas, cached)

    return _send(
        info, tasks, STAGE_WRITE, WRITE_CACHE, base_url, settings, worker_id, info.width, redo
    )


def tiles_to_rewrite(
    info: RunInfo, canvas: Mapping[str, Any], cached: Sequence[MiniTask]
) -> set[str]:
    """Of the slices ``cached`` (answered before), those whose tiles are gone but are still
    needed: read by a cube not yet written.

    The tmp bucket's lifecycle deletes the tiles once the volume is done; a cleared or
    re-triggered run rewrites them only for the cubes it must (re)build, so a finished
    run triggered again sends nothing. Only a batch task with cached answers asks (a
    retry, a re-triggered run), so a first run plans and lists nothing here.
    """
    conf = info.conf
    done = cached_keys(conf.layout.process_url(NG_CACHE))
    cubes = shard_plan(info, canvas)
    mine = {t.index + conf.minz for t in cached}
    needed = {
        z
        for t in cubes
        if t.cache_key() not in done
        for z in cube_slices(conf, t.payload["start"][2])
        if z in mine
    }
    if not needed:
        return set()
    prefix = TiledSlices.channel(conf.layout.tmp).folder_url
    present = {k.rsplit("/", 1)[-1] for k in storage.list_keys(prefix)}
    return {slice_task_name(z) for z in needed if tiles_key(z) not in present}


def check_slices_written(info: RunInfo, canvas: Mapping[str, Any]) -> dict[str, Any]:
    """``finish_align``: every slice has its /alignedslice answer cached (one listing).

    Raises:
        EmprocessError: naming the slices without an answer.
    """
    conf = info.conf
    tasks = write_plan(info, canvas)
    done = cached_keys(conf.layout.process_url(WRITE_CACHE))
    missing = [t.name for t in tasks if t.cache_key() not in done]
    if missing:
        raise EmprocessError(
            f"{len(missing)} of {len(tasks)} slices have not been written: {_names(missing)}"
        )
    return {"slices": len(tasks)}


# -- ngingest -------------------------------------------------------------------


def write_ngmeta(
    info: RunInfo, canvas: Mapping[str, Any], base_url: str, settings: HttpEnv | None = None
) -> dict[str, Any]:
    """``write_ngmeta``: the one /ngmeta request, through the same batch helper."""
    tasks = [ngmeta_task(info.conf, canvas["bbox"])]
    redo = () if storage.exists(info_url(info.conf.layout.jpeg_url)) else [NGMETA]
    return _send(info, tasks, STAGE_NGMETA, NG_CACHE, base_url, settings, redo=redo)


def write_ng_shards(
    info: RunInfo,
    canvas: Mapping[str, Any],
    worker_id: int,
    base_url: str,
    settings: HttpEnv | None = None,
) -> dict[str, Any]:
    """Batch task ``write_ng_shards_{i}``: /ngshard for this worker's cubes (only those planned)."""
    tasks = shard_plan(info, canvas, (worker_id, info.width))
    return _send(info, tasks, STAGE_NGSHARD, NG_CACHE, base_url, settings, worker_id, info.width)


def check_written(info: RunInfo, canvas: Mapping[str, Any]) -> tuple[bool, str]:
    """``iswritten``: whether the volume is complete: its ``info`` and every cube answered."""
    conf = info.conf
    done = cached_keys(conf.layout.process_url(NG_CACHE))
    tasks = [ngmeta_task(conf, canvas["bbox"]), *shard_plan(info, canvas)]
    missing = [t.name for t in tasks if t.cache_key() not in done]
    jpeg_info = info_url(conf.layout.jpeg_url)
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(tasks)} requests unanswered: {_names(missing)}")
    if not storage.exists(jpeg_info):
        problems.append(f"{jpeg_info} does not exist")
    if problems:
        return False, "volume incomplete: " + "; ".join(problems)
    return True, f"volume complete: {len(tasks) - 1} cubes and {jpeg_info}"
