"""Hostile requests against both services under gunicorn (issue 10), on the local storage root.

Each case asserts a fast 4xx whose message names the field (or its value), that the
answer does not reveal the storage root or the working directory, that the gunicorn
worker survived with its peak RSS (VmHWM, reset before each request through
/proc/PID/clear_refs) bounded, and that /health answers afterwards. The bombs are
real files: a 1,080-byte RLE BMP claiming 32767^2 px and a 2 MB 16-bit RGBA PNG of
16384^2 px (2 GiB decoded), built without ever holding their pixels.

The issue's cases that are not requests to a service are tested where their code is:
the run conf's bounds and types (test_workflow_conf.py::test_strict_types_and_bounds),
links and FIFOs in the storage root and bucket adoption (test_storage.py), a damaged
complete.json (test_report.py), a NUL in a path of the view server
(test_view_browser.py) and the containers' user and timeout (test_containers.py).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests
from conftest import ServicePool, point_storage, unique_bucket

from emprocess import storage
from emprocess.layout import RunLayout, process_bucket

log = logging.getLogger(__name__)

RUN_ID = "run1"
FAST_S = 5.0  # every refusal is answered within this
MAX_GROWTH_MB = 64.0  # peak RSS of the worker during a refused request, over its RSS before


# -- crafted files -------------------------------------------------------------------


def rle_bmp(width: int = 32767, height: int = 32767) -> bytes:
    """A valid 8-bit RLE BMP of ``width`` x ``height`` px in 1,080 bytes (end-of-bitmap only)."""
    pixels = b"\x00\x01"
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    offset = 14 + len(info) + 1024
    return (
        b"BM"
        + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
        + info
        + bytes(1024)
        + pixels
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zero_png(width: int, height: int, depth: int = 16, colour: int = 6) -> bytes:
    """A valid all-zero PNG (default 16-bit RGBA), compressed without holding its pixels.

    Each row (filter byte + zeros) is deflated after a full flush, so every row
    compresses to the same bytes; the Adler-32 of n zero bytes is (1, n mod 65521).
    """
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    row_bytes = 1 + width * channels * depth // 8
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    row = deflate.compress(bytes(row_bytes)) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.flush(zlib.Z_FINISH)
    total = row_bytes * height
    adler = ((total % 65521) << 16) | 1
    stream = b"\x78\xda" + row * height + tail + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", stream)
        + _chunk(b"IEND", b"")
    )


def test_crafted_files_are_what_they_claim() -> None:
    bmp = rle_bmp(64, 32)
    assert len(rle_bmp()) == 1080 and len(bmp) == 1080
    assert cv2.imdecode(np.frombuffer(bmp, np.uint8), cv2.IMREAD_UNCHANGED).shape[:2] == (32, 64)
    small = cv2.imdecode(np.frombuffer(zero_png(40, 30), np.uint8), cv2.IMREAD_UNCHANGED)
    assert small.shape == (30, 40, 4) and small.dtype == np.uint16 and not small.any()


# -- the services and their worker ----------------------------------------------------


@dataclass
class Service:
    url: str
    master_pid: int

    def worker_pid(self) -> int:
        """The one gunicorn worker: the master's child."""
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if int(stat.rpartition(")")[2].split()[1]) == self.master_pid:
                    children.append(int(entry))
        assert len(children) == 1, children
        return children[0]


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.fixture(autouse=True)
def _local_root(local_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    point_storage(monkeypatch, str(local_root))


@pytest.fixture(scope="module")
def align(service_pool: ServicePool) -> Service:
    url = service_pool.url("align", "local")
    return Service(url, service_pool.procs[("align", "local")][1].pid)


@pytest.fixture(scope="module")
def emwrite(service_pool: ServicePool) -> Service:
    url = service_pool.url("emwrite", "local")
    return Service(url, service_pool.procs[("emwrite", "local")][1].pid)


@pytest.fixture(scope="module")
def env(local_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One run's buckets with a 512 px slice, the bombs, links out and a FIFO in the source."""
    with pytest.MonkeyPatch.context() as mp:
        point_storage(mp, str(local_root))
        src = unique_bucket("hostile")
        run = RunLayout(src, RUN_ID)
        e: dict[str, Any] = {"src": src, "tmp": run.tmp, "ng": run.ng, "chunk": run.chunk}
        for b in (src, run.process, e["tmp"], e["ng"], e["chunk"]):
            storage.create_bucket(b)
        slice512 = np.random.default_rng(0).integers(0, 255, (512, 512), np.uint8)
        for z in (0, 1):
            storage.write_bytes(f"gs://{src}/img.{z:05d}.png", cv2.imencode(".png", slice512)[1])
        storage.write_bytes(f"gs://{src}/bmp.png", rle_bmp())
        storage.write_bytes(f"gs://{src}/rgba16.png", zero_png(16384, 16384))
        storage.write_bytes(f"gs://{src}/rgba16-small.png", zero_png(2000, 1000))
        past = b"II*\x00" + (10_000).to_bytes(4, "little") + bytes(8)
        storage.write_bytes(f"gs://{src}/past.tif", past)
        outside = tmp_path_factory.mktemp("outside")
        (outside / "secret.png").write_bytes(cv2.imencode(".png", slice512)[1].tobytes())
        folder = local_root / src
        (folder / "link.png").symlink_to(outside / "secret.png")
        (folder / "zero.png").symlink_to("/dev/zero")
        os.mkfifo(folder / "fifo.png")
        # A tmp bucket whose tiles folder leads out of the storage root.
        e["tmp_link"] = f"{src}_tmp_link"
        storage.create_bucket(e["tmp_link"])
        (local_root / e["tmp_link"] / "aligned").symlink_to(outside)
        e["outside"] = outside
        e["slice"] = {
            "img": "img.00000.png", "transform": [1, 0, 0, 1, 0, 0], "bbox": [512, 512],
            "dest": src, "dest-tmp": e["tmp"], "slice": 0, "run_id": RUN_ID,
        }  # fmt: skip
        e["volume"] = {
            "dest": e["ng"],
            "dest_raw": e["chunk"],
            "minz": 0,
            "maxz": 3,
            "bbox": [512, 512],
        }
        yield e


def attack(
    service: Service,
    path: str,
    body: Any = None,
    *,
    data: bytes | None = None,
    status: int = 400,
    names: tuple[str, ...] = (),
    what: str = "",
) -> float:
    """Send one hostile request; assert the refusal and the worker's health. Returns peak MB."""
    pid = service.worker_pid()
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
    before = _status_kb(pid, "VmRSS")
    t0 = time.monotonic()
    if data is None:
        r = requests.post(service.url + path, json=body, timeout=60)
    else:
        headers = {"Content-Type": "application/json"}
        r = requests.post(service.url + path, data=data, headers=headers, timeout=60)
    elapsed = time.monotonic() - t0
    peak = _status_kb(pid, "VmHWM")
    growth_mb = (peak - before) / 1024
    log.info(
        "%s %s: %d in %.2f s, worker peak RSS %.0f MB (+%.1f MB)",
        *(path, what, r.status_code, elapsed, peak / 1024, growth_mb),
    )
    assert r.status_code == status, r.text[:500]
    message = r.json()["error"]
    for name in names:
        assert name in message, (name, message)
    root = os.environ["EMPROCESS_STORAGE_ROOT"]
    assert root not in r.text and os.getcwd() not in r.text, r.text
    assert "Traceback" not in r.text
    assert elapsed < FAST_S, elapsed
    assert growth_mb < MAX_GROWTH_MB, growth_mb
    assert service.worker_pid() == pid, "the worker died"
    assert requests.get(service.url + "/health", timeout=10).status_code == 200
    return growth_mb


# -- 1, 2: the alignment service reads only gs:// objects of the run's storage ----------


@pytest.mark.parametrize(
    "url",
    [
        "/etc/shadow", "/etc/no-such-file", "file:///etc/passwd", "FILE:///etc/passwd",
        "file://localhost/etc/passwd", "../../etc/passwd", "~/.bashrc", "/dev/zero",
        "/proc/self/fd/5", "img.00000.png", "gs://", "gs://../etc/passwd", "s3://b/x.png",
    ],
)  # fmt: skip
def test_align_takes_only_gs_urls(align: Service, env: dict, url: str) -> None:
    good = f"gs://{env['src']}/img.00001.png"
    attack(align, "/", {"pre": url, "post": good}, names=("pre: ",), what=url)
    legacy = {"command": '-Dpre="a" -Dpost="b"', "input-map": {"a": good, "b": url}}
    attack(align, "/", legacy, names=("post: ",), what="legacy " + url)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("link.png", "link leading out of it"),
        ("zero.png", "link leading out of it"),
        ("fifo.png", "not a regular file"),
    ],
)
def test_links_and_special_files_in_the_root_are_refused(
    align: Service, env: dict, key: str, message: str
) -> None:
    pre, post = f"gs://{env['src']}/{key}", f"gs://{env['src']}/img.00001.png"
    attack(align, "/", {"pre": pre, "post": post}, names=(key, message), what=key)


