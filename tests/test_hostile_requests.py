"""Hostile requests, second round (issue 20): the request-handling side.

Against both services under gunicorn (one worker each) on the local storage root, as in
test_hostile.py: each case asserts the status, the field or value named in the message,
the worker's peak RSS (VmHWM) and /health afterwards (``hostile.attack``). Covered here:
buckets tied to one run and marked as ours (20.1), the canvas bounded by the slice's area
(20.3), links and FIFOs on tensorstore's paths (20.5), JSON content type, Host and slow
clients (20.7), all-zero cubes rewritten (20.8), the smaller items of 20.9 and the
original DAG's string payloads (20.10). The image decoders' cases are elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests
import test_hostile as hostile
from conftest import ServicePool, unique_bucket

from emprocess import storage
from emprocess.kernels import tiles
from emprocess.layout import RunLayout

Service = hostile.Service
attack = hostile.attack


@pytest.fixture(autouse=True)
def _local_root(local_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMPROCESS_STORAGE_ROOT", str(local_root))


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
        storage.write_bytes(f"gs://{source}/img.{z:05d}.png", cv2.imencode(".png", image)[1])
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
        mp.setenv("EMPROCESS_STORAGE_ROOT", str(local_root))
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
    storage.write_bytes(f"gs://{src}/img.00000.png", cv2.imencode(".png", image)[1])
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
    storage.write_bytes(f"gs://{run.source}/thin.png", cv2.imencode(".png", thin)[1])
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


def test_an_all_zero_cube_replaces_what_was_there(emwrite: Service) -> None:
    """Data first, then zeros for the same cube: zeros read back, as from a fresh volume."""
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
        storage.write_bytes(f"gs://{run.source}/img.{z:05d}.png", cv2.imencode(".png", black)[1])
        assert post(emwrite, "/alignedslice", slice_body(run, z, 128)).status_code == 200
    assert post(emwrite, "/ngshard", shard).status_code == 200
    for url in (run.raw_url, run.jpeg_url):
        for scale in range(6):
            assert not _read_volume(url, scale).any(), (url, scale)
