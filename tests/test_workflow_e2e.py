"""The DAGs end to end on the GCS emulator: dag.test() against both services under gunicorn.

Every run aligns the same 12-slice synthetic stack with known drift (written once), so
their outputs can be compared byte for byte: a clean width-4 run, the same run through
proxies that answer every third request with a 503 and let one request time out, and a
run of the dynamic DAG whose write task dies after some slices and is retried by Airflow.
The width-1 run on the local backend is conftest.py's ``width1_run``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from conftest import ServicePool, point_storage, unique_bucket
from dags_conftest_helpers import (
    E2ERun,
    bucket_bytes,
    check_finished_run,
    e2e_conf,
    run_e2e,
    write_e2e_stack,
)
from faultproxy import Recorded, Rule

from emprocess import layout, storage
from emprocess.layout import RunLayout, slice_task_name
from emprocess.workflow import dag_id

TIMEOUT_S = 3.0
"""The batch helper's read timeout in the fault run. Far above any real answer here (the
slowest, /ngshard of this stack, takes ~0.5 s; with 2 threads per batch task at most two
requests wait at a single-worker service), so only the injected delay times out."""

PAIRS, SLICES = 11, 12


@dataclass
class Stack:
    source: str
    truth: dict[str, Any]


@pytest.fixture(autouse=True)
def on_gcs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run here uses the GCS emulator (the session's STORAGE_EMULATOR_HOST)."""
    point_storage(monkeypatch, None)


@pytest.fixture(scope="module")
def stack(gcs_emulator: str) -> Stack:
    """The 12-slice stack with known drift, in a bucket of the GCS emulator."""
    with pytest.MonkeyPatch.context() as mp:
        point_storage(mp, None)
        source = unique_bucket("e2e")
        storage.create_bucket(source)
        return Stack(source, write_e2e_stack(source))


def _run(
    mp: pytest.MonkeyPatch,
    dag: Any,
    stack: Stack,
    pool: ServicePool,
    run_id: str,
    **kwargs: Any,
) -> E2ERun:
    conf = e2e_conf(run_id, stack.source, stack.truth, **kwargs.pop("conf", {}))
    return run_e2e(
        mp,
        dag,
        conf,
        stack.truth,
        pool.url("align", "gcs"),
        pool.url("emwrite", "gcs"),
        backend="gcs",
        **kwargs,
    )


@pytest.fixture(scope="module")
def clean_width4(airflow_db: Any, dag_bag: Any, service_pool: ServicePool, stack: Stack) -> E2ERun:
    """The width-4 DAG on the GCS emulator, no faults: the reference output."""
    with pytest.MonkeyPatch.context() as mp:
        point_storage(mp, None)
        return _run(mp, dag_bag.dags[dag_id(4)], stack, service_pool, "clean4")


# -- what to compare --------------------------------------------------------------------

CACHES = tuple(f"{prefix}/" for prefix in set(layout.CACHES.values()))


def _process_outputs(key: str) -> bool:
    """Skip the process bucket's per-run records (times, conf, the request caches, and
    canvas.json, which names the run's transforms.json; compared as JSON instead)."""
    return key in (layout.INIT, layout.COMPLETE, layout.CANVAS) or key.startswith(CACHES)


def outputs(run: E2ERun) -> dict[str, dict[str, bytes]]:
    """Every output object's bytes: the JPEG and raw volumes, the tiles, and the process
    bucket's transforms, QC, canvas and thumbnails (not its timestamps or caches)."""
    return {
        "ng": bucket_bytes(f"gs://{run.ng_bucket}/"),
        "chunk": bucket_bytes(f"gs://{run.chunk_bucket}/"),
        "tmp": bucket_bytes(f"gs://{run.layout.tmp}/"),
        "process": bucket_bytes(run.process, skip=_process_outputs),
    }


def _canvas(run: E2ERun) -> tuple[list[int], dict[str, int]]:
    doc = json.loads(storage.read_bytes(run.layout.process_url(layout.CANVAS)))
    return doc["bbox"], doc["models"]


