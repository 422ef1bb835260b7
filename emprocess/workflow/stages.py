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
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from emprocess import storage
from emprocess.errors import BucketNotFound, EmprocessError, InvalidInput
from emprocess.imageinfo import HEADER_BYTES, image_size_xy
from emprocess.workflow import DEFAULT_DYNAMIC_WIDTH, VERSION
from emprocess.workflow.batch import (
    BatchSummary,
    HttpSettings,
    MiniTask,
    cached_keys,
    read_cached,
    run_batch,
)
from emprocess.workflow.conf import RunConf, parse_conf, template_prefix
from emprocess.workflow.payloads import (
    AFFINE_CACHE,
    NG_CACHE,
    WRITE_CACHE,
    ngmeta_task,
    plan_align_pairs,
    plan_aligned_slices,
    plan_ng_shards,
)

log = logging.getLogger(__name__)

TMP_LIFECYCLE_DAYS = 3
"""The tmp bucket's tiles are deleted this many days after they were written."""

PACKAGES = ("clio-ingest", "apache-airflow", "pydantic", "requests", "google-auth")
"""Whose versions init.json records."""

SHOWN = 10
"""How many names a problem message lists before "..."."""

FAILURES = "failures"
"""Failure records of mini-tasks: ``RUN_ID/failures/STAGE/NAME.json`` in the process bucket."""

CANVAS = "align/canvas.json"
"""What ``collect`` hands on (``{"bbox": [w, h], "models": {...}, "transforms": URL}``)."""


class SliceProblems(InvalidInput):
    """The source slices do not match the conf: missing, unreadable or of different sizes."""


class RunInfo(BaseModel):
    """What ``validate`` hands on: the parsed conf, the width, the slice size."""

    conf: RunConf
    width: int
    slice_size_xy: tuple[int, int]
    dag_id: str

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _names(names: Sequence[str]) -> str:
    more = ", ..." if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


# -- validate -------------------------------------------------------------------


def check_slices(conf: RunConf, threads: int = 16) -> tuple[int, int]:
    """Check every slice minz..maxz exists and all have one size; return (width, height).

    Finds the slices with one listing of the template's prefix, then reads only the
    first ``HEADER_BYTES`` of each slice (more for a TIFF whose directory lies further).

    Raises:
        SliceProblems: listing every problem found in one message.
    """
    source = f"gs://{conf.source}/"
    try:
        listing = storage.list_objects(source + template_prefix(conf.image))
    except BucketNotFound as e:
        raise SliceProblems(f"source: {e}") from None
    listed = {info.key for info in listing}
    expected = conf.slice_names()
    missing = [name for name in expected if name not in listed]
    present = [name for name in expected if name in listed]
    problems: list[str] = []
    if missing:
        problems.append(
            f"missing {len(missing)} of {len(expected)} slices in {source}: {_names(missing)}"
        )

    def size_of(name: str) -> tuple[str, tuple[int, int] | str]:
        url = source + name
        try:
            header = storage.read_bytes(url, 0, HEADER_BYTES)
            return name, image_size_xy(header, lambda s, e: storage.read_bytes(url, s, e))
        except EmprocessError as e:  # unreadable header, or the object vanished
            return name, str(e)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        sizes = list(pool.map(size_of, present))
    unreadable = [f"{name} ({why})" for name, why in sizes if isinstance(why, str)]
    if unreadable:
        problems.append(f"cannot read the size of {len(unreadable)} slices: {_names(unreadable)}")
    by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name, size in sizes:
        if not isinstance(size, str):
            by_size[size].append(name)
    groups = sorted(by_size.items(), key=lambda kv: -len(kv[1]))
    if len(groups) > 1:
        parts = [f"{w}x{h} ({len(names)}: {_names(names)})" for (w, h), names in groups]
        problems.append("slices differ in size (width x height): " + "; ".join(parts))
    if problems:
        raise SliceProblems(f"source slices of {conf.image!r}: " + "; ".join(problems))
    if not groups:
        raise SliceProblems(f"no slices of {conf.image!r} found in {source}")
    return groups[0][0]


