"""Hostile requests, second round (issue 20): the request-handling side.

Against both services under gunicorn (one worker each) on the local storage root, as in
test_hostile.py: each case asserts the status, the field or value named in the message,
the worker's peak RSS (VmHWM) and /health afterwards (``hostile.attack``). Covered here:
buckets tied to one run and marked as ours (20.1), the canvas bounded by the slice's area
(20.3), links and FIFOs on tensorstore's paths (20.5), JSON content type, Host and slow
clients, and the viewer's data server (CORS, Host, hard links, threads) (20.7), all-zero
cubes rewritten (20.8), the smaller items of 20.9 and the original DAG's string payloads
(20.10). The image decoders' cases are elsewhere.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests
import test_hostile as hostile
from conftest import ServicePool, point_storage, unique_bucket

from emprocess import storage
from emprocess.kernels import tiles
from emprocess.layout import RunLayout
from emprocess.services.worker import RECEIVE_DEADLINE_S
from emprocess.view import (
    DATA_SERVER_READ_TIMEOUT_S,
    DATA_SERVER_THREADS,
    NEUROGLANCER_APP,
    DataServer,
)

Service = hostile.Service
attack = hostile.attack


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


def make_run(source: str, run_id: str, slices: int = 2, px: int = 256) -> RunLayout:
    """A run's buckets (created as a run creates them) and ``slices`` random PNG slices."""
    run = RunLayout(source, run_id)
    if not storage.bucket_exists(source):
        storage.create_bucket(source)
        storage.delete(storage.bucket_url(source, storage.MARKER_KEY))  # a user's bucket
    for bucket in (run.process, run.tmp, run.ng, run.chunk):
        storage.create_bucket(bucket)
    rng = np.random.default_rng(len(run_id))
    for z in range(slices):
        image = rng.integers(1, 255, (px, px), np.uint8)
        storage.write_bytes(
            f"gs://{source}/img.{z:05d}.png", cv2.imencode(".png", image)[1].tobytes()
        )
    return run


def slice_body(run: RunLayout, z: int = 0, px: int = 256) -> dict[str, Any]:
    return {
        "img": f"img.{z:05d}.png", "transform": [1, 0, 0, 1, 0, 0], "bbox": [px, px],
        "dest": run.source, "dest-tmp": run.tmp, "slice": z, "run_id": run.run_id,
    }  # fmt: skip


def volume_body(run: RunLayout, maxz: int = 1, px: int = 256) -> dict[str, Any]:
    return {"dest": run.ng, "dest_raw": run.chunk, "minz": 0, "maxz": maxz, "bbox": [px, px]}


@pytest.fixture(scope="module")
def runs(local_root: Path) -> Iterator[dict[str, RunLayout]]:
    """A victim's run (slices written, its volume published) and an attacker's run."""
    with pytest.MonkeyPatch.context() as mp:
        point_storage(mp, str(local_root))
        yield {
            "victim": make_run(unique_bucket("victim"), "run1"),
            "attacker": make_run(unique_bucket("attacker"), "evil"),
        }


def post(service: Service, path: str, body: Any) -> requests.Response:
    return requests.post(service.url + path, json=body, timeout=120)


def objects(bucket: str) -> dict[str, bytes]:
    return {
        k: storage.read_bytes(f"gs://{bucket}/{k}") for k in storage.list_keys(f"gs://{bucket}/")
    }


# -- 20.1: every bucket written is the run's own, by role, and marked --------------------