def assert_same_outputs(run: E2ERun, reference: E2ERun) -> dict[str, int]:
    """``run`` wrote exactly the objects of ``reference``, byte for byte; returns how many
    objects were compared, per bucket."""
    got, want = outputs(run), outputs(reference)
    for bucket in want:
        assert sorted(got[bucket]) == sorted(want[bucket]), bucket
        differ = [k for k in want[bucket] if got[bucket][k] != want[bucket][k]]
        assert differ == [], (bucket, differ)
    assert _canvas(run) == _canvas(reference)
    assert layout.TRANSFORMS in want["process"]
    assert any(k.startswith(f"{layout.JPEG_PATH}/") and k.endswith(".shard") for k in want["ng"])
    assert any(k.startswith(f"{layout.RAW_PATH}/") for k in want["chunk"])
    return {bucket: len(objects) for bucket, objects in want.items()}


# -- the runs --------------------------------------------------------------------------


def test_width4_dag_on_gcs_aligns_the_stack_within_a_pixel(
    clean_width4: E2ERun, dag_bag: Any
) -> None:
    run = clean_width4
    dag = dag_bag.dags[dag_id(4)]
    assert run.task_states == {t: "success" for t in dag.task_ids}, run.task_states
    figures = check_finished_run(run)
    print(figures.line(run))
    # Each mini-task was sent once, and only once: 11 pairs, 12 slices, meta, 1 cube.
    pairs = sorted((b["pre"], b["post"]) for b in run.bodies("/"))
    assert len(pairs) == PAIRS and len(set(pairs)) == PAIRS
    assert sorted(b["slice"] for b in run.bodies("/alignedslice")) == list(range(SLICES))
    assert sorted(run.paths()) == ["/alignedslice"] * SLICES + ["/ngmeta", "/ngshard"]
    complete = json.loads(storage.read_bytes(run.layout.process_url(layout.COMPLETE)))
    stages = complete["stages"]
    assert (stages["align.affine"]["tasks"], stages["align.affine"]["sent"]) == (4, PAIRS)
    # Each slice's features once (issue 19), stored, before any pair.
    assert (stages["align.features"]["tasks"], stages["align.features"]["sent"]) == (4, SLICES)
    assert len({b["img"] for b in run.bodies("/features")}) == len(run.bodies("/features"))
    assert run.paths("align")[:SLICES] == ["/features"] * SLICES
    assert len(storage.list_keys(run.layout.process_url(layout.FEATURES) + "/")) == SLICES
    assert (stages["align.write"]["tasks"], stages["align.write"]["planned"]) == (4, SLICES)
    assert stages["ngingest.write_ng_shards"]["planned"] == 1


