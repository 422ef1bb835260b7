"""The DAG file under real Airflow: DagBag loading, the contract's graph, Params, parse cost,
and the width-1 run end to end.

Airflow reads its configuration when first imported, so conftest.py's session fixture
``airflow_home`` points ``AIRFLOW_HOME`` (config, SQLite DB, logs) and the dags folder at
a temporary directory before any test imports it; nothing here touches ``~/airflow``.
The other end-to-end runs (width 4, faults, the dynamic DAG) are in test_workflow_e2e.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DAG_FILE, airflow_environ, point_storage
from dags_conftest_helpers import (
    E2ERun,
    ScriptedServer,
    check_finished_run,
    fake_emwrite_respond,
    write_slices,
)

from emprocess import layout
from emprocess.layout import RunLayout
from emprocess.workflow import POOL, VERSION, WIDTHS, dag_id
from emprocess.workflow.taskids import BATCH_TASKS

BATCH_STAGES = (
    "align.features", "align.affine", "align.gap_pairs", "align.slicestats", "align.write",
    "ngingest.write_ng_shards",
)  # fmt: skip
REQUIRED = {"id", "image", "minz", "maxz", "source"}


@pytest.fixture(scope="module")
def bench_process(airflow_home: Path) -> Iterator[subprocess.Popen]:
    """The parse benchmark in a fresh interpreter, started early to run alongside the tests."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emprocess_bench.parse",
            "--json",
            "--repeats",
            "3",
            str(DAG_FILE),
        ],
        env={**os.environ, **airflow_environ(airflow_home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def dagbag(bench_process: subprocess.Popen, airflow_home: Path) -> Any:
    """A DagBag of the dags folder of this module's own, the benchmark started too.

    Not the session's ``dag_bag``: ``dag.test(run_conf=...)`` writes the conf into the
    Params of the DAG it runs, and the tests here check the Params' defaults.
    """
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(airflow_home / "dags"), safe_mode=True)


def contract_edges(width: int) -> set[tuple[str, str]]:
    """CONTRACTS.md's task graph for a fixed width."""
    edges = {
        ("validate", "measure_window"),
        ("measure_window", "create_env"),
        ("create_env", "align.start_align"),
        ("align.check_features", "align.affine_0"),
        ("align.finish_align", "ngingest.write_ngmeta"),
        ("ngingest.finish_ngwrite", "iswritten"),
        ("iswritten", "cleanup_images"),
        ("cleanup_images", "set_public_read"),
        ("set_public_read", "write_status"),
    }
    for i in range(width):
        edges |= {
            ("align.start_align", f"align.features_{i}"),
            (f"align.features_{i}", "align.check_features"),
            ("align.check_features", f"align.affine_{i}"),
            (f"align.affine_{i}", "align.plan_gaps"),
            ("align.plan_gaps", f"align.gap_pairs_{i}"),
            (f"align.gap_pairs_{i}", "align.collect"),
            ("align.collect", f"align.slicestats_{i}"),
            (f"align.slicestats_{i}", "align.plan_intensity"),
            ("align.plan_intensity", f"align.write_{i}"),
            (f"align.write_{i}", "align.finish_align"),
            ("ngingest.write_ngmeta", f"ngingest.write_ng_shards_{i}"),
            (f"ngingest.write_ng_shards_{i}", "ngingest.finish_ngwrite"),
        }
    return edges


def edges_of(dag: Any) -> set[tuple[str, str]]:
    return {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}


def test_dag_folder_loads_with_the_expected_ids(dagbag: Any) -> None:
    assert dagbag.import_errors == {}
    expected = {f"emprocess_width{w}_v{VERSION}" for w in (128, 64, 32, 4, 1)}
    expected.add(f"emprocess_v{VERSION}")
    assert set(dagbag.dag_ids) == expected
    assert dag_id(32) == f"emprocess_width32_v{VERSION}"
    assert sorted(WIDTHS) == [1, 4, 32, 64, 128]


@pytest.mark.parametrize("width", sorted(WIDTHS))
def test_fixed_width_graph_is_the_contract(dagbag: Any, width: int) -> None:
    dag = dagbag.dags[dag_id(width)]
    edges = contract_edges(width)
    assert set(dag.task_ids) == {n for e in edges for n in e}
    assert edges_of(dag) == edges
    assert len(dag.tasks) == 15 + 6 * width
    assert dag.timetable.can_be_scheduled is False  # schedule=None
    assert {"emprocess", f"v{VERSION}", f"width{width}"} <= set(dag.tags)
    assert dag.doc_md.startswith(f"# {dag_id(width)}")
    for task in dag.tasks:
        batch = task.task_id.rstrip("0123456789").rstrip("_") in BATCH_STAGES
        single = task.task_id in ("measure_window", "ngingest.write_ngmeta")  # one request task
        assert (task.pool == POOL) == (batch or single), task
    iswritten = dag.task_dict["iswritten"]
    assert type(iswritten).__name__ == "_ShortCircuitDecoratedOperator"
    assert iswritten.trigger_rule == "all_done"
    assert dag.task_dict["validate"].retries == 0
    assert dag.task_dict["align.affine_0"].retries == 2


def test_dynamic_dag_maps_the_batch_stages(dagbag: Any) -> None:
    dag = dagbag.dags[f"emprocess_v{VERSION}"]
    assert set(dag.task_ids) == {
        "validate", "measure_window", "create_env", "align.start_align", "align.features",
        "align.check_features", "align.affine", "align.plan_gaps", "align.gap_pairs",
        "align.collect", "align.slicestats", "align.plan_intensity",
        "align.write", "align.finish_align", "ngingest.write_ngmeta",
        "ngingest.write_ng_shards", "ngingest.finish_ngwrite", "iswritten", "cleanup_images",
        "set_public_read", "write_status",
    }  # fmt: skip
    mapped = {t.task_id for t in dag.tasks if getattr(t, "is_mapped", False)}
    assert mapped == set(BATCH_STAGES)
    assert {t.pool for t in dag.tasks if t.task_id in mapped} == {POOL}
    assert BATCH_TASKS == BATCH_STAGES  # the one tuple the trigger and benchmarks read
    # The contract's order; each mapped stage also reads the worker ids from start_align.
    assert edges_of(dag) >= {
        ("align.start_align", "align.features"),
        ("align.features", "align.check_features"),
        ("align.check_features", "align.affine"),
        ("align.affine", "align.plan_gaps"),
        ("align.plan_gaps", "align.gap_pairs"),
        ("align.gap_pairs", "align.collect"),
        ("align.collect", "align.slicestats"),
        ("align.slicestats", "align.plan_intensity"),
        ("align.plan_intensity", "align.write"),
        ("align.write", "align.finish_align"),
        ("align.finish_align", "ngingest.write_ngmeta"),
        ("ngingest.write_ngmeta", "ngingest.write_ng_shards"),
        ("ngingest.write_ng_shards", "ngingest.finish_ngwrite"),
        ("ngingest.finish_ngwrite", "iswritten"),
        ("set_public_read", "write_status"),
    }
    assert dag.params.get_param("width").value == 32


@pytest.mark.parametrize("dynamic", [False, True])
def test_params_carry_defaults_and_descriptions(dagbag: Any, dynamic: bool) -> None:
    dag = dagbag.dags[dag_id(None if dynamic else 4)]
    params = {k: dag.params.get_param(k) for k in dag.params}
    keys = {"id", "image", "minz", "maxz", "source", "project", "email", "downsample_factor",
            "skip_align", "clip-limit", "createRawPyramid", "resolution", "public"}  # fmt: skip
    keys |= {"intensity", "raw_bits", "raw_format"}
    keys |= {"neighbors", "global_solve", "regularization", "skip_slices", "bad_slice_fill"}
    keys |= {"align_from"}
    keys |= {"channels", "align_channel", "jpeg_channels", "channel_templates"}
    keys |= {"location"}
    keys |= {"destreak", "intensity_correction"}
    assert set(params) == keys | ({"width"} if dynamic else set())
    for key, p in params.items():
        assert p.description, key
        assert p.schema.get("type"), key
        assert p.has_value == (
            key
            not in REQUIRED | {"project", "location", "email", "align_from", "channel_templates"}
        ), key
    assert params["clip-limit"].value == 0.02 and params["createRawPyramid"].value is True
    assert params["downsample_factor"].schema["minimum"] == 1
    assert params["public"].value is False and params["skip_align"].value is False
    # The trigger form validates with these schemas.
    from airflow.sdk.exceptions import ParamValidationError

    params["downsample_factor"].resolve(4)
    with pytest.raises(ParamValidationError):
        params["downsample_factor"].resolve(0)
    with pytest.raises(ParamValidationError):
        params["minz"].resolve("ten")
    # Keys of two shapes: a number or [x, y, z]; a word or [low, high].
    assert params["resolution"].resolve([4, 4, 40]) == [4, 4, 40]
    assert params["destreak"].resolve(True) is True and params["destreak"].resolve(12.5) == 12.5
    assert params["resolution"].resolve(8) == 8
    assert params["intensity"].resolve([100, 4000]) == [100, 4000]
    assert params["intensity"].resolve("full") == "full"
    with pytest.raises(ParamValidationError):
        params["resolution"].resolve([4, 40])


def test_every_dag_lets_its_width_run_at_once(dagbag: Any) -> None:
    """Airflow's default of 16 tasks per run would cap width 32..128; the pool must fit too."""
    from emprocess.workflow import POOL_SLOTS
    from emprocess.workflow.conf import MAX_WIDTH

    for width in [*WIDTHS, None]:
        dag = dagbag.dags[dag_id(width)]
        batch = [t for t in dag.tasks if t.task_id.startswith(BATCH_STAGES)]
        # The largest number of batch tasks of one stage (the dynamic DAG: the widest conf).
        peak = MAX_WIDTH if width is None else len(batch) // len(BATCH_STAGES)
        assert peak == (width or MAX_WIDTH)
        assert dag.max_active_tasks >= peak, dag.dag_id
        assert 1 <= dag.max_active_runs <= 16, dag.dag_id
        # Re-read as the scheduler reads it: the limit survives serialization.
        from airflow.serialization.serialized_objects import DagSerialization

        again = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
        assert again.max_active_tasks == dag.max_active_tasks
    assert max(WIDTHS) * dagbag.dags[dag_id(max(WIDTHS))].max_active_runs <= POOL_SLOTS


@pytest.mark.parametrize("width", [4, None])
def test_dags_serialize_for_the_scheduler(dagbag: Any, width: int | None) -> None:
    from airflow.serialization.serialized_objects import DagSerialization

    for dag in [dagbag.dags[dag_id(width)]]:
        again = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
        assert set(again.task_ids) == set(dag.task_ids)
        assert (
            again.params.get_param("minz").description == dag.params.get_param("minz").description
        )


def test_parse_is_cheap_and_imports_nothing_heavy(bench_process: subprocess.Popen) -> None:
    out, err = bench_process.communicate(timeout=180)
    assert bench_process.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    print(
        f"parse benchmark: first {result['first_parse_s']} s, DagBag median "
        f"{result['median_parse_s']} s, {result['tasks']} tasks"
    )
    assert result["heavy_modules"] == []
    assert result["import_errors"] == {}
    assert len(result["dag_ids"]) == 6 and result["tasks"] == 5 * 15 + 6 * 229 + 21
    # Target < 1 s; the bound leaves room for a busy 2-core test machine.
    assert result["median_parse_s"] < 3.0


# -- end to end: dag.test() -------------------------------------------------------------


def test_width1_dag_aligns_and_writes_a_volume_with_the_real_services(
    width1_run: E2ERun, dagbag: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dag.test() of the width-1 DAG on the local backend (the session's ``width1_run``)
    against both services under gunicorn, through recording proxies that make each
    service answer its first request with a 503: 12 slices aligned within 1 px."""
    from emprocess import storage

    run = width1_run
    assert run.root is not None
    point_storage(monkeypatch, str(run.root))
    dag = dagbag.dags[dag_id(1)]
    assert run.task_states == {t: "success" for t in dag.task_ids}, run.task_states
    figures = check_finished_run(run)
    print(figures.line(run))

    # What the services were sent: 11 pairs (+1 retried 503), 12 slices (+1), meta, 1 cube.
    source = run.source
    pairs_sent = [(b["pre"], b["post"]) for b in run.bodies("/")]
    assert len(pairs_sent) == 12  # one pair twice: its first answer was the injected 503
    assert sorted(set(pairs_sent)) == [
        (f"gs://{source}/stack/img.{z:05d}.png", f"gs://{source}/stack/img.{z + 1:05d}.png")
        for z in range(11)
    ]
    assert {b["downsample"] for b in run.bodies("/")} == {1}
    # Each slice's features were extracted once, before any pair; every pair matched them.
    align_paths = run.paths("align")
    assert align_paths == ["/features"] * 12 + ["/"] * 12
    assert sorted(b["img"] for b in run.bodies("/features")) == [
        f"gs://{source}/stack/img.{z:05d}.png" for z in range(12)
    ]
    assert {b["run_id"] for b in run.bodies("/")} == {"e2e1"}
    features = storage.list_keys(run.layout.process_url(layout.FEATURES) + "/")
    assert len(features) == 12
    assert run.paths() == ["/alignedslice"] * 13 + ["/ngmeta", "/ngshard"]
    assert sorted({b["slice"] for b in run.bodies("/alignedslice")}) == list(range(12))
    shard = run.bodies("/ngshard")[0]
    assert shard["start"] == [0, 0, 0] and shard["writeRaw"] is True
    assert shard["source"] == f"{source}_tmp_e2e1" and shard["dest_raw"] == f"{source}_chunk_e2e1"

    complete = json.loads(storage.read_bytes(run.layout.process_url(layout.COMPLETE)))
    assert complete["stages"]["align.features"]["sent"] == 12
    assert complete["stages"]["align.affine"]["sent"] == 11
    assert complete["stages"]["align.affine"]["attempts"] == 12
    assert complete["stages"]["align.write"]["attempts"] == 13
    assert (
        complete["models"]
        == json.loads(storage.read_bytes(run.layout.process_url(layout.CANVAS)))["models"]
    )
    # The volume: info of both pyramids and shard files of scale 0.
    info = json.loads(storage.read_bytes(f"{run.layout.jpeg_url}/info"))
    assert info["scales"][0]["size"] == [*complete["bbox"], 12]
    assert storage.list_keys(f"{run.layout.jpeg_url}/{info['scales'][0]['key']}/")
    assert storage.exists(f"{run.layout.raw_url}/info")
    assert storage.bucket_settings(run.layout.tmp)["lifecycle_delete_age_days"] == 3
    # The conf's address got the "ready" message through Airflow's SMTP connection.
    assert [m["rcpt"] for m in run.smtp_messages] == [["<someone@example.org>"]]
    assert "Subject: emprocess: e2e1 is ready (12 slices)" in run.smtp_messages[0]["data"]


@pytest.fixture
def recording_emwrite() -> Iterator[ScriptedServer]:
    """A stand-in for emwrite that records requests and answers 200; ONLY for DAG wiring."""
    with ScriptedServer(fake_emwrite_respond) as server:
        yield server


def test_dynamic_dag_maps_workers_from_the_conf(
    airflow_db: Path,
    dagbag: Any,
    recording_emwrite: ScriptedServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """dag.test() of emprocess_v{VERSION} with width 2 and skip_align: the mapped batch
    stages split the slices between two workers; no alignment service is needed."""
    from emprocess import storage

    point_storage(monkeypatch, str(tmp_path))
    monkeypatch.setenv("AIRFLOW_CONN_IMG_WRITE", recording_emwrite.url)
    monkeypatch.delenv("AIRFLOW_CONN_ALIGN_CLOUD_RUN", raising=False)
    storage.create_bucket("dyn-src")
    write_slices("dyn-src", "s%d.png", range(0, 5), size_xy=(30, 20))
    conf = {"id": "d1", "image": "s%d.png", "minz": 0, "maxz": 4, "source": "dyn-src",
            "skip_align": True, "width": 2, "project_id": "legacy-key"}  # fmt: skip
    dag = dagbag.dags[dag_id(None)]
    run = dag.test(run_conf=conf)
    tis = run.get_task_instances()
    assert {ti.state for ti in tis} == {"success"}, [(t.task_id, t.map_index, t.state) for t in tis]
    mapped = sorted((ti.task_id, ti.map_index) for ti in tis if ti.map_index >= 0)
    assert mapped == [(t, i) for t in sorted(BATCH_STAGES) for i in (0, 1)]
    slices = sorted(
        r.body["slice"] for r in recording_emwrite.requests if r.path == "/alignedslice"
    )
    assert slices == [0, 1, 2, 3, 4]
    done = RunLayout("dyn-src", "d1").process_url(layout.COMPLETE)
    complete = json.loads(storage.read_bytes(done))
    assert complete["conf"]["project"] == "legacy-key" and complete["conf"]["width"] == 2
    assert complete["stages"]["align.write"]["tasks"] == 2
    assert complete["stages"]["align.write"]["sent"] == 5
