"""The DAGs under a real Airflow 3, as a lab runs it: api-server, scheduler, dag-processor.

The README's "Self-managed Airflow 3" steps, done by :mod:`emprocess.airflowserver`:
LocalExecutor, the DAG folder laid out as users deploy it, the pool, the connections to
the real services under gunicorn, the storage root in every process. Runs are triggered
through the REST API with ``emprocess trigger --wait`` (a subprocess, as a user types it)
and checked from the REST API, the process bucket and the volume. The runs go at once,
as users' runs do: a width-4 run whose four batch tasks per stage all run at once
(checked from the task instances' start and end times), a run whose conf is bad, and the
original DAG's conf (``mail``, ``project_id``, ``rawPyramid``) on the width-1 DAG.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ServicePool, point_storage, unique_bucket
from dags_conftest_helpers import (
    E2ERun,
    bucket_bytes,
    check_finished_run,
    e2e_conf,
    write_e2e_stack,
)
from faultproxy import FaultProxy

from emprocess import layout, storage
from emprocess.airflow_api import AirflowApi
from emprocess.localrun import Services
from emprocess.settings import StorageEnv, load
from emprocess.trigger import NotReady, check_ready, follow_run, peak_concurrency, trigger_run
from emprocess.workflow import WIDTHS, dag_id
from emprocess.workflow.conf import parse_conf
from emprocess.workflow.payloads import align_pair_list

pytestmark = [pytest.mark.slow, pytest.mark.airflow_server]

WIDE = int(os.environ.get("EMPROCESS_TEST_AIRFLOW_WIDTH", "0"))
"""Width of an extra run of the dynamic DAG whose batch tasks must all run at once (0: none).
The width-4 run is checked the same way; EMPROCESS_TEST_AIRFLOW_WIDTH=32 adds a width
above Airflow's default limit of 16 tasks per run, which takes about 4 more minutes here
(32 task processes start at once on 2 cores; see the README's measured figures)."""
PARALLELISM = 4 + WIDE + 1 + 2 + 3
"""LocalExecutor workers: every run's widest stage at once, and a few to spare."""
RUN_TIMEOUT_S = 400


@pytest.fixture(scope="module")
def recorders(service_pool: ServicePool) -> Iterator[dict[str, FaultProxy]]:
    """A recording proxy in front of each service: what the Airflow below sends them."""
    with (
        FaultProxy(service_pool.url("align", "local")) as align,
        FaultProxy(service_pool.url("emwrite", "local")) as emwrite,
    ):
        yield {"align": align, "emwrite": emwrite}


@pytest.fixture(scope="module")
def airflow(
    recorders: dict[str, FaultProxy], local_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """A real Airflow on its own PostgreSQL: SQLite answers concurrent triggers with
    "database is locked" (HTTP 500)."""
    from pgcluster import pg_cluster

    from emprocess.airflowserver import airflow_server, wait_for_dag

    services = Services(align=recorders["align"].url, emwrite=recorders["emwrite"].url)
    home = tmp_path_factory.mktemp("airflow-server")
    with pytest.MonkeyPatch.context() as mp:
        # The session's own Airflow settings (unit-test mode, its home) are not this one's.
        for key in list(os.environ):
            if key.startswith("AIRFLOW"):
                mp.delenv(key)
        with (
            pg_cluster(home) as pg,
            airflow_server(
                home,
                services,
                db_url=pg.url,
                parallelism=PARALLELISM,
                storage_settings=load(StorageEnv, storage_root=local_root),
            ) as server,
        ):
            for width in (1, 4):
                wait_for_dag(server, dag_id(width))
            yield server


def trigger(server: Any, log: Path, *args: str) -> subprocess.Popen:
    """``emprocess trigger ... --api-url URL --username U --password P --unpause --wait``."""
    argv = [
        sys.executable, "-m", "emprocess.cli", "trigger", *args, "--api-url", server.api_url,
        "--username", server.username, "--unpause", "--wait", "--poll-s", "1",
        "--timeout-s", str(RUN_TIMEOUT_S),
    ]  # fmt: skip
    env = {**os.environ, "AIRFLOW_PASSWORD": server.password}
    with open(log, "w") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def run_seconds(api: AirflowApi, dag: str, run_id: str) -> float:
    """Seconds from the trigger (queued) to the end of the run, from the REST API."""
    from datetime import datetime

    run = api.dag_run(dag, run_id) or {}
    if not run.get("end_date"):
        return float("nan")
    end, queued = (datetime.fromisoformat(run[k]) for k in ("end_date", "queued_at"))
    return round((end - queued).total_seconds(), 1)


def as_e2e_run(api: AirflowApi, dag: str, source: str, conf: dict, truth: dict) -> E2ERun:
    run = api.dag_run(dag, conf["id"])
    assert run is not None
    tis = api.task_instances(dag, conf["id"])
    states = {
        ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else ""): ti["state"]
        for ti in tis
    }
    return E2ERun(
        source, conf["id"], "local", None, dag, conf, truth, run["state"], states,
        {k: 1 for k in states}, [], [], [], 0.0,
    )  # fmt: skip


def test_runs_through_the_rest_api_with_a_real_scheduler(
    airflow: Any, local_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The storage root of every Airflow process, also for `emprocess trigger` (its report).
    point_storage(monkeypatch, str(local_root))
    source = unique_bucket("as")
    truth = write_e2e_stack(source)
    api = AirflowApi(airflow.api_url)
    api.login(airflow.username, airflow.password)
    # What the checks before sending find: a paused DAG, too few LocalExecutor workers.
    with pytest.raises(NotReady) as refused:
        check_ready(api, dag_id(128), 128)
    assert f"DAG {dag_id(128)} is paused" in str(refused.value)
    assert f"[core] parallelism is {PARALLELISM}, below the width 128" in str(refused.value)
    with pytest.raises(NotReady, match="is not in Airflow"):
        check_ready(api, "emprocess_width3_v0", 3)
    width4 = e2e_conf("w4", source, truth)
    # Missing slices pass the trigger form's schema and fail in validate.
    bad = e2e_conf("bad", source, truth, maxz=truth["maxz"] + 5)
    original = {  # the original DAG's conf keys, as a user's saved conf has them
        "id": "orig", "image": width4["image"], "minz": truth["minz"], "maxz": truth["maxz"],
        "source": source, "mail": "lab@example.org", "project_id": "my-project",
        "downsample_factor": 1, "skip_align": False, "clip-limit": 0.02, "rawPyramid": False,
        "resolution": 8,
    }  # fmt: skip
    runs = {
        "w4": (dag_id(4), width4, ["--width", "4"]),
        "bad": (dag_id(4), bad, ["--width", "4"]),
        "orig": (dag_id(1), original, ["--width", "1"]),
    }
    if WIDE:  # a fixed DAG if there is one of that width, as `emprocess trigger` picks
        fixed = WIDE in WIDTHS
        wide = e2e_conf("wide", source, truth, **({} if fixed else {"width": WIDE}))
        runs["wide"] = (dag_id(WIDE if fixed else None), wide, ["--width", str(WIDE)])
    t0 = time.monotonic()
    procs = {
        name: trigger(airflow, tmp_path / f"{name}.log", "--conf", json.dumps(conf), *args)
        for name, (_, conf, args) in runs.items()
    }
    try:
        for proc in procs.values():
            proc.wait(timeout=max(1.0, RUN_TIMEOUT_S + 60 - (time.monotonic() - t0)))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = {name: (tmp_path / f"{name}.log").read_text() for name in runs}
    for name, proc in procs.items():
        assert proc.returncode == (1 if name == "bad" else 0), out[name][-3000:]
    peaks = {
        name: peak_concurrency(api.task_instances(dag, conf["id"]))
        for name, (dag, conf, _) in runs.items()
    }
    seconds = {name: run_seconds(api, dag, conf["id"]) for name, (dag, conf, _) in runs.items()}
    print(f"\ntrigger to finish (s): {seconds}; batch tasks at once: {peaks}")

    # The good runs: every task succeeded, the volume and the records are right.
    for name in [n for n in runs if n != "bad"]:
        assert procs[name].returncode == 0, out[name][-3000:]
        assert "unpaused DAG" in out[name] or "success after" in out[name]
        pairs = len(align_pair_list(parse_conf(runs[name][1])))  # the original conf: 2 per z
        progress = f"align pairs {pairs}/{pairs}"  # the line of counts rich prints in a log
        assert progress in out[name], out[name][-2000:]
        assert "State: FINISHED" in out[name], out[name][-2000:]
        dag, conf, _ = runs[name]
        check_finished_run(as_e2e_run(api, dag, source, conf, truth))
    # Every batch task of a stage ran at the same time as the others.
    assert peaks["w4"] == 4 and peaks["orig"] == 1
    assert "batch tasks ran up to 4 at once (width 4)" in out["w4"]
    if WIDE:
        assert peaks["wide"] == WIDE, "the dynamic DAG's batch tasks did not all run at once"
    # The original conf: mail is email, rawPyramid false wrote no raw volume.
    complete = json.loads(storage.read_bytes(f"gs://{source}_process/orig/complete.json"))
    assert complete["conf"]["email"] == "lab@example.org"
    assert complete["conf"]["project"] == "my-project"
    assert not storage.bucket_exists(f"{source}_chunk_orig")

    # The bad conf fails in validate with the conf's problem, and only there.
    assert procs["bad"].returncode == 1, out["bad"][-3000:]
    # validate failed first (its error is the one shown); iswritten only says so.
    assert "failed tasks: validate, iswritten\n" in out["bad"], out["bad"][-3000:]
    assert "missing 5 of 17 slices" in out["bad"], out["bad"][-3000:]
    # The exception's message, not Airflow's structured line with every frame.
    assert "'frames'" not in out["bad"] and "error: AirflowFailException: " in out["bad"]
    tis = {ti["task_id"]: ti for ti in api.task_instances(dag_id(4), "bad")}
    assert tis["validate"]["state"] == "failed"
    assert tis["iswritten"]["state"] == "failed"
    assert {ti["state"] for k, ti in tis.items() if k not in ("validate", "iswritten")} == {
        "upstream_failed"
    }
    iswritten_log = api.task_log(dag_id(4), "bad", tis["iswritten"])
    assert "validate did not succeed" in iswritten_log
    assert "RunInfo" not in iswritten_log and "validation error" not in iswritten_log

    # A taken run id gets a clear message; the checks found nothing to refuse.
    again = trigger(airflow, tmp_path / "again.log", "--conf", json.dumps(width4), "--width", "4")
    assert again.wait(timeout=60) == 1
    said = (tmp_path / "again.log").read_text()
    assert "already has a run with id 'w4' (state success)" in said
    assert f"`emprocess clear w4 --api-url {airflow.api_url}" in said


def test_a_cleared_task_redoes_only_what_it_owns_that_is_missing(
    airflow: Any,
    recorders: dict[str, FaultProxy],
    local_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The README's "Restarting from any point" on the real scheduler. A finished run loses
    what two batch tasks own: one slice's thumbnail and cached answer (``align.write_0``),
    the cube's cached answer and its full-resolution shards (``ngingest.write_ng_shards_0``).
    Clearing those two tasks (REST API, the UI's "Clear") sends exactly that slice and that
    cube again, brings every object back byte for byte, and runs no other task again.

    The finished run is the width-1 run ``orig`` of the test above when it ran (one run
    fewer), else a 4-slice run ``clr`` of its own."""
    point_storage(monkeypatch, str(local_root))
    dag = dag_id(1)
    api = AirflowApi(airflow.api_url)
    api.login(airflow.username, airflow.password)
    earlier = api.dag_run(dag, "orig")
    if earlier is not None and earlier["state"] == "success":
        conf = dict(earlier["conf"])
    else:
        source = unique_bucket("cl")
        truth = write_e2e_stack(source)
        conf = e2e_conf("clr", source, truth, maxz=truth["minz"] + 3, createRawPyramid=False)
        check_ready(api, dag, 1, unpause=True)
        trigger_run(api, dag, "clr", conf)
        assert follow_run(api, dag, "clr", poll_s=1, timeout_s=RUN_TIMEOUT_S).state == "success"
    parsed = parse_conf(conf)
    run, run_id = parsed.layout, parsed.id
    caches = tuple(f"{prefix.removeprefix(layout.THUMBNAILS + '/')}/" for prefix in (
        layout.AFFINE_CACHE, layout.WRITE_CACHE, layout.FEATURES_CACHE))  # fmt: skip

    def outputs() -> dict[str, dict[str, bytes]]:
        """The volume, the tiles, and the thumbnails, transforms and QC (not the caches,
        whose records hold times)."""
        return {
            "ng": bucket_bytes(f"gs://{run.ng}/"),
            "tmp": bucket_bytes(f"gs://{run.tmp}/"),
            "align": bucket_bytes(
                run.process_url(layout.THUMBNAILS), skip=lambda k: k.startswith(caches)
            ),
        }

    def answer_of(cache: str, name: str) -> str:
        (key,) = [k for k in storage.list_keys(run.process_url(cache) + "/")
                  if k.rsplit("/", 1)[-1].startswith(name + ".")]  # fmt: skip
        return storage.bucket_url(run.process, key)

    before = outputs()
    z = parsed.minz + 1
    scale0 = json.loads(storage.read_bytes(f"{run.jpeg_url}/info"))["scales"][0]["key"]
    shards = storage.list_keys(f"{run.jpeg_url}/{scale0}/")
    lost = [
        run.process_url(layout.THUMBNAILS, parsed.slice_name(z)),
        answer_of(layout.WRITE_CACHE, layout.slice_task_name(z)),
        answer_of(layout.NG_CACHE, layout.cube_name(0, 0, 0)),
        *(storage.bucket_url(run.ng, key) for key in shards),
    ]
    assert shards and all(storage.exists(url) for url in lost)
    for url in lost:
        storage.delete(url)
    for recorder in recorders.values():
        recorder.requests.clear()

    t0 = time.monotonic()
    cleared = api.clear_tasks(dag, run_id, ["align.write_0", "ngingest.write_ng_shards_0"])
    assert sorted(ti["task_id"] for ti in cleared) == [
        "align.write_0",
        "ngingest.write_ng_shards_0",
    ]
    assert follow_run(api, dag, run_id, poll_s=1, timeout_s=RUN_TIMEOUT_S).state == "success"
    seconds = time.monotonic() - t0

    assert recorders["align"].requests == []
    sent = [(r.path, json.loads(r.body)) for r in recorders["emwrite"].requests]
    assert sorted(path for path, _ in sent) == ["/alignedslice", "/ngshard"], sent
    assert [body["slice"] for path, body in sent if path == "/alignedslice"] == [z]
    assert outputs() == before
    tries = {ti["task_id"]: ti["try_number"] for ti in api.task_instances(dag, run_id)}
    again = {task for task, n in tries.items() if n != 1}
    assert again == {"align.write_0", "ngingest.write_ng_shards_0"}, tries
    print(f"cleared 2 of {len(tries)} tasks: done again in {seconds:.0f} s, sent "
          f"{sorted(p for p, _ in sent)}; {sum(map(len, before.values()))} objects "
          "byte-identical")  # fmt: skip


def finished_run(api: AirflowApi, dag: str, name: str, earlier: str) -> dict[str, Any]:
    """The conf of the finished run ``earlier`` of ``dag`` (the first test's), else of a
    4-slice run ``name`` triggered and finished here."""
    run = api.dag_run(dag, earlier)
    if run is not None and run["state"] == "success":
        return dict(run["conf"])
    source = unique_bucket(name[:2])
    truth = write_e2e_stack(source)
    conf = e2e_conf(name, source, truth, maxz=truth["minz"] + 3, createRawPyramid=False)
    check_ready(api, dag, 4 if "width4" in dag else 1, unpause=True)
    trigger_run(api, dag, name, conf)
    assert follow_run(api, dag, name, poll_s=1, timeout_s=RUN_TIMEOUT_S).state == "success"
    return conf


def test_clear_redoes_a_run_from_its_cache_and_its_wait_outlives_an_api_server_restart(
    airflow: Any,
    recorders: dict[str, FaultProxy],
    local_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``emprocess clear RUN --wait`` on a finished run: every task runs again, finds its
    work in the cache and sends no request; the api-server stops for 10 s while the
    command waits (the DAG is paused meanwhile, so no task meets the outage), and the
    command says it waits, goes on, and reports the run's success."""
    from emprocess.localrun import wait_http

    point_storage(monkeypatch, str(local_root))
    dag = dag_id(4)
    api = AirflowApi(airflow.api_url)
    api.login(airflow.username, airflow.password)
    conf = finished_run(api, dag, "cw4", earlier="w4")
    run_id = conf["id"]
    before = {ti["task_id"]: ti["try_number"] for ti in api.task_instances(dag, run_id)}
    for recorder in recorders.values():
        recorder.requests.clear()
    api.set_paused(dag, True)  # the cleared run stays queued until the api-server is back

    log = tmp_path / "clear.log"
    argv = [
        sys.executable, "-m", "emprocess.cli", "clear", run_id, "--api-url", airflow.api_url,
        "--username", airflow.username, "--wait", "--poll-s", "1", "--retry-s", "120",
        "--timeout-s", str(RUN_TIMEOUT_S),
    ]  # fmt: skip
    env = {**os.environ, "AIRFLOW_PASSWORD": airflow.password}
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while "following run" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.5)
        t0 = time.monotonic()
        airflow.restart("api-server", down_s=10)
        wait_http(f"{airflow.api_url}/api/v2/monitor/health", timeout_s=120)
        print(f"api-server away for {time.monotonic() - t0:.0f} s")
        api.set_paused(dag, False)
        assert proc.wait(timeout=RUN_TIMEOUT_S + 60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    said = log.read_text()
    assert f"cleared {len(before)} task(s) of run {run_id} of {dag}" in said, said[-3000:]
    assert "waiting for the api-server" in said and "answers again" in said, said[-3000:]
    assert f"run {run_id} of {dag}: success" in said, said[-3000:]
    after = {ti["task_id"]: ti["try_number"] for ti in api.task_instances(dag, run_id)}
    assert after == {task: n + 1 for task, n in before.items()}  # every task ran again
    assert recorders["align"].requests == [] and recorders["emwrite"].requests == []
    print(f"clear --wait: {len(after)} tasks again, 0 requests; api-server restarted mid-wait")

    # A run started elsewhere is followed by its id alone: its DAG and conf come from Airflow.
    attach = subprocess.run(
        [sys.executable, "-m", "emprocess.cli", "trigger", "--attach", run_id, "--api-url",
         airflow.api_url, "--username", airflow.username, "--poll-s", "1"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert attach.returncode == 0, attach.stdout[-2000:] + attach.stderr[-2000:]
    assert f"run {run_id} of {dag}: success" in attach.stdout
