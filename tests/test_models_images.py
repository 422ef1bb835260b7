"""Request models (both payload shapes, legacy strings at the edge) and image decoding."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from emprocess.errors import InvalidInput
from emprocess.imageinfo import UnreadableHeader, image_size_xy
from emprocess.images import decode_image
from emprocess.models import AlignedSliceRequest, AlignRequest, NgMetaRequest, NgShardRequest, parse

LEGACY_COMMAND = (
    '/Fiji.app/ImageJ-linux64 -Dpre="img1.png" -Dpost="img2.png" -- --headless "fiji_align.bsh"'
)


def test_legacy_alignment_payload_is_read_without_running_it() -> None:
    req = AlignRequest.from_payload(
        {
            "command": LEGACY_COMMAND + "; rm -rf /",
            "input-map": {
                "img1.png": "gs://src/img.00012.png?downsample=4",
                "img2.png": "gs://src/img.00013.png?downsample=4",
            },
            "input-str": {"fiji_align.bsh": "anything"},
        }
    )
    assert (req.pre, req.post, req.downsample) == (
        "gs://src/img.00012.png",
        "gs://src/img.00013.png",
        4,
    )
    no_query = AlignRequest.from_payload(
        {
            "command": LEGACY_COMMAND,
            "input-map": {"img1.png": "gs://s/a.png", "img2.png": "gs://s/b.png"},
        }
    )
    assert no_query.downsample == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"command": LEGACY_COMMAND, "input-map": {}, "extra": 1}, "unknown keys"),
        ({"command": 5, "input-map": {}}, "'command' string"),
        ({"command": '-Dpre="a"', "input-map": {"a": "gs://s/a"}}, "-Dpost"),
        ({"command": '-Dpre="a" -Dpost="b', "input-map": {}}, "cannot parse"),
        (
            {
                "command": '-Dpre="a" -Dpost="b"',
                "input-map": {"a": "gs://s/a?x=1", "b": "gs://s/b"},
            },
            "only '?downsample=N'",
        ),
        (
            {
                "command": '-Dpre="a" -Dpost="b"',
                "input-map": {"a": "gs://s/a?downsample=two", "b": "gs://s/b"},
            },
            "'two'",
        ),
        ({"pre": "gs://s/a", "post": "gs://s/b", "downsample": 65}, "downsample"),
        ("text", "JSON object"),
    ],
)
def test_bad_alignment_payloads_name_the_problem(body: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        AlignRequest.from_payload(body)


def test_emwrite_models_accept_values_and_legacy_strings_alike() -> None:
    modern = {
        "img": "img.00012.png", "transform": [1, 0, 0, 1, 5, 6], "bbox": [100, 200], "dest": "src",
        "dest-tmp": "src_tmp_r", "slice": 12, "shard-size": 1024, "run_id": "r", "clip-limit": 0.02,
    }  # fmt: skip
    legacy = {k: str(v) for k, v in modern.items()}  # what the original DAG sent
    a, b = parse(AlignedSliceRequest, modern), parse(AlignedSliceRequest, legacy)
    assert a == b
    assert a.payload() == {**modern, "transform": [1.0, 0.0, 0.0, 1.0, 5.0, 6.0]}
    meta = parse(
        NgMetaRequest,
        {
            "dest": "a",
            "dest_raw": "b",
            "minz": "3",
            "maxz": 9,
            "bbox": "[5, 6]",
            "writeRaw": "false",
        },
    )
    assert (meta.minz, meta.bbox, meta.write_raw) == (3, [5, 6], False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"minz": 10, "maxz": 3}, "minz (10) must be <= maxz (3)"),
        ({"bbox": [0, 5]}, "bbox"),
        ({"bbox": "[1, 2"}, "JSON list"),
        ({"start": [0, 0]}, "start"),
        ({"dest_raw": None}, "dest_raw"),
        ({"shard-size": 512}, "shard-size must be 1024"),
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"resolution": -8}, "resolution"),
    ],
)
def test_bad_volume_requests_name_the_key(change: dict, message: str) -> None:
    body = {
        "dest": "ng",
        "dest_raw": "raw",
        "source": "tmp",
        "start": [0, 0, 0],
        "minz": 0,
        "maxz": 3,
        "bbox": [64, 64],
    }
    body.update(change)
    if change.get("dest_raw", "") is None:
        body.pop("dest_raw")
    with pytest.raises(InvalidInput, match=re.escape(message)):
        parse(NgShardRequest, body)


def test_header_sizes_of_png_and_tiff() -> None:
    img = np.zeros((37, 53), np.uint8)
    for ext in (".png", ".tif"):
        ok, buf = cv2.imencode(ext, img)
        assert ok
        assert image_size_xy(buf.tobytes()[:4096]) == (53, 37)
    big_tiff = cv2.imencode(".tif", np.zeros((70000, 3), np.uint8))[1].tobytes()
    assert image_size_xy(big_tiff[:65536]) == (3, 70000)  # a LONG height
    with pytest.raises(UnreadableHeader, match="not a PNG, TIFF or JPEG"):
        image_size_xy(b"GIF89a....")


def test_decode_image_types_and_limits() -> None:
    gray16 = np.arange(600, dtype=np.uint16).reshape(20, 30) * 100
    out = decode_image(cv2.imencode(".png", gray16)[1].tobytes(), "a.png")
    assert out.dtype == np.uint16 and np.array_equal(out, gray16)
    colour = np.dstack([np.full((4, 5), v, np.uint8) for v in (10, 20, 30)])
    assert decode_image(cv2.imencode(".png", colour)[1].tobytes()).shape == (4, 5)
    with pytest.raises(InvalidInput, match=r"a\.png is 30x20 = 600 pixels, over the limit of 599"):
        decode_image(cv2.imencode(".png", gray16)[1].tobytes(), "a.png", max_pixels=599)
    with pytest.raises(InvalidInput, match="not a PNG or TIFF"):
        decode_image(b"\x89PNG\r\n\x1a\nbroken", "b.png")
    floats = cv2.imencode(".tif", np.zeros((4, 4), np.float32))[1].tobytes()
    with pytest.raises(InvalidInput, match="float32"):
        decode_image(floats, "f.tif")