def test_a_run_writes_its_own_buckets(emwrite: Service, runs: dict[str, RunLayout]) -> None:
    """The legitimate requests of both runs: 200 (so the refusals below are not broken)."""
    for run in runs.values():
        for z in (0, 1):
            assert post(emwrite, "/alignedslice", slice_body(run, z)).status_code == 200
        assert post(emwrite, "/ngmeta", volume_body(run)).status_code == 200
        shard = {**volume_body(run), "source": run.tmp, "start": [0, 0, 0]}
        r = post(emwrite, "/ngshard", shard)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("path", "change", "names"),
    [
        # dest-tmp = another run's ng bucket: its slice would be copied out into it.
        ("/alignedslice", lambda v, a: {"dest-tmp": v.ng}, ("dest-tmp", "is not the tmp bucket")),
        # The victim's thumbnails: dest = its source, run_id = its id, tiles elsewhere.
        (
            "/alignedslice",
            lambda v, a: {"dest": v.source, "run_id": v.run_id, "dest-tmp": a.tmp},
            ("dest-tmp", "is not the tmp bucket of run 'run1'"),
        ),
        # The victim's published volume, from the attacker's tiles.
        (
            "/ngshard",
            lambda v, a: {"dest": v.ng, "dest_raw": v.chunk, "source": a.tmp},
            ("not the buckets of one run",),
        ),
        ("/ngshard", lambda v, a: {"dest": v.ng, "source": a.tmp}, ("not the buckets of one run",)),
        ("/ngmeta", lambda v, a: {"dest": v.ng}, ("not the buckets of one run",)),
        ("/ngmeta", lambda v, a: {"dest": v.source}, ("dest", "is not the ng bucket of a run")),
        ("/ngmeta", lambda v, a: {"dest_raw": v.tmp}, ("dest_raw", "is not the chunk bucket")),
        ("/ngmeta", lambda v, a: {"dest": v.process}, ("dest", "is not the ng bucket")),
        ("/ngshard", lambda v, a: {"source": v.source}, ("source", "is not the tmp bucket")),
        (
            "/ngshard",
            lambda v, a: {"dest": v.tmp, "dest_raw": v.chunk, "source": v.tmp},
            ("dest", "is not the ng bucket"),
        ),
    ],
    ids=[
        "slice-into-ng", "thumbnails-of-another-run", "ngshard-other-volume",
        "ngshard-jpeg-only", "ngmeta-other-ng", "ngmeta-into-source", "ngmeta-raw-into-tmp",
        "ngmeta-into-process", "ngshard-reads-source", "ngshard-into-tmp",
    ],
)  # fmt: skip
def test_buckets_of_another_run_are_refused(
    emwrite: Service, runs: dict[str, RunLayout], path: str, change: Any, names: tuple
) -> None:
    victim, attacker = runs["victim"], runs["attacker"]
    test_a_run_writes_its_own_buckets(emwrite, {"v": victim})
    if path == "/alignedslice":
        base = slice_body(attacker)
    elif path == "/ngmeta":
        base = volume_body(attacker)
    else:
        base = {**volume_body(attacker), "source": attacker.tmp, "start": [0, 0, 0]}
    before = {b: objects(b) for b in victim.bucket_names().values()}
    attack(emwrite, path, {**base, **change(victim, attacker)}, names=names, what=path)
    assert {b: objects(b) for b in victim.bucket_names().values()} == before


def test_unmarked_buckets_are_refused(emwrite: Service, local_root: Path) -> None:
    """Buckets with the run's names but made by hand (no marker) get nothing written."""
    src = unique_bucket("hand")
    run = RunLayout(src, "r")
    for bucket in (src, run.process, run.tmp, run.ng, run.chunk):
        (local_root / bucket).mkdir()
    body = volume_body(run)
    attack(emwrite, "/ngmeta", body, names=("dest bucket", "no .emprocess-bucket"))
    storage.adopt_bucket(run.ng)
    attack(emwrite, "/ngmeta", body, names=("dest_raw bucket", "no .emprocess-bucket"))
    storage.adopt_bucket(run.chunk)
    assert post(emwrite, "/ngmeta", body).status_code == 200
    shard = {**body, "source": run.tmp, "start": [0, 0, 0]}
    attack(emwrite, "/ngshard", shard, names=("source bucket", "no .emprocess-bucket"))
    image = np.full((64, 64), 7, np.uint8)
    storage.write_bytes(f"gs://{src}/img.00000.png", cv2.imencode(".png", image)[1].tobytes())
    names = ("dest-tmp bucket", "no .emprocess-bucket")
    attack(emwrite, "/alignedslice", slice_body(run, 0, 64), names=names)
    storage.adopt_bucket(run.tmp)
    names = ("process bucket", "no .emprocess-bucket")
    attack(emwrite, "/alignedslice", slice_body(run, 0, 64), names=names)
    assert not storage.list_keys(f"gs://{run.tmp}/")
    assert not storage.list_keys(f"gs://{run.process}/")


