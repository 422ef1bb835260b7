"""``validate``: slices in a real bucket (local root and GCS emulator), and image headers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import point_storage
from dags_conftest_helpers import write_slices
from faultproxy import FaultProxy

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.imageinfo import HEADER_BYTES, UnreadableHeader, image_size_xy
from emprocess.workflow.conf import parse_conf
from emprocess.workflow.stages import SliceProblems, check_slices, validate_run

TEMPLATE = "stack/img.%05d.png"


def conf_for(bucket: str, minz: int = 10, maxz: int = 15, **extra: Any) -> dict[str, Any]:
    return {"id": "r1", "image": TEMPLATE, "minz": minz, "maxz": maxz, "source": bucket, **extra}


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list]]:
    calls: dict[str, list] = {"list": [], "read": []}
    real_list, real_read = storage.list_objects, storage.read_bytes

    def list_objects(url: str) -> Any:
        calls["list"].append(url)
        return real_list(url)

    def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
        calls["read"].append((url, start, end))
        return real_read(url, start, end)

    monkeypatch.setattr(storage, "list_objects", list_objects)
    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    yield calls


def test_complete_stack_passes_with_one_listing_and_header_reads(
    bucket: str, counted: dict[str, list]
) -> None:
    write_slices(bucket, TEMPLATE, range(8, 18), size_xy=(40, 30))  # more than minz..maxz
    storage.write_bytes(f"gs://{bucket}/stack/notes.txt", b"not a slice")
    info = validate_run(conf_for(bucket), dag_width=4, dag_id="emprocess_width4_v0.4")
    assert info.slice_size_xy == (40, 30) and info.width == 4
    assert counted["list"] == [f"gs://{bucket}/stack/img."]
    assert sorted(url.rsplit("/", 1)[1] for url, _, _ in counted["read"]) == [
        f"img.{z:05d}.png" for z in range(10, 16)
    ]
    assert {(s, e) for _, s, e in counted["read"]} == {(0, HEADER_BYTES)}


def test_missing_middle_and_last_slice_in_one_message(bucket: str) -> None:
    write_slices(bucket, TEMPLATE, [10, 11, 13, 14])
    with pytest.raises(SliceProblems) as info:
        check_slices(parse_conf(conf_for(bucket)))
    assert str(info.value) == (
        f"source slices of '{TEMPLATE}': missing 2 of 6 slices in gs://{bucket}/: "
        "stack/img.00012.png, stack/img.00015.png"
    )


def test_different_sizes_and_missing_slices_are_reported_together(bucket: str) -> None:
    write_slices(bucket, TEMPLATE, [10, 11, 12, 13, 14], sizes={12: (41, 30), 14: (40, 31)})
    with pytest.raises(SliceProblems) as info:
        check_slices(parse_conf(conf_for(bucket)))
    msg = str(info.value)
    assert "missing 1 of 6 slices in" in msg and "stack/img.00015.png" in msg
    assert re.search(
        r"slices differ in size \(width x height\): 40x30 \(3: stack/img.00010.png, "
        r"stack/img.00011.png, stack/img.00013.png\); (41x30 \(1: stack/img.00012.png\)|"
        r"40x31 \(1: stack/img.00014.png\)); ",
        msg,
    )
    assert "41x30 (1: stack/img.00012.png)" in msg and "40x31 (1: stack/img.00014.png)" in msg


def test_missing_source_bucket_is_named(backend: str) -> None:
    with pytest.raises(InvalidInput, match="no-such-bucket-x1"):
        check_slices(parse_conf(conf_for("no-such-bucket-x1")))


def test_unreadable_slice_is_named(bucket: str) -> None:
    write_slices(bucket, TEMPLATE, [10, 11])
    storage.write_bytes(f"gs://{bucket}/{TEMPLATE % 12}", b"GIF89a....")
    with pytest.raises(
        SliceProblems, match=r"cannot read the size of 1 slices: stack/img.00012.png \(not a PNG"
    ):
        check_slices(parse_conf(conf_for(bucket, maxz=12)))


def test_gcs_listing_is_one_request(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch) -> None:
    point_storage(monkeypatch, None)
    name = f"v-{np.random.default_rng().integers(1 << 40):x}"
    storage.create_bucket(name)
    write_slices(name, TEMPLATE, range(0, 30))
    with FaultProxy(gcs_emulator) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        assert check_slices(parse_conf(conf_for(name, 0, 29))) == (40, 30)
    lists = [
        r
        for r in proxy.requests
        if r.method == "GET" and r.path.split("?")[0].endswith(f"/b/{name}/o")
    ]
    media = [r for r in proxy.requests if "alt=media" in r.path]
    assert len(lists) == 1
    assert len(media) == 30  # one header read per slice, nothing per-slice besides


def test_width_must_match_a_fixed_dag(local_root_bucket: str) -> None:
    write_slices(local_root_bucket, TEMPLATE, range(10, 16))
    with pytest.raises(
        InvalidInput, match="width: conf asks for width 8, but DAG d32 has fixed width 32"
    ):
        validate_run(conf_for(local_root_bucket, width=8), dag_width=32, dag_id="d32")
    assert validate_run(conf_for(local_root_bucket, width=32), 32, "d32").width == 32
    assert validate_run(conf_for(local_root_bucket, width=8), None, "dyn").width == 8
    assert validate_run(conf_for(local_root_bucket), None, "dyn").width == 32


@pytest.fixture
def local_root_bucket(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    point_storage(monkeypatch, str(tmp_path))
    storage.create_bucket("slices-v")
    return "slices-v"


# -- headers ---------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".png", ".tif", ".jpg"])
def test_header_sizes(ext: str) -> None:
    img = np.random.default_rng(1).integers(0, 255, (37, 53), dtype=np.uint8)
    data = cv2.imencode(ext, img)[1].tobytes()
    assert image_size_xy(data[:HEADER_BYTES]) == (53, 37)


def test_png_needs_only_24_bytes() -> None:
    data = cv2.imencode(".png", np.zeros((5, 7), np.uint8))[1].tobytes()
    assert image_size_xy(data[:24]) == (7, 5)


def test_tiff_directory_beyond_the_header_costs_one_more_read() -> None:
    img = np.random.default_rng(2).integers(0, 255, (600, 400), dtype=np.uint8)
    data = cv2.imencode(".tif", img)[1].tobytes()  # OpenCV writes the directory last
    reads: list[tuple[int, int]] = []

    def read_range(start: int, end: int) -> bytes:
        reads.append((start, end))
        return data[start:end]

    assert image_size_xy(data[:1024], read_range) == (400, 600)
    assert len(reads) == 2 and reads[0][0] > 1024
    with pytest.raises(UnreadableHeader, match="lies beyond the 1024 bytes read"):
        image_size_xy(data[:1024])


def test_unknown_format() -> None:
    with pytest.raises(
        UnreadableHeader, match=r"not a PNG, TIFF or JPEG file \(starts with b'GIF89a"
    ):
        image_size_xy(b"GIF89a\x00\x00")
