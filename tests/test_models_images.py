"""Request models (both payload shapes, legacy strings at the edge) and image decoding."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from emprocess.errors import InvalidInput
from emprocess.imageinfo import UnreadableHeader, image_layout, image_size_xy
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
            "input-map": {"img1.png": "gs://src/a.png", "img2.png": "gs://src/b.png"},
        }
    )
    assert no_query.downsample == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"command": LEGACY_COMMAND, "input-map": {}, "extra": 1}, "unknown keys"),
        ({"command": 5, "input-map": {}}, "'command' string"),
        ({"command": '-Dpre="a"', "input-map": {"a": "gs://src/a"}}, "-Dpost"),
        ({"command": '-Dpre="a" -Dpost="b', "input-map": {}}, "cannot parse"),
        (
            {
                "command": '-Dpre="a" -Dpost="b"',
                "input-map": {"a": "gs://src/a?x=1", "b": "gs://src/b"},
            },
            "only '?downsample=N'",
        ),
        (
            {
                "command": '-Dpre="a" -Dpost="b"',
                "input-map": {"a": "gs://src/a?downsample=two", "b": "gs://src/b"},
            },
            "'gs://src/a?downsample=two': only '?downsample=N'",
        ),
        ({"pre": "gs://src/a", "post": "gs://src/b", "downsample": 65}, "downsample"),
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
            "dest": "dst",
            "dest_raw": "raw",
            "minz": 3,
            "maxz": 9,
            "bbox": "[5, 6]",
            "writeRaw": "false",
            "shard-size": "1024",
        },
    )
    assert (meta.minz, meta.bbox, meta.write_raw) == (3, [5, 6], False)


SLICE = {
    "img": "img.00012.png", "transform": [1, 0, 0, 1, 5, 6], "bbox": [100, 200], "dest": "src",
    "dest-tmp": "src_tmp_r", "slice": 12, "run_id": "r",
}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"slice": True}, "slice: Input should be a valid integer"),
        ({"slice": 1e23}, "slice: Input should be a valid integer"),
        ({"slice": 12.0}, "slice: Input should be a valid integer"),
        ({"slice": "1e3"}, "slice: Input should be a valid integer"),
        ({"bbox": [True, True]}, "bbox.0: Input should be a valid integer"),
        ({"bbox": [65537, 10]}, "bbox.0: Input should be less than or equal to 65536"),
        ({"transform": [float("inf"), 0, 0, 1, 0, 0]}, "transform.0: Input should be a finite"),
        ({"transform": [0, 0, 0, 0, 0, 0]}, "transform [0.0, 0.0, 0.0, 0.0, 0.0, 0.0] is singular"),
        ({"run_id": ".."}, "run id '..' must be"),
        ({"run_id": "a/b/c"}, "run id 'a/b/c' must be"),
        ({"run_id": "-rf"}, "run id '-rf' must be"),
        ({"img": "../x.png"}, "img: object key '../x.png'"),
        ({"dest": "/etc"}, "dest: bucket name '/etc'"),
        ({"clip-limit": True}, "clip-limit: Input should be a valid number"),
        ({"shard-size": 1024.0}, "shard-size: Input should be a valid integer"),
    ],
)
def test_aligned_slice_types_are_strict(change: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        parse(AlignedSliceRequest, {**SLICE, **change})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"writeRaw": "yes"}, "writeRaw: Input should be a valid boolean"),
        ({"writeRaw": 1}, "writeRaw: Input should be a valid boolean"),
        ({"minz": "+1"}, "minz: Input should be a valid integer"),
        ({"maxz": 10**9}, "maxz: Input should be less than or equal to 99999999"),
        ({"maxz": 2_000_000}, "2000001 slices; at most 1000000"),
        ({"resolution": 1e308}, "resolution 1e+308 nm is not in (0, 1e+06]"),
        ({"resolution": float("nan")}, "resolution nan nm is not in (0, 1e+06]"),
        ({"resolution": "8nm"}, "resolution must be one number or [x, y, z] in nm (got '8nm')"),
        ({"bbox": [1e21, 5]}, "bbox.0: Input should be a valid integer"),
    ],
)
def test_volume_types_are_strict(change: dict, message: str) -> None:
    body = {"dest": "dst", "dest_raw": "raw", "minz": 0, "maxz": 3, "bbox": [64, 64], **change}
    with pytest.raises(InvalidInput, match=re.escape(message)):
        parse(NgMetaRequest, body)


@pytest.mark.parametrize(
    "url",
    [
        "/etc/shadow", "file:///etc/passwd", "FILE:///etc/passwd", "file://localhost/etc/passwd",
        "../../etc/passwd", "~/.bashrc", "/dev/zero", "/proc/self/fd/5", "gs://src/", "GS://src/a",
        "gs://src/../x", "s3://src/a",
    ],
)  # fmt: skip
def test_alignment_takes_only_gs_urls(url: str) -> None:
    with pytest.raises(InvalidInput, match="pre: "):
        AlignRequest.from_payload({"pre": url, "post": "gs://src/b.png"})


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
        "dest": "dst",
        "dest_raw": "raw",
        "source": "tmp-bucket",
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
    with pytest.raises(InvalidInput, match="not a PNG, TIFF or JPEG"):
        decode_image(b"\x89PNG\r\n\x1a\nbroken", "b.png")
    floats = cv2.imencode(".tif", np.zeros((4, 4), np.float32))[1].tobytes()
    with pytest.raises(InvalidInput, match="float32"):
        decode_image(floats, "f.tif")


def test_decode_refuses_other_formats_and_costly_layouts_by_header() -> None:
    bmp = cv2.imencode(".bmp", np.zeros((4, 4), np.uint8))[1].tobytes()
    with pytest.raises(InvalidInput, match=r"x\.png is not a PNG, TIFF or JPEG image.*BM"):
        decode_image(bmp, "x.png")
    rgba16 = np.zeros((20, 30, 4), np.uint16)
    data = cv2.imencode(".png", rgba16)[1].tobytes()
    assert image_layout(data).decoded_bytes == 20 * 30 * 4 * 2
    with pytest.raises(InvalidInput, match="4800 bytes decoded, over the limit of 4799"):
        decode_image(data, "a.png", max_decoded_bytes=4799)
    assert decode_image(data, "a.png", max_decoded_bytes=4800).shape == (20, 30)
    tiff = cv2.imencode(".tif", np.zeros((5, 7, 3), np.uint16))[1].tobytes()
    assert image_layout(tiff) == (7, 5, 4, 2, 3)
    jpeg = cv2.imencode(".jpg", np.zeros((5, 7), np.uint8))[1].tobytes()
    assert image_layout(jpeg) == (7, 5, 1, 1, 1)
    gray = cv2.imencode(".png", np.zeros((5, 7), np.uint8))[1].tobytes()
    assert image_layout(gray) == (7, 5, 1, 1, 1)


def test_tiff_directory_past_the_end_is_refused() -> None:
    past = b"II*\x00" + (10_000).to_bytes(4, "little") + b"\x00" * 8
    with pytest.raises(UnreadableHeader, match="past the end"):
        image_size_xy(past, lambda s, e: past[s:e])
    with pytest.raises(InvalidInput, match=r"t\.tif is not a PNG, TIFF or JPEG image"):
        decode_image(past, "t.tif")
    cut = b"II*\x00" + (8).to_bytes(4, "little") + (3).to_bytes(2, "little") + b"\x00" * 5
    with pytest.raises(UnreadableHeader):
        image_size_xy(cut, lambda s, e: cut[s:e])
