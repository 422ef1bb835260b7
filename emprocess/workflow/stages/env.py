"""``create_env``: the run's buckets, in the source's location, and RUN_ID/init.json."""

from __future__ import annotations

import logging
import platform
from typing import Any

from emprocess import storage
from emprocess.errors import EmprocessError
from emprocess.records import InitRecord, IntensitySample
from emprocess.workflow import VERSION
from emprocess.workflow.conf import RunConf
from emprocess.workflow.stages.common import RunInfo, _now
from emprocess.workflow.window import measured_channels, sample_slices

log = logging.getLogger(__name__)

PACKAGES = ("clio-ingest", "apache-airflow", "pydantic", "requests", "google-auth")
"""Whose versions init.json records."""


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
