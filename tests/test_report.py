"""The run report, on process buckets written by the workflow's own stage functions.

A small HTTP server in this file stands in for the two services: it answers like them
(alignment JSON, "success") so that the real batch helper, collect and write_status
fill the process bucket exactly as a DAG run does. On the local backend the cache
objects' times are then spread over an hour with os.utime, so rates and ETAs have
known answers; the GCS emulator keeps its own times, so there they are checked loosely.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import FinishedRun, point_storage, unique_bucket
from dags_conftest_helpers import Answer, Request, ScriptedServer
from nbclient import NotebookClient

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.layout import (
    AFFINE_CACHE,
    CANVAS,
    COMPLETE,
    INIT,
    NG_CACHE,
    QC,
    TRANSFORMS,
    TRANSFORMS_CSV,
    WRITE_CACHE,
    RunLayout,
    slice_task_name,
)
from emprocess.report import (
    FAILED,
    FEW_INLIERS,
    FINISHED,
    LARGE_RESIDUAL,
    NO_MODEL,
    RUNNING,
    STALLED,
    RunNotFound,
    RunReport,
    load_run,
    plot_progress,
    plot_qc,
    run_report,
    write_html,
)
from emprocess.settings import HttpEnv
from emprocess.workflow import dag_id
from emprocess.workflow.batch import BatchError, run_batch
from emprocess.workflow.conf import parse_conf
from emprocess.workflow.payloads import (
    plan_align_pairs,
    plan_aligned_slices,
)
from emprocess.workflow.stages import (
    RunInfo,
    align_pairs,
    collect_alignment,
    create_env,
    read_transforms,
    shard_plan,
    write_ng_shards,
    write_ngmeta,
    write_slices,
    write_status,
)

NOTEBOOK = Path(__file__).resolve().parents[1] / "clio_report.ipynb"
MINZ, MAXZ = 100, 139  # 40 slices, 39 pairs
SLICE_XY = (2500, 2200)  # a canvas of 3 x 3 cubes of 1024 px
WIDTH = 2
PARTIAL_WRITES = 15
SETTINGS = HttpEnv(http_threads=4, http_attempts=3, http_backoff_s=0.01, http_max_backoff_s=0.02)

# The finished run's alignment problems, by pre slice: what the service answers.
FEW_INLIERS_Z = 110  # affine not found, translation with 12 inliers
LARGE_RESIDUAL_Z = 120  # affine (sheared) with a 3.4 px mean residual
NO_MODEL_Z = 130  # neither model found
RETRIED_Z = 103  # the first request of this pair gets a 503
EXPECTED_FLAGS = {
    FEW_INLIERS_Z: (FEW_INLIERS,),
    LARGE_RESIDUAL_Z: (LARGE_RESIDUAL,),
    NO_MODEL_Z: (FEW_INLIERS, NO_MODEL),
}

# The local timeline, seconds after T0: when each stage's mini-task i finished.
AFFINE_T = (60, 6)  # first at T0 + 60 s, then every 6 s: 10 per minute
WRITE_T = (310, 3)  # 20 per minute
NGMETA_T = 440
NGSHARD_T = (450, 20)  # 3 per minute


# -- a stand-in for the two services ------------------------------------------------


def align_answer(z: int) -> dict[str, Any]:
    """What the alignment service answers for pair (z, z + 1) of the test stacks."""
    dx, dy = 2.0 + z % 4, -1.0 + z % 3
    shear = 0.002 if z % 7 == 0 or z == LARGE_RESIDUAL_Z else 0.0001
    answer: dict[str, Any] = {
        "width": SLICE_XY[0],
        "height": SLICE_XY[1],
        "width0": SLICE_XY[0],
        "height0": SLICE_XY[1],
        "affine": [1.0, -shear, shear, 1.0, dx, dy],
        "translation": [1.0, 0.0, 0.0, 1.0, dx, dy],
        "affine_found": True,
        "translation_found": True,
        "affine_inliers": 400 + z,
        "translation_inliers": 380 + z,
        "affine_mean_residual_px": 0.6,
        "affine_max_residual_px": 1.5,
        "translation_mean_residual_px": 0.8,
        "translation_max_residual_px": 2.1,
        "features_pre": 2000,
        "features_post": 2000,
        "seconds": 0.1,
    }
    if z == FEW_INLIERS_Z:
        answer.update(affine_found=False, affine_inliers=9, translation_inliers=12)
        answer.update(affine=[1.0, 0.0, 0.0, 1.0, 0.0, 0.0], affine_mean_residual_px=None)
    elif z == LARGE_RESIDUAL_Z:
        answer.update(affine_mean_residual_px=3.4)
    elif z == NO_MODEL_Z:
        answer.update(affine_found=False, translation_found=False)
        answer.update(affine_inliers=5, translation_inliers=7)
        answer.update(affine=[1.0, 0.0, 0.0, 1.0, 0.0, 0.0], translation=answer["affine"])
        answer.update(affine_mean_residual_px=None, translation_mean_residual_px=None)
    return answer


class _Handler(BaseHTTPRequestHandler):
    server: _Services

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/":
            m = re.fullmatch(r"gs://([^/]+)/img\.(\d+)\.png", body["pre"])
            assert m, body
            z = int(m.group(2))
            with self.server.lock:
                first = (m.group(1), z) not in self.server.seen
                self.server.seen.add((m.group(1), z))
            if z == RETRIED_Z and first:
                self._answer(503, "text/plain", b"busy")
                return
            self._answer(200, "application/json", json.dumps(align_answer(z)).encode())
        elif self.path in ("/alignedslice", "/ngmeta", "/ngshard"):
            self._answer(200, "text/plain", b"success")
        else:
            self._answer(404, "text/plain", b"no such endpoint")

    def _answer(self, status: int, kind: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Services(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.seen: set[tuple[str, int]] = set()


@pytest.fixture(scope="module")
def services() -> Iterator[str]:
    server = _Services()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# -- runs written by the workflow's stage functions ----------------------------------


@dataclass
class Runs:
    """The process bucket of one source with a finished and a partly finished run."""

    backend: str
    source: str
    t0: datetime
    finished: RunInfo
    partial: RunInfo
    canvas: dict[str, Any]
    qc_before_collect: RunReport


_BUILT: dict[str, Runs] = {}


def _info(source: str, run_id: str) -> RunInfo:
    conf = parse_conf(
        {
            "id": run_id,
            "image": "img.%05d.png",
            "minz": MINZ,
            "maxz": MAXZ,
            "source": source,
            # The chain of issue 11's compatibility mode: one pair per slice, as these
            # tests count them.
            "neighbors": 1,
            "global_solve": False,
        }
    )
    return RunInfo(conf=conf, width=WIDTH, slice_size_xy=SLICE_XY, dag_id=dag_id(WIDTH))


def _timing(task_id: str, summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "started": summary["started"],
        "finished": summary["finished"],
        "batch": summary,
    }


def _set_time(url: str, t: datetime) -> None:
    root = storage.local_root()
    assert root is not None
    loc = storage.parse_url(url)
    os.utime(root / loc.bucket / loc.key, (t.timestamp(), t.timestamp()))


def _spread(cache_url: str, names: list[str], start: datetime, first_s: int, step_s: int) -> None:
    """Give the cache object of the i-th name the time start + first_s + i * step_s."""
    prefix = storage.parse_url(cache_url + "/").key
    bucket = storage.parse_url(cache_url).bucket
    when = {n: start + timedelta(seconds=first_s + i * step_s) for i, n in enumerate(names)}
    for info in storage.list_objects(cache_url + "/"):
        name = info.key[len(prefix) :].split(".")[0]
        if name in when:
            _set_time(storage.bucket_url(bucket, info.key), when[name])


def _build(backend: str, base_url: str) -> Runs:
    source = unique_bucket("rep")
    fin, part = _info(source, "fin"), _info(source, "part")
    records = []
    for info in (fin, part):
        create_env(info, f"manual__{info.conf.id}")
        for w in range(WIDTH):
            summary = align_pairs(info, w, base_url, SETTINGS)
            if info is fin:
                records.append(_timing(f"align.affine_{w}", summary))
    qc_before_collect = load_run(source, "part")
    canvas = collect_alignment(fin)
    assert collect_alignment(part)["bbox"] == canvas["bbox"]
    for w in range(WIDTH):
        records.append(
            _timing(f"align.write_{w}", write_slices(fin, canvas, w, base_url, SETTINGS))
        )
    records.append(_timing("ngingest.write_ngmeta", write_ngmeta(fin, canvas, base_url, SETTINGS)))
    for w in range(WIDTH):
        summary = write_ng_shards(fin, canvas, w, base_url, SETTINGS)
        records.append(_timing(f"ngingest.write_ng_shards_{w}", summary))
    write_status(fin, canvas, records, "manual__fin")
    # The partial run: every pair aligned, 15 of 40 slices written, one failure record.
    slices = plan_aligned_slices(part.conf, read_transforms(part.conf), canvas["bbox"])
    run_batch(
        slices[:PARTIAL_WRITES],
        base_url=base_url,
        cache_url=part.conf.layout.process_url(WRITE_CACHE),
        stage="write",
        settings=SETTINGS,
    )
    storage.write_bytes(
        part.conf.layout.process_url("failures", "write", f"{slices[20].name}.json"),
        json.dumps({"name": slices[20].name, "error": "POST /alignedslice answered 500"}).encode(),
    )
    # An object of an earlier trigger whose request differed: not this run's answer.
    storage.write_bytes(
        part.conf.layout.process_url(WRITE_CACHE, "z000100.0123456789ab.json"), b"{}"
    )
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    runs = Runs(backend, source, t0, fin, part, canvas, qc_before_collect)
    if backend == "local":
        _spread_local(runs)
    return runs


def _rewrite_json(url: str, **fields: Any) -> None:
    doc = json.loads(storage.read_bytes(url))
    storage.write_bytes(url, json.dumps({**doc, **fields}).encode())


def _spread_local(runs: Runs) -> None:
    """Move the runs into the past: records and their times as if written over 10 minutes."""
    t0 = runs.t0
    for info in (runs.finished, runs.partial):
        conf = info.conf
        _rewrite_json(
            conf.layout.process_url(INIT), started=t0.isoformat(), first_started=t0.isoformat()
        )
        _set_time(conf.layout.process_url(INIT), t0)
        pairs = [t.name for t in plan_align_pairs(conf)]
        _spread(conf.layout.process_url(AFFINE_CACHE), pairs, t0, *AFFINE_T)
        for name in (TRANSFORMS, TRANSFORMS_CSV, QC, CANVAS):
            _set_time(conf.layout.process_url(name), t0 + timedelta(seconds=300))
        slices = [slice_task_name(z) for z in range(MINZ, MAXZ + 1)]
        _spread(conf.layout.process_url(WRITE_CACHE), slices, t0, *WRITE_T)
    conf = runs.finished.conf
    cubes = [t.name for t in shard_plan(runs.finished, runs.canvas)]
    _spread(conf.layout.process_url(NG_CACHE), ["ngmeta"], t0, NGMETA_T, 0)
    _spread(conf.layout.process_url(NG_CACHE), cubes, t0, *NGSHARD_T)
    end = t0 + timedelta(seconds=620)
    _rewrite_json(
        conf.layout.process_url(COMPLETE),
        started=t0.isoformat(),
        finished=end.isoformat(),
        elapsed_s=620.0,
    )
    _set_time(conf.layout.process_url(COMPLETE), end)
    part = runs.partial.conf
    _set_time(
        part.layout.process_url("failures", "write", "z000120.json"), t0 + timedelta(seconds=340)
    )
    _set_time(part.layout.process_url(WRITE_CACHE, "z000100.0123456789ab.json"), t0)


@pytest.fixture
def runs(backend: str, services: str) -> Runs:
    if backend not in _BUILT:
        _BUILT[backend] = _build(backend, services)
    return _BUILT[backend]


def _t(runs: Runs, seconds: float) -> datetime:
    return runs.t0 + timedelta(seconds=seconds)


def _check_rate(runs: Runs, rate: float | None, per_min: float) -> None:
    if runs.backend == "local":
        assert rate == pytest.approx(per_min, rel=1e-6)
    else:  # the emulator's own times: all within a second or two
        assert rate is None or rate > 0


# -- tests ---------------------------------------------------------------------------


def test_finished_run(runs: Runs) -> None:
    report = load_run(runs.source, "fin")
    cubes = len(shard_plan(runs.finished, runs.canvas))
    assert cubes == 9
    done = {s.name: (s.done, s.total) for s in report.stages}
    assert done == {"affine": (39, 39), "write": (40, 40), "ngmeta": (1, 1), "ngshard": (9, 9)}
    assert report.state == FINISHED
    assert report.bbox_xy == tuple(runs.canvas["bbox"])
    assert all(s.matched_by == "key" and s.stale == 0 and s.failures == 0 for s in report.stages)
    assert all(s.eta is None for s in report.stages)
    assert [s.retried for s in report.stages] == [1, 0, 0, 0]
    assert report.stage("affine").attempts == 40
    _check_rate(runs, report.stage("affine").rate_per_min, 10.0)
    _check_rate(runs, report.stage("write").rate_per_min, 20.0)
    _check_rate(runs, report.stage("ngshard").rate_per_min, 3.0)
    assert report.stage("ngmeta").rate_per_min is None
    if runs.backend == "local":
        affine = report.stage("affine")
        assert affine.first_finished == _t(runs, 60)
        assert affine.last_finished == _t(runs, 60 + 38 * 6)
        assert report.stage("ngshard").last_finished == _t(runs, 450 + 8 * 20)
        assert report.last_activity == _t(runs, 620)
        assert report.started == runs.t0
        assert report.state_reason.endswith("after 10m20s")


def test_qc_flags_and_thresholds(runs: Runs) -> None:
    report = load_run(runs.source, "fin")
    assert report.qc_source == "qc.csv"
    assert [p.pre for p in report.qc] == list(range(MINZ, MAXZ))
    assert {p.pre: p.flags for p in report.flagged} == EXPECTED_FLAGS
    by_z = {p.pre: p for p in report.qc}
    assert (by_z[FEW_INLIERS_Z].model, by_z[FEW_INLIERS_Z].inliers) == ("translation", 12)
    assert (by_z[LARGE_RESIDUAL_Z].model, by_z[LARGE_RESIDUAL_Z].residual_px) == ("affine", 3.4)
    assert (by_z[NO_MODEL_Z].model, by_z[NO_MODEL_Z].inliers) == ("identity", 7)
    assert (by_z[105].model, by_z[105].inliers, by_z[105].residual_px) == ("affine", 505, 0.6)
    assert (by_z[101].model, by_z[101].inliers, by_z[101].residual_px) == ("translation", 481, 0.8)
    assert report.models_used() == {"affine": 6, "translation": 32, "identity": 1}
    loose = load_run(runs.source, "fin", min_inliers=10, max_residual_px=5.0)
    assert {p.pre: p.flags for p in loose.flagged} == {NO_MODEL_Z: (FEW_INLIERS, NO_MODEL)}
    text = report.summary_text()
    assert "3 pairs flagged" in text
    assert f"pair {FEW_INLIERS_Z}->{FEW_INLIERS_Z + 1}: translation, 12 inliers" in text
    assert f"pair {LARGE_RESIDUAL_Z}->{LARGE_RESIDUAL_Z + 1}: affine" in text
    assert "residual 3.40 px: large_residual" in text


def test_qc_from_the_cache_equals_qc_csv(runs: Runs) -> None:
    """Before collect, QC comes from the cached answers, choosing models as collect does."""
    before = runs.qc_before_collect
    assert before.qc_source == "affine_cache"
    assert before.bbox_xy is None and before.stage("ngshard").total is None
    after = load_run(runs.source, "part")
    assert after.qc_source == "qc.csv"
    assert before.qc == after.qc
    assert {p.pre: p.flags for p in after.flagged} == EXPECTED_FLAGS


def test_partial_run_is_running_with_an_eta(runs: Runs) -> None:
    last = _t(runs, WRITE_T[0] + (PARTIAL_WRITES - 1) * WRITE_T[1])
    now = last + timedelta(seconds=30) if runs.backend == "local" else datetime.now(UTC)
    report = load_run(runs.source, "part", now=now)
    assert report.state == RUNNING
    assert report.complete is None
    assert report.bbox_xy == tuple(runs.canvas["bbox"])  # from transforms.json
    done = {s.name: (s.done, s.total) for s in report.stages}
    assert done == {"affine": (39, 39), "write": (15, 40), "ngmeta": (0, 1), "ngshard": (0, 9)}
    write = report.stage("write")
    assert (write.stale, write.matched_by, write.failures) == (1, "key", 1)
    assert report.stage("affine").failures == 0
    assert report.stage("ngshard").failures is None
    assert [(f.stage, f.name) for f in report.failures] == [("write", "z000120")]
    assert "answered 500" in report.failures[0].error
    assert report.current_stage() is write
    assert "Now in aligned slices: 15/40 done, ETA " in report.summary_text()
    if runs.backend == "local":
        assert write.rate_per_min == pytest.approx(20.0)
        assert write.eta is not None
        assert write.eta == now + timedelta(seconds=25 / 20 * 60)
    else:
        assert (write.eta is not None) == (write.rate_per_min is not None)
    assert report.stage("affine").eta is None and report.stage("ngshard").eta is None
    stalled = load_run(runs.source, "part", now=now + timedelta(hours=2))
    assert stalled.state == FAILED  # no progress, and a failure record
    assert "no new record for 2h00m" in stalled.state_reason
    assert all(s.eta is None for s in stalled.stages)


def test_stalled_run_counted_by_name(runs: Runs) -> None:
    """A run made by other code (other digests): counted by mini-task name; no progress -> stalled."""
    info = _info(runs.source, "old")
    create_env(info, "manual__old")
    for task in plan_align_pairs(info.conf)[:5]:
        record = {"name": task.name, "response": align_answer(MINZ), "attempts": 1}
        url = info.conf.layout.process_url(AFFINE_CACHE, f"{task.name}.feedfacecafe.json")
        storage.write_bytes(url, json.dumps(record).encode())
    now = datetime.now(UTC) + timedelta(hours=1)
    report = load_run(runs.source, "old", now=now, stall_after_s=600)
    affine = report.stage("affine")
    assert (affine.done, affine.total, affine.matched_by, affine.stale) == (5, 39, "name", 0)
    assert report.state == STALLED
    assert report.qc_source == "affine_cache" and len(report.qc) == 5
    assert load_run(runs.source, "old", now=now, stall_after_s=7200).state == RUNNING


def test_skip_align_run(runs: Runs) -> None:
    """skip_align: no alignment stage, no QC; the canvas is the slice size."""
    conf = parse_conf(
        {"id": "skip", "image": "img.%05d.png", "minz": 0, "maxz": 9, "source": runs.source,
         "skip_align": True}
    )  # fmt: skip
    info = RunInfo(conf=conf, width=1, slice_size_xy=(1500, 900), dag_id=dag_id(1))
    create_env(info, "manual__skip")
    collect_alignment(info)
    report = load_run(runs.source, "skip")
    affine = report.stage("affine")
    assert (affine.skipped, affine.done, affine.total, affine.complete) == (True, 0, 0, True)
    assert report.bbox_xy == (1500, 900)
    assert {s.name: s.total for s in report.stages} == {
        "affine": 0, "write": 10, "ngmeta": 1, "ngshard": 2,
    }  # fmt: skip
    assert report.current_stage() is report.stage("write")
    assert (report.qc, report.qc_source) == ((), "qc.csv")
    assert "no pair results yet" in report.summary_text()


def test_unknown_runs_are_named(runs: Runs) -> None:
    with pytest.raises(RunNotFound, match=r"nope/init\.json"):
        load_run(runs.source, "nope")
    with pytest.raises(InvalidInput, match="Not_A_Bucket"):
        load_run("Not_A_Bucket", "fin")
    with pytest.raises(InvalidInput, match="one non-empty path segment"):
        load_run(runs.source, "a/b")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_run_report_writes_figures_html_and_json(runs: Runs, tmp_path: Path) -> None:
    report = run_report(runs.source, "fin", tmp_path / "out")
    out = tmp_path / "out"
    for name in ("progress.png", "qc.png", "quality.png"):
        w, h = _png_size(out / name)
        assert w > 300 and h > 200
    page = (out / "report.html").read_text()
    assert "<title>emprocess run fin</title>" in page
    assert ">finished</span>" in page
    assert "<td class=l>align pairs</td><td>39</td><td>39</td>" in page
    assert "<td class=l>ng shards</td><td>9</td><td>9</td>" in page
    assert page.count("data:image/png;base64,") == 3  # progress, QC, quality along z
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert base64.b64decode(embedded[0]) == (out / "progress.png").read_bytes()
    for z, flags in EXPECTED_FLAGS.items():
        assert f"<tr><td>{z}</td><td>{z + 1}</td>" in page
        assert f"<td class=l>{', '.join(flags)}</td>" in page
    assert "3 flagged" in page
    doc = json.loads((out / "report.json").read_text())
    assert doc == json.loads(json.dumps(report.to_json()))
    assert doc["state"] == FINISHED
    assert [s["done"] for s in doc["stages"]] == [39, 40, 1, 9]
    assert {p["pre"] for p in doc["qc"]["flagged"]} == set(EXPECTED_FLAGS)


def test_figures_of_a_run_in_progress(runs: Runs, tmp_path: Path) -> None:
    now = _t(runs, 400) if runs.backend == "local" else datetime.now(UTC)
    report = load_run(runs.source, "part", now=now, read_records=False)
    assert report.state == RUNNING
    assert report.stage("write").retried is None and report.qc_source == "qc.csv"
    assert _png_size(plot_progress(report, tmp_path / "p.png"))[0] > 300
    assert _png_size(plot_qc(report, tmp_path / "q.png"))[0] > 300
    page = write_html(report, tmp_path / "html").read_text()
    assert f">{report.state}</span>" in page
    assert "<td class=l>aligned slices</td><td>15</td><td>40</td>" in page
    assert "Failed write z000120" in page  # the failure record, in the summary


def test_failure_records_of_the_batch_helper(runs: Runs) -> None:
    """A mini-task that finally fails leaves RUN_ID/failures/STAGE/NAME.json, which the
    report counts and shows; its later success deletes the record."""
    info = _info(runs.source, "flaky")
    create_env(info, "manual__flaky")
    broken = {MINZ + 6}  # worker 0 of 2 sends the even pairs

    def respond(req: Request) -> Answer:
        z = int(req.body["pre"].rsplit(".", 2)[-2])
        if z in broken:
            return Answer(500, {"error": f"cannot read pair {z}"})
        return Answer(200, align_answer(z))

    with ScriptedServer(respond) as server:
        with pytest.raises(BatchError, match="1 of 20 mini-tasks failed: z000106"):
            align_pairs(info, 0, server.url, SETTINGS)
        align_pairs(info, 1, server.url, SETTINGS)
        url = info.conf.layout.process_url("failures", "affine", "z000106.json")
        record = json.loads(storage.read_bytes(url))
        task = plan_align_pairs(info.conf)[6]
        assert record.pop("finished")
        assert record == {
            "name": "z000106",
            "stage": "affine",
            "path": "/",
            "request": task.payload,
            "error": f"POST {server.url}/ answered 500: cannot read pair 106 (after 3 attempts)",
            "status": 500,
            "attempts": 3,
        }
        report = load_run(runs.source, "flaky")
        assert (report.stage("affine").done, report.stage("affine").failures) == (38, 1)
        assert [(f.stage, f.name) for f in report.failures] == [("affine", "z000106")]
        assert "answered 500: cannot read pair 106" in report.failures[0].error

        broken.clear()  # the task's retry: only the failed pair is sent, and succeeds
        summary = align_pairs(info, 0, server.url, SETTINGS)
    assert (summary["cached"], summary["sent"]) == (19, 1)
    assert not storage.exists(url)
    assert storage.list_keys(info.conf.layout.process_url("failures") + "/") == []
    report = load_run(runs.source, "flaky")
    assert report.stage("affine").complete and not report.stage("affine").failures
    assert report.failures == ()


def test_canvas_comes_from_canvas_json(runs: Runs) -> None:
    """collect's canvas.json gives the report its canvas; without it (runs made before
    collect wrote it) the canvas is recomputed from transforms.json, to the same box."""
    conf = runs.partial.conf
    canvas_url = conf.layout.process_url("align", "canvas.json")
    written = json.loads(storage.read_bytes(canvas_url))
    assert written == {**runs.canvas, "transforms": conf.layout.process_url(TRANSFORMS)}
    assert load_run(runs.source, "part").bbox_xy == tuple(written["bbox"])
    try:
        storage.write_bytes(canvas_url, json.dumps({**written, "bbox": [7, 5]}).encode())
        assert load_run(runs.source, "part").bbox_xy == (7, 5)  # read, not recomputed
        storage.delete(canvas_url)
        assert load_run(runs.source, "part").bbox_xy == tuple(written["bbox"])
    finally:
        storage.write_bytes(canvas_url, json.dumps(written).encode())
        if runs.backend == "local":
            _set_time(canvas_url, runs.t0 + timedelta(seconds=300))


def test_report_of_a_real_finished_run(
    finished_run: FinishedRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's real run (width-1 DAG, dag.test() against both services under
    gunicorn, each answering its first request with a 503) as the report sees it."""
    source, run_id, backend, root = finished_run
    if root is None:
        point_storage(monkeypatch, None)
    else:
        point_storage(monkeypatch, str(root))
    report = load_run(source, run_id)
    assert report.state == FINISHED, report.state_reason
    done = {s.name: (s.done, s.total) for s in report.stages}
    assert done == {"affine": (11, 11), "write": (12, 12), "ngmeta": (1, 1), "ngshard": (1, 1)}
    assert all(s.complete and s.matched_by == "key" and s.stale == 0 for s in report.stages)
    assert [s.retried for s in report.stages] == [1, 1, 0, 0]
    assert report.failures == () and report.current_stage() is None
    canvas = json.loads(storage.read_bytes(RunLayout(source, run_id).process_url(CANVAS)))
    assert report.bbox_xy == tuple(canvas["bbox"]) == tuple(report.complete["bbox"])
    assert report.qc_source == "qc.csv"
    assert [p.pre for p in report.qc] == list(range(11))
    assert all(p.inliers and p.inliers >= 50 for p in report.qc)
    assert report.models_used() == canvas["models"]
    print(f"report of the real {backend} run: {report.summary_text().splitlines()[0]}")


