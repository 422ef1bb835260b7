"""Every request a visible, pooled task (issue 22 item 5): the second align round and the
slice statistics as stages of the DAG, and a re-run after a failed gap task that redoes
nothing finished (dag.test() of the width-4 DAG, both services under gunicorn, the GCS
emulator, a recording proxy that refuses one gap pair once)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import ServicePool, unique_bucket
from dags_conftest_helpers import e2e_conf, run_e2e, write_e2e_stack
from faultproxy import Recorded

from emprocess import layout, storage
from emprocess.errors import EmprocessError
from emprocess.workflow import POOL, dag_id
from emprocess.workflow.taskids import BATCH_TASKS, GAP_PAIRS, SLICESTATS

NOISE = (5, 6)
"""Two bad slices in a row: with 2 neighbours no first-round pair crosses them."""
REFUSED = ("img.00004.png", "img.00008.png")
"""The gap pair the first run's proxy refuses (the plan's second pair: worker 1's)."""


@pytest.fixture(autouse=True)
def on_gcs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMPROCESS_STORAGE_ROOT", raising=False)


@pytest.mark.parametrize("width", [4, None])
def test_gap_round_and_slicestats_are_pooled_tasks_of_the_graph(dag_bag: Any, width: Any) -> None:
    dag = dag_bag.dags[dag_id(width)]
    ids = [f"{s}_{i}" for s in (GAP_PAIRS, SLICESTATS) for i in range(width)] if width else []
    ids = ids or [GAP_PAIRS, SLICESTATS]
    for task_id in ids:
        task = dag.task_dict[task_id]
        assert task.pool == POOL, task_id
        assert task.retries == 2
    edges = {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}
    first = ids[0]  # worker 0's gap task (or the mapped one)
    stats = ids[len(ids) // 2]
    assert {
        ("align.plan_gaps", first),
        (first, "align.collect"),
        ("align.collect", stats),
        (stats, "align.plan_intensity"),
    } <= edges
    # The planning steps compute only: outside the pool.
    for task_id in ("align.plan_gaps", "align.collect", "align.plan_intensity"):
        assert dag.task_dict[task_id].pool != POOL
    batch = {t.task_id.rstrip("0123456789").rstrip("_") for t in dag.tasks if t.pool == POOL}
    assert batch == {*BATCH_TASKS, "measure_window", "ngingest.write_ngmeta"}


def _pair(rec: Recorded) -> tuple[str, str] | None:
    if rec.path != "/":
        return None
    body = json.loads(rec.body)
    return body["pre"].rsplit("/", 1)[-1], body["post"].rsplit("/", 1)[-1]


def _refuse_gap_pair(rec: Recorded) -> tuple[int, bytes] | None:
    if _pair(rec) == REFUSED:
        return 400, b'{"error": "refused by the test: stands in for a killed gap task"}'
    return None


def test_rerun_after_a_failed_gap_task_redoes_nothing_finished(
    airflow_db: Any, dag_bag: Any, service_pool: ServicePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = unique_bucket("gaptask")
    storage.create_bucket(source)
    truth = write_e2e_stack(source)
    rng = np.random.default_rng(4)
    for z in NOISE:
        noise = rng.integers(0, 256, (320, 384), dtype=np.uint8)
        storage.write_bytes(
            f"gs://{source}/stack/{truth['image'] % z}", cv2.imencode(".png", noise)[1].tobytes()
        )
    conf = e2e_conf(
        "gaps", source, truth, neighbors=2, global_solve=True, intensity_correction="slice"
    )
    dag = dag_bag.dags[dag_id(4)]
    align, emwrite = service_pool.url("align", "gcs"), service_pool.url("emwrite", "gcs")

    first = run_e2e(
        monkeypatch, dag, conf, truth, align, emwrite, backend="gcs",
        align_rules=[_refuse_gap_pair],
    )  # fmt: skip
    assert first.state == "failed"
    states = first.task_states
    assert states["align.plan_gaps"] == "success"
    assert [states[f"align.gap_pairs_{i}"] for i in range(4)] == [
        "success", "failed", "success", "success"
    ]  # fmt: skip
    assert states["align.collect"] == "upstream_failed"
    gaps = json.loads(storage.read_bytes(first.layout.process_url(layout.GAPS)))
    assert gaps["pairs"] == [[4, 7], [4, 8]] and gaps["gaps"] == [[5, 6]]
    pairs = [p for p in map(_pair, first.align_requests) if p]
    assert len(pairs) == 11 + 10 + 2  # the first round (neighbours 1 and 2) and the gap pairs
    assert first.emwrite_requests == []  # nothing measured or written before collect

    second = run_e2e(monkeypatch, dag, conf, truth, align, emwrite, backend="gcs")
    assert second.state == "success", second.task_states
    # Only the refused gap pair is sent again: no features, no first-round pair, not (4, 7).
    assert [(r.path, _pair(r)) for r in second.align_requests] == [("/", REFUSED)]
    complete = json.loads(storage.read_bytes(second.layout.process_url(layout.COMPLETE)))
    stages = complete["stages"]
    assert (stages[GAP_PAIRS]["tasks"], stages[GAP_PAIRS]["planned"]) == (4, 2)
    assert (stages[GAP_PAIRS]["cached"], stages[GAP_PAIRS]["sent"]) == (1, 1)
    assert (stages[SLICESTATS]["tasks"], stages[SLICESTATS]["sent"]) == (4, 12)
    assert stages["align.features"]["sent"] == stages["align.affine"]["sent"] == 0
    quality = complete["alignment"]
    assert quality["gap_pairs"] == 2 and quality["gaps"] == []
    assert quality["slices"] == {"good": 10, "bridged": 0, "bad": 2}
    rows = csv.DictReader(
        io.StringIO(storage.read_bytes(second.layout.process_url(layout.SLICES)).decode())
    )
    assert {int(r["z"]) for r in rows if r["status"] != "good"} == set(NOISE)
    assert len(second.bodies("/slicestats")) == 12
    written = second.bodies("/alignedslice")
    assert len(written) == 12 and all("intensity_gain_offset" in b for b in written)


def test_collect_names_gap_pairs_without_an_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recorded plan whose pairs were never answered: collect refuses, naming them."""
    from emprocess.workflow import stages
    from emprocess.workflow.gaps import read_gap_answers
    from emprocess.workflow.globalalign import GapPlan

    source = unique_bucket("gapmiss")
    storage.create_bucket(source)
    truth = write_e2e_stack(source)
    conf = e2e_conf("m", source, truth, neighbors=2, global_solve=True)
    info = stages.validate_run(conf, 1, "emprocess_width1_test")
    stages.create_env(info, "manual__1")
    plan = GapPlan([(2, 5)], [(3, 4)], [])
    storage.write_bytes(
        info.conf.layout.process_url(layout.GAPS), json.dumps(plan.to_json()).encode()
    )
    assert GapPlan.from_json(plan.to_json()) == plan
    with pytest.raises(EmprocessError, match=r"1 of 1 pairs across bad slices .*z000002-000005"):
        read_gap_answers(info)
