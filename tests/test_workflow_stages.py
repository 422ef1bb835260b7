"""The task bodies without Airflow, against small scripted services and real storage."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import point_storage
from dags_conftest_helpers import (
    Answer,
    Request,
    ScriptedServer,
    fake_emwrite_respond,
    write_slices,
)

from emprocess import affine, layout, storage
from emprocess.errors import EmprocessError, InvalidInput
from emprocess.settings import HttpEnv
from emprocess.workflow import stages
from emprocess.workflow.batch import MiniTask, select_worker
from emprocess.workflow.payloads import (
    plan_align_pairs,
    plan_aligned_slices,
    plan_ng_shards,
    shard_slices,
)
from emprocess.workflow.stages import RunInfo

FAST = HttpEnv(http_threads=2, http_attempts=2, http_backoff_s=0.01, http_max_backoff_s=0.02)
SHIFT_PX = {3: (2.0, -1.0), 4: (-3.0, 0.5)}  # pair (z, z+1): translation found at downsample 2


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    point_storage(monkeypatch, str(tmp_path / "root"))
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


def run_info(source: str, **conf: Any) -> RunInfo:
    write_slices(source, "img.%05d.png", range(3, 6), size_xy=(40, 30))
    data = {"id": "r1", "image": "img.%05d.png", "minz": 3, "maxz": 5, "source": source, **conf}
    return stages.validate_run(data, dag_width=2, dag_id="emprocess_width2_test")


@pytest.fixture
def emwrite() -> Iterator[ScriptedServer]:
    with ScriptedServer(fake_emwrite_respond) as server:
        yield server


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


def test_create_env_is_idempotent(root: Path) -> None:
    storage.create_bucket("src")
    info = run_info("src", createRawPyramid=False, project="proj")
    first = stages.create_env(info, "manual__1")
    assert first["buckets_created"] == {"src_process": True, "src_tmp_r1": True, "src_ng_r1": True}
    init1 = json.loads(storage.read_bytes(info.conf.layout.process_url(layout.INIT)))
    second = stages.create_env(info, "manual__2")
    assert set(second["buckets_created"].values()) == {False}
    init2 = json.loads(storage.read_bytes(info.conf.layout.process_url(layout.INIT)))
    assert init2["first_started"] == init1["started"]
    assert init2["airflow_run_id"] == "manual__2"
    assert init2["conf"] == info.conf.to_json() and init2["slice_size_xy"] == [40, 30]
    assert set(init2["versions"]) >= {"python", "clio-ingest", "pydantic"}
    assert not storage.bucket_exists(info.conf.layout.chunk)
    assert "environ" not in json.dumps(init2).lower()


def test_align_and_collect_compose_the_cached_answers(root: Path) -> None:
    storage.create_bucket("src")
    info = run_info("src", downsample_factor=2, neighbors=1, global_solve=False)
    stages.create_env(info, "manual__1")
    with ScriptedServer(fake_align) as server:
        sent = [stages.align_pairs(info, w, server.url, FAST)["sent"] for w in (0, 1)]
    assert sent == [1, 1]
    assert sorted(r.body["downsample"] for r in server.requests) == [2, 2]
    canvas = stages.collect_alignment(info)
    # Full resolution pairs (4, -2) and (-6, 1): slices at (0, 0), (4, -2), (-2, -1);
    # x spans -2..44, y spans -2..30.
    assert canvas["bbox"] == [46, 32] and canvas["models"] == {"translation": 2}
    transforms = stages.read_transforms(info.conf)
    assert transforms == {
        3: affine.translation(2, 2),
        4: affine.translation(6, 0),
        5: affine.translation(0, 1),
    }
    csv = (
        storage.read_bytes(info.conf.layout.process_url(layout.TRANSFORMS_CSV))
        .decode()
        .splitlines()
    )
    assert csv[0] == "slice,m00,m10,m01,m11,m02,m12" and csv[2] == "4,1.0,0.0,0.0,1.0,6.0,0.0"
    qc = storage.read_bytes(info.conf.layout.process_url(layout.QC)).decode().splitlines()
    assert qc[1] == "3,4,translation,0.0,40,44,0.3,0.4"


def test_align_from_takes_an_earlier_runs_alignment(root: Path) -> None:
    """r2 takes r1's transforms (its z sub-range) and canvas without one alignment request;
    a missing, uncovering or self-naming align_from is refused, naming the problem."""
    storage.create_bucket("src")
    first = run_info("src", downsample_factor=2, neighbors=1, global_solve=False)
    with pytest.raises(InvalidInput, match=r"align_from 'r1': gs://src_process/r1/init.json"):
        run_info("src", id="r2", align_from="r1")  # r1 has not run yet
    stages.create_env(first, "manual__1")
    with ScriptedServer(fake_align) as server:
        for w in (0, 1):
            stages.align_pairs(first, w, server.url, FAST)
    before = stages.collect_alignment(first)

    info = run_info("src", id="r2", align_from="r1", minz=4, **{"clip-limit": 0.05})
    stages.create_env(info, "manual__2")
    assert stages.align_pairs(info, 0, "http://127.0.0.1:9", FAST)["planned"] == 0
    canvas = stages.collect_alignment(info)
    assert canvas["bbox"] == before["bbox"] and canvas["aligned_from"] == "r1"
    assert canvas["transforms"] == info.conf.layout.process_url(layout.TRANSFORMS)
    whole = stages.read_transforms(first.conf)
    assert stages.read_transforms(info.conf) == {4: whole[4], 5: whole[5]}
    assert stages.write_plan(info, canvas)[0].payload["transform"] == whole[4]

    write_slices("src", "img.%05d.png", [6], size_xy=(40, 30))
    with pytest.raises(InvalidInput, match=r"do not cover minz..maxz \(3..6\): 1 missing"):
        run_info("src", id="r3", align_from="r1", maxz=6)
    with pytest.raises(InvalidInput, match="this run's own id"):
        run_info("src", align_from="r1")
    with pytest.raises(InvalidInput, match="exclude each other"):
        run_info("src", id="r3", align_from="r1", skip_align=True)


def test_skip_align_sends_nothing_and_writes_identity(root: Path, emwrite: ScriptedServer) -> None:
    storage.create_bucket("src")
    info = run_info("src", skip_align=True)
    stages.create_env(info, "manual__1")
    assert stages.align_pairs(info, 0, "http://127.0.0.1:9", FAST)["planned"] == 0
    canvas = stages.collect_alignment(info)
    assert canvas["bbox"] == [40, 30]
    with pytest.raises(EmprocessError, match=r"3 of 3 slices have not been written: z000003"):
        stages.check_slices_written(info, canvas)
    for w in (0, 1):
        stages.write_slices(info, canvas, w, emwrite.url, FAST)
    assert stages.check_slices_written(info, canvas) == {"slices": 3}
    bodies = sorted((r.body for r in emwrite.requests), key=lambda b: b["slice"])
    assert [b["transform"] for b in bodies] == [list(affine.IDENTITY)] * 3
    assert {json.dumps(b["bbox"]) for b in bodies} == {"[40, 30]"}


def test_ngingest_written_check_and_status(root: Path, emwrite: ScriptedServer) -> None:
    storage.create_bucket("src")
    info = run_info("src", skip_align=True, public=True, email="a@b.org")
    stages.create_env(info, "manual__1")
    canvas = stages.collect_alignment(info)
    ok, msg = stages.check_written(info, canvas)
    assert not ok
    assert msg == (
        "volume incomplete: 2 of 2 requests unanswered: ngmeta, cube_0_0_0; "
        "gs://src_ng_r1/neuroglancer/jpeg/info does not exist"
    )
    stages.write_ngmeta(info, canvas, emwrite.url, FAST)
    stages.write_ng_shards(info, canvas, 0, emwrite.url, FAST)
    assert stages.write_ng_shards(info, canvas, 1, emwrite.url, FAST)["planned"] == 0
    assert stages.check_written(info, canvas) == (
        True,
        "volume complete: 1 cubes and gs://src_ng_r1/neuroglancer/jpeg/info",
    )
    assert "deleted 3 days after" in stages.cleanup_images(info)
    assert storage.bucket_settings(info.conf.layout.tmp)["lifecycle_delete_age_days"] == 3
    assert "public-read is a no-op" in stages.set_public_read(info)
    records = [
        {"task_id": "validate", "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:00:02+00:00"},
        {"task_id": "ngingest.write_ng_shards_0", "started": "2026-01-01T00:00:05+00:00",
         "finished": "2026-01-01T00:00:09+00:00", "batch": {"planned": 1, "cached": 0, "sent": 1, "attempts": 2}},
        {"task_id": "ngingest.write_ng_shards_1", "started": "2026-01-01T00:00:04+00:00",
         "finished": "2026-01-01T00:00:06+00:00", "batch": {"planned": 0, "cached": 0, "sent": 0, "attempts": 0}},
    ]  # fmt: skip
    doc = stages.write_status(info, canvas, records, "manual__1")
    assert json.loads(storage.read_bytes(info.conf.layout.process_url(layout.COMPLETE))) == doc
    assert doc["stages"] == {
        "validate": {"tasks": 1, "started": records[0]["started"], "finished": records[0]["finished"], "elapsed_s": 2.0},
        "ngingest.write_ng_shards": {"tasks": 2, "started": records[2]["started"], "finished": records[1]["finished"],
                                     "elapsed_s": 5.0, "planned": 1, "cached": 0, "sent": 1, "attempts": 2},
    }  # fmt: skip
    assert doc["neuroglancer"] == "precomputed://gs://src_ng_r1/neuroglancer/jpeg"
    assert doc["public"] is True and doc["slices"] == 3 and doc["elapsed_s"] >= 0
    subject, body = stages.status_email(doc)
    assert subject == "emprocess: r1 is ready (3 slices)"
    assert "precomputed://gs://src_ng_r1/neuroglancer/jpeg" in body


def test_private_by_default(root: Path) -> None:
    storage.create_bucket("src")
    info = run_info("src")
    assert stages.set_public_read(info) == "bucket src_ng_r1 stays private (conf public is false)"


def test_cube_plan_covers_the_volume_round_robin(root: Path) -> None:
    storage.create_bucket("src")
    conf = run_info("src").conf.model_copy(update={"minz": 5, "maxz": 1030})
    written = [MiniTask(i, f"z{i + 5:06d}", "/alignedslice", {"clip": 0.02}) for i in range(1026)]
    tasks = plan_ng_shards(conf, [2500, 1100], written)
    starts = [t.payload["start"] for t in tasks]
    assert len(starts) == 3 * 2 * 2 and starts[0] == [0, 0, 0] and starts[-1] == [2, 1, 1]
    assert [t.index for t in tasks] == list(range(12))
    assert {t.payload["minz"] for t in tasks} == {5}
    assert tasks[4].name == "cube_1_1_0"
    # Each cube's cost is its voxels: edge cubes are thinner, the last z-layer 2 deep.
    assert tasks[0].cost == 1024 * 1024 * 1024 and tasks[-1].cost == 452 * 76 * 2
    # A cube's cache key follows the write requests of its own slices, and only those:
    # slice 1029 (position 1024) lies in the cubes of z-start 1.
    changed = list(written)
    changed[1024] = MiniTask(1024, "z001029", "/alignedslice", {"clip": 0.05})
    again = plan_ng_shards(conf, [2500, 1100], changed)
    redo = [t.name for t, u in zip(tasks, again, strict=True) if t.cache_key() != u.cache_key()]
    assert redo == [t.name for t in tasks if t.payload["start"][2] == 1]
    assert [t.payload for t in again] == [t.payload for t in tasks]
    with pytest.raises(ValueError, match="write plan has 3 slices"):
        plan_ng_shards(conf, [2500, 1100], written[:3])


def test_a_batch_task_plans_its_own_share_as_the_whole_plan_would(root: Path) -> None:
    """Planned with a share, each stage gives exactly the whole plan's mini-tasks of that
    worker (same indexes, payloads and cache keys); a share's cubes need only the write
    requests of their own z-layers."""
    storage.create_bucket("src")
    conf = run_info("src").conf.model_copy(update={"minz": 5, "maxz": 2100, "neighbors": 3})
    transforms = {z: affine.translation(z % 7, 1) for z in range(5, 2101)}
    bbox = [2500, 1100]
    pairs = plan_align_pairs(conf, (0.0, 255.0))
    written = plan_aligned_slices(conf, transforms, bbox)
    cubes = plan_ng_shards(conf, bbox, written)
    width = 4
    for w in range(width):
        share = (w, width)
        assert plan_align_pairs(conf, (0.0, 255.0), share) == select_worker(pairs, w, width)
        zs = range(conf.minz + w, conf.maxz + 1, width)
        assert plan_aligned_slices(conf, transforms, bbox, zs=zs) == select_worker(
            written, w, width
        )
        layers = shard_slices(conf, bbox, share)
        own = plan_ng_shards(
            conf, bbox, plan_aligned_slices(conf, transforms, bbox, zs=layers), share
        )
        assert [t.cache_key() for t in own] == [
            t.cache_key() for t in select_worker(cubes, w, width)
        ]
    # 18 cubes, 6 per z-layer: worker 1 of 12 has cubes 1 and 13, of z-layers 0 and 2.
    assert shard_slices(conf, bbox, (1, 12)) == [*range(5, 1029), *range(2053, 2101)]
    with pytest.raises(EmprocessError, match=r"worker_id 4 is outside 0\.\.3 \(width 4\)"):
        plan_align_pairs(conf, None, (4, 4))
