"""A 12-bit-in-16 stack through the real DAG and services gives the 8-bit original's volume.

The stack is the first slices of the shared real FIB-SEM stack, once as they are (8-bit)
and once scaled by 16 (0..4080) plus an offset and stored as 16-bit PNGs. The 16-bit run
measures its ``auto`` window once (recorded in init.json), and both the alignment and
emwrite apply it. The 8-bit run is given the same window in 8-bit grey levels, so both
runs must produce the same pixels at every step: the same transforms and the same JPEG
volume. The 16-bit run keeps 16 bits in its lossless volume (raw_bits 16): the warped
source values. Both runs use 10 x 10 x 40 nm voxels (the anisotropic pyramid). (Without a window the 8-bit run aligns its own contrast stretch,
and CONTRACTS.md's affine-or-translation rule can flip on a pair, moving slices by tenths
of a pixel; emwrite's side of "same as the 8-bit original" without a window is
test_emwrite_intensity.py's.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import SHARED_DATA, ServicePool, point_storage, unique_bucket
from dags_conftest_helpers import E2ERun, read_volume, run_on_local
from test_emwrite_service import read_cloudvolume

from emprocess import affine, layout, storage
from emprocess.kernels.intensity import AUTO_SATURATED_PERCENT
from emprocess.workflow import dag_id

SLICES = 6
SCALE, OFFSET = 16, 300
"""The 16-bit stack is v * SCALE + OFFSET: 12 bits of signal above a pedestal. With a
power-of-two SCALE the 8-bit window (w - OFFSET) / SCALE maps every pixel to exactly the
same 8-bit level as the 16-bit window does (float64 scaling by 16 is exact)."""


def _fibsem(z: int) -> Path:
    path = SHARED_DATA / "fibsem" / f"img.{z:05d}.png"
    if not path.is_file():
        pytest.fail(
            f"real FIB-SEM stack not found in {path.parent}: ../shared/data must sit beside the checkout"
        )
    return path


def to_12bit(image8: np.ndarray) -> np.ndarray:
    return image8.astype(np.uint16) * SCALE + OFFSET


def _run(
    mp: pytest.MonkeyPatch,
    dag_bag: Any,
    pool: ServicePool,
    root: Path,
    bits: int,
    intensity: Any = "auto",
    raw_bits: int = 8,
) -> E2ERun:
    source = unique_bucket(f"i{bits}")
    storage.create_bucket(source)
    for z in range(SLICES):
        path = _fibsem(z)
        data = path.read_bytes()
        if bits == 16:
            image = to_12bit(cv2.imread(str(path), cv2.IMREAD_UNCHANGED))
            data = cv2.imencode(".png", image)[1].tobytes()
        storage.write_bytes(f"gs://{source}/img.{z:05d}.png", data)
    conf = {
        "id": "run",
        "image": "img.%05d.png",
        "minz": 0,
        "maxz": SLICES - 1,
        "source": source,
        "resolution": [10, 10, 40],  # anisotropic, to run that through the DAG too
        "intensity": intensity,
        "raw_bits": raw_bits,
    }
    return run_on_local(mp, dag_bag.dags[dag_id(1)], conf, pool, root)


@pytest.fixture(autouse=True)
def on_local(local_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runs use the local backend; so do the checks that read their outputs."""
    point_storage(monkeypatch, str(local_root))


@pytest.fixture(scope="module")
def runs(
    airflow_db: Path, dag_bag: Any, service_pool: ServicePool, local_root: Path
) -> dict[int, E2ERun]:
    """The 16-bit run (auto window, 16-bit lossless volume), then the 8-bit run with that
    window in 8-bit levels."""
    with pytest.MonkeyPatch.context() as mp:
        point_storage(mp, str(local_root))
        run16 = _run(mp, dag_bag, service_pool, local_root, 16, raw_bits=16)
        init16 = json.loads(storage.read_bytes(run16.layout.process_url(layout.INIT)))
        window8 = [(v - OFFSET) / SCALE for v in init16["intensity_window"]]
        run8 = _run(mp, dag_bag, service_pool, local_root, 8, window8)
        return {8: run8, 16: run16}


def expected_window() -> list[float]:
    """The auto window by hand: the sorted sampled pixels at the clipped count from each end."""
    pixels = np.sort(
        np.concatenate(
            [to_12bit(cv2.imread(str(_fibsem(z)), cv2.IMREAD_UNCHANGED)).ravel() for z in range(6)]
        )
    )
    clipped = int(pixels.size * AUTO_SATURATED_PERCENT / 200)
    return [float(pixels[clipped]), float(pixels[pixels.size - 1 - clipped])]


