"""What each DAG task does, as plain functions of the run (no Airflow imports).

:mod:`emprocess.workflow.tasks` wraps these in Airflow tasks; the CLI and tests call
them directly. Small JSON moves between them: :class:`RunInfo` from ``validate`` and
the canvas from ``collect``; everything large lives in the process bucket.
"""

from __future__ import annotations

import json
import logging
import platform
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from emprocess import storage
from emprocess.errors import BucketNotFound, EmprocessError, InvalidInput
from emprocess.imageinfo import HEADER_BYTES, ImageHeader, image_header
from emprocess.layout import (
    AFFINE_CACHE,
    CANVAS,
    FEATURES_CACHE,
    INIT,
    NG_CACHE,
    NGMETA,
    QC,
    SLICES,
    STAGE_AFFINE,
    STAGE_FEATURES,
    STAGE_NGMETA,
    STAGE_NGSHARD,
    STAGE_WRITE,
    TRANSFORMS,
    TRANSFORMS_CSV,
    WRITE_CACHE,
    RunLayout,
    parse_pair_name,
    slice_task_name,
    tiles_key,
)
from emprocess.records import (
    AlignmentSummary,
    CanvasRecord,
    CompleteRecord,
    InitRecord,
    IntensitySample,
    parse_record,
)
from emprocess.settings import HttpEnv
from emprocess.volume import TiledSlices, info_url, source_slice_url
from emprocess.workflow import DEFAULT_DYNAMIC_WIDTH, VERSION
from emprocess.workflow.batch import (
    BatchSummary,
    MiniTask,
    cached_keys,
    read_cached,
    run_batch,
    select_worker,
)
from emprocess.workflow.conf import RunConf, parse_conf, template_prefix
from emprocess.workflow.payloads import (
    Share,
    cube_slices,
    ngmeta_task,
    plan_align_pairs,
    plan_aligned_slices,
    plan_features,
    plan_ng_shards,
    shard_slices,
)
from emprocess.workflow.window import (
    decide_window,
    measured_channels,
    sample_slices,
    window_is_measured,
)

log = logging.getLogger(__name__)

TMP_LIFECYCLE_DAYS = 3
"""The tmp bucket's tiles are deleted this many days after they were written."""

PACKAGES = ("clio-ingest", "apache-airflow", "pydantic", "requests", "google-auth")
"""Whose versions init.json records."""

SHOWN = 10
"""How many names a problem message lists before "..."."""


class SliceProblems(InvalidInput):
    """The source slices do not match the conf: missing, unreadable or of different sizes."""


class RunInfo(BaseModel):
    """What ``validate`` hands on: the parsed conf, the width, the slice size."""

    conf: RunConf
    width: int
    slice_size_xy: tuple[int, int]
    dag_id: str
    slice_bits: int = 8
    intensity_window: tuple[float, float] | None = None
    window_pending: bool = False
    """An ``auto`` window still to be measured (the DAG's ``measure_window`` task)."""

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _names(names: Sequence[str]) -> str:
    more = ", ..." if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


# -- validate -------------------------------------------------------------------


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


# -- create_env -----------------------------------------------------------------


def intensity_sample(info: RunInfo) -> IntensitySample | None:
    """What an ``auto`` window was measured on (slices, channels per slice); None when
    no window was measured."""
    conf = info.conf
    if conf.intensity != "auto" or info.intensity_window is None:
        return None
    return IntensitySample(
        slices=sample_slices(conf.minz, conf.maxz),
        channels=measured_channels(conf),
        of="one window for every channel: their samples' summed histogram",
    )


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the results, and of Python."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


RUN_STORAGE_CLASS = "STANDARD"
"""Every bucket a run creates starts Standard, as the original's did: its tiles and
records are read while the run goes on and the volume is viewed at once. Moving a
volume to Coldline is a choice made later (scripts/coldline_bucket.sh); the tmp bucket
is emptied by its lifecycle rule instead."""


def run_location(conf: RunConf) -> str | None:
    """Where the run's buckets go: conf ``location``, else the source bucket's location.

    Reading a bucket's location needs ``storage.buckets.get``, which a reader of another
    project's slices may lack: then GCS's default location, with a warning.
    """
    if conf.location:
        return conf.location
    try:
        return storage.bucket_location(conf.source)
    except EmprocessError as e:
        log.warning(
            "cannot read the location of source bucket %s (%s): the run's buckets get GCS's "
            "default location; set conf location to choose one",
            conf.source,
            e,
        )
        return None


