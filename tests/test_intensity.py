"""The intensity window: kernel known answers, both services applying it, validate deciding it.

The services run under real gunicorn on the local backend. A 12-bit-in-16 slice is the
real FIB-SEM slice v scaled to v * 16 + 300; through the window [300, 300 + 255 * 16]
every pixel maps back to exactly v, so both services must answer as for the 8-bit
original, byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests
from conftest import SHARED_DATA, ServicePool, point_storage, unique_bucket

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.kernels import tiles
from emprocess.kernels.intensity import check_window, to_uint8, window_from_histogram
from emprocess.layout import RunLayout, thumbnail_key
from emprocess.services.emwrite import tiles_url
from emprocess.workflow.conf import parse_conf
from emprocess.workflow.stages import SliceProblems, check_slice_format, validate_run
from emprocess.workflow.window import decide_window, sample_slices

SCALE, OFFSET = 16, 300
EXACT = [float(OFFSET), float(OFFSET + 255 * SCALE)]
"""The window that maps v * SCALE + OFFSET back to v exactly."""


@pytest.fixture(autouse=True)
def on_local(local_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    point_storage(monkeypatch, str(local_root))


@pytest.fixture(scope="module")
def slices8() -> list[np.ndarray]:
    paths = [SHARED_DATA / "fibsem" / f"img.{z:05d}.png" for z in (0, 1)]
    if not all(p.is_file() for p in paths):
        pytest.fail(
            f"real FIB-SEM stack not found in {paths[0].parent}: ../shared/data must sit beside the checkout"
        )
    return [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in paths]


def to_12bit(image8: np.ndarray) -> np.ndarray:
    return image8.astype(np.uint16) * SCALE + OFFSET


def put(bucket: str, name: str, image: np.ndarray) -> None:
    storage.write_bytes(f"gs://{bucket}/{name}", cv2.imencode(".png", image)[1].tobytes())


# -- kernel -------------------------------------------------------------------------


def test_window_maps_low_to_0_high_to_255_linearly_and_clips() -> None:
    image = np.array([[0, 100, 150, 201, 355, 65535]], np.uint16)
    np.testing.assert_array_equal(to_uint8(image, (100.0, 355.0)), [[0, 0, 50, 101, 255, 255]])
    # (150 - 100) * 255 / 1100 = 11.59 rounds to 12; (201 - 100) * 255 / 1100 = 23.41 to 23.
    np.testing.assert_array_equal(to_uint8(image, (100.0, 1200.0))[0, 2:4], [12, 23])
    eight = np.array([[10, 20, 30]], np.uint8)
    assert to_uint8(eight) is eight  # no window: 8-bit untouched
    np.testing.assert_array_equal(to_uint8(eight, (10.0, 30.0)), [[0, 128, 255]])
    # No window on 16-bit: today's full-range scaling, v * 255 / 65535 rounded.
    np.testing.assert_array_equal(
        to_uint8(np.array([[0, 128, 129, 4095, 65535]], np.uint16)), [[0, 0, 1, 16, 255]]
    )


def test_window_from_histogram_clips_the_saturated_percent_per_end() -> None:
    values = np.concatenate([np.full(5, 7), np.arange(1000, 2000), np.full(5, 60000)])
    hist = np.bincount(values, minlength=65536)
    # 1010 pixels, 1% saturated: 5 clipped at each end, so exactly the outliers go.
    assert window_from_histogram(hist, 1.0) == (1000.0, 1999.0)
    assert window_from_histogram(hist, 0.0) == (7.0, 60000.0)
    with pytest.raises(InvalidInput, match="one grey level"):
        window_from_histogram(np.bincount(np.full(50, 9), minlength=256))


@pytest.mark.parametrize(
    ("window", "message"),
    [([5, 5], "low 5 must be < high 5"), ([9, 3], "low 9"), ([-1, 3], r"within \[0, 65535\]")],
)
def test_bad_windows_are_named(window: list[float], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_window(window)


# -- services -----------------------------------------------------------------------


def _slice_body(source: str, img: str, window: list[float] | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "img": img,
        "transform": [1, 0, 0, 1, 3.5, -2.25],
        "bbox": [530, 515],
        "dest": source,
        "dest-tmp": RunLayout(source, "r").tmp,
        "slice": int(img[:2]),
        "run_id": "r",
    }
    if window is not None:
        body["intensity_window"] = window
    return body


def _tiles(source: str, z: int) -> np.ndarray:
    return tiles.decode_tiled_slice(storage.read_bytes(tiles_url(RunLayout(source, "r").tmp, z)))


def test_emwrite_applies_the_window(service_pool: ServicePool, slices8: list[np.ndarray]) -> None:
    url = service_pool.url("emwrite", "local")
    source = unique_bucket("win")
    run = RunLayout(source, "r")
    for b in (source, run.tmp, run.process):
        storage.create_bucket(b)
    image8, image16 = slices8[0], to_12bit(slices8[0])
    put(source, "10.png", image8)
    put(source, "11.png", image16)
    put(source, "12.png", image16)
    put(source, "13.png", image16)
    auto = window_from_histogram(np.bincount(image16.ravel(), minlength=65536))
    for img, window in (
        ("10.png", None),
        ("11.png", EXACT),
        ("12.png", None),
        ("13.png", list(auto)),
    ):
        r = requests.post(url + "/alignedslice", json=_slice_body(source, img, window), timeout=60)
        assert r.status_code == 200, r.text
    reference = _tiles(source, 10)  # the 8-bit original, no window: today's path
    assert reference.std() > 30
    np.testing.assert_array_equal(_tiles(source, 11), reference)
    # Without a window a 12-bit slice is divided by 257: nearly black before CLAHE, which
    # then stretches a handful of grey levels; it is not the original's picture.
    dark = _tiles(source, 12)
    assert np.abs(dark.astype(int) - reference).mean() > 5
    # The auto window stretches the slice linearly (x1.8 here) and CLAHE equalises it
    # again: inside the slice the result is the original's within far less than JPEG's
    # own error on this data (mean 5.5 levels at quality 75): mean 0.8, at most 4 levels,
    # from the warp rounding at finer grey levels. On the slice's 2-px rim the bicubic
    # warp blends in the fill 0, which the stretch moves relative to the data.
    diff = np.abs(_tiles(source, 13).astype(int) - reference)[5:508, 8:518]
    assert diff.mean() < 1.5 and diff.max() <= 6, (diff.mean(), diff.max())
    thumb = storage.read_bytes(storage.bucket_url(run.process, thumbnail_key("r", "11.png")))
    assert cv2.imdecode(np.frombuffer(thumb, np.uint8), cv2.IMREAD_UNCHANGED).dtype == np.uint8


def test_align_service_applies_the_window(
    service_pool: ServicePool, slices8: list[np.ndarray]
) -> None:
    url = service_pool.url("align", "local")
    source = unique_bucket("awin")
    storage.create_bucket(source)
    shifted = np.roll(slices8[1], (3, -5), axis=(0, 1))
    for name, image in (("a8.png", slices8[0]), ("b8.png", shifted)):
        put(source, name, image)
        put(source, name.replace("8", "16"), to_12bit(image))
    answers = []
    for suffix, window in (("8", None), ("16", EXACT)):
        body: dict[str, Any] = {
            "pre": f"gs://{source}/a{suffix}.png",
            "post": f"gs://{source}/b{suffix}.png",
        }
        if window is not None:
            body["intensity_window"] = window
        r = requests.post(url + "/", json=body, timeout=60)
        assert r.status_code == 200, r.text
        answers.append({k: v for k, v in r.json().items() if k != "seconds"})
    assert answers[0] == answers[1]
    assert answers[0]["translation_found"]
    # post is slice 1 moved by (x -5, y +3): mapping it onto pre moves it back.
    np.testing.assert_allclose(answers[0]["translation"][4:], [5, -3], atol=0.3)


@pytest.mark.parametrize(
    ("service", "path", "window", "message"),
    [
        ("emwrite", "/alignedslice", [900, 100], "low 900 must be < high 100"),
        ("align", "/", [7, 7], "low 7 must be < high 7"),
        ("align", "/", [0, 70000], "70000"),
        ("emwrite", "/alignedslice", "[1, 2, 3]", "must be"),
    ],
)
def test_bad_window_in_a_request_is_a_400_naming_it(
    service_pool: ServicePool, service: str, path: str, window: Any, message: str
) -> None:
    if service == "align":
        body: dict[str, Any] = {"pre": "gs://nobucket/a.png", "post": "gs://nobucket/b.png"}
    else:
        body = _slice_body("nobucket", "10.png", None)
    body["intensity_window"] = window
    r = requests.post(service_pool.url(service, "local") + path, json=body, timeout=30)
    assert r.status_code == 400
    assert message in json.loads(r.text)["error"]


# -- validate -----------------------------------------------------------------------


def _conf(source: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"id": "r", "image": "s%03d.png", "minz": 0, "maxz": n - 1, "source": source, **extra}


def test_sample_slices_spread_over_the_stack() -> None:
    assert sample_slices(0, 3) == [0, 1, 2, 3]
    assert sample_slices(10, 80, 8) == [10, 20, 30, 40, 50, 60, 70, 80]
    assert sample_slices(0, 1000, 3) == [0, 500, 1000]


def test_validate_decides_the_window_once(slices8: list[np.ndarray]) -> None:
    source = unique_bucket("vwin")
    storage.create_bucket(source)
    for z in range(3):
        put(source, f"s{z:03d}.png", to_12bit(slices8[z % 2]))
    info = validate_run(_conf(source, 3), 1, "d")
    pixels = np.sort(np.concatenate([to_12bit(slices8[z % 2]).ravel() for z in range(3)]))
    k = int(pixels.size * 0.35 / 200)
    assert info.slice_bits == 16
    assert info.intensity_window == (float(pixels[k]), float(pixels[-1 - k]))
    assert validate_run(_conf(source, 3, intensity="full"), 1, "d").intensity_window is None
    explicit = validate_run(_conf(source, 3, intensity=[400, 4000]), 1, "d")
    assert explicit.intensity_window == (400.0, 4000.0)


def test_8bit_slices_keep_their_values_and_refuse_a_16bit_window(
    slices8: list[np.ndarray],
) -> None:
    source = unique_bucket("v8")
    storage.create_bucket(source)
    put(source, "s000.png", slices8[0])
    conf = parse_conf(_conf(source, 1))
    assert decide_window(conf, 8) is None
    with pytest.raises(InvalidInput, match=r"window \[0, 4095\] goes beyond the 8-bit"):
        validate_run(_conf(source, 1, intensity=[0, 4095]), 1, "d")


def test_a_stack_mixing_bit_depths_or_channels_is_refused_before_any_work(
    slices8: list[np.ndarray],
) -> None:
    source = unique_bucket("mix")
    storage.create_bucket(source)
    put(source, "s000.png", slices8[0])
    put(source, "s001.png", to_12bit(slices8[1]))
    put(source, "s002.png", cv2.cvtColor(slices8[0], cv2.COLOR_GRAY2BGR))
    with pytest.raises(SliceProblems) as err:
        check_slice_format(parse_conf(_conf(source, 3)))
    message = str(err.value)
    assert "slices differ in bit depth: 8-bit (2: s000.png, s002.png); 16-bit (1: s001.png)" in (
        message
    )
    assert "slices differ in channel count: 1 channel(s) (2: s000.png, s001.png); " in message


FORMATS = [
    (ext, dtype, channels)
    for ext in (".png", ".tif")
    for dtype, channels in ((np.uint8, 1), (np.uint16, 1), (np.uint8, 3), (np.uint16, 4))
] + [(".jpg", np.uint8, 1), (".jpg", np.uint8, 3)]


@pytest.mark.parametrize(("ext", "dtype", "channels"), FORMATS)
def test_headers_tell_bit_depth_and_channels(ext: str, dtype: Any, channels: int) -> None:
    from emprocess.imageinfo import image_header

    shape = (5, 7) if channels == 1 else (5, 7, channels)
    data = cv2.imencode(ext, np.zeros(shape, dtype))[1].tobytes()
    bits = 16 if dtype == np.uint16 else 8
    assert tuple(image_header(data)) == (7, 5, bits, channels)


def test_benchmark_of_16bit_slices_drives_the_same_rendering(tmp_path: Path) -> None:
    """``emprocess bench emwrite --bits 16 --raw-bits 16``: the 16-bit stack through the
    window gives the 8-bit stack's tiles, byte for byte (so its figures measure the same
    work plus the 16-bit decode and lookup), and the 16-bit source tiles beside them."""
    from emprocess_bench.emwrite import RUN_ID, SOURCE, run_emwrite_benchmark

    objects = {}
    for bits in (8, 16):
        root = tmp_path / str(bits)
        result = run_emwrite_benchmark(
            slices=2, size=128, write_raw=False, root=str(root), bits=bits, raw_bits=bits
        )
        assert result["stack"]["bits"] == bits and result["phases"]["alignedslice"]["cpu_s"] > 0
        tiles_dir = root / f"{SOURCE}_tmp_{RUN_ID}" / "aligned"
        objects[bits] = {p.name: p.read_bytes() for p in sorted(tiles_dir.iterdir())}
    assert list(objects[8]) == ["000000.tiles", "000001.tiles"]
    assert objects[16] == objects[8]
    wide = root / f"{SOURCE}_tmp_{RUN_ID}" / "aligned16"  # raw_bits 16: the source tiles
    assert sorted(p.name for p in wide.iterdir()) == list(objects[8])


def test_raw_volume_keeps_16_bits_when_asked(
    service_pool: ServicePool, slices8: list[np.ndarray]
) -> None:
    """raw_dtype "uint16": the lossless volume holds the warped 16-bit source values (no
    window, no CLAHE) at every scale, the JPEG volume the 8-bit rendering as before."""
    from test_anisotropic import mean_steps
    from test_emwrite_service import read_cloudvolume, read_tensorstore

    from emprocess import affine

    url = service_pool.url("emwrite", "local")
    source = unique_bucket("w16")
    run = RunLayout(source, "r")
    tmp, ng, chunk = run.tmp, run.ng, run.chunk
    for b in (source, tmp, run.process, ng, chunk):
        storage.create_bucket(b)
    transform, bbox = [1.0, 0.0, 0.0, 1.0, 3.5, -2.25], (530, 515)
    expected = []
    for z in (0, 1):
        image = to_12bit(slices8[z])
        put(source, f"{10 + z}.png", image)
        body = {**_slice_body(source, f"{10 + z}.png", EXACT), "raw_dtype": "uint16"}
        r = requests.post(url + "/alignedslice", json=body, timeout=60)
        assert r.status_code == 200, r.text
        expected.append(
            cv2.warpAffine(
                image, affine.to_matrix(transform), bbox, flags=cv2.INTER_CUBIC,
                borderMode=cv2.BORDER_CONSTANT, borderValue=0,
            )
        )  # fmt: skip
    volume = {
        "dest": ng, "dest_raw": chunk, "minz": 10, "maxz": 11, "bbox": list(bbox),
        "writeRaw": True, "resolution": 8, "raw_dtype": "uint16",
    }  # fmt: skip
    for path, body in (
        ("/ngmeta", volume),
        ("/ngshard", {**volume, "source": tmp, "start": [0, 0, 0]}),
    ):
        r = requests.post(url + path, json=body, timeout=60)
        assert r.status_code == 200, r.text
    level = np.stack(expected)
    for s in range(6):
        if s:
            level = mean_steps(level, (2, 2, 2))
        for read in (read_tensorstore, read_cloudvolume):
            got, _ = read(run.raw_url, s)
            assert got.dtype == np.uint16
            np.testing.assert_array_equal(got, level, err_msg=f"scale {s} {read.__name__}")
    # The JPEG volume is the 8-bit rendering: the 8-bit original's tiles (as without
    # raw_dtype), within JPEG error.
    jpeg, _ = read_tensorstore(run.jpeg_url, 0)
    assert jpeg.dtype == np.uint8
    assert np.abs(jpeg[0].astype(int) - _tiles(source, 10)).mean() < 8
    # A /ngshard that forgets raw_dtype would mix dtypes: refused, naming both.
    narrow = {k: v for k, v in volume.items() if k != "raw_dtype"}
    r = requests.post(
        url + "/ngshard", json={**narrow, "source": tmp, "start": [0, 0, 0]}, timeout=60
    )
    assert r.status_code == 400
    assert "data_type uint16) than this request" in r.json()["error"]
    assert "data_type uint8)" in r.json()["error"]
    # An 8-bit slice cannot keep 16 bits: named, before anything is written.
    put(source, "12.png", slices8[0])
    body = {**_slice_body(source, "12.png", None), "raw_dtype": "uint16"}
    r = requests.post(url + "/alignedslice", json=body, timeout=60)
    assert r.status_code == 400 and "is uint8" in r.json()["error"]
    assert not storage.exists(tiles_url(tmp, 12))


def test_raw_bits_16_needs_16bit_slices_and_the_raw_volume(slices8: list[np.ndarray]) -> None:
    source = unique_bucket("rb")
    storage.create_bucket(source)
    put(source, "s000.png", slices8[0])
    with pytest.raises(InvalidInput, match="raw_bits: 16 keeps 16-bit values, but the slices"):
        validate_run(_conf(source, 1, raw_bits=16), 1, "d")
    with pytest.raises(InvalidInput, match="createRawPyramid is false"):
        parse_conf(_conf(source, 1, raw_bits=16, createRawPyramid=False))