def test_faults_on_every_service_give_the_same_bytes(
    clean_width4: E2ERun,
    dag_bag: Any,
    service_pool: ServicePool,
    stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every third request to each service answered 503 by the proxy, and one alignment
    request held past the read timeout: the run succeeds, with the clean run's bytes."""
    injected: dict[str, int] = {"align": 0, "emwrite": 0, "delayed": 0}
    lock = threading.Lock()

    def every_third(service: str) -> Rule:
        seen = [0]

        def rule(rec: Recorded) -> tuple[int, bytes] | None:
            with lock:
                seen[0] += 1
                if seen[0] % 3:
                    return None
                injected[service] += 1
            return 503, json.dumps({"error": "injected: every third request"}).encode()

        return rule

    def hold_once(rec: Recorded) -> tuple[int, bytes] | None:
        # The first (not 503'd) request for pair 5 -> 6 waits past the client's timeout,
        # then goes on to the service: the service answers a request nobody waits for.
        with lock:
            if injected["delayed"] or json.loads(rec.body).get("pre", "")[-9:] != "00005.png":
                return None
            injected["delayed"] += 1
        time.sleep(TIMEOUT_S + 1.0)
        return None

    run = _run(
        monkeypatch,
        dag_bag.dags[dag_id(4)],
        stack,
        service_pool,
        "faulty4",
        align_rules=[every_third("align"), hold_once],
        emwrite_rules=[every_third("emwrite")],
        env={
            "EMPROCESS_HTTP_TIMEOUT_S": str(TIMEOUT_S),
            "EMPROCESS_HTTP_ATTEMPTS": "10",
            "EMPROCESS_HTTP_THREADS": "2",
        },
    )
    figures = check_finished_run(run)
    print(figures.line(run))
    # Every request was answered with a 503, timed out, or answered once for good.
    align, emwrite = len(run.align_requests), len(run.emwrite_requests)
    assert injected["delayed"] == 1
    assert align == SLICES + PAIRS + injected["align"] + 1
    assert emwrite == SLICES + 2 + injected["emwrite"]
    assert injected["align"] == align // 3 and injected["emwrite"] == emwrite // 3
    complete = json.loads(storage.read_bytes(run.layout.process_url(layout.COMPLETE)))
    stages = complete["stages"]
    assert stages["align.features"]["attempts"] + stages["align.affine"]["attempts"] == align
    objects = assert_same_outputs(run, clean_width4)
    print(
        f"fault run: {align} alignment requests ({injected['align']} answered 503, 1 timed "
        f"out) for {PAIRS} pairs, {emwrite} emwrite requests ({injected['emwrite']} answered "
        f"503) for {SLICES + 2}; {objects} output objects byte-identical to the clean run"
    )


@dataclass
class DiesOnce:
    """A proxy rule: lets ``answered`` /alignedslice requests through, then answers the
    rest of the first write task's requests with a 503 (with one attempt per request, the
    task fails: a worker dying part way). When a slice is sent again (Airflow's retry of
    that task), it first reads the process bucket the way the monitoring report does."""

    first_task: int  # requests the first write task sends
    answered: int
    on_retry: Callable[[], dict[str, Any]]
    slices: list[int] = field(default_factory=list)
    snapshot: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, rec: Recorded) -> tuple[int, bytes] | None:
        if rec.path != "/alignedslice":
            return None
        z = json.loads(rec.body)["slice"]
        with self.lock:
            again = z in self.slices
            self.slices.append(z)
            n = len(self.slices)
            if again and not self.snapshot:
                try:
                    self.snapshot = self.on_retry()
                except Exception as e:  # shown by the test, not lost in the proxy thread
                    self.snapshot = {"error": repr(e)}
        if self.answered < n <= self.first_task:
            return 503, json.dumps({"error": "injected: the worker died"}).encode()
        return None


