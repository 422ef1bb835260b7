"""A run's per-slice intensity correction through the real emwrite service.

Twenty real slices with known flicker and small shifts go into a source bucket;
``measure_intensity`` measures them with /slicestats (real gunicorn, both storage
backends), records align/intensity.csv, and the write stage's requests carry each
slice's gain and offset: the written tiles' per-slice mean and spread follow the clean
stack's, where the flickered ones' do not. A repeat uses the cache and writes the same
bytes.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from conftest import SHARED_DATA, unique_bucket

from emprocess import storage
from emprocess.errors import EmprocessError
from emprocess.kernels import tiles
from emprocess.layout import INTENSITY, QUALITY, STATS_CACHE
from emprocess.report.model import RunReport
from emprocess.report.page import write_html
from emprocess.report.quality import plot_quality, read_quality
from emprocess.services import emwrite
from emprocess.workflow.conf import InvalidRunConf, RunConf, parse_conf
from emprocess.workflow.corrections import measure_intensity, read_gain_offset, run_common_area
from emprocess.workflow.payloads import plan_aligned_slices
from emprocess.workflow.quality import record_quality
from emprocess_bench.corrections import Faults, inject

N = 20


def _run(source: str, correction: str) -> RunConf:
    return parse_conf(
        {
            "id": "fix1",
            "image": "img.%05d.png",
            "minz": 0,
            "maxz": N - 1,
            "source": source,
            "clip-limit": 0,
            "intensity_correction": correction,
        }
    )


def test_slice_correction_of_a_run_follows_the_clean_stack(
    backend: str, emwrite_service: str, tmp_path: Path
) -> None:
    files = [SHARED_DATA / "fibsem" / f"img.{z:05d}.png" for z in range(N)]
    clean = [cv2.imread(str(f), cv2.IMREAD_UNCHANGED) for f in files]
    flicker = inject(clean, Faults(gain=0.1, offset=10.0, seed=2), True, False, 1.0)
    source = unique_bucket("fixrun")
    conf = _run(source, "slice")
    for b in (source, conf.layout.process, conf.layout.tmp):
        storage.create_bucket(b)
    for z, image in enumerate(flicker):
        storage.write_bytes(
            f"gs://{source}/img.{z:05d}.png", cv2.imencode(".png", image)[1].tobytes()
        )
    # Small drift: slice z moved by (z, -(z // 2)) px in a canvas with room for it; the
    # common area's rows y0..y1 and columns x0..x1 are slice z's rows y0 - 10 + z // 2 ...
    # and columns x0 - z ...
    transforms = {z: [1.0, 0.0, 0.0, 1.0, float(z), 10.0 - z // 2] for z in range(N)}
    bbox = (520 + N, 520 + 10)
    x0, y0, x1, y1 = N - 1, 10, 520, 530 - (N - 1) // 2
    assert run_common_area(transforms, (520, 520)) == (x0, y0, x1, y1)

    summary = measure_intensity(conf, transforms, (520, 520), emwrite_service)
    assert summary["area"] == [x0, y0, x1, y1]
    table = read_gain_offset(conf)
    assert table is not None and sorted(table) == list(range(N))
    record = storage.read_bytes(conf.layout.process_url(INTENSITY))
    assert record.decode().startswith("z,mean,std,pixels,gain,offset\n")

    want = np.array(
        [
            [part.mean(), part.std()]
            for z, c in enumerate(clean)
            for part in [c[y0 - 10 + z // 2 : y1 - 10 + z // 2, x0 - z : x1 - z]]
        ]
    )
    for corrected, tasks in (
        (True, plan_aligned_slices(conf, transforms, bbox, gain_offset=table)),
        (False, plan_aligned_slices(_run(source, "none"), transforms, bbox)),
    ):
        assert all(("intensity_gain_offset" in t.payload) is corrected for t in tasks)
        for t in tasks:
            r = requests.post(emwrite_service + t.path, json=t.payload, timeout=120)
            assert r.status_code == 200, r.text
        written = [
            tiles.decode_tiled_slice(storage.read_bytes(emwrite.tiles_url(conf.layout.tmp, z)))
            for z in range(N)
        ]
        got = np.array([[w[y0:y1, x0:x1].mean(), w[y0:y1, x0:x1].std()] for w in written])
        err = np.abs(got - want)
        if corrected:
            assert err[:, 0].max() < 6.0 and np.median(err[:, 0]) < 3.5, err[:, 0]
            assert err[:, 1].max() < 2.0, err[:, 1]
        else:
            assert err[:, 0].max() > 10.0  # the flicker as acquired

    # Quality along z from the thumbnails just written: real neighbours correlate, none
    # is doubtful; slice 12 written 12 px off makes pairs (11, 12) and (12, 13) doubtful.
    quality = record_quality(conf, transforms, (520, 520), bbox)
    rows = list(
        csv.DictReader(io.StringIO(storage.read_bytes(conf.layout.process_url(QUALITY)).decode()))
    )
    assert [int(r["z"]) for r in rows] == list(range(N)) and rows[-1]["ncc_next"] == ""
    assert min(float(r["ncc_next"]) for r in rows[:-1]) > 0.9
    assert quality["doubtful"] == [] and 0.5 <= quality["threshold"] < 0.95
    moved = {**transforms, 12: [1.0, 0.0, 0.0, 1.0, 24.0, 10.0 - 6]}
    task = plan_aligned_slices(_run(source, "none"), moved, bbox, zs=[12])[0]
    assert requests.post(emwrite_service + task.path, json=task.payload, timeout=120).ok
    assert record_quality(conf, transforms, (520, 520), bbox)["doubtful"] == [11, 12]

    # The report reads the record: doubtful slices in its summary, page and figure.
    report = RunReport(
        source=source, run_id=conf.id, process_url=conf.layout.process_url(), backend="test",
        generated=datetime.now(UTC), state="finished", state_reason="", last_activity=None,
        init={"conf": {"minz": 0, "maxz": N - 1}}, complete=None, bbox_xy=bbox, stages=(),
        slice_ncc=read_quality(conf.layout),
    )  # fmt: skip
    assert report.quality is not None and report.quality["doubtful"] == [11, 12]
    assert report.to_json()["quality_along_z"]["doubtful"] == [11, 12]
    other = plot_quality(report, tmp_path / "other.png")  # stands in for the figures of stages
    page = write_html(report, tmp_path, other, other).read_text()
    assert "<h2>Quality along z</h2>" in page and "below " in page and ": 11, 12</p>" in page
    assert (tmp_path / "quality.png").stat().st_size > 5000

    # A repeat: every answer cached, the same record.
    before = set(storage.list_keys(conf.layout.process_url(STATS_CACHE) + "/"))
    assert len(before) == N
    measure_intensity(conf, transforms, (520, 520), "http://127.0.0.1:9")  # nothing sent
    assert storage.read_bytes(conf.layout.process_url(INTENSITY)) == record


def test_slice_correction_is_refused_for_colour_runs_and_missing_records(backend: str) -> None:
    with pytest.raises(InvalidRunConf, match="grey slices"):
        parse_conf(
            {
                "id": "fix2",
                "image": "img.%05d.png",
                "minz": 0,
                "maxz": 3,
                "source": "some-src",
                "channels": 3,
                "intensity_correction": "slice",
            }
        )
    source = unique_bucket("fixrun")
    conf = _run(source, "slice")
    storage.create_bucket(conf.layout.process)
    with pytest.raises(EmprocessError, match=r"intensity\.csv is missing"):
        read_gain_offset(conf)
    assert read_gain_offset(_run(source, "none")) is None


def test_slicestats_answers_known_figures_and_refuses_bad_requests(
    backend: str, emwrite_service: str
) -> None:
    source = unique_bucket("stats")
    storage.create_bucket(source)
    image = np.full((80, 100), 50, np.uint8)
    image[:, 50:] = 150  # mean 100, std 50
    storage.write_bytes(f"gs://{source}/img.00000.png", cv2.imencode(".png", image)[1].tobytes())
    colour = np.dstack([image] * 3)
    storage.write_bytes(f"gs://{source}/rgb.png", cv2.imencode(".png", colour)[1].tobytes())
    body = {
        "img": "img.00000.png",
        "dest": source,
        "transform": [1.0, 0.0, 0.0, 1.0, 10.0, 0.0],
        "area": [10, 0, 110, 80],
    }
    r = requests.post(emwrite_service + "/slicestats", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == {"mean": 100.0, "std": 50.0, "pixels": 8000}
    # A colour slice is measured grey, as /alignedslice makes it without channels.
    r = requests.post(emwrite_service + "/slicestats", json={**body, "img": "rgb.png"}, timeout=60)
    assert r.status_code == 200 and r.json() == {"mean": 100.0, "std": 50.0, "pixels": 8000}
    for change, words in [
        ({"area": [10, 0, 10, 80]}, "area"),
        ({"area": [0, 0, 1]}, "area"),
        ({"img": "missing.png"}, "missing.png"),
        ({"transform": [1, 0, 0]}, "transform"),
        ({"colour": 1}, "colour"),
    ]:
        r = requests.post(emwrite_service + "/slicestats", json={**body, **change}, timeout=60)
        assert r.status_code == 400 and words in r.text, (change, r.text)