def create_env(info: RunInfo, airflow_run_id: str) -> dict[str, Any]:
    """Create the run's buckets (in the source's location) and RUN_ID/init.json; repeatable."""
    conf = info.conf
    created = {}
    location = run_location(conf)
    for role, name in conf.layout.bucket_names().items():
        if role == "source":
            continue
        created[name] = storage.create_bucket(
            name, project=conf.project, location=location, storage_class=RUN_STORAGE_CLASS
        )
    records = conf.layout.records
    previous = records.read_init()
    first_started = previous.first_start if previous is not None else None
    started = _now()
    record = InitRecord(
        id=conf.id,
        dag_id=info.dag_id,
        version=VERSION,
        airflow_run_id=airflow_run_id,
        conf=conf.to_json(),
        width=info.width,
        slice_size_xy=list(info.slice_size_xy),
        slice_bits=info.slice_bits,
        intensity_window=None if info.intensity_window is None else list(info.intensity_window),
        intensity_measured=intensity_sample(info),
        buckets=conf.layout.bucket_names(),
        location=location,
        started=started,
        first_started=first_started or started,
        versions=package_versions(),
    )
    init_url = records.write_init(record)
    log.info("buckets %s (True = created now); wrote %s", created, init_url)
    return {"buckets_created": created, "init": init_url}


# -- align ----------------------------------------------------------------------


def _send(
    info: RunInfo,
    tasks: Sequence[MiniTask],
    stage: str,
    cache: str,
    base_url: str,
    settings: HttpEnv | None,
    worker_id: int = 0,
    width: int = 1,
    redo: Collection[str] | Callable[[list[MiniTask]], Collection[str]] = (),
) -> dict[str, Any]:
    """Run one batch task of ``stage``: its answers under ``cache``, its failures beside."""
    conf = info.conf
    return run_batch(
        tasks,
        base_url=base_url,
        cache_url=conf.layout.process_url(cache),
        worker_id=worker_id,
        width=width,
        stage=stage,
        settings=settings,
        failure_url=conf.layout.failure_url(stage),
        redo=redo,
        run_id=conf.id,
    ).to_json()


def align_pairs(
    info: RunInfo, worker_id: int, base_url: str, settings: HttpEnv | None = None
) -> dict[str, Any]:
    """Batch task ``affine_{i}``: align this worker's pairs (nothing when skip_align)."""
    conf = info.conf
    if conf.skip_align or conf.align_from is not None:
        log.info("skip_align or align_from: no alignment requests")
        return BatchSummary(STAGE_AFFINE, worker_id, info.width, 0).to_json()
    tasks = plan_align_pairs(conf, info.intensity_window, (worker_id, info.width))
    return _send(info, tasks, STAGE_AFFINE, AFFINE_CACHE, base_url, settings, worker_id, info.width)


def extract_slice_features(
    info: RunInfo, worker_id: int, base_url: str, settings: HttpEnv | None = None
) -> dict[str, Any]:
    """Batch task ``features_{i}``: each of this worker's slices' features, extracted once
    and stored by the alignment service (nothing when skip_align or align_from)."""
    conf = info.conf
    if conf.skip_align or conf.align_from is not None:
        log.info("skip_align or align_from: no features requests")
        return BatchSummary(STAGE_FEATURES, worker_id, info.width, 0).to_json()
    tasks = plan_features(conf, info.intensity_window, (worker_id, info.width))
    return _send(
        info, tasks, STAGE_FEATURES, FEATURES_CACHE, base_url, settings, worker_id, info.width
    )


def check_features(info: RunInfo) -> dict[str, Any]:
    """``check_features``: every slice's features request was answered (one listing).

    A pair whose slice has no stored features would still align (the service extracts
    them), but each of its ``2 x neighbors`` pairs would extract them again.

    Raises:
        EmprocessError: naming the slices without an answer.
    """
    conf = info.conf
    if conf.skip_align or conf.align_from is not None:
        return {"slices": 0}
    tasks = plan_features(conf, info.intensity_window)
    done = cached_keys(conf.layout.process_url(FEATURES_CACHE))
    missing = [t.name for t in tasks if t.cache_key() not in done]
    if missing:
        raise EmprocessError(
            f"{len(missing)} of {len(tasks)} slices have no features: {_names(missing)}"
        )
    return {"slices": len(tasks)}