# -- 20.3: the canvas in proportion to the slice's area ----------------------------------


def test_a_thin_slice_gets_a_small_canvas(emwrite: Service, runs: dict[str, RunLayout]) -> None:
    """A 7,936 x 1 PNG (90 bytes) may not ask for a 32,768^2 canvas: at most 1380^2 px."""
    run = runs["attacker"]
    thin = np.full((1, 7936), 200, np.uint8)
    storage.write_bytes(f"gs://{run.source}/thin.png", cv2.imencode(".png", thin)[1].tobytes())
    body = {**slice_body(run), "img": "thin.png", "slice": 5}
    names = ("bbox [32768, 32768] has 1073741824 pixels", "1380^2", "7936x1 slice thin.png")
    attack(emwrite, "/alignedslice", {**body, "bbox": [32768, 32768]}, names=names)
    attack(emwrite, "/alignedslice", {**body, "bbox": [1381, 1380]}, names=("1380^2",))
    assert post(emwrite, "/alignedslice", {**body, "bbox": [1380, 1380]}).status_code == 200
    assert storage.exists(f"gs://{run.tmp}/aligned/000005.tiles")


# -- 20.5: links and FIFOs on tensorstore's paths ----------------------------------------


def _volume_run(emwrite: Service, name: str, raw_dtype: str | None = None) -> dict[str, Any]:
    """A new run with its volume's info written; the /ngshard body of its one cube."""
    run = make_run(unique_bucket(name), "r", slices=0)
    body = volume_body(run, maxz=0, px=64)
    if raw_dtype:
        body["raw_dtype"] = raw_dtype
    assert post(emwrite, "/ngmeta", body).status_code == 200
    return {**body, "source": run.tmp, "start": [0, 0, 0]}


def test_a_scale_folder_linked_out_of_the_root_is_refused(
    emwrite: Service, local_root: Path, tmp_path: Path
) -> None:
    shard = _volume_run(emwrite, "scalelink")
    (local_root / shard["dest"] / "neuroglancer/jpeg/8_8_8").symlink_to(tmp_path)
    names = ("neuroglancer/jpeg/8_8_8", "link leading out")
    attack(emwrite, "/ngshard", shard, names=names)
    assert not list(tmp_path.iterdir())


def test_16bit_tiles_through_a_link_are_refused(
    emwrite: Service, local_root: Path, tmp_path: Path
) -> None:
    shard = _volume_run(emwrite, "link16", raw_dtype="uint16")
    secret = tmp_path / "secret.tiles"
    secret.write_bytes(tiles.encode_tiled_slice(np.full((64, 64), 9, np.uint16), codec="raw"))
    for prefix in ("aligned", "aligned16"):
        (local_root / shard["source"] / prefix).mkdir()
        plain = tiles.encode_tiled_slice(np.full((64, 64), 9, np.uint8), codec="raw")
        (local_root / shard["source"] / "aligned" / "000000.tiles").write_bytes(plain)
    (local_root / shard["source"] / "aligned16" / "000000.tiles").symlink_to(secret)
    attack(emwrite, "/ngshard", shard, names=("aligned16/000000.tiles", "link leading out"))
    (local_root / shard["source"] / "aligned16" / "000000.tiles").unlink()
    (local_root / shard["source"] / "aligned16").rmdir()
    (local_root / shard["source"] / "aligned16").symlink_to(tmp_path)
    attack(emwrite, "/ngshard", shard, names=("aligned16", "link leading out"))