# -- 3: decompression bombs and formats we do not read ------------------------------


def test_align_bombs(align: Service, env: dict) -> None:
    post = f"gs://{env['src']}/img.00001.png"
    for key, message in [
        ("bmp.png", "is not a PNG, TIFF or JPEG image"),
        ("rgba16.png", "16384x16384 = 268435456 pixels, over the limit"),
        ("rgba16-small.png", "16000000 bytes decoded, over the limit of 8000000"),
        ("past.tif", "lies past the end of the file"),
    ]:
        pre = f"gs://{env['src']}/{key}"
        attack(align, "/", {"pre": pre, "post": post}, names=(pre, message), what=key)


def test_emwrite_bombs(emwrite: Service, env: dict) -> None:
    for key, message in [
        ("bmp.png", "is not a PNG, TIFF or JPEG image"),
        ("rgba16.png", "2147483648 bytes decoded, over the limit of 1073741824"),
        ("past.tif", "lies past the end of the file"),
    ]:
        body = {**env["slice"], "img": key}
        attack(emwrite, "/alignedslice", body, names=(key, message), what=key)
    assert not storage.list_keys(f"gs://{env['tmp']}/")


# -- 4: bounded work ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"max_octave_size": 100000}, "params.max_octave_size"),
        ({"max_features": 0}, "params.max_features"),
        ({"ransac_iterations": 10**6}, "params.ransac_iterations"),
        ({"dense_max_size": 100000}, "params.dense_max_size"),
        ({"max_steps": 100}, "params.max_steps"),
        ({"max_features": True}, "params.max_features"),
        ({"max_features": "10"}, "params.max_features"),
    ],
)
def test_alignment_params_are_bounded(align: Service, env: dict, params: dict, name: str) -> None:
    pre, post = (f"gs://{env['src']}/img.{z:05d}.png" for z in (0, 1))
    body = {"pre": pre, "post": post, "params": params}
    attack(align, "/", body, names=(name.removeprefix("params."),), what=name)


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"bbox": [1073741824, 1]}, ("bbox.0", "65536")),
        ({"bbox": [32768, 32768]}, ("bbox [32768, 32768] is more than 4x", "512x512")),
        ({"transform": [1e30, 0, 0, 1, 0, 0]}, ("transform.0",)),
    ],
)
def test_canvas_is_bounded(emwrite: Service, env: dict, change: dict, names: tuple) -> None:
    attack(emwrite, "/alignedslice", {**env["slice"], **change}, names=names, what=str(change))
    assert not storage.list_keys(f"gs://{env['tmp']}/")


