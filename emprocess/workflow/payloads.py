"""The mini-tasks of every stage, built from the run's conf with the shared request models.

``plan_*`` functions split a stage into :class:`~emprocess.workflow.batch.MiniTask`
lists (index order = the order worker ids round-robin over); payloads come from
:mod:`emprocess.models`, so the DAG sends exactly what the services parse: numbers as
numbers, booleans as booleans, CONTRACTS.md's key spelling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from emprocess import affine
from emprocess.errors import EmprocessError
from emprocess.geometry import TILE_PX
from emprocess.layout import NGMETA, cube_name, pair_name, slice_task_name
from emprocess.models import (
    AlignedSliceRequest,
    AlignRequest,
    FeaturesRequest,
    NgMetaRequest,
    NgShardRequest,
)
from emprocess.volume import source_slice_url
from emprocess.workflow.batch import MiniTask
from emprocess.workflow.conf import RunConf

SHARD_SIZE = TILE_PX
"""Tile and cube edge in pixels (CONTRACTS.md's shard-size)."""


Window = tuple[float, float] | None
"""The run's intensity window (``RunInfo.intensity_window``): None sends no window."""

Share = tuple[int, int] | None
"""``(worker_id, width)``: plan only that batch task's mini-tasks (``index % width ==
worker_id``), with the indexes of the whole plan; None plans the whole stage. A wide
stage's tasks each build their own share, so a stage plans N mini-tasks, not width x N."""


def _owns(index: int, share: Share) -> bool:
    return share is None or index % share[1] == share[0]


def _checked(share: Share) -> Share:
    if share is not None and not (share[1] >= 1 and 0 <= share[0] < share[1]):
        raise EmprocessError(
            f"worker_id {share[0]} is outside 0..{share[1] - 1} (width {share[1]})"
        )
    return share


def _window(window: Window) -> list[float] | None:
    return None if window is None else [float(window[0]), float(window[1])]


def _gain_offset(table: Mapping[int, Sequence[float]] | None, z: int) -> list[float] | None:
    """Slice z's [gain, offset]; absent (None) without correction, so payloads stay as before."""
    if table is None or z not in table:
        return None
    return [float(table[z][0]), float(table[z][1])]


def _raw_dtype(conf: RunConf) -> Literal["uint16"] | None:
    """The requests' ``raw_dtype``: absent unless the raw volume keeps 16 bits."""
    return "uint16" if conf.raw_bits == 16 else None


def _channels(conf: RunConf) -> int | None:
    """The requests' ``channels``: absent for grey runs (legacy payloads unchanged)."""
    return conf.channels if conf.channels > 1 else None


def align_pair_list(conf: RunConf) -> list[tuple[int, int]]:
    """Pairs (z, z + d), d = 1 .. conf.neighbors, z from minz, post <= maxz, by z then d."""
    return neighbour_pairs(conf.minz, conf.maxz, conf.neighbors)


def neighbour_pairs(minz: int, maxz: int, neighbors: int) -> list[tuple[int, int]]:
    """Pairs (z, z + d), d = 1 .. ``neighbors``, minz <= z < z + d <= maxz, by z then d."""
    return [(z, z + d) for z in range(minz, maxz) for d in range(1, neighbors + 1) if z + d <= maxz]


def plan_align_pairs(conf: RunConf, window: Window = None, share: Share = None) -> list[MiniTask]:
    """One POST / per pair (z, z + d) of :func:`align_pair_list`; index = position.

    With ``neighbors`` 1 the plan is the original one: pairs (z, z + 1), index z - minz.
    ``share`` plans only one batch task's pairs (:data:`Share`).
    """
    return plan_pair_tasks(conf, align_pair_list(conf), window, share)


def plan_pair_tasks(
    conf: RunConf,
    pairs: Sequence[tuple[int, int]],
    window: Window = None,
    share: Share = None,
) -> list[MiniTask]:
    """One POST / per (pre, post) pair, named :func:`~emprocess.layout.pair_name`; index =
    position (the second align round's pairs across gaps use it too); ``share`` keeps
    one batch task's."""
    share = _checked(share)
    source = conf.source
    return [
        MiniTask(
            index=i,
            name=pair_name(pre, post),
            path="/",
            payload=AlignRequest(
                pre=source_slice_url(source, conf.slice_name(pre)),
                post=source_slice_url(source, conf.slice_name(post)),
                downsample=conf.downsample_factor,
                intensity_window=_window(window),
                channel=conf.align_channel if conf.channels > 1 else None,
                pre_channels=_more_channels(conf, pre, source_slice_url(source)),
                post_channels=_more_channels(conf, post, source_slice_url(source)),
                run_id=conf.id,
            ).payload(),
        )
        for i, (pre, post) in enumerate(pairs)
        if _owns(i, share)
    ]


def plan_features(conf: RunConf, window: Window = None, share: Share = None) -> list[MiniTask]:
    """One POST /features per slice z from minz to maxz, named ``z000012``; index z - minz.

    Each slice's SIFT features are extracted once and stored by the alignment service;
    the pairs of :func:`plan_pair_tasks` (same slice URLs, downsample, window and channel,
    and ``run_id``) then match the stored features instead of decoding both slices.
    ``share`` plans only one batch task's slices (:data:`Share`).
    """
    share = _checked(share)
    prefix = source_slice_url(conf.source)
    return [
        MiniTask(
            index=z - conf.minz,
            name=slice_task_name(z),
            path="/features",
            payload=FeaturesRequest(
                img=prefix + conf.slice_name(z),
                run_id=conf.id,
                downsample=conf.downsample_factor,
                intensity_window=_window(window),
                channel=conf.align_channel if conf.channels > 1 else None,
                channel_files=_more_channels(conf, z, prefix),
            ).payload(),
        )
        for z in range(conf.minz, conf.maxz + 1)
        if _owns(z - conf.minz, share)
    ]


def _more_channels(conf: RunConf, z: int, prefix: str = "") -> list[str] | None:
    """The files of channels 1, 2, ... of slice z (``channel_templates``); absent (None)
    when one file holds the slice, so those payloads are the ones before."""
    if conf.channel_templates is None:
        return None
    return [prefix + name for name in conf.channel_files(z)[1:]]


def plan_aligned_slices(
    conf: RunConf,
    transforms: Mapping[int, Sequence[float]],
    bbox_xy: Sequence[int],
    window: Window = None,
    fill: Mapping[int, int | None] | None = None,
    zs: Iterable[int] | None = None,
    gain_offset: Mapping[int, Sequence[float]] | None = None,
) -> list[MiniTask]:
    """One POST /alignedslice per slice z from minz to maxz; index = z - minz.

    Args:
        conf: the run's conf.
        transforms: z -> 6 numbers mapping slice z into the canvas.
        bbox_xy: the canvas (width, height) in pixels.
        window: the run's intensity window.
        fill: bad slice z -> the slice whose pixels (at its own transform) stand in for
            it, or None for a black slice (the image is placed just outside the canvas,
            so the service writes zeros); slices not named show their own pixels.
        zs: plan only these slices (a batch task's share, the slices of some cubes),
            in this order; default minz..maxz.
        gain_offset: slice z -> its intensity correction [gain, offset] (a stand-in's
            own applies to its pixels); slices not named, or None, get none.
    """
    fill = fill or {}
    outside = affine.translation(float(bbox_xy[0]) + 16.0, 0.0)

    def source_of(z: int) -> tuple[int, list[float]]:
        if z not in fill:
            return z, [float(v) for v in transforms[z]]
        stand_in = fill[z]
        if stand_in is None:
            return z, outside
        return stand_in, [float(v) for v in transforms[stand_in]]

    tasks = []
    for z in range(conf.minz, conf.maxz + 1) if zs is None else zs:
        img_z, transform = source_of(z)
        tasks.append(
            MiniTask(
                index=z - conf.minz,
                name=slice_task_name(z),
                path="/alignedslice",
                payload=AlignedSliceRequest(
                    img=conf.slice_name(img_z),
                    transform=transform,
                    bbox=[int(bbox_xy[0]), int(bbox_xy[1])],
                    dest=conf.source,
                    dest_tmp=conf.layout.tmp,
                    slice=z,
                    shard_size=SHARD_SIZE,
                    run_id=conf.id,
                    clip_limit=conf.clip_limit,
                    intensity_window=_window(window),
                    raw_dtype=_raw_dtype(conf),
                    channels=_channels(conf),
                    channel_imgs=_more_channels(conf, img_z),
                    destreak=conf.destreak_deg,
                    intensity_gain_offset=_gain_offset(gain_offset, img_z),
                ).payload(),
            )
        )
    return tasks


def _volume_fields(conf: RunConf, bbox_xy: Sequence[int]) -> dict:
    return {
        "dest": conf.layout.ng,
        "dest_raw": conf.layout.chunk if conf.create_raw_pyramid else None,
        "minz": conf.minz,
        "maxz": conf.maxz,
        "bbox": [int(bbox_xy[0]), int(bbox_xy[1])],
        "shard_size": SHARD_SIZE,
        "write_raw": conf.create_raw_pyramid,
        "resolution": conf.resolution,
        "raw_dtype": _raw_dtype(conf),
        "channels": _channels(conf),
        "jpeg_channels": "each" if conf.channels > 1 and conf.jpeg_channels == "each" else None,
        # Sent only when not precomputed: the original payloads and cache keys stay as they were.
        "raw_format": None if conf.raw_format == "precomputed" else conf.raw_format,
    }


def ngmeta_task(conf: RunConf, bbox_xy: Sequence[int]) -> MiniTask:
    """The single POST /ngmeta of the run."""
    return MiniTask(
        index=0,
        name=NGMETA,
        path="/ngmeta",
        payload=NgMetaRequest(**_volume_fields(conf, bbox_xy)).payload(),
    )


def plan_cube_starts(bbox_xy: Sequence[int], minz: int, maxz: int) -> list[tuple[int, int, int]]:
    """Cube starts (x, y, z) in units of 1024, z relative to minz: the kernels' plan."""
    from emprocess.kernels.ngmeta import plan_cubes

    return plan_cubes((int(bbox_xy[0]), int(bbox_xy[1])), minz, maxz, SHARD_SIZE)


def cube_slices(conf: RunConf, cube_z: int) -> range:
    """The slices a cube of z-start ``cube_z`` (in cubes, counted from minz) reads."""
    first = conf.minz + cube_z * SHARD_SIZE
    return range(first, min(conf.maxz, first + SHARD_SIZE - 1) + 1)


def tiles_digest(keys: Sequence[str]) -> str:
    """A digest of the cache keys of the /alignedslice requests of a cube's slices.

    Those requests' cache keys cover everything that shaped the tiles (transform,
    canvas, contrast, window, fill), so the digest changes exactly when the tiles do.
    """
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def shard_slices(conf: RunConf, bbox_xy: Sequence[int], share: Share = None) -> list[int]:
    """The slices whose write requests key the cubes of ``share`` (all slices for None)."""
    share = _checked(share)
    starts = plan_cube_starts(bbox_xy, conf.minz, conf.maxz)
    layers = sorted({z for i, (_, _, z) in enumerate(starts) if _owns(i, share)})
    return [z for cz in layers for z in cube_slices(conf, cz)]


def plan_ng_shards(
    conf: RunConf, bbox_xy: Sequence[int], written: Sequence[MiniTask], share: Share = None
) -> list[MiniTask]:
    """One POST /ngshard per 1024^3 cube of the volume, in :func:`plan_cube_starts` order.

    Args:
        conf: the run's conf.
        bbox_xy: the canvas (width, height) in pixels.
        written: the run's /alignedslice requests (:func:`plan_aligned_slices`, index
            z - minz), at least those of :func:`shard_slices`: each cube's cache key
            covers the requests that wrote the tiles it reads, so a re-triggered run whose
            tiles changed (other clip-limit, transforms...) redoes the cubes, and only those.
        share: plan only one batch task's cubes (:data:`Share`).

    Raises:
        ValueError: ``written`` lacks a slice that a planned cube reads.
    """
    share = _checked(share)
    keys = {t.index + conf.minz: t.cache_key() for t in written}
    digests: dict[int, str] = {}  # the cubes of one z-layer read the same slices

    def digest(cz: int) -> str:
        if cz not in digests:
            zs = cube_slices(conf, cz)
            missing = [z for z in zs if z not in keys]
            if missing:
                raise ValueError(
                    f"the write plan has {len(written)} slices; the cubes of z-layer {cz} "
                    f"read slices {zs.start}..{zs.stop - 1}, {len(missing)} of them missing"
                )
            digests[cz] = tiles_digest([keys[z] for z in zs])
        return digests[cz]

    fields = _volume_fields(conf, bbox_xy)
    tmp = conf.layout.tmp

    def voxels(x: int, y: int, z: int) -> float:  # edge cubes are thinner
        wx = min(SHARD_SIZE, int(bbox_xy[0]) - x * SHARD_SIZE)
        wy = min(SHARD_SIZE, int(bbox_xy[1]) - y * SHARD_SIZE)
        return float(wx * wy * len(cube_slices(conf, z)))

    return [
        MiniTask(
            index=i,
            name=cube_name(x, y, z),
            path="/ngshard",
            payload=NgShardRequest(**fields, source=tmp, start=[x, y, z]).payload(),
            inputs=digest(z),
            cost=voxels(x, y, z),
        )
        for i, (x, y, z) in enumerate(plan_cube_starts(bbox_xy, conf.minz, conf.maxz))
        if _owns(i, share)
    ]