def test_16bit_run_records_its_window_and_sends_it_to_both_services(
    runs: dict[int, E2ERun],
) -> None:
    run8, run16 = runs[8], runs[16]
    for run in (run8, run16):
        assert run.state == "success", run.task_states
    init8 = json.loads(storage.read_bytes(run8.layout.process_url(layout.INIT)))
    init16 = json.loads(storage.read_bytes(run16.layout.process_url(layout.INIT)))
    window = expected_window()
    assert init16["slice_bits"] == 16 and init16["intensity_window"] == window
    assert init16["conf"]["intensity"] == "auto"
    window8 = [(v - OFFSET) / SCALE for v in window]
    assert init8["slice_bits"] == 8 and init8["intensity_window"] == window8
    for run, sent in ((run16, window), (run8, window8)):
        for path in ("/", "/alignedslice"):
            bodies = run.bodies(path)
            assert bodies and all(b["intensity_window"] == sent for b in bodies), path
    # raw_bits 16 reaches emwrite as raw_dtype; the 8-bit run's requests have no such key.
    for path in ("/alignedslice", "/ngmeta", "/ngshard"):
        assert all(b["raw_dtype"] == "uint16" for b in run16.bodies(path)), path
        assert all("raw_dtype" not in b for b in run8.bodies(path)), path


def test_16bit_volume_equals_the_8bit_volume(runs: dict[int, E2ERun]) -> None:
    run8, run16 = runs[8], runs[16]
    for record in (layout.CANVAS, layout.TRANSFORMS):
        a = json.loads(storage.read_bytes(run8.layout.process_url(record)))
        b = json.loads(storage.read_bytes(run16.layout.process_url(record)))
        assert {k: v for k, v in a.items() if k != "transforms"} == {
            k: v for k, v in b.items() if k != "transforms"
        }, record
    bbox = json.loads(storage.read_bytes(run8.layout.process_url(layout.CANVAS)))["bbox"]
    info = json.loads(storage.read_bytes(f"{run16.layout.jpeg_url}/info"))
    assert [s["resolution"] for s in info["scales"]] == [
        [10, 10, 40], [20, 20, 40], [40, 40, 40], [80, 80, 80], [160, 160, 160], [320, 320, 320]
    ]  # fmt: skip
    for scale in (0, 2):
        a = read_volume(run8.layout.jpeg_url, scale)
        b = read_volume(run16.layout.jpeg_url, scale)
        if scale == 0:
            assert a.shape == (SLICES, bbox[1], bbox[0])
            assert a.std() > 30  # contrast: not the nearly black result of v / 257
        np.testing.assert_array_equal(a, b)
    # The 8-bit run's lossless volume holds the JPEG volume's voxels; the 16-bit run's
    # (raw_bits 16) each slice's own 12-bit-in-16 values, warped by the run's transform.
    raw8 = read_volume(run8.layout.raw_url)
    assert raw8.dtype == np.uint8 and raw8.shape == (SLICES, bbox[1], bbox[0])
    raw16 = read_volume(run16.layout.raw_url)
    transforms = json.loads(storage.read_bytes(run16.layout.process_url(layout.TRANSFORMS)))
    for z in range(SLICES):
        source = to_12bit(cv2.imread(str(_fibsem(z)), cv2.IMREAD_UNCHANGED))
        warped = cv2.warpAffine(
            source, affine.to_matrix(transforms[str(z)]), (bbox[0], bbox[1]),
            flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=0,
        )  # fmt: skip
        np.testing.assert_array_equal(raw16[z], warped, err_msg=f"slice {z}")
    # Read back through cloud-volume as well: the same JPEG voxels.
    cv8, _ = read_cloudvolume(run8.layout.jpeg_url, 0)
    cv16, _ = read_cloudvolume(run16.layout.jpeg_url, 0)
    np.testing.assert_array_equal(cv8, cv16)
    np.testing.assert_array_equal(cv8, read_volume(run8.layout.jpeg_url))


def test_report_counts_the_16bit_run_complete(runs: dict[int, E2ERun]) -> None:
    """The window is part of the alignment and /alignedslice requests, so of their cache
    keys: the report reads it from init.json and finds every mini-task done."""
    from emprocess.report.load import load_run

    run = runs[16]
    report = load_run(run.source, run.run_id)
    for stage in ("affine", "write", "ngmeta", "ngshard"):
        assert report.stage(stage).complete, (stage, report.stage(stage).to_json())


def test_anisotropic_run_scales_equal_numpy_downsampling(runs: dict[int, E2ERun]) -> None:
    """The runs' conf says 10 x 10 x 40 nm: x and y halve alone until the voxels are
    40 nm cubes, then all three; every lossless scale is the numpy mean of the one before."""
    from test_anisotropic import mean_steps

    from emprocess.kernels.ngmeta import downsample_factors_xyz

    url = runs[16].layout.raw_url  # uint16 (raw_bits 16)
    factors = downsample_factors_xyz([10, 10, 40], 6)
    assert factors[:4] == [(1, 1, 1), (2, 2, 1), (4, 4, 1), (8, 8, 2)]
    level = read_volume(url, 0)
    for s in range(1, 6):
        step = [b // a for a, b in zip(factors[s - 1][::-1], factors[s][::-1], strict=True)]
        level = mean_steps(level, (step[0], step[1], step[2]))
        np.testing.assert_array_equal(read_volume(url, s), level, err_msg=f"scale {s}")
    np.testing.assert_array_equal(read_cloudvolume(url, 5)[0], level)