# -- 5: /ngmeta never replaces a volume with data; what it writes always opens -----------


def test_ngmeta_keeps_an_existing_volume(emwrite: Service, env: dict) -> None:
    volume = {**env["volume"], "dest": RunLayout(env["src"], "ngvol").ng, "writeRaw": False}
    storage.create_bucket(volume["dest"])
    info_url = f"gs://{volume['dest']}/neuroglancer/jpeg/info"
    assert requests.post(emwrite.url + "/ngmeta", json=volume, timeout=60).status_code == 200
    other = {**volume, "bbox": [640, 512]}
    # Only the info exists (no data yet): replacing it loses nothing.
    assert requests.post(emwrite.url + "/ngmeta", json=other, timeout=60).status_code == 200
    assert requests.post(emwrite.url + "/ngmeta", json=volume, timeout=60).status_code == 200
    info = storage.read_bytes(info_url)
    storage.write_bytes(f"gs://{volume['dest']}/neuroglancer/jpeg/8_8_8/0.shard", b"data")
    names = ("describes another volume that already has data", "[512, 512, 4]", "[640, 512, 4]")
    attack(emwrite, "/ngmeta", other, names=names, what="other bbox")
    assert storage.read_bytes(info_url) == info
    assert requests.post(emwrite.url + "/ngmeta", json=volume, timeout=60).status_code == 200


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"bbox": [1e21, 512]}, "bbox.0"),
        ({"bbox": [10**21, 512]}, "bbox.0"),
        ({"resolution": 1e308}, "resolution"),
        ({"maxz": 10**12}, "maxz"),
        ({"maxz": 5_000_000}, "at most 1000000"),
        ({"shard-size": 4096}, "shard-size"),
    ],
)
def test_ngmeta_geometry_is_bounded(emwrite: Service, env: dict, change: dict, name: str) -> None:
    attack(emwrite, "/ngmeta", {**env["volume"], **change}, names=(name,), what=str(change))


# -- 6, 7: strict types; nothing written before everything is validated ---------------


