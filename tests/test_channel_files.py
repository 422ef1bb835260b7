"""Slices stored one grey file per channel (``channel_templates``), the ``auto`` window of
colour stacks, and the viewer of a run with one JPEG volume per channel."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests
from conftest import point_storage

from emprocess import affine, storage
from emprocess.errors import InvalidInput
from emprocess.kernels import ngmeta
from emprocess.layout import jpeg_channel_path
from emprocess.models import AlignedSliceRequest, AlignRequest, parse
from emprocess.view import CHANNEL_COLOURS, RGB_SHADER, DataServer, gcs_view, serve_run
from emprocess.workflow.conf import InvalidRunConf, parse_conf
from emprocess.workflow.payloads import plan_align_pairs, plan_aligned_slices

RNG = np.random.default_rng(12)
TEMPLATES = ["red/img.%05d.png", "green/img.%05d.png", "blue/img.%05d.png"]
BASE: dict[str, Any] = {"id": "run", "minz": 0, "maxz": 2, "source": "slices"}


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def test_channel_templates_give_image_and_channels() -> None:
    conf = parse_conf({**BASE, "channel_templates": TEMPLATES})
    assert conf.image == TEMPLATES[0] and conf.channels == 3
    assert conf.channel_files(7) == ["red/img.00007.png", "green/img.00007.png", "blue/img.00007.png"]  # fmt: skip
    same = parse_conf(
        {**BASE, "channel_templates": TEMPLATES, "image": TEMPLATES[0], "channels": 3}
    )
    assert same == conf
    assert parse_conf({**BASE, "image": "img.%05d.png"}).templates() == ["img.%05d.png"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"image": "img.%05d.png"}, "image 'img.%05d.png' must be the first of channel_templates"),
        ({"channels": 2}, "channels 2 but channel_templates has 3 templates"),
        ({"channel_templates": ["a.%d.png"]}, "channel_templates"),
        ({"channel_templates": ["a.%d.png", "a.%d.png"]}, r"names \['a.%d.png'\] more than once"),
        ({"channel_templates": ["a.%d.png", "b.%s.png"]}, "'b.%s.png' has field '%s'"),
        ({"channel_templates": ["a.%d.png", "../b.%d.png"]}, "image template '../b.%d.png' gives"),
        ({"channel_templates": ["a.%d.png", "b" * 1030 + "%d"]}, "must be 1 to 1024 long"),
    ],
)
def test_bad_channel_templates_are_refused(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRunConf, match=message):
        parse_conf({**BASE, "channel_templates": TEMPLATES, **extra})


def test_payloads_name_every_channel_file_and_grey_ones_do_not_change() -> None:
    transforms = {z: [1.0, 0.0, 0.0, 1.0, 0.0, 0.0] for z in range(3)}
    conf = parse_conf({**BASE, "channel_templates": TEMPLATES, "align_channel": "mean"})
    pair = plan_align_pairs(conf)[0].payload
    assert pair["pre"] == "gs://slices/red/img.00000.png" and pair["channel"] == "mean"
    assert pair["pre_channels"] == ["gs://slices/green/img.00000.png", "gs://slices/blue/img.00000.png"]  # fmt: skip
    assert pair["post_channels"][1] == "gs://slices/blue/img.00001.png"
    body = plan_aligned_slices(conf, transforms, [10, 10])[2].payload
    assert body["img"] == "red/img.00002.png" and body["channels"] == 3
    assert body["channel_imgs"] == ["green/img.00002.png", "blue/img.00002.png"]
    grey = parse_conf({**BASE, "image": "img.%05d.png"})
    assert "pre_channels" not in plan_align_pairs(grey)[0].payload
    assert "channel_imgs" not in plan_aligned_slices(grey, transforms, [10, 10])[0].payload


def test_requests_check_the_channel_files() -> None:
    body = {"pre": "gs://bkt/a.png", "post": "gs://bkt/c.png", "channel": "mean"}
    with pytest.raises(InvalidInput, match=r"pre_channels \(1 files\) and post_channels \(0"):
        parse(AlignRequest, {**body, "pre_channels": ["gs://bkt/a1.png"]})
    with pytest.raises(InvalidInput, match="need channel"):
        parse(AlignRequest, {"pre": "gs://bkt/a.png", "post": "gs://bkt/c.png", "pre_channels": ["gs://bkt/x.png"], "post_channels": ["gs://bkt/y.png"]})  # fmt: skip
    with pytest.raises(InvalidInput, match="channel 2 is not one of the 2 channel files"):
        parse(AlignRequest, {**body, "channel": 2, "pre_channels": ["gs://bkt/x.png"], "post_channels": ["gs://bkt/y.png"]})  # fmt: skip
    slice_body = {"img": "a.png", "transform": [1, 0, 0, 1, 0, 0], "bbox": [9, 9], "dest": "bkt", "dest-tmp": "tmp", "slice": 0, "run_id": "r"}  # fmt: skip
    with pytest.raises(InvalidInput, match="channel_imgs names 1 files, so the slice has 2 channels, but channels is 3"):  # fmt: skip
        parse(AlignedSliceRequest, {**slice_body, "channels": 3, "channel_imgs": ["b.png"]})


def _write_channel_stack(source: str, planes_of: dict[int, list[np.ndarray]]) -> None:
    storage.create_bucket(source)
    for z, planes in planes_of.items():
        for template, plane in zip(TEMPLATES, planes, strict=False):
            storage.write_bytes(f"gs://{source}/{template % z}", _png(plane))


def test_validate_checks_every_channel_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emprocess.workflow.stages import SliceProblems, validate_run

    point_storage(monkeypatch, str(tmp_path))
    grey = [RNG.integers(0, 256, (30, 40), np.uint8) for _ in range(3)]
    _write_channel_stack("files-ok", {z: grey for z in range(3)})
    conf = {**BASE, "source": "files-ok", "channel_templates": TEMPLATES}
    info = validate_run(conf, 1, "d1")
    assert info.conf.channels == 3 and info.slice_size_xy == (40, 30) and info.slice_bits == 8
    # Green of slice 1 missing, blue of slice 2 wider, red of slice 0 colour, 16 bits.
    _write_channel_stack("files-bad", {0: [np.dstack(grey)], 1: grey[:1], 2: [*grey[:2], np.zeros((30, 41), np.uint16)]})  # fmt: skip
    with pytest.raises(SliceProblems) as e:
        validate_run({**conf, "source": "files-bad"}, 1, "d1")
    msg = str(e.value)
    assert "missing 2 of 3 slices of 'green/img.%05d.png' in gs://files-bad/: green/img.00000.png, green/img.00001.png" in msg  # fmt: skip
    assert "1 files have several channels: red/img.00000.png (3)" in msg
    assert "41x30 (1: blue/img.00002.png)" in msg and "16-bit (1: blue/img.00002.png)" in msg


def test_auto_window_of_colour_slices_is_measured_on_their_channels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16-bit RGBA: red 1000..2000, green 3000..4000, blue 500, alpha 65535. One window
    covers every colour channel (not a grey conversion, which lies in 2100..3010), and
    alpha, one value, is left out; slices stored one file per channel give the same."""
    from emprocess.workflow.stages import intensity_sample, validate_run

    point_storage(monkeypatch, str(tmp_path))
    storage.create_bucket("rgba16")
    planes = {}
    for z in range(3):
        red = RNG.integers(1000, 2001, (40, 50)).astype(np.uint16)
        green = RNG.integers(3000, 4001, (40, 50)).astype(np.uint16)
        blue, alpha = np.full_like(red, 500), np.full_like(red, 65535)
        storage.write_bytes(f"gs://rgba16/img.{z:05d}.png", _png(np.dstack([blue, green, red, alpha])))  # fmt: skip
        planes[z] = [red, green, blue]
    conf = {**BASE, "source": "rgba16", "image": "img.%05d.png", "channels": 4}
    info = validate_run(conf, 1, "d1")
    assert info.slice_bits == 16 and info.intensity_window is not None
    low, high = info.intensity_window
    assert low == 500 and 3990 <= high <= 4000, info.intensity_window
    sample = intensity_sample(info)
    assert sample is not None
    assert sample.to_json() == {"slices": [0, 1, 2], "channels": 3, "of": sample.to_json()["of"]}
    grey = validate_run({**conf, "channels": 1}, 1, "d1").intensity_window
    assert grey is not None and 2100 < grey[0] < grey[1] < 3010  # what a grey conversion gave
    _write_channel_stack("files16", planes)
    files = validate_run({**BASE, "source": "files16", "channel_templates": TEMPLATES}, 1, "d1")
    assert files.intensity_window == info.intensity_window


