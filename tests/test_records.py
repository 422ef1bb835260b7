"""The run records as models: each round-trips, byte for byte, a record the workflow wrote;
a damaged record is refused naming the record, the field and the value."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
from dags_conftest_helpers import Answer, Request, ScriptedServer, write_slices

from emprocess import affine, layout, storage
from emprocess.answers import AnswerCache, answer_key
from emprocess.errors import ObjectNotFound
from emprocess.records import (
    AnswerRecord,
    CanvasRecord,
    CompleteRecord,
    FailureRecord,
    GapsRecord,
    InitRecord,
    MalformedRecord,
    NotifiedRecord,
    Record,
    parse_fill,
    parse_record,
    parse_slices_csv,
    parse_transforms,
)
from emprocess.settings import HttpEnv
from emprocess.workflow import gaps as gaps_stage
from emprocess.workflow import stages
from emprocess.workflow.batch import BatchError, MiniTask, run_batch
from emprocess.workflow.stages import RunInfo

FAST = HttpEnv(http_threads=2, http_attempts=1, http_backoff_s=0.01, http_max_backoff_s=0.02)
SHIFT_PX = {3: (2.0, -1.0), 4: (-3.0, 0.5)}  # pair (z, z+1): translation at downsample 2


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EMPROCESS_STORAGE_ROOT", str(tmp_path / "root"))
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


def run_info(**conf: Any) -> RunInfo:
    data = {"id": "r1", "image": "img.%05d.png", "minz": 3, "maxz": 5, "source": "src", **conf}
    return stages.validate_run(data, dag_width=2, dag_id="emprocess_width2_test")


def fake_align(req: Request) -> Answer:
    z = int(re.search(r"img\.(\d+)\.png$", req.body["pre"]).group(1))
    dx, dy = SHIFT_PX[z]
    return Answer(
        200,
        {
            "width": 20,
            "height": 15,
            "width0": 20,
            "height0": 15,
            "affine": [1.0, 0.0, 0.0, 1.0, dx, dy],
            "translation": affine.translation(dx, dy),
            "affine_found": True,
            "translation_found": True,
            "affine_inliers": 40,
            "translation_inliers": 44,
            "affine_mean_residual_px": 0.3,
            "translation_mean_residual_px": 0.4,
        },
    )


def _round_trip(cls: type[Record], url: str) -> Record:
    """The record at ``url`` parsed as ``cls``; written back it gives the same bytes."""
    data = storage.read_bytes(url)
    record = parse_record(cls, data, url)
    assert record.to_bytes() == data, url
    return record


@pytest.fixture
def written_run(root: Path) -> RunInfo:
    """Run r1 of src, slices 3..5, through create_env, align, collect (global solve, the gap
    round) and write_status, by the workflow's own code against a scripted align service."""
    storage.create_bucket("src")
    write_slices("src", "img.%05d.png", range(3, 6), size_xy=(40, 30))
    info = run_info(downsample_factor=2, neighbors=1)
    stages.create_env(info, "manual__1")
    with ScriptedServer(fake_align) as server:
        for worker in (0, 1):
            stages.align_pairs(info, worker, server.url, FAST)
        gaps_stage.plan_gaps(info)
        for worker in (0, 1):
            gaps_stage.align_gap_pairs(info, worker, server.url, FAST)
        canvas = stages.collect_alignment(info)
    tasks = [
        {
            "task_id": "validate",
            "started": "2026-01-01T00:00:00+00:00",
            "finished": "2026-01-01T00:00:01+00:00",
        },
        {
            "task_id": "align.affine_0",
            "started": "2026-01-01T00:00:01+00:00",
            "finished": "2026-01-01T00:00:03.500+00:00",
            "batch": {"planned": 1, "cached": 0, "sent": 1, "attempts": 2},
        },
    ]
    stages.write_status(info, canvas, tasks, "manual__1")
    return info