def test_a_fifo_at_a_tile_path_does_not_block_ngshard(emwrite: Service, local_root: Path) -> None:
    shard = _volume_run(emwrite, "fifo")
    (local_root / shard["source"] / "aligned").mkdir()
    os.mkfifo(local_root / shard["source"] / "aligned" / "000000.tiles")
    names = ("aligned/000000.tiles", "not a regular file")
    attack(emwrite, "/ngshard", shard, names=names)


# -- 20.8: an all-zero cube is written too -------------------------------------------------


def _read_volume(url: str, scale: int) -> np.ndarray:
    import tensorstore as ts

    store = ts.open(
        {"driver": "neuroglancer_precomputed", "kvstore": storage.kvstore_spec(url),
         "scale_index": scale},
        open=True,
    ).result()  # fmt: skip
    return np.asarray(store.read().result())


@pytest.mark.parametrize("backend_name", ["local", "gcs"])
def test_an_all_zero_cube_replaces_what_was_there(
    service_pool: ServicePool, monkeypatch: pytest.MonkeyPatch, backend_name: str
) -> None:
    """Data first, then zeros for the same cube: zeros read back, as from a fresh volume
    (on the local root and on the GCS emulator: the shard files are deleted)."""
    if backend_name == "gcs":
        point_storage(monkeypatch, None)
    url = service_pool.url("emwrite", backend_name)
    emwrite = Service(url, service_pool.procs[("emwrite", backend_name)][1].pid)
    run = make_run(unique_bucket("zero"), "r", slices=2, px=128)
    for z in (0, 1):
        assert post(emwrite, "/alignedslice", slice_body(run, z, 128)).status_code == 200
    body = volume_body(run, maxz=1, px=128)
    shard = {**body, "source": run.tmp, "start": [0, 0, 0]}
    assert post(emwrite, "/ngmeta", body).status_code == 200
    assert post(emwrite, "/ngshard", shard).status_code == 200
    assert _read_volume(run.raw_url, 0).any() and _read_volume(run.jpeg_url, 0).any()
    black = np.zeros((128, 128), np.uint8)
    for z in (0, 1):
        storage.write_bytes(
            f"gs://{run.source}/img.{z:05d}.png", cv2.imencode(".png", black)[1].tobytes()
        )
        assert post(emwrite, "/alignedslice", slice_body(run, z, 128)).status_code == 200
    assert post(emwrite, "/ngshard", shard).status_code == 200
    for url in (run.raw_url, run.jpeg_url):
        for scale in range(6):
            assert not _read_volume(url, scale).any(), (url, scale)


# -- 20.7: what a web page can send; slow clients ----------------------------------------


def send(
    service: Service,
    path: str,
    data: bytes,
    headers: dict[str, str],
    status: int,
    names: tuple[str, ...] = (),
) -> None:
    """``hostile.attack`` with the headers as given: status, message, peak RSS, /health."""
    pid = service.worker_pid()
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = hostile._status_kb(pid, "VmRSS")
    r = requests.post(service.url + path, data=data, headers=headers, timeout=30)
    growth_mb = (hostile._status_kb(pid, "VmHWM") - before) / 1024
    assert r.status_code == status, r.text[:300]
    for name in names:
        assert name in r.json()["error"], (name, r.text[:300])
    assert growth_mb < hostile.MAX_GROWTH_MB
    assert service.worker_pid() == pid
    assert requests.get(service.url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize(
    "content_type",
    [
        None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x", "application/jsonp", "application/json-patch+json",
    ],
)  # fmt: skip
def test_a_json_body_must_say_so(
    align: Service, emwrite: Service, runs: dict[str, RunLayout], content_type: str | None
) -> None:
    """What a page can post without a preflight (text/plain, form, multipart): 415."""
    run = runs["attacker"]
    headers = {} if content_type is None else {"Content-Type": content_type}
    data = json.dumps(volume_body(run)).encode()
    send(emwrite, "/ngmeta", data, headers, 415, ("Content-Type must be application/json",))
    pre, post_ = (f"gs://{run.source}/img.{z:05d}.png" for z in (0, 1))
    data = json.dumps({"pre": pre, "post": post_}).encode()
    send(align, "/", data, headers, 415, ("Content-Type must be application/json",))


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.example", 400), ("evil.example:80", 400), ("127.0.0.2", 400), ("", 400),
        ("127.0.0.1", 200), ("localhost:{port}", 200), ("LOCALHOST", 200), ("[::1]:{port}", 200),
    ],
)  # fmt: skip
def test_the_host_is_a_local_name(align: Service, emwrite: Service, host: str, status: int) -> None:
    """A page that rebinds its own name to 127.0.0.1 sends its own Host: refused (400)."""
    for service in (align, emwrite):
        port = service.url.rpartition(":")[2]
        with socket.create_connection(("127.0.0.1", int(port)), 10) as s:
            s.sendall(f"GET /health HTTP/1.1\r\nHost: {host.format(port=port)}\r\n\r\n".encode())
            reply = b""
            while chunk := s.recv(65536):  # the answer, then the server closes
                reply += chunk
        assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
        if status == 400:
            assert b"is not one this service answers" in reply