KNOWN = [0.999, 0.02, -0.02, 0.999, 7.5, -4.25]


def test_align_service_reads_channel_files(
    align_service: str, bucket: str, real_slices: tuple[Path, Path]
) -> None:
    """Red and green carry the texture, blue is flat: the mean of the files recovers the
    known transform; blue alone (only its file is read) finds nothing."""
    texture = cv2.imread(str(real_slices[0]), cv2.IMREAD_GRAYSCALE)
    size = texture.shape[::-1]
    moved = cv2.warpAffine(texture, affine.to_matrix(KNOWN), size, flags=cv2.INTER_CUBIC)
    urls: dict[int, list[str]] = {}
    for z, plane in enumerate([texture, moved]):
        urls[z] = []
        for c, channel in enumerate([plane, plane, np.full_like(plane, 90)]):
            urls[z].append(f"gs://{bucket}/c{c}/img.{z:05d}.png")
            storage.write_bytes(urls[z][-1], _png(channel))
    body = {"pre": urls[0][0], "post": urls[1][0], "pre_channels": urls[0][1:], "post_channels": urls[1][1:]}  # fmt: skip
    r = requests.post(align_service + "/", json={**body, "channel": "mean"}, timeout=120)
    assert r.status_code == 200, r.text
    assert affine.mean_corner_error(r.json()["affine"], affine.invert(KNOWN), *size) < 0.3
    r = requests.post(align_service + "/", json={**body, "channel": 2}, timeout=120)
    assert r.status_code == 200 and not r.json()["affine_found"], r.text
    storage.write_bytes(urls[1][2], _png(np.zeros((20, 20), np.uint8)))
    r = requests.post(align_service + "/", json={**body, "channel": "mean"}, timeout=120)
    assert r.status_code == 400 and f"channel file {urls[1][2]} is 20x20" in r.text, r.text