@pytest.mark.parametrize(
    ("path", "change", "name"),
    [
        ("/", {"downsample": True}, "downsample"),
        ("/alignedslice", {"slice": True, "bbox": [True, True]}, "slice"),
        ("/alignedslice", {"bbox": [True, True]}, "bbox.0"),
        ("/alignedslice", {"run_id": ".."}, "run_id"),
        ("/alignedslice", {"run_id": "a/b/c"}, "run_id"),
        ("/alignedslice", {"slice": 1e23}, "slice"),
        ("/alignedslice", {"img": "../img.00000.png"}, "img"),
        ("/alignedslice", {"dest": "/etc"}, "dest"),
        ("/alignedslice", {"dest-tmp": "gs://x/y"}, "dest-tmp"),
        ("/ngmeta", {"writeRaw": "yes"}, "writeRaw"),
        ("/ngmeta", {"minz": "+1"}, "minz"),
        ("/ngmeta", {"minz": 1.0}, "minz"),
    ],
)
def test_lax_types_are_refused_before_any_write(
    align: Service, emwrite: Service, env: dict, path: str, change: dict, name: str
) -> None:
    if path == "/":
        pre, post = (f"gs://{env['src']}/img.{z:05d}.png" for z in (0, 1))
        attack(align, path, {"pre": pre, "post": post, **change}, names=(name,), what=name)
        return
    base = env["slice"] if path == "/alignedslice" else env["volume"]
    attack(emwrite, path, {**base, **change}, names=(name,), what=f"{name}={change}")
    for bucket in (env["tmp"], env["ng"], env["chunk"], process_bucket(env["src"])):
        assert not storage.list_keys(f"gs://{bucket}/"), bucket


def test_non_finite_numbers_are_not_json(emwrite: Service, env: dict) -> None:
    text = json.dumps({**env["slice"], "transform": [1, 0, 0, 1, 0, 0]})
    data = text.replace("[1, 0, 0, 1, 0, 0]", "[Infinity, 0, 0, 1, NaN, 0]").encode()
    attack(emwrite, "/alignedslice", data=data, names=("Infinity is not a JSON number",))


def test_writes_through_a_link_out_of_the_root_are_refused(emwrite: Service, env: dict) -> None:
    body = {**env["slice"], "dest-tmp": env["tmp_link"], "run_id": "link"}
    attack(emwrite, "/alignedslice", body, names=("aligned/000000.tiles", "link leading out"))
    assert sorted(p.name for p in env["outside"].iterdir()) == ["secret.png"]


# -- 9: bodies ------------------------------------------------------------------------


def test_deep_nesting_and_big_bodies(align: Service, emwrite: Service) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for service, path in ((align, "/"), (emwrite, "/ngmeta")):
        attack(service, path, data=deep, names=("nests deeper than 16",), what="deep")
        shallow = json.dumps({"params": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}).encode()
        attack(service, path, data=shallow, names=("nests deeper than 16",), what="17 deep")
    pid = emwrite.worker_pid()
    with socket.create_connection(("127.0.0.1", int(emwrite.url.rpartition(":")[2])), 30) as s:
        s.sendall(
            b"POST /ngmeta HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {75 * 10**6}\r\n\r\n".encode()
            + b"[" * 65536
        )
        reply = b""
        while chunk := s.recv(4096):  # the server answers at once and closes
            reply += chunk
    assert reply.split(b"\r\n")[0].endswith(b"413 REQUEST ENTITY TOO LARGE"), reply[:200]
    assert b"Request Entity Too Large" in reply
    assert emwrite.worker_pid() == pid
    assert requests.get(emwrite.url + "/health", timeout=10).status_code == 200


def test_ngshard_reads_no_tile_through_a_link(
    emwrite: Service, env: dict, local_root: Path
) -> None:
    run = RunLayout(unique_bucket("ngshard"), "tiles")
    dest, tmp = run.ng, run.tmp
    for bucket in (dest, tmp):
        storage.create_bucket(bucket)
    volume = {"dest": dest, "writeRaw": False, "minz": 0, "maxz": 0, "bbox": [64, 64]}
    assert requests.post(emwrite.url + "/ngmeta", json=volume, timeout=60).status_code == 200
    (local_root / tmp / "aligned").mkdir()
    (local_root / tmp / "aligned" / "000000.tiles").symlink_to(env["outside"] / "secret.png")
    body = {**volume, "source": tmp, "start": [0, 0, 0]}
    attack(emwrite, "/ngshard", body, names=("aligned/000000.tiles", "link leading out"))