def test_dynamic_dag_retries_a_dead_write_task_from_its_cache(
    clean_width4: E2ERun,
    dag_bag: Any,
    service_pool: ServicePool,
    stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """emprocess_v{VERSION} with width 3 and the real services: the first write task to run
    (4 slices) gets two slices answered, then dies; Airflow retries it, the retry sends only
    the two slices without a cached answer, and the output equals the width-4 run's, byte
    for byte."""
    from emprocess.report import load_run

    dag = dag_bag.dags[dag_id(None)]
    write = dag.task_dict["align.write"]
    monkeypatch.setattr(write, "retry_delay", timedelta(0))  # retry at once, not in 1 min
    monkeypatch.setattr(write, "retry_exponential_backoff", 0)
    run_id = "dyn3"

    def report() -> dict[str, Any]:
        rep = load_run(stack.source, run_id)
        return {
            "failures": storage.list_keys(
                RunLayout(stack.source, run_id).process_url(layout.FAILURES) + "/"
            ),
            "write": (rep.stage("write").done, rep.stage("write").failures),
            "notes": [(f.stage, f.name, f.error) for f in rep.failures],
        }

    dies = DiesOnce(first_task=4, answered=2, on_retry=report)
    run = _run(
        monkeypatch,
        dag,
        stack,
        service_pool,
        run_id,
        conf={"width": 3},
        emwrite_rules=[dies],
        env={"EMPROCESS_HTTP_ATTEMPTS": "1"},
    )
    mapped = sorted(k for k in run.task_states if "[" in k)
    stages = (
        "align.affine",
        "align.features",
        "align.gap_pairs",
        "align.slicestats",
        "align.write",
    )
    assert mapped == [f"{t}[{i}]" for t in stages for i in range(3)] + [
        f"ngingest.write_ng_shards[{i}]" for i in range(3)
    ]
    figures = check_finished_run(run)  # also: no failure record is left
    print(figures.line(run))

    # The requests (in the order the rule saw them): the first write task's four slices,
    # two answered and two dead; later, the other workers' slices once each, and the
    # retry of the first task: only its two dead slices.
    slices = dies.slices
    assert sorted(slices) == sorted(b["slice"] for b in run.bodies("/alignedslice"))
    assert len(slices) == SLICES + 2
    first, later = slices[:4], slices[4:]
    worker = first[0] % 3
    assert sorted(first) == [z for z in range(SLICES) if z % 3 == worker]
    answered, died = set(first[:2]), set(first[2:])
    retry = [z for z in later if z % 3 == worker]
    assert sorted(retry) == sorted(died)
    assert not answered & set(retry)
    assert sorted(z for z in later if z % 3 != worker) == [
        z for z in range(SLICES) if z % 3 != worker
    ]
    dead_task = f"align.write[{worker}]"
    assert run.tries == {k: 2 if k == dead_task else 1 for k in run.task_states}, run.tries
    # Between the tries the process bucket held failure records for the two dead slices,
    # which the monitoring report counts; the retry's success deleted them.
    names = sorted(slice_task_name(z) for z in died)
    assert dies.snapshot.get("failures") == [
        f"{run_id}/{layout.FAILURES}/write/{n}.json" for n in names
    ], dies.snapshot
    retry_at = next(i for i, z in enumerate(slices) if i >= 4 and z in died)
    assert dies.snapshot["write"] == (retry_at - 2, 2)  # (slices done, failure records)
    assert sorted((s, n) for s, n, _ in dies.snapshot["notes"]) == [("write", n) for n in names]
    assert all("503" in error for *_, error in dies.snapshot["notes"])
    complete = json.loads(storage.read_bytes(run.layout.process_url(layout.COMPLETE)))
    write_stage = complete["stages"]["align.write"]
    assert (write_stage["planned"], write_stage["cached"], write_stage["sent"]) == (12, 2, 10)
    objects = assert_same_outputs(run, clean_width4)
    print(
        f"retry run: /alignedslice sent {len(slices)} times for {SLICES} slices; try 1 of "
        f"{dead_task}: {sorted(answered)} answered, {sorted(died)} died; the retry sent "
        f"{sorted(retry)} only; {objects} output objects byte-identical to the width-4 run"
    )


def test_a_rerun_with_another_clip_limit_redoes_only_what_changes(
    clean_width4: E2ERun,
    dag_bag: Any,
    service_pool: ServicePool,
    stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run ``reclip`` with clip-limit 0.05, then trigger the same run id with the default
    clip-limit (the clean run's conf): the second trigger aligns nothing, rewrites every
    slice and the cube (their tiles' contrast changed) but not /ngmeta (the volume's info
    did not), and leaves the clean run's bytes. A third trigger, conf unchanged, sends
    nothing at all, though a tile has expired; a fourth, after the cube and the info are
    lost, redoes exactly those and the one tile the cube reads that is gone."""
    dag = dag_bag.dags[dag_id(1)]
    first = _run(monkeypatch, dag, stack, service_pool, "reclip", conf={"clip-limit": 0.05})
    assert first.state == "success", first.task_states
    assert len(first.align_requests) == SLICES + PAIRS  # features once per slice, pairs
    first_volume = bucket_bytes(f"gs://{first.ng_bucket}/")

    again = _run(monkeypatch, dag, stack, service_pool, "reclip")
    check_finished_run(again)
    assert again.align_requests == []
    assert sorted(again.paths()) == ["/alignedslice"] * SLICES + ["/ngshard"]
    assert {b["clip-limit"] for b in again.bodies("/alignedslice")} == {0.02}
    objects = assert_same_outputs(again, clean_width4)
    changed = [k for k, v in bucket_bytes(f"gs://{again.ng_bucket}/").items()
               if first_volume.get(k) != v]  # fmt: skip
    assert any(k.endswith(".shard") for k in changed), changed

    # The tmp bucket's lifecycle deletes a slice's tiles: the volume is complete, so a
    # re-trigger with the same conf still sends nothing.
    tiles = f"gs://{again.layout.tmp}/{layout.TILES_PREFIX}{layout.tiles_key(3)}"
    storage.delete(tiles)
    same = _run(monkeypatch, dag, stack, service_pool, "reclip")
    assert same.state == "success", same.task_states
    assert same.align_requests == [] and same.emwrite_requests == []

    # The cube's answer and the volume's info are lost too (as if the cube's task had
    # been cleared half done): the next trigger rewrites the one missing tile the cube
    # needs, the info and the cube, nothing else, and the volume is the same again.
    cache = again.layout.process_url(layout.NG_CACHE)
    for key in storage.list_keys(cache + "/"):
        if key.rsplit("/", 1)[-1].startswith("cube_"):
            storage.delete(storage.bucket_url(again.layout.process, key))
    storage.delete(f"{again.layout.jpeg_url}/info")
    fixed = _run(monkeypatch, dag, stack, service_pool, "reclip")
    check_finished_run(fixed)
    assert fixed.align_requests == []
    assert sorted(fixed.paths()) == ["/alignedslice", "/ngmeta", "/ngshard"]
    assert [b["slice"] for b in fixed.bodies("/alignedslice")] == [3]
    assert_same_outputs(fixed, clean_width4)
    print(
        f"re-trigger with clip-limit 0.05 -> 0.02: 0 alignment requests, {len(again.paths())} "
        f"emwrite requests; {objects} output objects byte-identical to a fresh run; "
        f"unchanged re-trigger: 0 requests ({same.elapsed_s} s); after losing a tile, the "
        f"cube and the info: {sorted(fixed.paths())}"
    )


def test_reexport_with_align_from_sends_no_alignment_request(
    clean_width4: E2ERun,
    dag_bag: Any,
    service_pool: ServicePool,
    stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new run of slices 2..9 with another clip-limit and no raw volume, taking the clean
    run's alignment: no alignment request, the clean run's canvas and transforms, and its
    slices match the clean run's (same place, other contrast)."""
    from dags_conftest_helpers import ncc, read_volume

    conf = {"align_from": clean_width4.run_id, "clip-limit": 0.05, "createRawPyramid": False}
    conf.update(minz=2, maxz=9)
    run = _run(monkeypatch, dag_bag.dags[dag_id(1)], stack, service_pool, "reexp", conf=conf)
    assert run.state == "success", run.task_states
    assert run.align_requests == []
    assert sorted(run.paths()) == ["/alignedslice"] * 8 + ["/ngmeta", "/ngshard"]
    assert _canvas(run)[0] == _canvas(clean_width4)[0]
    whole, mine_t = (
        json.loads(storage.read_bytes(r.layout.process_url(layout.TRANSFORMS)))
        for r in (clean_width4, run)
    )
    assert mine_t == {str(z): whole[str(z)] for z in range(2, 10)}
    assert not storage.bucket_exists(run.chunk_bucket)
    mine, theirs = read_volume(run.layout.jpeg_url), read_volume(clean_width4.layout.jpeg_url)
    assert mine.shape == (8, *theirs.shape[1:])
    assert min(ncc(mine[i], theirs[i + 2]) for i in range(8)) > 0.9
    assert any((mine[i] != theirs[i + 2]).any() for i in range(8))  # other contrast
