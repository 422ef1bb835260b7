"""A 3-channel stack through the real DAG and services: aligned on its texture, every channel moved alike.

The stack is cut from the shared real FIB-SEM stack: slice z is a 384 px window of a
3-channel "world" image at a known offset (the drift). Red carries the FIB-SEM texture,
green and blue carry known patterns (squares drawn in the world frame), so every channel
drifts together. The run aligns on channel 0 (``align_channel``), CLAHE is off
(``clip-limit`` 0) so the lossless volume holds the warped pixels: after alignment each
square sits at one canvas position in every slice, and each slice's squares moved by the
very transform found for its texture. Both volumes are read back with tensorstore and
cloud-volume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import SHARED_DATA, ServicePool, point_storage, unique_bucket
from dags_conftest_helpers import E2ERun, run_on_local

from emprocess import affine, layout, storage
from emprocess.workflow import dag_id

CROP = 384
DRIFT_XY = [(0, 0), (6, -4), (11, -2), (5, 5), (-3, 8)]
"""Offset of slice z's window in the world image, on top of the margin: the known drift."""
MARGIN = 60
GREEN = (slice(150, 200), slice(180, 250), 200)  # rows, columns, value in the world frame
BLUE = (slice(250, 300), slice(100, 140), 120)


def _world(z: int) -> np.ndarray:
    """(y, x, 3) RGB world image of slice z: FIB-SEM texture, then the two squares."""
    path = SHARED_DATA / "fibsem" / f"img.{z:05d}.png"
    if not path.is_file():
        pytest.fail(
            f"real FIB-SEM stack not found in {path.parent}: ../shared/data must sit beside the checkout"
        )
    grey = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    world = np.zeros((*grey.shape, 3), np.uint8)
    world[..., 0] = grey
    for channel, (rows, cols, value) in ((1, GREEN), (2, BLUE)):
        world[rows, cols, channel] = value
    return world


def _slice(z: int) -> np.ndarray:
    dx, dy = DRIFT_XY[z]
    x0, y0 = MARGIN + dx, MARGIN + dy
    return _world(z)[y0 : y0 + CROP, x0 : x0 + CROP]


