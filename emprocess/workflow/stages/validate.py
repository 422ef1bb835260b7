"""``validate``: parse the conf, settle the width, check every source slice's header."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from emprocess import storage
from emprocess.errors import BucketNotFound, EmprocessError, InvalidInput
from emprocess.imageinfo import HEADER_BYTES, ImageHeader, image_header
from emprocess.volume import source_slice_url
from emprocess.workflow import DEFAULT_DYNAMIC_WIDTH, VERSION
from emprocess.workflow.conf import RunConf, parse_conf
from emprocess.workflow.slicenames import template_prefix
from emprocess.workflow.stages.alignfrom import check_align_from
from emprocess.workflow.stages.common import RunInfo, _names
from emprocess.workflow.window import decide_window, window_is_measured

log = logging.getLogger(__name__)


class SliceProblems(InvalidInput):
    """The source slices do not match the conf: missing, unreadable or of different sizes."""


def check_slices(conf: RunConf, threads: int = 16) -> tuple[int, int]:
    """Check every slice minz..maxz exists and all have one format; return (width, height).

    See :func:`check_slice_format`.
    """
    found = check_slice_format(conf, threads)
    return found.width, found.height


def check_slice_format(conf: RunConf, threads: int = 16) -> ImageHeader:
    """Check every slice minz..maxz exists and all have one size, bit depth and channel count.

    Finds the slices with one listing of each template's prefix, then reads only the
    first ``HEADER_BYTES`` of each file (more for a TIFF whose directory lies further).
    With ``channel_templates`` every channel's file of every slice is checked, each must
    be grey, and the header returned counts the channels.

    Raises:
        SliceProblems: listing every problem found in one message.
    """
    source = source_slice_url(conf.source)
    problems: list[str] = []
    present: list[str] = []
    for template in conf.templates():
        try:
            listing = storage.list_objects(source + template_prefix(template))
        except BucketNotFound as e:
            raise SliceProblems(f"source: {e}") from None
        listed = {info.key for info in listing}
        expected = [template % z for z in range(conf.minz, conf.maxz + 1)]
        missing = [name for name in expected if name not in listed]
        present += [name for name in expected if name in listed]
        if missing:
            of = f" of {template!r}" if conf.channel_templates is not None else ""
            problems.append(
                f"missing {len(missing)} of {len(expected)} slices{of} in {source}: "
                f"{_names(missing)}"
            )

    def size_of(name: str) -> tuple[str, ImageHeader | str]:
        url = source + name
        try:
            header = storage.read_bytes(url, 0, HEADER_BYTES)
            return name, image_header(header, lambda s, e: storage.read_bytes(url, s, e))
        except EmprocessError as e:  # unreadable header, or the object vanished
            return name, str(e)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        sizes = list(pool.map(size_of, present))
    unreadable = [f"{name} ({why})" for name, why in sizes if isinstance(why, str)]
    if unreadable:
        problems.append(f"cannot read the size of {len(unreadable)} slices: {_names(unreadable)}")
    headers = [(name, h) for name, h in sizes if not isinstance(h, str)]
    if conf.channel_templates is not None:
        colour = [f"{name} ({h.channels})" for name, h in headers if h.channels != 1]
        if colour:
            problems.append(
                f"channel_templates name one grey file per channel, but {len(colour)} files "
                f"have several channels: {_names(colour)}"
            )
    for what, value_of in (
        ("size (width x height)", lambda h: f"{h.width}x{h.height}"),
        ("bit depth", lambda h: f"{h.bits}-bit"),
        ("channel count", lambda h: f"{h.channels} channel(s)"),
    ):
        by_value: dict[str, list[str]] = defaultdict(list)
        for name, h in headers:
            by_value[value_of(h)].append(name)
        if len(by_value) > 1:
            groups = sorted(by_value.items(), key=lambda kv: -len(kv[1]))
            parts = [f"{v} ({len(names)}: {_names(names)})" for v, names in groups]
            problems.append(f"slices differ in {what}: " + "; ".join(parts))
    stack: str | list[str] = conf.channel_templates or conf.image
    if problems:
        raise SliceProblems(f"source slices of {stack!r}: " + "; ".join(problems))
    if not headers:
        raise SliceProblems(f"no slices of {stack!r} found in {source}")
    first = headers[0][1]
    if conf.channel_templates is not None:
        return first._replace(channels=len(conf.channel_templates))
    return first


def validate_run(
    conf_data: Mapping[str, Any] | None,
    dag_width: int | None,
    dag_id: str,
    measure_window: bool = True,
) -> RunInfo:
    """Parse the conf, settle the width and check the slices (``validate``).

    Args:
        conf_data: ``dag_run.conf``.
        dag_width: the fixed DAG's width, or None for the dynamic DAG (conf ``width``).
        dag_id: the DAG's id, for messages and records.
        measure_window: measure an ``auto`` window of 12/16-bit slices here, decoding
            sampled slices; False (the DAG's ``validate``, which reads headers only)
            leaves it to ``measure_window`` (:attr:`RunInfo.window_pending`).

    Raises:
        InvalidRunConf, SliceProblems, InvalidInput: naming every problem.
    """
    conf = parse_conf(conf_data)
    if dag_width is None:
        width = conf.width or DEFAULT_DYNAMIC_WIDTH
    else:
        if conf.width is not None and conf.width != dag_width:
            raise InvalidInput(
                f"width: conf asks for width {conf.width}, but DAG {dag_id} has fixed width "
                f"{dag_width}; leave width out or trigger the dynamic DAG emprocess_v{VERSION}"
            )
        width = dag_width
    found = check_slice_format(conf)
    if conf.channels > 1 and found.channels != conf.channels:
        raise SliceProblems(
            f"channels: the conf asks for {conf.channels} channels, but the slices of "
            f"{conf.image!r} have {found.channels}"
        )
    if conf.align_from is not None:
        check_align_from(conf, (found.width, found.height))
    window = decide_window(conf, found.bits, measure_window)
    pending = not measure_window and window_is_measured(conf, found.bits)
    log.info(
        "run %s: slices %d..%d of %s are %dx%d, %d-bit; width %d; intensity window %s",
        conf.id,
        conf.minz,
        conf.maxz,
        conf.image,
        found.width,
        found.height,
        found.bits,
        width,
        "to be measured" if pending else window,
    )
    return RunInfo(
        conf=conf,
        width=width,
        slice_size_xy=(found.width, found.height),
        dag_id=dag_id,
        slice_bits=found.bits,
        intensity_window=window,
        window_pending=pending,
    )