def validate_run(
    conf_data: Mapping[str, Any] | None, dag_width: int | None, dag_id: str
) -> RunInfo:
    """Parse the conf, settle the width and check the slices (``validate``).

    Args:
        conf_data: ``dag_run.conf``.
        dag_width: the fixed DAG's width, or None for the dynamic DAG (conf ``width``).
        dag_id: the DAG's id, for messages and records.

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
    size = check_slices(conf)
    log.info(
        "run %s: slices %d..%d of %s are %dx%d; width %d",
        conf.id,
        conf.minz,
        conf.maxz,
        conf.image,
        size[0],
        size[1],
        width,
    )
    return RunInfo(conf=conf, width=width, slice_size_xy=size, dag_id=dag_id)


# -- create_env -----------------------------------------------------------------


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
    for role, name in conf.bucket_names().items():
        if role == "source":
            continue
        created[name] = storage.create_bucket(
            name, project=conf.project, location=location, storage_class=RUN_STORAGE_CLASS
        )
    init_url = conf.process_url("init.json")
    first_started = None
    if storage.exists(init_url):
        previous = json.loads(storage.read_bytes(init_url))
        first_started = previous.get("first_started") or previous.get("started")
    started = _now()
    record = {
        "id": conf.id,
        "dag_id": info.dag_id,
        "version": VERSION,
        "airflow_run_id": airflow_run_id,
        "conf": conf.to_json(),
        "width": info.width,
        "slice_size_xy": list(info.slice_size_xy),
        "buckets": conf.bucket_names(),
        "location": location,
        "started": started,
        "first_started": first_started or started,
        "versions": package_versions(),
    }
    storage.write_bytes(
        init_url, json.dumps(record, indent=2).encode(), content_type="application/json"
    )
    log.info("buckets %s (True = created now); wrote %s", created, init_url)
    return {"buckets_created": created, "init": init_url}


# -- align ----------------------------------------------------------------------


def _send(
    info: RunInfo,
    tasks: Sequence[MiniTask],
    stage: str,
    cache: str,
    base_url: str,
    settings: HttpSettings | None,
    worker_id: int = 0,
    width: int = 1,
) -> dict[str, Any]:
    """Run one batch task of ``stage``: its answers under ``cache``, its failures beside."""
    conf = info.conf
    return run_batch(
        tasks,
        base_url=base_url,
        cache_url=conf.process_url(cache),
        worker_id=worker_id,
        width=width,
        stage=stage,
        settings=settings,
        failure_url=conf.process_url(FAILURES, stage),
    ).to_json()


def align_pairs(
    info: RunInfo, worker_id: int, base_url: str, settings: HttpSettings | None = None
) -> dict[str, Any]:
    """Batch task ``affine_{i}``: align this worker's pairs (nothing when skip_align)."""
    conf = info.conf
    if conf.skip_align:
        log.info("skip_align: no alignment requests")
        return BatchSummary("affine", worker_id, info.width, 0).to_json()
    tasks = plan_align_pairs(conf)
    return _send(info, tasks, "affine", AFFINE_CACHE, base_url, settings, worker_id, info.width)


def collect_alignment(info: RunInfo) -> dict[str, Any]:
    """``collect``: compose global transforms, write transforms.json/.csv, qc.csv, canvas.json.

    Returns:
        ``{"bbox": [width, height], "models": {model: pairs}, "transforms": URL}``.
    """
    from emprocess.workflow.compose import (
        compose_alignment,
        identity_alignment,
        qc_csv,
        transforms_csv,
    )

    conf = info.conf
    size = info.slice_size_xy
    if conf.skip_align:
        comp = identity_alignment(conf.minz, conf.maxz, size)
    else:
        tasks = plan_align_pairs(conf)
        answers = read_cached(tasks, conf.process_url(AFFINE_CACHE))
        results = {conf.minz + t.index: answers[t.name] for t in tasks}
        comp = compose_alignment(results, conf.minz, conf.maxz, size, conf.downsample_factor)
    transforms_url = conf.process_url("align", "transforms.json")
    doc = {str(z): comp.transforms[z] for z in sorted(comp.transforms)}
    storage.write_bytes(transforms_url, json.dumps(doc).encode(), content_type="application/json")
    storage.write_bytes(
        conf.process_url("align", "transforms.csv"),
        transforms_csv(comp.transforms).encode(),
        content_type="text/csv",
    )
    storage.write_bytes(
        conf.process_url("align", "qc.csv"), qc_csv(comp.pairs).encode(), content_type="text/csv"
    )
    models = dict(Counter(p.model for p in comp.pairs))
    log.info("canvas %dx%d; models used %s", comp.bbox_xy[0], comp.bbox_xy[1], models)
    canvas = {"bbox": list(comp.bbox_xy), "models": models, "transforms": transforms_url}
    storage.write_bytes(
        conf.process_url(CANVAS), json.dumps(canvas).encode(), content_type="application/json"
    )
    return canvas


def read_transforms(conf: RunConf) -> dict[int, list[float]]:
    """transforms.json of the run, by slice number."""
    doc = json.loads(storage.read_bytes(conf.process_url("align", "transforms.json")))
    return {int(z): [float(v) for v in t] for z, t in doc.items()}