def collect_alignment(info: RunInfo) -> dict[str, Any]:
    """``collect``: global transforms, transforms.json/.csv, qc.csv, slices.csv, canvas.json.

    Computes only; it sends nothing. With ``global_solve`` (default) all pairs of the
    ``neighbors`` nearest slices, and the pairs across gaps of the second align round
    (planned in align/gaps.json and answered by ``align.gap_pairs``,
    :mod:`emprocess.workflow.gaps`; no gaps.json, no second round), are solved at once
    (:mod:`emprocess.workflow.globalalign`); bad slices are bridged and listed in
    align/slices.csv, their stand-ins in align/fill.json. Without it, the (z, z + 1)
    pairs are chained as before.

    Returns:
        ``{"bbox": [width, height], "models": {model: pairs}, "transforms": URL}``, plus
        ``"alignment"`` (quality figures, :meth:`GlobalAlignment.summary`) with the solve.
    """
    from emprocess.workflow.compose import (
        compose_alignment,
        identity_alignment,
        qc_csv,
        transforms_csv,
    )
    from emprocess.workflow.globalalign import global_alignment, pairs_csv, slices_csv

    conf = info.conf
    if conf.align_from is not None:
        return take_alignment(conf)
    size = info.slice_size_xy
    quality = None
    fill: dict[int, int | None] = {}
    if conf.skip_align:
        comp = identity_alignment(conf.minz, conf.maxz, size)
        qc_text = qc_csv(comp.pairs)
    else:
        tasks = plan_align_pairs(conf, info.intensity_window)
        answers = read_cached(tasks, conf.layout.process_url(AFFINE_CACHE))
        results = {parse_pair_name(t.name): answers[t.name] for t in tasks}
        if conf.global_solve:
            from emprocess.workflow.gaps import read_gap_answers

            gap_plan, more = read_gap_answers(info)
            results.update(more)
            solved = global_alignment(
                results,
                conf.minz,
                conf.maxz,
                size,
                conf.downsample_factor,
                conf.regularization,
                conf.skip_slices,
                gap_plan,
            )
            comp, quality = solved.composition, solved.summary()
            qc_text = pairs_csv(comp.pairs, solved)
            fill = solved.fill(conf.bad_slice_fill)
            storage.write_bytes(
                conf.layout.process_url(SLICES),
                slices_csv(solved.slices).encode(),
                content_type="text/csv",
            )
        else:
            chain = {pre: r for (pre, post), r in results.items() if post == pre + 1}
            comp = compose_alignment(chain, conf.minz, conf.maxz, size, conf.downsample_factor)
            qc_text = qc_csv(comp.pairs)
    records = conf.layout.records
    transforms_url = records.write_transforms(
        {z: comp.transforms[z] for z in sorted(comp.transforms)}
    )
    storage.write_bytes(
        conf.layout.process_url(TRANSFORMS_CSV),
        transforms_csv(comp.transforms).encode(),
        content_type="text/csv",
    )
    storage.write_bytes(conf.layout.process_url(QC), qc_text.encode(), content_type="text/csv")
    records.write_fill(dict(sorted(fill.items())))
    models = dict(Counter(p.model for p in comp.pairs))
    log.info("canvas %dx%d; models used %s", comp.bbox_xy[0], comp.bbox_xy[1], models)
    canvas = CanvasRecord(
        bbox=list(comp.bbox_xy),
        models=models,
        transforms=transforms_url,
        alignment=None if quality is None else AlignmentSummary.model_validate(quality),
    )
    if quality is not None:
        log.info("alignment: %s", json.dumps(quality)[:2000])
    records.write_canvas(canvas)
    return canvas.to_json()


def read_transforms(conf: RunConf) -> dict[int, list[float]]:
    """transforms.json of the run, by slice number.

    Raises:
        ObjectNotFound: when collect has not written it.
    """
    return conf.layout.records.transforms()


# -- align_from: the alignment of an earlier run ------------------------------------


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
    from emprocess.workflow.compose import transforms_csv

    earlier = RunLayout(conf.source, str(conf.align_from))
    records = conf.layout.records
    zs = range(conf.minz, conf.maxz + 1)
    every = earlier.records.transforms()
    transforms = {z: every[z] for z in zs}
    fill = {z: s for z, s in earlier.records.read_fill().items() if z in zs}
    transforms_url = records.write_transforms(transforms)
    storage.write_bytes(
        conf.layout.process_url(TRANSFORMS_CSV),
        transforms_csv(transforms).encode(),
        content_type="text/csv",
    )
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


