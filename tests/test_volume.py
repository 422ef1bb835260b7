"""The volume model: each volume's and scale's URL, the box geometry, the tiles' IO seams."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import tensorstore as ts
from conftest import unique_bucket

from emprocess import affine, storage
from emprocess.errors import InvalidInput
from emprocess.geometry import CUBE_PX, TILE_PX, Box, RectXY
from emprocess.kernels import ngmeta, tiles
from emprocess.kernels.render import stream_source_tiles
from emprocess.layout import RunLayout
from emprocess.models import NgMetaRequest, NgShardRequest
from emprocess.services.tilestore import TileReader
from emprocess.volume import (
    INFO,
    TiledSlices,
    info_key,
    info_url,
    request_volumes,
    same_geometry,
    source_slice_url,
)

RUN = RunLayout("src-bucket", "r1")


def _meta(**extra: Any) -> NgMetaRequest:
    body = {
        "dest": RUN.ng,
        "dest_raw": RUN.chunk,
        "minz": 3,
        "maxz": 12,
        "bbox": [2500, 1100],
        "resolution": [4, 4, 40],
        **extra,
    }
    return NgMetaRequest.model_validate(body)


def test_one_tile_size() -> None:
    """Every module that cuts on the grid takes its side from geometry.TILE_PX."""
    from emprocess.kernels import render
    from emprocess.workflow import payloads

    assert TILE_PX == CUBE_PX == 1024
    assert tiles.DEFAULT_TILE_PX == ngmeta.DEFAULT_CUBE_PX == payloads.SHARD_SIZE == TILE_PX
    assert render.stream_slice.__kwdefaults__["tile_px"] == TILE_PX
    assert NgShardRequest.model_fields["shard_size"].default == TILE_PX


def test_grey_run_volumes_and_scales() -> None:
    volumes = request_volumes(_meta())
    jpeg, raw = volumes.precomputed
    assert (jpeg.url, jpeg.encoding, jpeg.data_type) == (RUN.jpeg_url, "jpeg", "uint8")
    assert (raw.url, raw.encoding, raw.channels) == (RUN.raw_url, "raw", 1)
    assert jpeg.info_url == f"gs://{RUN.ng}/neuroglancer/jpeg/info" == info_url(RUN.jpeg_url)
    assert info_key("neuroglancer/raw") == "neuroglancer/raw/" + INFO
    assert volumes.ome_zarr is None
    # Anisotropic 4 x 4 x 40 nm: x and y halve first; each scale's folder under the volume.
    scales = raw.scales()
    assert [s.key for s in scales] == [
        "4_4_40",
        "8_8_40",
        "16_16_40",
        "32_32_40",
        "64_64_80",
        "128_128_160",
    ]
    assert [s.url for s in scales[:2]] == [
        f"gs://{RUN.chunk}/neuroglancer/raw/4_4_40",
        f"gs://{RUN.chunk}/neuroglancer/raw/8_8_40",
    ]
    assert raw.info() == ngmeta.build_info((2500, 1100), 3, 12, [4, 4, 40], "raw", 6)


def test_colour_wide_and_ome_zarr_volumes() -> None:
    each = request_volumes(_meta(channels=3, jpeg_channels="each", writeRaw=False))
    assert [(v.url, v.first_channel, v.channels) for v in each.precomputed] == [
        (f"gs://{RUN.ng}/neuroglancer/jpeg", 0, 1),
        (f"gs://{RUN.ng}/neuroglancer/jpeg_c1", 1, 1),
        (f"gs://{RUN.ng}/neuroglancer/jpeg_c2", 2, 1),
    ]
    rgb = request_volumes(_meta(channels=4))
    assert [(v.encoding, v.first_channel, v.channels) for v in rgb.precomputed] == [
        ("jpeg", 0, 3),
        ("raw", 0, 4),
    ]
    wide = request_volumes(_meta(raw_dtype="uint16", raw_format="both"))
    assert [v.data_type for v in wide.precomputed] == ["uint8", "uint16"]
    assert wide.ome_zarr is not None and wide.ome_zarr.url == RUN.raw_ome_zarr_url
    zarr_only = request_volumes(_meta(raw_format="ome-zarr"))
    assert [v.encoding for v in zarr_only.precomputed] == ["jpeg"]
    # The tiles a cube reads: every channel's, and the 16-bit ones of a wide lossless volume.
    assert [t.url(7) for t in rgb.tiles(RUN.tmp, True)] == [
        f"gs://{RUN.tmp}/aligned/c{c}/000007.tiles" for c in range(4)
    ]
    assert [(t.prefix, t.dtype) for t in wide.tiles(RUN.tmp, True)] == [
        ("aligned/", "uint8"),
        ("aligned16/", "uint16"),
    ]
    assert [t.prefix for t in wide.tiles(RUN.tmp, False)] == ["aligned/"]


def test_slice_urls() -> None:
    assert TiledSlices.channel(RUN.tmp).url(12) == f"gs://{RUN.tmp}/aligned/000012.tiles"
    assert TiledSlices.channel(RUN.tmp, 2).folder_url == f"gs://{RUN.tmp}/aligned/c2/"
    assert TiledSlices.wide(RUN.tmp).url(0) == f"gs://{RUN.tmp}/aligned16/000000.tiles"
    assert source_slice_url("src", "img.00012.png") == "gs://src/img.00012.png"
    assert source_slice_url("src") == "gs://src/"
    with pytest.raises(InvalidInput):
        TiledSlices.channel("Bad_Bucket!").url(0)


def test_box_geometry() -> None:
    box = ngmeta.cube_bounds_xyz((2, 1, 0), (2500, 1100), 1000, 1009, 0)
    assert isinstance(box, Box)
    assert box == ((2048, 1024, 1000), (2500, 1100, 1010))  # still the plain tuples
    assert box.shape_zyx == (10, 76, 452)
    assert box.rect_xy == RectXY(2048, 1024, 2500, 1100)
    assert box.rect_xy.tile_xy() == (2, 1)
    assert (box.rect_xy.width, box.rect_xy.height) == (452, 76)
    assert Box.of(RectXY(0, 0, 5, 6), 2, 4) == Box((0, 0, 2), (5, 6, 4))
    with pytest.raises(ValueError, match="not inside one 1024 px tile"):
        RectXY(1000, 0, 1100, 10).tile_xy()


def test_tiles_written_read_back(backend: str) -> None:
    """The write seam's tiles, read by the read seam, equal the slice (and an independent
    decoding of the whole object)."""
    tmp = unique_bucket("vol")
    storage.create_bucket(tmp)
    rng = np.random.default_rng(3)
    bbox = (2100, 1500)
    slices = TiledSlices.wide(tmp)
    images = [rng.integers(0, 65535, (bbox[1], bbox[0]), dtype=np.uint16) for _ in range(3)]
    for z, image in enumerate(images, start=4):
        compute = [0.0]
        slices.write(z, stream_source_tiles(image, affine.IDENTITY, bbox), compute)
        assert compute[0] > 0
        whole = tiles.decode_tiled_slice(storage.read_bytes(slices.url(z)))
        np.testing.assert_array_equal(whole, image)
    reader = slices.reader(bbox, ts.Context())
    stack = np.stack(images)
    for rect in (
        RectXY(0, 0, 1024, 1024),
        RectXY(2048, 1024, 2100, 1500),
        RectXY(1030, 7, 1500, 900),
    ):
        got = reader(4, 7, rect)
        assert got.dtype == np.uint16 and got.shape == (3, rect.height, rect.width)
        np.testing.assert_array_equal(got, stack[:, rect.y0 : rect.y1, rect.x0 : rect.x1])
    with pytest.raises(InvalidInput, match=r"aligned slice 7 is missing .*aligned16/000007"):
        reader(6, 8, RectXY(0, 0, 10, 10))
    grey = TileReader(TiledSlices(tmp, "aligned16/", "uint8"), bbox, ts.Context())
    with pytest.raises(InvalidInput, match="is uint16, expected uint8"):
        grey(4, 5, RectXY(0, 0, 10, 10))


def test_info_checks(backend: str) -> None:
    """One info check for /ngmeta (absent or dataless: fine) and /ngshard (must match)."""
    run = RunLayout(unique_bucket("vol"), "r1")
    storage.create_bucket(run.ng)
    req = _meta(dest=run.ng, writeRaw=False)
    (jpeg,) = request_volumes(req).precomputed
    with pytest.raises(InvalidInput, match="info does not exist; run /ngmeta first"):
        jpeg.check_info(written=True)
    jpeg.check_info(written=False)
    jpeg.write_info()
    assert storage.read_bytes(jpeg.info_url) == json.dumps(jpeg.info(), indent=1).encode()
    jpeg.check_info(written=True)
    (other,) = request_volumes(_meta(dest=run.ng, writeRaw=False, maxz=40)).precomputed
    with pytest.raises(InvalidInput, match=r"describes another volume \(size \[2500, 1100, 10\]"):
        other.check_info(written=True)
    other.check_info(written=False)  # no data yet: its info may be replaced
    storage.write_bytes(storage.join(jpeg.url, jpeg.scales()[0].key, "0.shard"), b"x")
    with pytest.raises(InvalidInput, match="another volume that already has data"):
        other.check_info(written=False)
    # The chunks' data encoding is the writer's choice, not the volume's.
    info = jpeg.info()
    recoded = {**info, "scales": [{**s, "sharding": {**s["sharding"], "data_encoding": "gzip"}} for s in info["scales"]]}  # fmt: skip
    assert same_geometry(recoded, info) and not same_geometry(other.info(), info)


def test_a_cube_from_written_tiles_reads_back(backend: str) -> None:
    """The model end to end: slices' tiles written, one cube built from them by
    ``write_cube``, the lossless volume read back by tensorstore equal to the slices."""
    from emprocess.services.pyramid import write_cube

    run = RunLayout(unique_bucket("vol"), "r1")
    for b in (run.tmp, run.ng, run.chunk):
        storage.create_bucket(b)
    bbox = (300, 200)
    rng = np.random.default_rng(5)
    stack = rng.integers(0, 255, (6, bbox[1], bbox[0]), dtype=np.uint8)
    for z, image in enumerate(stack, start=2):
        TiledSlices.channel(run.tmp).write(
            z, stream_source_tiles(image, affine.IDENTITY, bbox), [0.0]
        )
    req = _meta(dest=run.ng, dest_raw=run.chunk, minz=2, maxz=7, bbox=list(bbox), resolution=8)
    volumes = request_volumes(req)
    volumes.check_before_meta()
    volumes.write_meta()
    volumes.check_infos()
    boxes = volumes.geometry.cube_boxes((0, 0, 0))
    assert boxes[0] == Box((0, 0, 2), (300, 200, 8))
    timings = write_cube(volumes, run.tmp, True, boxes, ts.Context())
    assert set(timings) == {"read_s", "write_s", "downsample_s"}
    raw = volumes.precomputed[-1]
    spec = {"driver": "neuroglancer_precomputed", "kvstore": storage.kvstore_spec(raw.url)}
    got = ts.open({**spec, "scale_index": 0}).result()[:, :, 2:8, 0].read().result()
    np.testing.assert_array_equal(np.transpose(got, (2, 1, 0)), stack)