def test_every_record_of_a_run_round_trips_byte_for_byte(written_run: RunInfo) -> None:
    run = written_run.conf.layout
    records = run.records
    init = _round_trip(InitRecord, run.process_url(layout.INIT))
    assert isinstance(init, InitRecord)
    assert (init.width, init.slice_size_xy, init.conf["id"]) == (2, [40, 30], "r1")
    assert init.first_start == init.started and records.read_init() == init

    canvas = _round_trip(CanvasRecord, run.process_url(layout.CANVAS))
    assert isinstance(canvas, CanvasRecord) and canvas.alignment is not None
    assert canvas.alignment.slices == {"good": 3, "bridged": 0, "bad": 0}
    assert canvas.transforms == run.process_url(layout.TRANSFORMS)
    assert records.read_canvas() == records.canvas() == canvas

    complete = _round_trip(CompleteRecord, run.process_url(layout.COMPLETE))
    assert isinstance(complete, CompleteRecord)
    assert complete.bbox == canvas.bbox and complete.alignment == canvas.alignment
    assert complete.stages["align.affine"].attempts == 2
    assert complete.stages["validate"].to_json() == {
        "tasks": 1,
        "started": "2026-01-01T00:00:00+00:00",
        "finished": "2026-01-01T00:00:01+00:00",
        "elapsed_s": 1.0,
    }

    gaps = _round_trip(GapsRecord, run.process_url(layout.GAPS))
    assert isinstance(gaps, GapsRecord) and gaps.pairs == []

    cache = AnswerCache.of_stage(run, layout.STAGE_AFFINE)
    keys = sorted(cache.keys())
    assert [AnswerCache.name_of(k) for k in keys] == ["z000003", "z000004"]
    for key in keys:
        answer = _round_trip(AnswerRecord, cache.url_of(key))
        assert isinstance(answer, AnswerRecord)
        assert answer.response["affine_inliers"] == 40 and answer == cache.read(key)
        assert key == answer_key(answer.name, answer.path, answer.request)

    data = storage.read_bytes(run.process_url(layout.TRANSFORMS))
    transforms = parse_transforms(data, "t")
    assert records.transforms() == records.read_transforms() == transforms
    assert sorted(transforms) == [3, 4, 5] and all(len(t) == 6 for t in transforms.values())
    records.write_transforms(transforms)
    assert storage.read_bytes(run.process_url(layout.TRANSFORMS)) == data
    rows = records.read_slices()
    assert rows is not None and [(r.z, r.status, r.features) for r in rows] == [
        (3, "good", None),
        (4, "good", None),
        (5, "good", None),
    ]
    fill = storage.read_bytes(run.process_url(layout.FILL))
    assert parse_fill(fill, "f") == records.read_fill() == {}


def test_a_taken_alignment_round_trips(written_run: RunInfo) -> None:
    """align_from: the canvas names the earlier run; transforms and fill are restricted."""
    info = run_info(id="r2", align_from="r1", minz=4)
    stages.create_env(info, "manual__2")
    taken = stages.collect_alignment(info)
    run = info.conf.layout
    canvas = _round_trip(CanvasRecord, run.process_url(layout.CANVAS))
    assert isinstance(canvas, CanvasRecord) and canvas.to_json() == taken
    assert list(taken) == ["bbox", "models", "transforms", "aligned_from", "alignment"]
    assert canvas.aligned_from == "r1" and sorted(run.records.transforms()) == [4, 5]


def test_a_failure_record_round_trips(root: Path) -> None:
    storage.create_bucket("src_process")
    run = layout.RunLayout("src", "r1")
    tasks = [MiniTask(i, f"z{i:06d}", "/alignedslice", {"slice": i}) for i in range(2)]

    def refuse_one(req: Request) -> Answer:
        return (
            Answer(400, {"error": "slice 1 is bad"})
            if req.body["slice"] == 1
            else Answer(200, "success")
        )

    with ScriptedServer(refuse_one) as server, pytest.raises(BatchError):
        run_batch(
            tasks,
            base_url=server.url,
            cache_url=run.process_url(layout.WRITE_CACHE),
            stage=layout.STAGE_WRITE,
            settings=FAST.model_copy(update={"http_threads": 1}),
            failure_url=run.records.failure_url(layout.STAGE_WRITE),
        )
    url = run.process_url(layout.FAILURES, layout.STAGE_WRITE, "z000001.json")
    failure = _round_trip(FailureRecord, url)
    assert isinstance(failure, FailureRecord)
    assert (failure.stage, failure.status, failure.request) == ("write", 400, {"slice": 1})
    assert "slice 1 is bad" in failure.error


def test_reading_an_absent_record(root: Path) -> None:
    storage.create_bucket("src_process")
    records = layout.RunLayout("src", "r1").records
    assert records.read_init() is None and records.read_complete() is None
    assert records.read_fill() == {} and records.read_transforms() is None
    with pytest.raises(ObjectNotFound):
        records.canvas()


def test_older_records_with_fewer_fields_are_read() -> None:
    init = parse_record(InitRecord, b'{"conf": {"minz": 0}, "started": "2024-01-01T00:00:00"}', "i")
    assert init.first_start == "2024-01-01T00:00:00" and init.width is None
    answer = parse_record(AnswerRecord, b'{"name": "z000001", "response": "success"}', "a")
    assert (answer.attempts, answer.elapsed_s, answer.response) == (1, None, "success")


