"""Issue 11 end to end: real FIB-SEM resliced with known drift and bad slices, through dag.test().

One combined run of the width-4 DAG on the GCS emulator with both real services:
100 slices (440 px crops of ../shared/data/fibsem), a rigid random walk of up to 0.15
degree and 6 px per slice, a blank slice (20), a noise slice (40), two bad slices in a
row (60 blank, 61 noise) and an exact duplicate (80 of 79); the default neighbours (3)
and regularization, downsample 2, no lossless volume. collect's second align round asks
one more pair across 60-61 (the first round has only (59, 62) across it).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import cv2
import pytest
from conftest import SHARED_DATA, ServicePool, point_storage, unique_bucket
from dags_conftest_helpers import run_e2e

from emprocess import layout, storage
from emprocess.report import run_report
from emprocess.workflow import dag_id
from emprocess_bench.reslice import BLANK, DUPLICATE, NOISE, errors_px, reslice

FIBSEM = SHARED_DATA / "fibsem"
FAULTS = {20: BLANK, 40: NOISE, 60: BLANK, 61: NOISE, 80: DUPLICATE}
CROP = 440


@pytest.fixture(autouse=True)
def on_gcs(monkeypatch: pytest.MonkeyPatch) -> None:
    point_storage(monkeypatch, None)


def _write_stack(bucket: str) -> dict[str, Any]:
    images = [
        cv2.imread(str(FIBSEM / f"img.{z:05d}.png"), cv2.IMREAD_GRAYSCALE) for z in range(100)
    ]
    assert all(i is not None and i.shape == (520, 520) for i in images), FIBSEM
    slices, truth = reslice(images, CROP, seed=3, faults=FAULTS)
    for z, image in enumerate(slices):
        ok, png = cv2.imencode(".png", image)
        assert ok
        storage.write_bytes(f"gs://{bucket}/drift/img.{z:05d}.png", png.tobytes())
    return truth


def test_neighbours_solve_and_bad_slices_on_real_fibsem(
    gcs_emulator: str,
    airflow_db: Any,
    dag_bag: Any,
    service_pool: ServicePool,
    tmp_path: Path,
) -> None:
    source = unique_bucket("ga")
    storage.create_bucket(source)
    truth = _write_stack(source)
    conf = {
        "id": "drift",
        "image": "drift/img.%05d.png",
        "minz": 0,
        "maxz": 99,
        "source": source,
        "downsample_factor": 2,
        "createRawPyramid": False,
        "resolution": 10,
    }
    with pytest.MonkeyPatch.context() as mp:
        run = run_e2e(
            mp,
            dag_bag.dags[dag_id(4)],
            conf,
            truth,
            service_pool.url("align", "gcs"),
            service_pool.url("emwrite", "gcs"),
            backend="gcs",
        )
    assert run.state == "success", run.task_states
    gaps = json.loads(storage.read_bytes(run.layout.process_url(layout.GAPS)))
    assert gaps["gaps"] == [[20, 20], [40, 40], [60, 61], [80, 80]] and gaps["too_long"] == []
    assert gaps["pairs"] == [[59, 63]]  # nearest after (59, 62); 20, 40, 80 had 3 across
    first_round = 99 + 98 + 97  # pairs (z, z+1..3)
    sent = sorted((b["pre"][-9:-4], b["post"][-9:-4]) for b in run.bodies("/"))
    assert len(sent) == len(set(sent)) == first_round + 1 and ("00059", "00063") in sent
    # Each slice's features were extracted once; every pair (gap pair too) matched them.
    assert len({b["img"] for b in run.bodies("/features")}) == len(run.bodies("/features")) == 100
    assert {b["run_id"] for b in run.bodies("/")} == {conf["id"]}
    doc = json.loads(storage.read_bytes(run.layout.process_url(layout.TRANSFORMS)))
    transforms = {int(z): t for z, t in doc.items()}
    rows = list(
        csv.DictReader(
            io.StringIO(storage.read_bytes(run.layout.process_url(layout.SLICES)).decode())
        )
    )
    flagged = {int(r["z"]): r["status"] for r in rows if r["status"] != "good"}
    assert flagged == dict.fromkeys(FAULTS, "bad")  # every fault, nothing else
    reasons = {int(r["z"]): r["reason"] for r in rows}
    assert reasons[80] == "exact duplicate of slice 79"
    assert reasons[20].startswith("textureless")
    figures = errors_px(transforms, truth, bad=sorted(FAULTS))
    print({k: round(v, 2) for k, v in figures.items() if not k.startswith("per")})
    # Measured against the registered volume's frame, which SIFT itself sees turn and
    # move: the undrifted stack aligned alike is 11.7 px off it at downsample 1 (docs/figures.md,
    # "floor"), so the 1.5 px / 0.5 px cannot be asked here. Measured 17.5 px and
    # 1.98 px at downsample 2 (the identity link without the solve: 9 px jumps).
    assert figures["neighbours"] < 2.5
    assert figures["anywhere"] < 20.0
    complete = json.loads(storage.read_bytes(run.layout.process_url(layout.COMPLETE)))
    quality = complete["alignment"]
    assert quality["slices"] == {"good": 95, "bridged": 0, "bad": 5}
    assert quality["pairs"] == first_round + 1 and quality["gap_pairs"] == 1
    assert quality["gaps"] == [] and 0 < quality["pair_residual_px"]["median"] < 1.0
    assert quality["doubtful"] is False and quality["why"] == ""  # 5% bad is still allowed
    # The report names every bad slice with its reason, and draws them along z.
    report = run_report(source, "drift", tmp_path)
    text = report.summary_text()
    assert f"of {quality['pairs']} pairs used" in text and "bridged 0, bad 5" in text
    assert "slice 61 bad: no model to any neighbour" in text
    assert "slice 80 bad: exact duplicate of slice 79" in text
    assert "ALIGNMENT DOUBTFUL" not in text
    assert "second align round: 1 pairs across bad slices" in text
    assert report.stage("affine").done == report.stage("affine").total == first_round + 1
    html = (tmp_path / "report.html").read_text()
    assert "slice 20 bad: textureless" in html
    assert report.to_json()["alignment"]["slices"]["bad"] == 5
