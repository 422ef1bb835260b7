"""``align_from``: check and take the alignment of an earlier run of the same source."""

from __future__ import annotations

import logging
from typing import Any

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.layout import CANVAS, INIT, QC, SLICES, TRANSFORMS, RunLayout
from emprocess.records import InitRecord
from emprocess.workflow.conf import RunConf

log = logging.getLogger(__name__)


def check_align_from(conf: RunConf, slice_size_xy: tuple[int, int]) -> None:
    """The earlier run ``align_from`` exists, finished collect, and covers this run.

    Raises:
        InvalidInput: naming the earlier run and what is wrong (missing records, slices
            it did not align, other slices or another slice size).
    """
    earlier = RunLayout(conf.source, str(conf.align_from))
    what = f"align_from {conf.align_from!r}"
    for key in (INIT, TRANSFORMS, CANVAS):
        url = earlier.process_url(key)
        if not storage.exists(url):
            raise InvalidInput(
                f"{what}: {url} does not exist: no such run of source {conf.source!r}, "
                "or it has not finished aligning (collect)"
            )
    init = earlier.records.read_init() or InitRecord()
    problems = []
    if init.conf.get("image") != conf.image:
        problems.append(f"it aligned image {init.conf.get('image')!r}, not {conf.image!r}")
    if list(init.slice_size_xy or []) != list(slice_size_xy):
        problems.append(f"its slices are {init.slice_size_xy}, these {list(slice_size_xy)}")
    zs = earlier.records.transforms()
    missing = [z for z in range(conf.minz, conf.maxz + 1) if z not in zs]
    if missing:
        lo, hi = (min(zs), max(zs)) if zs else (None, None)
        problems.append(
            f"it aligned slices {lo}..{hi}, which do not cover minz..maxz "
            f"({conf.minz}..{conf.maxz}): {len(missing)} missing, e.g. {missing[:5]}"
        )
    if problems:
        raise InvalidInput(f"{what} cannot be used: " + "; ".join(problems))


def take_alignment(conf: RunConf) -> dict[str, Any]:
    """``collect`` with ``align_from``: this run's records from the earlier run's alignment.

    The earlier canvas is kept (a z sub-range lands in the same coordinates); the
    transforms and the fill are restricted to minz..maxz; qc.csv and slices.csv are copied.
    """
    earlier = RunLayout(conf.source, str(conf.align_from))
    records = conf.layout.records
    zs = range(conf.minz, conf.maxz + 1)
    every = earlier.records.transforms()
    transforms = {z: every[z] for z in zs}
    fill = {z: s for z, s in earlier.records.read_fill().items() if z in zs}
    transforms_url = records.write_transforms(transforms)
    records.write_transforms_csv(transforms)
    records.write_fill(fill)
    for key in (QC, SLICES):
        if storage.exists(earlier.process_url(key)):
            data = storage.read_bytes(earlier.process_url(key))
            storage.write_bytes(conf.layout.process_url(key), data, content_type="text/csv")
    canvas = earlier.records.canvas().model_copy(
        update={"transforms": transforms_url, "aligned_from": conf.align_from}
    )
    records.write_canvas(canvas)
    log.info("alignment of run %s taken: canvas %s", conf.align_from, canvas.bbox)
    return canvas.to_json()
