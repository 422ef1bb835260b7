"""The reduced-resolution reader (emprocess.images, libvips): what it returns at 1/n equals
OpenCV's full decode shrunk by INTER_AREA within one grey level, for PNG, TIFF and JPEG,
8- and 16-bit, grey and colour; its subsample is every n-th pixel; and alignment of the
real FIB-SEM pair read at 1/2 recovers the same transform as the full-decode path."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SHARED_DATA, point_storage

from emprocess import affine
from emprocess.errors import InvalidInput
from emprocess.images import decode_image
from emprocess.kernels.align import align_pair, downsample_image
from emprocess.workflow.window import sample_step


def _texture(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, shape, np.uint8), (0, 0), 1.5)


def _tiff(image: np.ndarray) -> bytes:
    """A TIFF written by OpenCV (libtiff): RGB order in the file for an RGB ``image``."""
    return cv2.imencode(".tif", image if image.ndim == 2 else image[:, :, ::-1])[1].tobytes()


def _files() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (file bytes, OpenCV's decode in RGB order), odd sizes so blocks are dropped."""
    grey = _texture((203, 317))
    grey16 = grey.astype(np.uint16) * 250 + np.arange(317, dtype=np.uint16)
    rgb = np.dstack([grey, 255 - grey, _texture((203, 317), 1)])
    files = {
        "grey.png": cv2.imencode(".png", grey)[1].tobytes(),
        "grey16.png": cv2.imencode(".png", grey16)[1].tobytes(),
        "rgb.png": cv2.imencode(".png", rgb[:, :, ::-1])[1].tobytes(),
        "grey.tif": _tiff(grey),
        "grey16.tif": _tiff(grey16),
        "rgb.tif": _tiff(rgb),
        "grey.jpg": cv2.imencode(".jpg", grey)[1].tobytes(),
    }
    out = {}
    for name, data in files.items():
        full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        out[name] = (data, full if full.ndim == 2 else full[:, :, ::-1])
    return out


FILES = _files()


def _inter_area(image: np.ndarray, factor: int) -> np.ndarray:
    if image.ndim == 2:
        return downsample_image(image, factor)
    return np.dstack([downsample_image(np.ascontiguousarray(p), factor) for p in image.T]).T


@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("factor", [1, 2, 3, 4, 7])
def test_reduced_read_is_inter_area_of_the_full_decode(name: str, factor: int) -> None:
    data, full = FILES[name]
    reduced = decode_image(data, name, channels="all", factor=factor)
    h, w = full.shape[0] // factor, full.shape[1] // factor
    expected = cv2.resize(
        np.ascontiguousarray(full[: h * factor, : w * factor]), (w, h), interpolation=cv2.INTER_AREA
    )
    assert reduced.dtype == full.dtype and reduced.shape == expected.shape
    assert np.abs(reduced.astype(np.int64) - expected).max() <= (0 if factor == 1 else 1)
    # the grey plane alignment gets: OpenCV's grey of the decode, shrunk (colour: grey of
    # the shrunk channels, two roundings, so within two levels)
    grey = decode_image(data, name, factor=factor)
    ref = full if full.ndim == 2 else cv2.cvtColor(full, cv2.COLOR_RGB2GRAY)
    tolerance = 0 if factor == 1 else 1 if full.ndim == 2 else 2
    assert np.abs(grey.astype(np.int64) - _inter_area(ref, factor)).max() <= tolerance


@pytest.mark.parametrize("name", ["grey16.png", "rgb.tif"])
def test_subsample_keeps_every_nth_pixel(name: str) -> None:
    data, full = FILES[name]
    got = decode_image(data, name, channels="all", factor=3, subsample=True)
    h, w = full.shape[0] // 3, full.shape[1] // 3
    assert np.array_equal(got, full[: h * 3 : 3, : w * 3 : 3])


def test_factor_is_checked() -> None:
    data, _ = FILES["grey.png"]
    with pytest.raises(InvalidInput, match="integer >= 1, got 0"):
        decode_image(data, "grey.png", factor=0)
    with pytest.raises(InvalidInput, match="smaller than downsample factor 400"):
        decode_image(data, "grey.png", factor=400)
    # the limits are those of the full-resolution image, whatever the factor
    with pytest.raises(InvalidInput, match="over the limit of 1000"):
        decode_image(data, "grey.png", max_pixels=1000, factor=8)


def test_sample_step() -> None:
    assert sample_step(520, 520) == 1
    assert sample_step(4096, 4096) == 1
    assert sample_step(4097, 4096) == 2
    assert sample_step(20000, 20000) == 5  # 4000^2 pixels counted of each slice


def test_real_pair_aligns_alike_through_the_reader() -> None:
    """At downsample 2, the reduced read and the full decode + INTER_AREA align the real
    pair to the same transform within the pair's noise (a few hundredths of a pixel)."""
    paths = [SHARED_DATA / "iso.03493.png", SHARED_DATA / "iso.03494.png"]
    if not all(p.exists() for p in paths):
        pytest.fail(
            f"real FIB-SEM slices not found in {SHARED_DATA}: ../shared/data must sit beside the checkout"
        )
    data = [Path(p).read_bytes() for p in paths]
    full = [cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_UNCHANGED) for d in data]
    old = align_pair(downsample_image(full[0], 2), downsample_image(full[1], 2))
    new = align_pair(*(decode_image(d, "iso.png", factor=2) for d in data))
    assert old.affine_found and new.affine_found
    error = affine.mean_corner_error(
        affine.rescale(new.affine, 2), affine.rescale(old.affine, 2), 520, 520
    )
    assert error < 0.25, (old.affine, new.affine)


def test_auto_window_from_a_subsample_is_the_full_one_within_two_levels(
    local_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``validate``'s auto window measured on every 2nd pixel of every 2nd row of 4 real
    slices (20,000^2 slices: every 5th, 16 M samples each) is the full one within 2 of
    the window's 255 levels (with 4x fewer samples the 0.35% tails are too few: 3.7)."""
    from conftest import unique_bucket

    from emprocess import storage
    from emprocess.workflow import window
    from emprocess.workflow.conf import parse_conf

    paths = [SHARED_DATA / "fibsem" / f"img.{z:05d}.png" for z in range(4)]
    if not all(p.is_file() for p in paths):
        pytest.fail(
            f"real FIB-SEM stack not found in {paths[0].parent}: ../shared/data must sit beside the checkout"
        )
    point_storage(monkeypatch, str(local_root))
    source = unique_bucket("subwin")
    storage.create_bucket(source)
    for z, path in enumerate(paths):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.uint16) * 16 + 300
        storage.write_bytes(f"gs://{source}/s{z:03d}.png", cv2.imencode(".png", image)[1])
    conf = parse_conf(
        {"id": "r", "image": "s%03d.png", "minz": 0, "maxz": 3, "source": source,
         "intensity": "auto"}
    )  # fmt: skip
    full = window.measure_window(conf)
    monkeypatch.setattr(window, "AUTO_SAMPLE_PIXELS", 260 * 260)  # 520 px: every 2nd
    sampled = window.measure_window(conf)
    level = (full[1] - full[0]) / 255
    assert abs(sampled[0] - full[0]) <= 2 * level and abs(sampled[1] - full[1]) <= 2 * level