@pytest.mark.parametrize(
    ("cls", "doc", "message"),
    [
        (
            InitRecord,
            {"width": "wide"},
            "width: Input should be a valid integer, unable to parse string as an integer (got 'wide')",
        ),
        (InitRecord, {"started": "today"}, "started 'today' is not an ISO 8601 time"),
        (CanvasRecord, {"bbox": [0, 5]}, "bbox [0, 5] is not [width, height]"),
        (CanvasRecord, {"models": {}}, "bbox is missing"),
        (CanvasRecord, {"bbox": [4, 5], "alignment": {"pairs": "x"}}, "alignment.pairs: "),
        (CompleteRecord, {"elapsed_s": "long"}, "elapsed_s 'long' is not a number"),
        (CompleteRecord, {"elapsed_s": True}, "elapsed_s True is not a number"),
        (CompleteRecord, {"stages": {"a": {"tasks": "x"}}}, "stages.a.tasks: "),
        (AnswerRecord, {"attempts": "many"}, "attempts: "),
        (FailureRecord, {"status": "teapot"}, "status: "),
        (GapsRecord, {"pairs": [[1]]}, "pairs.0.1 is missing"),
    ],
)
def test_a_damaged_record_names_the_field(cls: type[Record], doc: Any, message: str) -> None:
    with pytest.raises(MalformedRecord, match=re.escape(f"gs://b/r/x.json is damaged: {message}")):
        parse_record(cls, json.dumps(doc).encode(), "gs://b/r/x.json")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "is damaged: not JSON"),
        (b"[1, 2]", "is damaged: a JSON list, not an object"),
    ],
)
def test_a_record_that_is_not_a_json_object(data: bytes, message: str) -> None:
    with pytest.raises(MalformedRecord, match=re.escape(message)):
        parse_record(CompleteRecord, data, "gs://b/r/complete.json")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"3": [1, 0, 0, 1]}', "not {slice: [6 numbers]} (3: List should have at least 6"),
        (
            b'{"z": [1, 0, 0, 1, 0, 0]}',
            "not {slice: [6 numbers]} (z.[key]: Input should be a valid integer",
        ),
        (b'{"3": [1, 0, 0, 1, 0, "x"]}', "not {slice: [6 numbers]} (3.5: Input should be"),
    ],
)
def test_a_damaged_transforms_json_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(MalformedRecord, match=re.escape(f"t.json is damaged: {message}")):
        parse_transforms(data, "t.json")


def test_compare_records_ignores_only_the_run_to_run_values(tmp_path: Path) -> None:
    """scripts/compare_records.py (the check that a change keeps the records' bytes): times,
    durations and the features digest are ignored; key order, spacing and values are not."""
    spec = importlib.util.spec_from_file_location(
        "_compare_records", Path(__file__).parents[1] / "scripts" / "compare_records.py"
    )
    assert spec is not None and spec.loader is not None
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    a, b = tmp_path / "a", tmp_path / "b"
    for root, started, seconds, digest in (
        (a, "10:00", 0.5, "0" * 16),
        (b, "11:00", 0.7, "f" * 16),
    ):
        (root / "align").mkdir(parents=True)
        init = {"id": "r", "started": f"2026-01-01T{started}:00+00:00", "elapsed_s": seconds}
        (root / "init.json").write_text(json.dumps(init, indent=2))
        feat = f"gs://s_process/r/align/features/img.00001.{digest}.feat"
        (root / "align" / "z1.json").write_text(json.dumps({"features": feat, "seconds": seconds}))
        (root / "align" / "img.00001.png").write_bytes(started.encode())  # not a record
    assert compare.compare(a, b) == []
    (b / "init.json").write_text(json.dumps({"started": "x", "id": "r", "elapsed_s": 1}, indent=2))
    (b / "extra.json").write_text("{}")
    problems = compare.compare(a, b)
    assert problems[0] == f"only in {b}: extra.json"
    assert problems[1].startswith("differs: init.json")


def test_a_failure_mail_is_recorded_once_per_airflow_run(root: Path) -> None:
    storage.create_bucket("src_process")
    records = layout.RunLayout("src", "r1").records
    first = NotifiedRecord(airflow_run_id="manual__2026-01-01T00:00:00+00:00", task="write[3]")
    assert records.write_notified(first)
    assert not records.write_notified(first.model_copy(update={"task": "collect"}))
    key = "notified/manual__2026-01-01T00_00_00_00_00.json"
    data = storage.read_bytes(records.url(key))  # as notify.py always wrote it
    assert data == json.dumps({"airflow_run_id": first.airflow_run_id, "task": "write[3]"}).encode()
    assert parse_record(NotifiedRecord, data, key) == first


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("z,status\n", "no column residual_px"),
        ("z,status,residual_px,features,reason\n3,good,0.1,,\n4,bad,x,5,\n", "line 3: residual_px"),
    ],
)
def test_a_damaged_slices_csv_names_the_line(text: str, message: str) -> None:
    with pytest.raises(MalformedRecord, match=re.escape(f"s.csv is damaged: {message}")):
        parse_slices_csv(text, "s.csv")
