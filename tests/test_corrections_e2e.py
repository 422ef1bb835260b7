"""A run with both corrections through the real DAG (dag.test(), both services under
gunicorn, the GCS emulator): collect measures every slice, the write requests carry the
destreak angle and each slice's gain and offset, finish_align records the quality along z.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from conftest import ServicePool, point_storage, unique_bucket
from dags_conftest_helpers import check_finished_run, e2e_conf, run_e2e, write_e2e_stack

from emprocess import layout, storage
from emprocess.workflow import dag_id

SLICES = 12


@pytest.fixture(autouse=True)
def on_gcs(monkeypatch: pytest.MonkeyPatch) -> None:
    point_storage(monkeypatch, None)


def test_a_corrected_run_measures_sends_and_records(
    airflow_db: Any, dag_bag: Any, service_pool: ServicePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = unique_bucket("fixe2e")
    storage.create_bucket(source)
    truth = write_e2e_stack(source)
    assert truth["maxz"] - truth["minz"] + 1 == SLICES
    conf = e2e_conf("fixed", source, truth, **{"destreak": True, "intensity_correction": "slice"})
    run = run_e2e(
        monkeypatch,
        dag_bag.dags[dag_id(1)],
        conf,
        truth,
        service_pool.url("align", "gcs"),
        service_pool.url("emwrite", "gcs"),
        backend="gcs",
    )
    check_finished_run(run)
    stats = run.bodies("/slicestats")
    assert sorted(b["img"] for b in stats) == [conf["image"] % z for z in range(SLICES)]
    writes = run.bodies("/alignedslice")
    assert len(writes) == SLICES
    assert {b["destreak"] for b in writes} == {0.0}
    table = {
        int(r["z"]): (float(r["gain"]), float(r["offset"]))
        for r in csv.DictReader(
            io.StringIO(storage.read_bytes(run.layout.process_url(layout.INTENSITY)).decode())
        )
    }
    zs = list(range(truth["minz"], truth["maxz"] + 1))
    assert sorted(table) == zs
    for b in writes:
        gain, offset = table[b["slice"]]
        assert b["intensity_gain_offset"] == pytest.approx([gain, offset], abs=1e-4)
    quality = list(
        csv.DictReader(
            io.StringIO(storage.read_bytes(run.layout.process_url(layout.QUALITY)).decode())
        )
    )
    assert [int(r["z"]) for r in quality] == zs
    assert all(float(r["ncc_next"]) > 0.5 for r in quality[:-1])