def test_a_slow_client_does_not_hold_the_worker(emwrite: Service) -> None:
    """Slowloris: headers a line at a time, and a body that never comes. /health and a real
    request are answered meanwhile, at once; the slow ones are dropped at the deadline."""
    port = int(emwrite.url.rpartition(":")[2])
    slow = [socket.create_connection(("127.0.0.1", port), 10) for _ in range(3)]
    try:
        t0 = time.monotonic()
        slow[0].sendall(b"POST /ngmeta HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow[1].sendall(b"POST /ngmeta HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n{")
        for _ in range(3):
            slow[0].sendall(b"X-Slow: 1\r\n")
            started = time.monotonic()
            assert requests.get(emwrite.url + "/health", timeout=30).status_code == 200
            assert time.monotonic() - started < 2.0
            r = requests.post(emwrite.url + "/ngmeta", json={"dest": "x"}, timeout=30)
            assert r.status_code == 400 and time.monotonic() - started < 3.0
            time.sleep(0.5)
        for s in slow:
            s.settimeout(RECEIVE_DEADLINE_S + 10)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(1) == b""  # closed by the server, nothing answered
        assert RECEIVE_DEADLINE_S - 1 < time.monotonic() - t0 < RECEIVE_DEADLINE_S + 5
    finally:
        for s in slow:
            s.close()
    assert requests.get(emwrite.url + "/health", timeout=5).status_code == 200


def test_expect_100_continue_is_answered_at_once(emwrite: Service) -> None:
    """curl sends a larger body only after "100 Continue": the worker does not wait for it."""
    port = int(emwrite.url.rpartition(":")[2])
    body = json.dumps({"dest": "x" * 2000}).encode()
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.sendall(
            b"POST /ngmeta HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        s.settimeout(2)
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        s.settimeout(10)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400 ") and b"dest" in reply, reply[:300]


# -- 20.9: smaller items ---------------------------------------------------------------------


def test_a_300_byte_path_component_is_a_bad_request(
    align: Service, emwrite: Service, runs: dict[str, RunLayout]
) -> None:
    run = runs["attacker"]
    long_name = "a" * 300 + ".png"
    attack(emwrite, "/alignedslice", {**slice_body(run), "img": long_name}, names=("img", "255"))
    pre, post_ = f"gs://{run.source}/{long_name}", f"gs://{run.source}/img.00001.png"
    attack(align, "/", {"pre": pre, "post": post_}, names=("pre", "255"))


@pytest.mark.parametrize(
    "query", ["1_6", "\u0661\u0666", "+2", " 2", "2 ", "2&downsample=3", "%32", "", "0x2", "2.0"]
)
def test_legacy_downsample_is_parsed_strictly(
    align: Service, runs: dict[str, RunLayout], query: str
) -> None:
    run = runs["attacker"]
    pre, post_ = (f"gs://{run.source}/img.{z:05d}.png" for z in (0, 1))
    body = {
        "command": '-Dpre="a.png" -Dpost="b.png" -- --headless "fiji_align.bsh"',
        "input-map": {"a.png": f"{pre}?downsample={query}", "b.png": f"{post_}?downsample=2"},
        "input-str": {"fiji_align.bsh": "script"},
    }
    attack(align, "/", body, names=("downsample",), what=repr(query))


def test_an_error_does_not_echo_every_key(align: Service, emwrite: Service) -> None:
    """25,000 input-map keys (or unknown keys; 0.8 MB): a short message naming a few."""
    keys = {f"k{i:05d}": "gs://b/x.png" for i in range(25_000)}
    body = {"command": '-Dpre="nope" -Dpost="k00001"', "input-map": keys}
    pid = align.worker_pid()
    r = requests.post(align.url + "/", json=body, timeout=30)
    assert r.status_code == 400 and len(r.content) < 2000, len(r.content)
    assert "'nope' is not a key of 'input-map'" in r.json()["error"]
    assert "and 24992 more" in r.json()["error"]
    r = requests.post(emwrite.url + "/ngmeta", json=keys, timeout=30)
    assert r.status_code == 400 and len(r.content) < 2000, len(r.content)
    assert "unknown key 'k00000'" in r.json()["error"] and "more problems" in r.json()["error"]
    assert align.worker_pid() == pid


def test_a_chunked_body_over_1_mib_is_too_large(emwrite: Service) -> None:
    """Without Content-Length (chunked): 413, as with one."""
    pid = emwrite.worker_pid()

    def chunks() -> Iterator[bytes]:
        yield b'{"dest": "'
        for _ in range(2048):
            yield b"a" * 1024
        yield b'"}'

    r = requests.post(
        emwrite.url + "/ngmeta",
        data=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413, r.text[:300]
    assert emwrite.worker_pid() == pid
    assert requests.get(emwrite.url + "/health", timeout=10).status_code == 200


# -- 20.10: the original DAG's payloads, as it sent them ------------------------------------


def test_the_original_payloads_write_the_same_volume(emwrite: Service) -> None:
    """/ngmeta and /ngshard with the original's strings give 200 and the same bytes as
    the typed payload: info files and every shard file."""
    written = []
    for legacy in (False, True):
        run = make_run(unique_bucket("orig"), "r", slices=2, px=128)
        for z in (0, 1):
            assert post(emwrite, "/alignedslice", slice_body(run, z, 128)).status_code == 200
        if legacy:
            body = {
                "dest": run.ng, "dest_raw": run.chunk, "minz": "0", "maxz": "1",
                "bbox": "[128, 128]", "shard-size": "1024", "writeRaw": "True",
                "resolution": "8",
            }  # fmt: skip
            shard = {**body, "source": run.tmp, "start": "[0, 0, 0]"}
        else:
            body = {**volume_body(run, maxz=1, px=128), "writeRaw": True, "resolution": 8}
            shard = {**body, "source": run.tmp, "start": [0, 0, 0]}
        for path, payload in (("/ngmeta", body), ("/ngshard", shard)):
            r = post(emwrite, path, payload)
            assert r.status_code == 200, (path, r.text)
        written.append([objects(run.ng), objects(run.chunk)])
    assert written[0] == written[1]
    assert any(k.endswith(".shard") for k in written[0][0])


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"minz": "-1"}, "minz"), ({"maxz": "6e1"}, "maxz"), ({"minz": " 0"}, "minz"),
        ({"writeRaw": "yes"}, "writeRaw"), ({"writeRaw": 1}, "writeRaw"),
        ({"resolution": "8nm"}, "resolution"), ({"resolution": "[8, 8, 8]"}, "resolution"),
        ({"resolution": "nan"}, "resolution"), ({"resolution": "0"}, "resolution"),
        ({"bbox": "[128, 128"}, "bbox"), ({"minz": 0.0}, "minz"),
    ],
)  # fmt: skip
def test_only_the_original_string_forms_are_accepted(
    emwrite: Service, runs: dict[str, RunLayout], change: dict, name: str
) -> None:
    run = runs["attacker"]
    attack(emwrite, "/ngmeta", {**volume_body(run), **change}, names=(name,), what=str(change))