def write_slices(
    info: RunInfo,
    canvas: Mapping[str, Any],
    worker_id: int,
    base_url: str,
    settings: HttpSettings | None = None,
) -> dict[str, Any]:
    """Batch task ``write_{i}``: /alignedslice for this worker's slices."""
    conf = info.conf
    tasks = plan_aligned_slices(conf, read_transforms(conf), canvas["bbox"])
    return _send(info, tasks, "write", WRITE_CACHE, base_url, settings, worker_id, info.width)


def check_slices_written(info: RunInfo, canvas: Mapping[str, Any]) -> dict[str, Any]:
    """``finish_align``: every slice has its /alignedslice answer cached (one listing).

    Raises:
        EmprocessError: naming the slices without an answer.
    """
    conf = info.conf
    tasks = plan_aligned_slices(conf, read_transforms(conf), canvas["bbox"])
    done = cached_keys(conf.process_url(WRITE_CACHE))
    missing = [t.name for t in tasks if t.cache_key() not in done]
    if missing:
        raise EmprocessError(
            f"{len(missing)} of {len(tasks)} slices have not been written: {_names(missing)}"
        )
    return {"slices": len(tasks)}


# -- ngingest -------------------------------------------------------------------


def write_ngmeta(
    info: RunInfo, canvas: Mapping[str, Any], base_url: str, settings: HttpSettings | None = None
) -> dict[str, Any]:
    """``write_ngmeta``: the one /ngmeta request, through the same batch helper."""
    tasks = [ngmeta_task(info.conf, canvas["bbox"])]
    return _send(info, tasks, "ngmeta", NG_CACHE, base_url, settings)


def write_ng_shards(
    info: RunInfo,
    canvas: Mapping[str, Any],
    worker_id: int,
    base_url: str,
    settings: HttpSettings | None = None,
) -> dict[str, Any]:
    """Batch task ``write_ng_shards_{i}``: /ngshard for this worker's cubes."""
    tasks = plan_ng_shards(info.conf, canvas["bbox"])
    return _send(info, tasks, "ngshard", NG_CACHE, base_url, settings, worker_id, info.width)


def check_written(info: RunInfo, canvas: Mapping[str, Any]) -> tuple[bool, str]:
    """``iswritten``: whether the volume is complete: its ``info`` and every cube answered."""
    conf = info.conf
    done = cached_keys(conf.process_url(NG_CACHE))
    tasks = [ngmeta_task(conf, canvas["bbox"]), *plan_ng_shards(conf, canvas["bbox"])]
    missing = [t.name for t in tasks if t.cache_key() not in done]
    info_url = f"gs://{conf.bucket_names()['ng']}/neuroglancer/jpeg/info"
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(tasks)} requests unanswered: {_names(missing)}")
    if not storage.exists(info_url):
        problems.append(f"{info_url} does not exist")
    if problems:
        return False, "volume incomplete: " + "; ".join(problems)
    return True, f"volume complete: {len(tasks) - 1} cubes and {info_url}"


def cleanup_images(info: RunInfo, age_days: int = TMP_LIFECYCLE_DAYS) -> str:
    """``cleanup_images``: a lifecycle rule deletes the tmp bucket's tiles after ``age_days``."""
    tmp = info.conf.bucket_names()["tmp"]
    storage.set_lifecycle_delete(tmp, age_days)
    return f"objects of {tmp} are deleted {age_days} days after they were written"


def set_public_read(info: RunInfo) -> str:
    """``set_public_read``: make the neuroglancer bucket public-read when conf ``public``."""
    ng = info.conf.bucket_names()["ng"]
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
    init_url = conf.process_url("init.json")
    started = None
    if storage.exists(init_url):
        started = json.loads(storage.read_bytes(init_url)).get("started")
    finished = _now()
    doc = {
        "id": conf.id,
        "dag_id": info.dag_id,
        "version": VERSION,
        "airflow_run_id": airflow_run_id,
        "conf": conf.to_json(),
        "slices": conf.maxz - conf.minz + 1,
        "slice_size_xy": list(info.slice_size_xy),
        "bbox": list(canvas["bbox"]),
        "models": canvas.get("models", {}),
        "neuroglancer": conf.neuroglancer_source(),
        "public": conf.public,
        "started": started,
        "finished": finished,
        "elapsed_s": (
            round(
                (
                    datetime.fromisoformat(finished) - datetime.fromisoformat(started)
                ).total_seconds(),
                3,
            )
            if started
            else None
        ),
        "stages": stage_timings(records),
        "versions": package_versions(),
    }
    url = conf.process_url("complete.json")
    storage.write_bytes(url, json.dumps(doc, indent=2).encode(), content_type="application/json")
    log.info("wrote %s; view %s", url, doc["neuroglancer"])
    return doc


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