def _write_info(folder: Path, num_channels: int = 1) -> None:
    folder.mkdir(parents=True)
    info = ngmeta.build_info((64, 48), 0, 9, [4.0, 4.0, 40.0], "jpeg", num_channels=num_channels)
    (folder / "info").write_text(json.dumps(info))


def test_view_shows_every_channel_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """jpeg_channels "each": one layer per channel, each in its colour, added up; the
    lossless volume in colour. Through serve_run and through the gs:// link."""
    ng = tmp_path / "src_ng_run"
    for path in ("neuroglancer/jpeg", "neuroglancer/jpeg_c1", "neuroglancer/jpeg_c2"):
        _write_info(ng / path)
    _write_info(tmp_path / "src_chunk_run" / "neuroglancer/raw", 3)
    point_storage(monkeypatch, str(tmp_path))
    with serve_run("src", "run", raw=True) as session:
        layers = session.viewer.state.layers
        assert [layer.name for layer in layers] == ["run-c0", "run-c1", "run-c2", "run-raw"]
        for c, layer in enumerate(list(layers)[:3]):
            assert layer.source[0].url.endswith(f"/{jpeg_channel_path(c)}")
            assert f'color(default="{CHANNEL_COLOURS[c]}")' in layer.shader
            assert layer.blend == "additive" and layer.opacity == 1.0
        assert layers["run-raw"].shader == RGB_SHADER
    point_storage(monkeypatch, None)
    with DataServer({"src_ng_run": ng}) as fake_gcs:  # plays a public GCS bucket
        result = gcs_view("src", "run", gcs_url=fake_gcs.url)
    assert [c.url.rsplit("/", 2)[-2] for c in result.checks] == ["jpeg", "jpeg_c1", "jpeg_c2"]
    state = json.loads(urllib.parse.unquote(result.link.split("#!", 1)[1]))
    assert [layer["source"] for layer in state["layers"]] == [
        f"precomputed://gs://src_ng_run/neuroglancer/{p}" for p in ("jpeg", "jpeg_c1", "jpeg_c2")
    ]
    assert [CHANNEL_COLOURS[c] in layer["shader"] for c, layer in enumerate(state["layers"])] == [True] * 3  # fmt: skip
    assert state["dimensions"]["z"] == [4e-08, "m"]