def centroid_xy(plane: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted centre (x, y) of a non-negative image."""
    w = plane.astype(np.float64)
    ys, xs = np.indices(w.shape)
    return float((xs * w).sum() / w.sum()), float((ys * w).sum() / w.sum())


@pytest.fixture(scope="module")
def run(airflow_db: Path, dag_bag: Any, service_pool: ServicePool, local_root: Path) -> E2ERun:
    with pytest.MonkeyPatch.context() as mp:
        point_storage(mp, str(local_root))
        source = unique_bucket("rgb")
        storage.create_bucket(source)
        for z in range(len(DRIFT_XY)):
            bgr = cv2.cvtColor(_slice(z), cv2.COLOR_RGB2BGR)
            storage.write_bytes(f"gs://{source}/img.{z:05d}.png", cv2.imencode(".png", bgr)[1])
        conf = {
            "id": "run",
            "image": "img.%05d.png",
            "minz": 0,
            "maxz": len(DRIFT_XY) - 1,
            "source": source,
            "clip-limit": 0,
            "channels": 3,
            "align_channel": 0,
            "neighbors": 1,
            "global_solve": False,
        }
        return run_on_local(mp, dag_bag.dags[dag_id(1)], conf, service_pool, local_root)


@pytest.fixture(autouse=True)
def on_local(local_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    point_storage(monkeypatch, str(local_root))


def _read_ts(url: str) -> tuple[dict[str, Any], np.ndarray]:
    """The info and scale 0 as (z, y, x, channel), through tensorstore."""
    import tensorstore as ts

    store = ts.open(
        {"driver": "neuroglancer_precomputed", "kvstore": storage.kvstore_spec(url)}, open=True
    ).result()
    info = json.loads(storage.read_bytes(storage.join(url, "info")))
    return info, np.asarray(store.read().result()).transpose(2, 1, 0, 3)


def _read_cv(url: str, rgb_jpeg: bool = False) -> np.ndarray:
    """Scale 0 as (z, y, x, channel), through cloud-volume.

    cloud-volume 12.15 decodes a 3-channel JPEG chunk by reshaping its interleaved RGB
    pixels in Fortran order, so channels come out mixed (its own encode_jpeg /
    decode_jpeg round trip does the same); with ``rgb_jpeg`` each chunk's bytes are put
    back in the interleaved (z, y, x, channel) order neuroglancer and tensorstore read.
    """
    from cloudvolume import CloudVolume

    loc = storage.parse_url(url)
    path = f"file://{storage.local_root() / loc.bucket / loc.key}"  # type: ignore[operator]
    vol = CloudVolume(f"precomputed://{path}", progress=False, cache=False, fill_missing=True)
    data = np.asarray(vol[vol.bounds])  # (x, y, z, channel)
    if rgb_jpeg:
        cx, cy, cz = (int(v) for v in vol.chunk_size)
        fixed = np.empty_like(data)
        for x0 in range(0, data.shape[0], cx):
            for y0 in range(0, data.shape[1], cy):
                for z0 in range(0, data.shape[2], cz):
                    box = np.s_[x0 : x0 + cx, y0 : y0 + cy, z0 : z0 + cz]
                    nx, ny, nz, nc = data[box].shape
                    chunk = data[box].ravel(order="F").reshape(nz, ny, nx, nc)
                    fixed[box] = chunk.transpose(2, 1, 0, 3)
        data = fixed
    return data.transpose(2, 1, 0, 3)


def test_channels_are_aligned_on_the_texture_and_moved_together(run: E2ERun) -> None:
    assert run.state == "success", run.task_states
    assert all(b["channel"] == 0 for b in run.bodies("/"))
    for path in ("/alignedslice", "/ngmeta", "/ngshard"):
        assert all(b["channels"] == 3 for b in run.bodies(path)), path
    transforms = json.loads(storage.read_bytes(run.layout.process_url(layout.TRANSFORMS)))
    info, raw = _read_ts(run.layout.raw_url)
    assert info["num_channels"] == 3 and raw.shape[0] == len(DRIFT_XY) and raw.shape[3] == 3
    assert np.array_equal(_read_cv(run.layout.raw_url), raw)
    for channel in (1, 2):
        aligned = [centroid_xy(raw[z, :, :, channel]) for z in range(len(DRIFT_XY))]
        given = [centroid_xy(_slice(z)[..., channel]) for z in range(len(DRIFT_XY))]
        # Before: the squares move with the drift; after: one place in every slice.
        assert max(abs(g[0] - given[0][0]) for g in given) >= 9
        for z, (x, y) in enumerate(aligned):
            assert abs(x - aligned[0][0]) < 1 and abs(y - aligned[0][1]) < 1, (channel, z)
            # The texture's transform moved this channel too.
            ex, ey = affine.apply(transforms[str(z)], np.array([given[z]]))[0]
            assert abs(x - ex) < 0.3 and abs(y - ey) < 0.3, (channel, z, (x, y), (ex, ey))
    # The texture itself lines up: slice z's red equals slice 0's where both have data.
    for z in range(1, len(DRIFT_XY)):
        a, b = raw[0, 100:300, 100:300, 0], raw[z, 100:300, 100:300, 0]
        corr = np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1]
        assert corr > 0.5, (z, corr)
    # The JPEG volume: RGB, the same voxels within JPEG error.
    jinfo, jpeg = _read_ts(run.layout.jpeg_url)
    assert jinfo["num_channels"] == 3 and jpeg.shape == raw.shape
    assert np.array_equal(_read_cv(run.layout.jpeg_url, True), jpeg)
    assert np.abs(jpeg.astype(int) - raw.astype(int)).mean() < 6


FILE_TEMPLATES = ["red/img.%05d.png", "green/img.%05d.png", "blue/img.%05d.png"]


@pytest.fixture(scope="module")
def files_run(
    airflow_db: Path, dag_bag: Any, service_pool: ServicePool, local_root: Path
) -> E2ERun:
    """The stack of :func:`run`, each slice stored as three grey files (``channel_templates``),
    with one JPEG volume per channel."""
    with pytest.MonkeyPatch.context() as mp:
        point_storage(mp, str(local_root))
        source = unique_bucket("files")
        storage.create_bucket(source)
        for z in range(len(DRIFT_XY)):
            rgb = _slice(z)
            for c, template in enumerate(FILE_TEMPLATES):
                storage.write_bytes(f"gs://{source}/{template % z}", cv2.imencode(".png", rgb[..., c])[1])  # fmt: skip
        conf = {
            "id": "run",
            "channel_templates": FILE_TEMPLATES,
            "minz": 0,
            "maxz": len(DRIFT_XY) - 1,
            "source": source,
            "clip-limit": 0,
            "align_channel": 0,
            "neighbors": 1,
            "global_solve": False,
            "jpeg_channels": "each",
        }
        return run_on_local(mp, dag_bag.dags[dag_id(1)], conf, service_pool, local_root)


def test_one_file_per_channel_gives_the_volume_of_the_colour_files(
    run: E2ERun, files_run: E2ERun
) -> None:
    """Known answer: the same alignment and the very lossless volume as the RGB PNG stack;
    each channel's JPEG volume is that channel within JPEG error (grey FIB-SEM: ~3 levels)."""
    assert files_run.state == "success", files_run.task_states
    for body in files_run.bodies("/"):
        z = int(body["pre"].rsplit(".", 2)[-2])
        assert body["pre_channels"] == [f"gs://{files_run.source}/{t % z}" for t in FILE_TEMPLATES[1:]]  # fmt: skip
        assert body["channel"] == 0
    for body in files_run.bodies("/alignedslice"):
        assert body["channel_imgs"] == [t % body["slice"] for t in FILE_TEMPLATES[1:]]
    transforms = [
        json.loads(storage.read_bytes(f"{r.process}/align/transforms.json"))
        for r in (run, files_run)
    ]
    assert transforms[0] == transforms[1]
    _, colour = _read_ts(f"gs://{run.chunk_bucket}/neuroglancer/raw")
    info, files = _read_ts(f"gs://{files_run.chunk_bucket}/neuroglancer/raw")
    assert info["num_channels"] == 3 and np.array_equal(files, colour)
    for c, path in enumerate(("jpeg", "jpeg_c1", "jpeg_c2")):
        jinfo, jpeg = _read_ts(f"gs://{files_run.ng_bucket}/neuroglancer/{path}")
        assert jinfo["num_channels"] == 1 and jpeg.shape == (*files.shape[:3], 1), path
        assert np.abs(jpeg[..., 0].astype(int) - files[..., c]).mean() < 4, path


def _load_script() -> Any:
    """scripts/ingest_multichannel_small.py as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "ingest_multichannel_small.py"
    spec = importlib.util.spec_from_file_location("_ingest_multichannel_small", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _rgba(z: int) -> np.ndarray:
    """Slice z with an alpha channel: the texture inverted."""
    rgb = _slice(z)
    return np.dstack([rgb, 255 - rgb[..., 0]])


@pytest.fixture(scope="module")
def script_run(
    airflow_db: Path, dag_bag: Any, service_pool: ServicePool, local_root: Path
) -> tuple[E2ERun, Any]:
    """An RGBA stack run with the configuration scripts/ingest_multichannel_small.py makes."""
    script = _load_script()
    with pytest.MonkeyPatch.context() as mp:
        point_storage(mp, str(local_root))
        source = unique_bucket("rgba")
        storage.create_bucket(source)
        for z in range(len(DRIFT_XY)):
            bgra = cv2.cvtColor(_rgba(z), cv2.COLOR_RGBA2BGRA)
            storage.write_bytes(f"gs://{source}/stack/img.{z:05d}.png", cv2.imencode(".png", bgra)[1])  # fmt: skip
        args = script.argparse.Namespace(
            src=f"gs://{source}/stack", template="img.%05d.png", minz=None, maxz=None, id=None,
            channels=None, align=False, align_channel="mean", clip_limit=0.0, resolution=[8.0],
            channel_template=None,
        )  # fmt: skip
        conf = script.build_conf(args)
        return run_on_local(mp, dag_bag.dags[dag_id(1)], conf.to_json(), service_pool, local_root), script  # fmt: skip


def test_the_multichannel_script_keeps_a_stack_as_given(script_run: tuple[E2ERun, Any]) -> None:
    """The script's run (taken as aligned, CLAHE off) keeps every channel of an RGBA stack
    exactly in the lossless volume, as the script's own writer did; it prints the layer of
    the run's volume with the RGB shader, or a whole viewer state."""
    from emprocess.view import RGB_SHADER
    from emprocess.workflow.conf import parse_conf

    run, script = script_run
    assert run.state == "success", run.task_states
    assert run.conf["channels"] == 4 and run.conf["skip_align"] and run.conf["clip-limit"] == 0
    assert run.conf["image"] == "stack/img.%05d.png" and run.conf["maxz"] == len(DRIFT_XY) - 1
    info, raw = _read_ts(f"gs://{run.chunk_bucket}/neuroglancer/raw")
    assert info["num_channels"] == 4
    assert np.array_equal(raw, np.stack([_rgba(z) for z in range(len(DRIFT_XY))]))
    conf = parse_conf(run.conf)
    layer = script.layer_or_state(conf, True, "cells", False)
    assert layer == {
        "type": "image",
        "source": f"precomputed://gs://{run.chunk_bucket}/neuroglancer/raw",
        "name": "cells",
        "shader": RGB_SHADER,
    }
    state = script.layer_or_state(conf, False, None, True)
    assert state["layers"][0]["source"] == f"precomputed://gs://{run.ng_bucket}/neuroglancer/jpeg"
    assert state["layout"] == "xy" and state["dimensions"]["x"] == [8e-09, "m"]
    assert state["position"] == [CROP / 2, CROP / 2, len(DRIFT_XY) / 2]
