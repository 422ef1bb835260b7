"""The closing stages: the tmp bucket's lifecycle, public read, complete.json and the
"run complete" message."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from emprocess import storage
from emprocess.records import CanvasRecord, CompleteRecord, parse_record
from emprocess.workflow import VERSION
from emprocess.workflow.stages.common import RunInfo, _now
from emprocess.workflow.stages.env import package_versions

log = logging.getLogger(__name__)

TMP_LIFECYCLE_DAYS = 3
"""The tmp bucket's tiles are deleted this many days after they were written."""


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