def test_emwrite_refuses_bad_channel_files_before_writing(
    emwrite_service: str, bucket: str
) -> None:
    """A colour file, one of another size, or a missing one: 400 naming it, nothing written."""
    grey = RNG.integers(0, 256, (30, 40), np.uint8)
    storage.write_bytes(f"gs://{bucket}/red/img.00000.png", _png(grey))
    storage.write_bytes(f"gs://{bucket}/green/img.00000.png", _png(np.dstack([grey] * 3)))
    storage.write_bytes(f"gs://{bucket}/blue/img.00000.png", _png(grey[:, :20]))
    storage.write_bytes(f"gs://{bucket}/text.png", b"not an image at all")
    for b in (f"{bucket}_tmp_run", f"{bucket}_process"):
        storage.create_bucket(b)
    body = {
        "img": "red/img.00000.png",
        "transform": [1, 0, 0, 1, 0, 0],
        "bbox": [40, 30],
        "dest": bucket,
        "dest-tmp": f"{bucket}_tmp_run",
        "slice": 0,
        "run_id": "run",
        "channels": 2,
    }
    for other, message in (
        ("green/img.00000.png", f"gs://{bucket}/green/img.00000.png has 3 channels"),
        ("blue/img.00000.png", f"channel file gs://{bucket}/blue/img.00000.png is 20x30 px"),
        ("none/img.00000.png", "none/img.00000.png"),
        ("text.png", f"gs://{bucket}/text.png is not a PNG, TIFF or JPEG image"),
    ):
        r = requests.post(emwrite_service + "/alignedslice", json={**body, "channel_imgs": [other]}, timeout=60)  # fmt: skip
        assert r.status_code == 400 and message in r.json()["error"], r.text
    assert storage.list_keys(f"gs://{bucket}_tmp_run/") == []


def test_mean_of_channel_files_is_the_mean_of_a_colour_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the alignment matches: the channel files' mean equals align_plane's mean of
    the same channels in one file (8 and 16 bits, 2 to 4 channels)."""
    from emprocess.images import align_plane
    from emprocess.services.align import read_channel_files

    point_storage(monkeypatch, str(tmp_path))
    storage.create_bucket("means")
    for n, top, dtype in ((2, 256, np.uint8), (3, 65536, np.uint16), (4, 256, np.uint8)):
        planes = [RNG.integers(0, top, (50, 60)).astype(dtype) for _ in range(n)]
        urls = [f"gs://means/{n}/c{c}.png" for c in range(n)]
        for url, plane in zip(urls, planes, strict=True):
            storage.write_bytes(url, _png(plane))
        expected = align_plane(np.dstack(planes), "mean")
        limit = 50 * 60  # the service's largest slice: these are at it
        assert np.array_equal(read_channel_files(urls, "mean", max_pixels=limit), expected), n
        assert np.array_equal(read_channel_files(urls, n - 1, max_pixels=limit), planes[-1]), n