def read_fill(conf: RunConf) -> dict[int, int | None]:
    """align/fill.json of the run (bad slice -> stand-in slice or None); {} when absent."""
    return conf.layout.records.read_fill()


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


def cleanup_images(info: RunInfo, age_days: int = TMP_LIFECYCLE_DAYS) -> str:
    """``cleanup_images``: a lifecycle rule deletes the tmp bucket's tiles after ``age_days``."""
    tmp = info.conf.layout.tmp
    storage.set_lifecycle_delete(tmp, age_days)
    return f"objects of {tmp} are deleted {age_days} days after they were written"


def set_public_read(info: RunInfo) -> str:
    """``set_public_read``: make the neuroglancer bucket public-read when conf ``public``."""
    ng = info.conf.layout.ng
    if not info.conf.public:
        return f"bucket {ng} stays private (conf public is false)"
    return storage.make_public(ng)


# -- write_status ---------------------------------------------------------------

_WORKER_SUFFIX = re.compile(r"_\d+$")


def stage_timings(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-stage timings from per-task records ``{task_id, started, finished, batch?}``.

    Tasks ``x_0 .. x_{W-1}`` (and mapped ``x``) form stage ``x``. A stage's ``elapsed_s``
    is its wall time (first start to last finish); batch stages also count mini-tasks.
    """
    stages: dict[str, dict[str, Any]] = {}
    for rec in records:
        name = _WORKER_SUFFIX.sub("", str(rec["task_id"]))
        st = stages.setdefault(name, {"tasks": 0, "started": rec["started"], "finished": ""})
        st["tasks"] += 1
        st["started"] = min(st["started"], rec["started"])
        st["finished"] = max(st["finished"], rec["finished"])
        batch = rec.get("batch")
        if batch:
            for key in ("planned", "cached", "sent", "attempts"):
                st[key] = st.get(key, 0) + int(batch.get(key, 0))
    for st in stages.values():
        t0 = datetime.fromisoformat(st["started"])
        t1 = datetime.fromisoformat(st["finished"])
        st["elapsed_s"] = round((t1 - t0).total_seconds(), 3)
    return dict(sorted(stages.items(), key=lambda kv: kv[1]["started"]))


def write_status(
    info: RunInfo,
    canvas: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    airflow_run_id: str,
) -> dict[str, Any]:
    """``write_status``: RUN_ID/complete.json with the canvas, timings and the viewer source."""
    conf = info.conf
    run_records = conf.layout.records
    handed = parse_record(CanvasRecord, canvas, "the canvas collect handed on")
    init = run_records.read_init()
    started = None if init is None else init.started
    finished = _now()
    elapsed_s = None
    if started:
        elapsed = datetime.fromisoformat(finished) - datetime.fromisoformat(started)
        elapsed_s = round(elapsed.total_seconds(), 3)
    record = CompleteRecord(
        id=conf.id,
        dag_id=info.dag_id,
        version=VERSION,
        airflow_run_id=airflow_run_id,
        conf=conf.to_json(),
        slices=conf.maxz - conf.minz + 1,
        slice_size_xy=list(info.slice_size_xy),
        bbox=handed.bbox,
        models=handed.models,
        alignment=handed.alignment,
        neuroglancer=conf.layout.neuroglancer_source(),
        public=conf.public,
        started=started,
        finished=finished,
        elapsed_s=elapsed_s,
        stages=stage_timings(records),
        versions=package_versions(),
    )
    url = run_records.write_complete(record)
    log.info("wrote %s; view %s", url, record.neuroglancer)
    return record.to_json()


def status_email(doc: Mapping[str, Any]) -> tuple[str, str]:
    """Subject and HTML body of the "run complete" message."""
    subject = f"emprocess: {doc['id']} is ready ({doc['slices']} slices)"
    rows = "".join(
        f"<tr><td>{name}</td><td>{st['elapsed_s']} s</td></tr>"
        for name, st in doc.get("stages", {}).items()
    )
    body = (
        f"<p>Run <b>{doc['id']}</b> ({doc['dag_id']}) finished at {doc['finished']}.</p>"
        f"<p>Canvas {doc['bbox'][0]} x {doc['bbox'][1]} px, {doc['slices']} slices.</p>"
        f"<p>neuroglancer source: <code>{doc['neuroglancer']}</code></p>"
        f"<table>{rows}</table>"
    )
    return subject, body
