"""The DAG file under real Airflow: DagBag loading, the contract's graph, Params, parse cost.

Airflow reads its configuration when first imported, so a session fixture points
``AIRFLOW_HOME`` (config, SQLite DB, logs) and the dags folder at a temporary
directory before any test imports it; nothing here touches ``~/airflow``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dags_conftest_helpers import ScriptedServer, SmtpSink, fake_emwrite_respond, write_slices
from faultproxy import FaultProxy, fail_first

from emprocess.workflow import POOL, VERSION, WIDTHS, dag_id

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "emprocess.py"
BATCH_STAGES = ("align.affine", "align.write", "ngingest.write_ng_shards")
REQUIRED = {"id", "image", "minz", "maxz", "source"}


def airflow_environ(home: Path) -> dict[str, str]:
    """Environment that confines Airflow to ``home`` (config, SQLite DB, dags, logs)."""
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
    }


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A throw-away AIRFLOW_HOME whose dags folder holds a copy of emprocess.py."""
    home = tmp_path_factory.mktemp("airflow_home")
    (home / "dags").mkdir()
    shutil.copy(DAG_FILE, home / "dags" / "emprocess.py")
    env = airflow_environ(home)
    if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != str(home):
        pytest.fail(
            "airflow was imported before the airflow_home fixture configured it "
            f"(AIRFLOW_HOME={os.environ.get('AIRFLOW_HOME')!r}); import it only inside tests"
        )
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def bench_process(airflow_home: Path) -> Iterator[subprocess.Popen]:
    """The parse benchmark in a fresh interpreter, started early to run alongside the tests."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emprocess.workflow.bench",
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
def dagbag(airflow_home: Path, bench_process: subprocess.Popen) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(airflow_home / "dags"), safe_mode=True)


def contract_edges(width: int) -> set[tuple[str, str]]:
    """CONTRACTS.md's task graph for a fixed width."""
    edges = {
        ("validate", "create_env"),
        ("create_env", "align.start_align"),
        ("align.finish_align", "ngingest.write_ngmeta"),
        ("ngingest.finish_ngwrite", "iswritten"),
        ("iswritten", "cleanup_images"),
        ("cleanup_images", "set_public_read"),
        ("set_public_read", "write_status"),
    }
    for i in range(width):
        edges |= {
            ("align.start_align", f"align.affine_{i}"),
            (f"align.affine_{i}", "align.collect"),
            ("align.collect", f"align.write_{i}"),
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
    assert len(dag.tasks) == 11 + 3 * width
    assert dag.timetable.can_be_scheduled is False  # schedule=None
    assert {"emprocess", f"v{VERSION}", f"width{width}"} <= set(dag.tags)
    assert dag.doc_md.startswith(f"# {dag_id(width)}")
    for task in dag.tasks:
        batch = task.task_id.rstrip("0123456789").rstrip("_") in BATCH_STAGES
        assert (task.pool == POOL) == (batch or task.task_id == "ngingest.write_ngmeta"), task
    iswritten = dag.task_dict["iswritten"]
    assert type(iswritten).__name__ == "_ShortCircuitDecoratedOperator"
    assert iswritten.trigger_rule == "all_done"
    assert dag.task_dict["validate"].retries == 0
    assert dag.task_dict["align.affine_0"].retries == 2


def test_dynamic_dag_maps_the_batch_stages(dagbag: Any) -> None:
    dag = dagbag.dags[f"emprocess_v{VERSION}"]
    assert set(dag.task_ids) == {
        "validate", "create_env", "align.start_align", "align.affine", "align.collect",
        "align.write", "align.finish_align", "ngingest.write_ngmeta",
        "ngingest.write_ng_shards", "ngingest.finish_ngwrite", "iswritten", "cleanup_images",
        "set_public_read", "write_status",
    }  # fmt: skip
    mapped = {t.task_id for t in dag.tasks if getattr(t, "is_mapped", False)}
    assert mapped == set(BATCH_STAGES)
    # The contract's order; each mapped stage also reads the worker ids from start_align.
    assert edges_of(dag) >= {
        ("align.start_align", "align.affine"),
        ("align.affine", "align.collect"),
        ("align.collect", "align.write"),
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
    assert set(params) == keys | ({"width"} if dynamic else set())
    for key, p in params.items():
        assert p.description, key
        assert p.schema.get("type"), key
        assert p.has_value == (key not in REQUIRED | {"project", "email"}), key
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
    assert len(result["dag_ids"]) == 6 and result["tasks"] == 5 * 11 + 3 * 229 + 14
    # Target < 1 s; the bound leaves room for a busy 2-core test machine.
    assert result["median_parse_s"] < 3.0


# -- end to end: dag.test() -------------------------------------------------------------


@pytest.fixture(scope="session")
def airflow_db(airflow_home: Path) -> Path:
    """The SQLite metadata DB of AIRFLOW_HOME, created once per session."""
    from airflow.utils import db

    db.initdb()
    return airflow_home


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_width1_dag_aligns_and_writes_a_volume_with_the_real_services(
    airflow_db: Path,
    dagbag: Any,
    bucket: str,
    align_service: str,
    emwrite_service: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """dag.test() of the width-1 DAG against both services under gunicorn, through a
    recording proxy that also makes each service answer its first request with a 503."""
    from emprocess import affine, storage
    from emprocess.sample import write_sample
    from emprocess.workflow.compose import compose_global

    truth = write_sample(f"gs://{bucket}/stack", 3, 384, 320, seed=3)
    conf = {
        "id": "e2e1",
        "image": "stack/" + truth["image"],
        "minz": truth["minz"],
        "maxz": truth["maxz"],
        "source": bucket,
        "downsample_factor": 2,
        "email": "someone@example.org",
        "resolution": 8,
    }
    monkeypatch.setenv("EMPROCESS_HTTP_ATTEMPTS", "3")
    monkeypatch.setenv("EMPROCESS_HTTP_BACKOFF_S", "0.05")
    with (
        FaultProxy(align_service) as align_proxy,
        FaultProxy(emwrite_service) as emwrite_proxy,
        SmtpSink() as smtp,
    ):
        monkeypatch.setenv(
            "AIRFLOW_CONN_SMTP_DEFAULT",
            f"smtp://127.0.0.1:{smtp.port}?disable_ssl=true&disable_tls=true"
            "&from_email=emprocess%40example.org&retry_limit=0&timeout=10",
        )
        align_proxy.rules.append(fail_first(1, 503))
        emwrite_proxy.rules.append(fail_first(1, 503, lambda r: r.path == "/alignedslice"))
        monkeypatch.setenv("AIRFLOW_CONN_ALIGN_CLOUD_RUN", align_proxy.url)
        monkeypatch.setenv("AIRFLOW_CONN_IMG_WRITE", emwrite_proxy.url)
        dag = dagbag.dags[dag_id(1)]
        run = dag.test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states == {t: "success" for t in dag.task_ids}, states
    assert run.state == "success"

    # What the services were sent: 2 pairs (+1 retried 503), 3 slices (+1), meta, 1 cube.
    align_bodies = [json.loads(r.body) for r in align_proxy.requests]
    pairs_sent = sorted((b["pre"], b["post"]) for b in align_bodies)
    assert len(pairs_sent) == 3  # one pair twice: its first answer was the injected 503
    assert sorted(set(pairs_sent)) == [
        (f"gs://{bucket}/stack/img.00000.png", f"gs://{bucket}/stack/img.00001.png"),
        (f"gs://{bucket}/stack/img.00001.png", f"gs://{bucket}/stack/img.00002.png"),
    ]
    assert {b["downsample"] for b in align_bodies} == {2}
    paths = [r.path for r in emwrite_proxy.requests]
    assert paths == ["/alignedslice"] * 4 + ["/ngmeta", "/ngshard"]
    shard = json.loads(emwrite_proxy.requests[-1].body)
    assert shard["start"] == [0, 0, 0] and shard["writeRaw"] is True
    assert shard["source"] == f"{bucket}_tmp_e2e1" and shard["dest_raw"] == f"{bucket}_chunk_e2e1"

    # The composed transforms match the stack's known drift.
    proc = f"gs://{bucket}_process/e2e1"
    found = json.loads(storage.read_bytes(f"{proc}/align/transforms.json"))
    pairs = {int(z): p for z, p in truth["pairs"].items()}
    expected, bbox = compose_global(pairs, truth["minz"], truth["maxz"], (384, 320))
    for z, transform in expected.items():
        assert affine.mean_corner_error(found[str(z)], transform, 384, 320) < 2.0, z
    complete = json.loads(storage.read_bytes(f"{proc}/complete.json"))
    assert abs(complete["bbox"][0] - bbox[0]) <= 2 and abs(complete["bbox"][1] - bbox[1]) <= 2
    assert complete["neuroglancer"] == f"precomputed://gs://{bucket}_ng_e2e1/neuroglancer/jpeg"
    assert complete["stages"]["align.affine"]["sent"] == 2
    assert complete["stages"]["align.affine"]["attempts"] == 3
    assert "qc.csv" in " ".join(storage.list_keys(f"{proc}/align/"))

    # The volume: info of both pyramids and shard files of scale 0.
    info = json.loads(storage.read_bytes(f"gs://{bucket}_ng_e2e1/neuroglancer/jpeg/info"))
    assert info["scales"][0]["size"] == [*complete["bbox"], 3]
    assert storage.list_keys(f"gs://{bucket}_ng_e2e1/neuroglancer/jpeg/{info['scales'][0]['key']}/")
    assert storage.exists(f"gs://{bucket}_chunk_e2e1/neuroglancer/raw/info")
    assert storage.bucket_settings(f"{bucket}_tmp_e2e1")["lifecycle_delete_age_days"] == 3
    # The conf's address got the "ready" message through Airflow's SMTP connection.
    assert [m["rcpt"] for m in smtp.messages] == [["<someone@example.org>"]]
    assert "Subject: emprocess: e2e1 is ready (3 slices)" in smtp.messages[0]["data"]


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

    monkeypatch.setenv("EMPROCESS_STORAGE_ROOT", str(tmp_path))
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
    complete = json.loads(storage.read_bytes("gs://dyn-src_process/d1/complete.json"))
    assert complete["conf"]["project"] == "legacy-key" and complete["conf"]["width"] == 2
    assert complete["stages"]["align.write"]["tasks"] == 2
    assert complete["stages"]["align.write"]["sent"] == 5