def test_progress_bars_of_a_real_finished_run(
    finished_run: FinishedRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``emprocess run``'s bars (rich) in a log: one line of counts per change, the bars at the end."""
    import io

    from rich.console import Console

    from emprocess.localrun import RunProgress

    source, run_id, _, root = finished_run
    if root is None:
        point_storage(monkeypatch, None)
    else:
        point_storage(monkeypatch, str(root))
    log = io.StringIO()
    with RunProgress(source, "no-such-run", Console(file=log, width=100)) as waiting:
        assert waiting.poll("queued") == "[queued] starting ..."
    labels = [s.label for s in load_run(source, run_id, read_records=False).stages]
    with RunProgress(source, run_id, Console(file=log, width=100)) as progress:
        line = progress.poll("running")
        assert progress.poll("running") == line  # unchanged: not printed again
        progress.poll("success")
    totals = (11, 12, 1, 1)
    assert line == "[running] " + "  ".join(
        f"{lb} {n}/{n}" for lb, n in zip(labels, totals, strict=True)
    )
    printed = [ln for ln in log.getvalue().splitlines() if ln.strip()]
    assert printed[:3] == ["[queued] starting ...", line, line.replace("running", "success")]
    bars = printed[3:]  # rich's bars, printed once when they stop
    assert [b.split()[-1] for b in bars] == [f"{n}/{n}" for n in totals]
    assert all(b.startswith(lb) and "━" in b for b, lb in zip(bars, labels, strict=True))


# -- the notebook --------------------------------------------------------------------


# One backend is enough here: the kernel runs the same load_run the tests above check on
# both, and the notebook must work on a local run (EMPROCESS_STORAGE_ROOT set).
@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_notebook_reports_the_finished_run(
    runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ipykernel.kernelspec import install

    # A kernelspec that runs this interpreter, whatever else is installed.
    install(kernel_name="python3", prefix=str(tmp_path / "jupyter"))
    kernels = tmp_path / "jupyter" / "share" / "jupyter"
    spec = json.loads((kernels / "kernels" / "python3" / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    monkeypatch.setenv("JUPYTER_PATH", str(kernels))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and params[0] is next(c for c in nb.cells if c.cell_type == "code")
    params[0].source = (
        f"source = {runs.source!r}\nrun_id = 'fin'\nout_dir = {str(tmp_path / 'nb')!r}\n"
        "min_inliers = 50\nmax_residual_px = 2.0\n"
    )
    NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    data = [o.data for o in outputs if o.output_type == "display_data"]
    markdown = "\n".join(d["text/markdown"] for d in data if "text/markdown" in d)
    assert storage.backend_description() in markdown
    texts = "\n".join(d["text/plain"] for d in data if "text/plain" in d)
    assert "State: FINISHED" in texts
    assert "3 pairs flagged" in texts
    pngs = [base64.b64decode(d["image/png"]) for d in data if "image/png" in d]
    # progress, QC and quality along z (this run has no quality record: said so)
    assert len(pngs) == 3 and all(p.startswith(b"\x89PNG") and len(p) > 1000 for p in pngs)
    assert "No quality record yet." in markdown
    doc = next(d["application/json"] for d in data if "application/json" in d)
    assert doc["state"] == FINISHED
    assert {s["name"]: (s["done"], s["total"]) for s in doc["stages"]} == {
        "affine": (39, 39),
        "write": (40, 40),
        "ngmeta": (1, 1),
        "ngshard": (9, 9),
    }
    assert {p["pre"]: tuple(p["flags"]) for p in doc["qc"]["flagged"]} == EXPECTED_FLAGS
    assert (tmp_path / "nb" / "report.html").is_file()


@pytest.mark.parametrize(
    ("complete", "message"),
    [
        (b"{not json", "complete.json is damaged: not JSON"),
        (b"[1, 2]", "complete.json is damaged: a JSON list, not an object"),
        (b'{"finished": "yesterday"}', "finished 'yesterday' is not an ISO 8601 time"),
        (b'{"finished": 5}', "finished '5' is not an ISO 8601 time"),
        (b'{"elapsed_s": "long"}', "elapsed_s 'long' is not a number"),
        (b'{"bbox": [1]}', "bbox [1] is not [width, height]"),
    ],
)
def test_a_damaged_complete_json_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, complete: bytes, message: str
) -> None:
    from emprocess.report.load import MalformedRecord

    point_storage(monkeypatch, str(tmp_path))
    run = RunLayout("src", "r1")
    storage.create_bucket(run.process)
    conf = {"id": "r1", "image": "img.%05d.png", "minz": 0, "maxz": 3, "source": "src"}
    init = {"conf": conf, "started": "2024-01-01T00:00:00+00:00"}
    storage.write_bytes(run.process_url(INIT), json.dumps(init).encode())
    storage.write_bytes(run.process_url(COMPLETE), complete)
    with pytest.raises(MalformedRecord, match=re.escape(message)):
        load_run("src", "r1")
