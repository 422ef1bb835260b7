"""Colour slices, piece by piece: decoding by channel, the alignment plane, the colour
pyramid, the info, the viewer's shader, and the requests and conf that carry channels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests
from conftest import point_storage

from emprocess import affine, layout, storage
from emprocess.errors import InvalidInput
from emprocess.images import align_plane, decode_image
from emprocess.kernels import ngmeta
from emprocess.models import AlignRequest, NgMetaRequest, parse
from emprocess.services.pyramid import ChannelsWriter, write_pyramid
from emprocess.view import RGB_SHADER, geometry_from_info, viewer_state
from emprocess.workflow.conf import InvalidRunConf, parse_conf
from emprocess.workflow.payloads import ngmeta_task, plan_align_pairs, plan_aligned_slices

RNG = np.random.default_rng(7)


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def test_decode_keeps_channels_in_rgb_order() -> None:
    rgb = RNG.integers(0, 256, (20, 30, 3), np.uint8)
    data = _png(rgb[:, :, ::-1])  # OpenCV writes BGR
    assert np.array_equal(decode_image(data, "x", channels=3), rgb)
    assert np.array_equal(decode_image(data, "x", channels="all"), rgb)
    assert decode_image(data, "x").shape == (20, 30)  # grey, as before
    rgba = RNG.integers(0, 256, (20, 30, 4), np.uint8)
    assert np.array_equal(decode_image(_png(rgba[:, :, [2, 1, 0, 3]]), "x", channels=4), rgba)
    with pytest.raises(InvalidInput, match="x has 3 channel\\(s\\), expected 4"):
        decode_image(data, "x", channels=4)


def test_align_plane_is_the_channel_or_the_mean() -> None:
    rgb = RNG.integers(0, 256, (8, 9, 3), np.uint8)
    assert np.array_equal(align_plane(rgb, 1), rgb[:, :, 1])
    mean = np.rint(rgb.astype(float).mean(axis=2)).astype(np.uint8)
    assert np.array_equal(align_plane(rgb, "mean"), mean)
    with pytest.raises(InvalidInput, match="channel 3 asked of an image with 3 channels"):
        align_plane(rgb, 3)
    grey = rgb[:, :, 0].copy()
    assert align_plane(grey, 0) is grey and align_plane(grey, "mean") is grey
    with pytest.raises(InvalidInput, match="channel 2 asked of a grey"):
        align_plane(grey, 2)


class MemoryWriter:
    """Keeps every block written, by scale."""

    def __init__(self) -> None:
        self.blocks: dict[int, np.ndarray] = {}

    def write(self, scale: int, lo_xyz: tuple[int, int, int], data_zyx: np.ndarray) -> None:
        assert scale not in self.blocks and lo_xyz[:2] == (0, 0)
        self.blocks[scale] = data_zyx.copy()


def test_colour_pyramid_is_each_channels_grey_pyramid() -> None:
    res = [4.0, 4.0, 40.0]
    layouts = ngmeta.scale_layouts(res, 4, cube=64)
    boxes = [ngmeta.cube_bounds_xyz([0, 0, 0], (64, 48), 0, 9, s, 64, lay.factor) for s, lay in enumerate(layouts)]  # fmt: skip
    vol = RNG.integers(0, 256, (10, 48, 64, 3), np.uint8)
    colour, first = MemoryWriter(), MemoryWriter()
    write_pyramid(
        lambda lo, hi, _box: vol[lo:hi], boxes, layouts, [colour, ChannelsWriter(first, 0, 1)], 32
    )
    for c in range(3):
        grey = MemoryWriter()
        plane = np.ascontiguousarray(vol[..., c])
        write_pyramid(lambda lo, hi, _box, p=plane: p[lo:hi], boxes, layouts, [grey], 32)
        for s in range(4):
            assert np.array_equal(colour.blocks[s][..., c], grey.blocks[s]), (c, s)
            if c == 0:
                assert np.array_equal(first.blocks[s], grey.blocks[s])


def test_info_channels() -> None:
    raw = ngmeta.build_info((100, 80), 0, 9, 8, "raw", num_channels=4)
    jpeg = ngmeta.build_info((100, 80), 0, 9, 8, "jpeg", num_channels=3)
    assert raw["num_channels"] == 4 and jpeg["num_channels"] == 3
    with pytest.raises(InvalidInput, match="a jpeg volume cannot hold 2 channels"):
        ngmeta.build_info((100, 80), 0, 9, 8, "jpeg", num_channels=2)


def test_view_shows_colour_with_a_shader() -> None:
    info = ngmeta.build_info((100, 80), 0, 9, 8, "jpeg", num_channels=3)
    geometry = geometry_from_info(info)
    assert geometry.num_channels == 3
    state = viewer_state([("run", "precomputed://x"), ("raw", "precomputed://y")], geometry)
    assert all(layer["shader"] == RGB_SHADER for layer in state["layers"])
    grey = viewer_state(
        [("run", "precomputed://x")], geometry_from_info({**info, "num_channels": 1})
    )
    assert "shader" not in grey["layers"][0]


GOOD: dict[str, Any] = {
    "id": "run",
    "image": "img.%05d.png",
    "minz": 0,
    "maxz": 3,
    "source": "slices",
}


def test_grey_runs_send_no_channel_keys_and_colour_runs_do() -> None:
    transforms = {z: [1.0, 0.0, 0.0, 1.0, 0.0, 0.0] for z in range(4)}
    grey, colour = parse_conf(GOOD), parse_conf({**GOOD, "channels": 3, "align_channel": 1})
    for conf, align, count in ((grey, None, None), (colour, 1, 3)):
        assert all(t.payload.get("channel") == align for t in plan_align_pairs(conf))
        slices = plan_aligned_slices(conf, transforms, [100, 80])
        assert all(t.payload.get("channels") == count for t in slices)
        assert ngmeta_task(conf, [100, 80]).payload.get("channels") == count
    assert "jpeg_channels" not in ngmeta_task(colour, [100, 80]).payload
    each = parse_conf({**GOOD, "channels": 2, "jpeg_channels": "each"})
    assert ngmeta_task(each, [100, 80]).payload["jpeg_channels"] == "each"
    # Absent keys: a grey run's payloads (hence its cache keys) are the ones before.
    assert all("channel" not in t.payload for t in plan_align_pairs(grey))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"channels": 5}, "channels"),
        ({"channels": 3, "align_channel": 3}, "align_channel 3 is not a channel"),
        ({"channels": 3, "align_channel": "max"}, "align_channel"),
        ({"channels": 3, "raw_bits": 16}, "keeps one grey channel only"),
    ],
)
def test_bad_channel_confs_are_refused(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRunConf, match=message):
        parse_conf({**GOOD, **extra})


def test_requests_type_channels_strictly() -> None:
    body = {"pre": "gs://bkt/a.png", "post": "gs://bkt/c.png"}
    assert parse(AlignRequest, {**body, "channel": "mean"}).channel == "mean"
    for bad in ("1", 4, -1, "max", True):
        with pytest.raises(InvalidInput, match="channel"):
            parse(AlignRequest, {**body, "channel": bad})
    volume = {"dest": "ngb", "minz": 0, "maxz": 3, "bbox": [10, 10], "writeRaw": False}
    assert parse(NgMetaRequest, {**volume, "channels": 3}).channels == 3
    for bad in (1, 5, "3", 3.0):
        with pytest.raises(InvalidInput, match="channels"):
            parse(NgMetaRequest, {**volume, "channels": bad})
    with pytest.raises(InvalidInput, match='jpeg_channels "each" needs channels'):
        parse(NgMetaRequest, {**volume, "jpeg_channels": "each"})


KNOWN = [0.999, 0.02, -0.02, 0.999, 7.5, -4.25]
"""A small rotation and shift (post = pre warped by KNOWN, mpicbg order)."""


def test_align_service_matches_the_chosen_channel(
    align_service: str, bucket: str, real_slices: tuple[Path, Path]
) -> None:
    """Green carries the texture, red is noise that differs between the slices, blue is
    flat: aligning on green recovers the known transform, on blue finds nothing."""
    texture = cv2.imread(str(real_slices[0]), cv2.IMREAD_GRAYSCALE)
    size = texture.shape[::-1]
    urls = []
    for z, green in enumerate(
        [texture, cv2.warpAffine(texture, affine.to_matrix(KNOWN), size, flags=cv2.INTER_CUBIC)]
    ):
        noise = RNG.integers(0, 256, green.shape, np.uint8)
        rgb = np.dstack([noise, green, np.full_like(green, 90)])
        urls.append(f"gs://{bucket}/rgb.{z:05d}.png")
        storage.write_bytes(urls[-1], _png(rgb[:, :, ::-1]))
    body = {"pre": urls[0], "post": urls[1], "downsample": 1}
    r = requests.post(align_service + "/", json={**body, "channel": 1}, timeout=120)
    assert r.status_code == 200, r.text
    assert affine.mean_corner_error(r.json()["affine"], affine.invert(KNOWN), *size) < 0.3
    r = requests.post(align_service + "/", json={**body, "channel": 2}, timeout=120)
    assert r.status_code == 200 and not r.json()["affine_found"], r.text
    r = requests.post(align_service + "/", json={**body, "channel": 3}, timeout=120)
    assert r.status_code == 400 and "channel 3 asked of an image with 3 channels" in r.text


def test_validate_names_a_channel_count_the_slices_lack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emprocess.workflow.stages import SliceProblems, validate_run

    point_storage(monkeypatch, str(tmp_path))
    storage.create_bucket("slices-c")
    for z in range(3):
        rgb = RNG.integers(0, 256, (30, 40, 3), np.uint8)
        storage.write_bytes(f"gs://slices-c/img.{z:05d}.png", _png(rgb))
    conf = {**GOOD, "source": "slices-c", "maxz": 2}
    assert validate_run({**conf, "channels": 3}, 4, "d4").conf.channels == 3
    with pytest.raises(SliceProblems, match=r"asks for 4 channels, but the slices .* have 3"):
        validate_run({**conf, "channels": 4}, 4, "d4")


def _read_ts(url: str) -> np.ndarray:
    """Scale 0 as (z, y, x, channel), through tensorstore."""
    import tensorstore as ts

    spec = {"driver": "neuroglancer_precomputed", "kvstore": storage.kvstore_spec(url)}
    return np.asarray(ts.open(spec, open=True).result().read().result()).transpose(2, 1, 0, 3)


def test_emwrite_writes_a_grey_jpeg_volume_per_channel(emwrite_service: str, backend: str) -> None:
    """jpeg_channels "each": neuroglancer/jpeg holds channel 0, jpeg_c1 and jpeg_c2 the
    others, each equal to that channel of the lossless volume within JPEG error."""
    from conftest import unique_bucket

    src = unique_bucket("each")
    tmp, ng, raw = (f"{src}_{role}_run" for role in ("tmp", "ng", "chunk"))
    for bucket in (src, layout.process_bucket(src), tmp, ng, raw):
        storage.create_bucket(bucket)
    for z in range(4):
        rgb = np.dstack([np.full((90, 120), v, np.uint8) for v in (40 + z, 120, 200)])
        rgb[20:60, 30:90, 1] = 10  # a dark square in green only
        storage.write_bytes(f"gs://{src}/img.{z:05d}.png", _png(rgb[:, :, ::-1]))
        body = {
            "img": f"img.{z:05d}.png",
            "transform": [1, 0, 0, 1, 3, 2],
            "bbox": [128, 96],
            "dest": src,
            "dest-tmp": tmp,
            "slice": z,
            "run_id": "run",
            "clip-limit": 0,
            "channels": 3,
        }
        r = requests.post(emwrite_service + "/alignedslice", json=body, timeout=60)
        assert r.status_code == 200, r.text
    volume = {
        "dest": ng,
        "dest_raw": raw,
        "minz": 0,
        "maxz": 3,
        "bbox": [128, 96],
        "channels": 3,
        "jpeg_channels": "each",
    }
    for path, body in (("/ngmeta", volume), ("/ngshard", {**volume, "source": tmp, "start": [0, 0, 0]})):  # fmt: skip
        r = requests.post(emwrite_service + path, json=body, timeout=120)
        assert r.status_code == 200, r.text
    lossless = _read_ts(f"gs://{raw}/{layout.RAW_PATH}")
    assert lossless.shape == (4, 96, 128, 3)
    assert lossless[0, 40, 60, 1] == 10 and lossless[0, 40, 60, 2] == 200
    for c, path in enumerate(layout.jpeg_channel_path(c) for c in range(3)):
        jpeg = _read_ts(f"gs://{ng}/{path}")
        assert jpeg.shape == (4, 96, 128, 1), path
        assert np.abs(jpeg[..., 0].astype(int) - lossless[..., c]).mean() < 3, path
