"""The ``auto`` window without decoding in the Airflow worker: ``validate`` reads headers only,
the alignment service's POST /histogram counts each sampled file (real gunicorn, local
backend), ``measure_window``'s answers are cached, and the window from them is the
in-process one exactly."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from conftest import SHARED_DATA, ServicePool, unique_bucket
from faultproxy import FaultProxy

from emprocess import images, storage
from emprocess.workflow import window
from emprocess.workflow.batch import BatchError
from emprocess.workflow.stages import validate_run
from emprocess.workflow.window import settle_window

RNG = np.random.default_rng(8)


@pytest.fixture(autouse=True)
def on_local(local_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMPROCESS_STORAGE_ROOT", str(local_root))


@pytest.fixture
def align_url(service_pool: ServicePool) -> str:
    return service_pool.url("align", "local")


def _put(bucket: str, name: str, image: np.ndarray) -> str:
    storage.write_bytes(f"gs://{bucket}/{name}", cv2.imencode(".png", image)[1].tobytes())
    return f"gs://{bucket}/{name}"


def test_histogram_counts_a_subsample_exactly_and_refuses_bad_requests(align_url: str) -> None:
    source = unique_bucket("hist")
    storage.create_bucket(source)
    image = RNG.integers(300, 4000, (50, 60)).astype(np.uint16)
    url = _put(source, "s.png", image)
    answer = requests.post(f"{align_url}/histogram", json={"img": url}, timeout=60).json()
    assert (answer["width"], answer["height"], answer["bits"], answer["step"]) == (60, 50, 16, 1)
    want = np.bincount(image.ravel())
    assert answer["values"] == np.flatnonzero(want).tolist()
    assert answer["counts"] == want[want > 0].tolist() and answer["counted"] == 3000
    # At most 100 samples: every 6th pixel of every 6th row (10 x 8), whole blocks only.
    small = requests.post(
        f"{align_url}/histogram", json={"img": url, "sample_pixels": 100}, timeout=60
    ).json()
    sample = np.bincount(image[0:48:6, 0:60:6].ravel())
    assert small["step"] == 6 and small["counted"] == 80
    assert small["values"] == np.flatnonzero(sample).tolist()
    assert small["counts"] == sample[sample > 0].tolist()

    storage.write_bytes(f"gs://{source}/notes.png", b"not an image at all" * 10)
    for body, message in [
        ({"img": f"gs://{source}/notes.png"}, "is not a PNG, TIFF or JPEG image"),
        ({"img": url, "channels": 3}, "channels: 3 asked, but"),
        ({"img": url, "sample_pixels": 0}, "sample_pixels"),
        ({"img": url, "window": [0, 1]}, "window"),
        ({"img": "/etc/passwd"}, "img"),
    ]:
        r = requests.post(f"{align_url}/histogram", json=body, timeout=60)
        assert r.status_code == 400 and message in r.text, (body, r.status_code, r.text)


def test_validate_reads_headers_and_the_service_measures_the_same_window(
    align_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real FIB-SEM slices as 12-bit-in-16 (v * 16 + 300), and 16-bit RGBA colour slices:
    validate decodes nothing (a decoder that fails shows it), leaves the window pending,
    and the service's histograms give the in-process window exactly."""
    paths = [SHARED_DATA / "fibsem" / f"img.{z:05d}.png" for z in range(3)]
    if not all(p.is_file() for p in paths):
        pytest.fail(
            f"real FIB-SEM stack not found in {paths[0].parent}: ../shared/data must sit beside the checkout"
        )
    source = unique_bucket("winsvc")
    storage.create_bucket(source)
    for z, path in enumerate(paths):
        v = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.uint16)
        _put(source, f"g{z:03d}.png", v * 16 + 300)
        red = RNG.integers(1000, 2001, (40, 50)).astype(np.uint16)
        green = RNG.integers(3000, 4001, (40, 50)).astype(np.uint16)
        blue, alpha = np.full_like(red, 500), np.full_like(red, 65535)
        _put(source, f"c{z:03d}.png", np.dstack([blue, green, red, alpha]))
    base = {"id": "w", "minz": 0, "maxz": 2, "source": source, "intensity": "auto"}
    for conf in [{**base, "image": "g%03d.png"}, {**base, "image": "c%03d.png", "channels": 4}]:
        with monkeypatch.context() as m:

            def no_decoding(*args: object, **kwargs: object) -> None:
                raise AssertionError("validate decoded a slice")

            m.setattr(images, "decode_image", no_decoding)
            info = validate_run(conf, 1, "d", measure_window=False)
        assert info.slice_bits == 16 and info.window_pending and info.intensity_window is None
        with FaultProxy(align_url) as proxy:
            settled = settle_window(info, proxy.url)  # creates the process bucket: the cache
            assert [r.path for r in proxy.requests] == ["/histogram"] * 3
            assert settle_window(info, proxy.url) == settled and len(proxy.requests) == 3
        assert not settled.window_pending and settled.intensity_window is not None
        remote = settled.intensity_window
        assert remote == window.measure_window(info.conf)
        assert validate_run(conf, 1, "d").intensity_window == remote
        assert settle_window(settled, "http://127.0.0.1:9") == settled  # nothing pending
    low, high = remote  # the colour stack: one window over its colour channels, alpha out
    assert low == 500 and 3990 <= high <= 4000


def test_a_refused_sample_names_the_slice(align_url: str) -> None:
    source = unique_bucket("winbad")
    storage.create_bucket(source)
    _put(source, "g000.png", RNG.integers(0, 4000, (20, 30)).astype(np.uint16))
    _put(source, "g001.png", RNG.integers(0, 4000, (20, 30)).astype(np.uint16))
    info = validate_run(
        {"id": "w", "image": "g%03d.png", "minz": 0, "maxz": 1, "source": source,
         "intensity": "auto"}, 1, "d", measure_window=False,
    )  # fmt: skip
    storage.write_bytes(f"gs://{source}/g001.png", b"\x89PNG\r\n\x1a\n broken since validate")
    with pytest.raises(BatchError, match=r"z000001: POST .*/histogram answered 400: .*g001") as e:
        settle_window(info, align_url)
    assert e.value.client_error