# -- 20.7: the viewer's data server ---------------------------------------------------------


def _get(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def data_server(tmp_path: Path) -> Iterator[tuple[DataServer, Path]]:
    folder = tmp_path / "vol"
    folder.mkdir()
    (folder / "info").write_text('{"type": "image"}')
    (tmp_path / "secret.txt").write_text("not for the web")
    os.link(tmp_path / "secret.txt", folder / "hardlink")
    server = DataServer({"neuroglancer/jpeg": folder})
    try:
        yield server, folder
    finally:
        server.stop()


def test_the_data_server_answers_cors_only_for_neuroglancer(
    data_server: tuple[DataServer, Path],
) -> None:
    server, _ = data_server
    app = NEUROGLANCER_APP.rstrip("/")
    status, headers, _ = _get(server.port, "/neuroglancer/jpeg/info", {"Origin": app})
    assert status == 200 and headers["access-control-allow-origin"] == app
    for origin in ("https://evil.example", "null", "http://127.0.0.1:9"):
        status, headers, _ = _get(server.port, "/neuroglancer/jpeg/info", {"Origin": origin})
        assert "access-control-allow-origin" not in headers, origin
    server.allow_origin("http://127.0.0.1:9/")  # a local viewer's origin (serve_run's)
    _, headers, _ = _get(server.port, "/neuroglancer/jpeg/info", {"Origin": "http://127.0.0.1:9"})
    assert headers["access-control-allow-origin"] == "http://127.0.0.1:9"


def test_the_data_server_checks_host_and_hard_links(data_server: tuple[DataServer, Path]) -> None:
    server, _ = data_server
    for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.2"):
        status, _, body = _get(server.port, "/neuroglancer/jpeg/info", {"Host": host})
        assert status == 400 and b"Host" in body, host
    for host in ("localhost", f"127.0.0.1:{server.port}", f"[::1]:{server.port}"):
        assert _get(server.port, "/neuroglancer/jpeg/info", {"Host": host})[0] == 200, host
    status, _, body = _get(server.port, "/neuroglancer/jpeg/hardlink", {})
    assert status == 403 and b"not for the web" not in body


def test_the_data_server_threads_are_bounded(data_server: tuple[DataServer, Path]) -> None:
    """12 idle connections start at most DATA_SERVER_THREADS threads; the server answers
    again once they are dropped for their silence (one read timeout later)."""
    server, _ = data_server
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port), 10) for _ in range(12)]
    try:
        time.sleep(1.0)
        assert threading.active_count() - before <= DATA_SERVER_THREADS
        t0 = time.monotonic()
        status, _, _ = _get(server.port, "/neuroglancer/jpeg/info", {})
        assert status == 200
        assert time.monotonic() - t0 < 2 * DATA_SERVER_READ_TIMEOUT_S + 5
    finally:
        for s in idle:
            s.close()


def test_a_bucket_name_is_read_back_as_every_run_it_can_be() -> None:
    """A source or run id holding ``_ng_`` splits more than one way; the fields of one
    request must share a split."""
    from emprocess.services.guard import runs_of

    assert runs_of("src-a_ng_b_ng_c", "ng") == {("src-a", "b_ng_c"), ("src-a_ng_b", "c")}
    assert runs_of("src-a_chunk_b_ng_c", "chunk") == {("src-a", "b_ng_c")}
    assert runs_of("src-a_ng_", "ng") == set() and runs_of("abc_ng_c", "ng") == {("abc", "c")}
    assert runs_of("_ng_c", "ng") == set() and runs_of("src_tmp_c", "ng") == set()
