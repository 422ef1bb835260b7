"""Anisotropic voxels (4 x 4 x 40 nm): near-isotropic scales, shards owned by one cube, and
every scale written by the real emwrite service equal to a numpy downsampling of scale 0.

The reference pyramid here is plain numpy: each step averages blocks of 2 (or 1 along an
axis that the step keeps) with the last block of an odd axis averaging the voxels that
exist, rounded half up, as the service's kernel defines it; the lossless volume must
match it exactly, read back with tensorstore and with cloud-volume.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests
from conftest import ServicePool, point_storage, unique_bucket
from test_emwrite_service import read_cloudvolume, read_tensorstore
from test_ngmeta import morton_ids

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.kernels.ngmeta import (
    build_info,
    cube_bounds_xyz,
    downsample_factors_xyz,
    plan_cubes,
    scale_layouts,
)
from emprocess.layout import RunLayout

RES = [4, 4, 40]
EXPECTED_FACTORS = [(1, 1, 1), (2, 2, 1), (4, 4, 1), (8, 8, 1), (16, 16, 2), (32, 32, 4)]


def test_factors_follow_neuroglancers_near_isotropic_rule() -> None:
    assert downsample_factors_xyz(RES, 6) == EXPECTED_FACTORS
    assert downsample_factors_xyz(8, 6) == [(2**s,) * 3 for s in range(6)]
    assert downsample_factors_xyz([8, 8, 8], 3) == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    # z finer than x and y (rare, but the rule is symmetric): z halves first.
    assert downsample_factors_xyz([16, 16, 4], 4) == [(1, 1, 1), (1, 1, 2), (1, 1, 4), (2, 2, 8)]
    with pytest.raises(InvalidInput, match="resolution"):
        downsample_factors_xyz([4, 4, 0], 6)
    with pytest.raises(InvalidInput, match="resolution"):
        build_info((10, 10), 0, 4, [4, 4])


def test_info_of_a_4x4x40_volume() -> None:
    info = build_info((3000, 2100), 10, 409, RES)
    scales = info["scales"]
    assert [s["resolution"] for s in scales] == [
        [4, 4, 40], [8, 8, 40], [16, 16, 40], [32, 32, 40], [64, 64, 80], [128, 128, 160]
    ]  # fmt: skip
    assert [s["key"] for s in scales][:2] == ["4_4_40", "8_8_40"]
    assert [s["size"] for s in scales] == [
        [3000, 2100, 400], [1500, 1050, 400], [750, 525, 400], [375, 263, 400],
        [188, 132, 200], [94, 66, 100]
    ]  # fmt: skip
    assert [s["voxel_offset"] for s in scales] == [[0, 0, 10]] * 4 + [[0, 0, 5], [0, 0, 2]]
    assert [s["chunk_sizes"] for s in scales] == [[[64, 64, 64]]] * 5 + [[[32, 32, 64]]]
    # Isotropic confs keep exactly today's info.
    assert build_info((3000, 2100), 10, 409, 8) == build_info((3000, 2100), 10, 409, [8, 8, 8])


VOLUMES = [((3000, 2100), 10, 2600), ((1100, 900), 0, 63), ((5000, 300), 7, 1500)]


@pytest.mark.parametrize(("bbox_xy", "minz", "maxz"), VOLUMES)
@pytest.mark.parametrize("res", [RES, [4, 8, 40], [16, 16, 4]])
def test_every_shard_belongs_to_exactly_one_cube(
    bbox_xy: tuple[int, int], minz: int, maxz: int, res: list[float]
) -> None:
    cube = 1024
    info = build_info(bbox_xy, minz, maxz, res)
    layouts = scale_layouts(res)
    planned = set(plan_cubes(bbox_xy, minz, maxz, cube))
    for s, (scale, layout) in enumerate(zip(info["scales"], layouts, strict=True)):
        chunk = np.array(scale["chunk_sizes"][0], np.uint64)
        grid = [math.ceil(n / c) for n, c in zip(scale["size"], layout.chunk, strict=True)]
        ids, pos = morton_ids(grid)
        sh = scale["sharding"]
        shard = (ids >> np.uint64(sh["preshift_bits"] + sh["minishard_bits"])) & np.uint64(
            (1 << sh["shard_bits"]) - 1
        )
        cube_of = pos // (np.array(layout.cube, np.uint64) // chunk)
        cubes_of_shard: dict[int, set[tuple[int, ...]]] = {}
        for a, c in zip(shard, cube_of, strict=True):
            cubes_of_shard.setdefault(int(a), set()).add(tuple(int(v) for v in c))
        assert all(len(v) == 1 for v in cubes_of_shard.values()), f"scale {s}"
        assert {c for v in cubes_of_shard.values() for c in v} == planned, f"scale {s}"
        assert int(ids.max()) >> (sum(sh[k] for k in sh if k.endswith("_bits"))) == 0
        for c in planned:  # each cube's first chunk is where cube_bounds_xyz says
            lo, _ = cube_bounds_xyz(c, bbox_xy, minz, maxz, s, cube, layout.factor)
            sel = (cube_of == np.array(c, np.uint64)).all(axis=1)
            first = pos[sel].min(axis=0) * chunk + np.array(scale["voxel_offset"], np.uint64)
            assert tuple(int(v) for v in first) == lo


# -- through the service -------------------------------------------------------------


def mean_steps(volume: np.ndarray, step_zyx: tuple[int, int, int]) -> np.ndarray:
    """Numpy reference of one pyramid step: edge-replicate odd axes, block mean, half up."""
    pad = [(0, (-n) % s) for n, s in zip(volume.shape, step_zyx, strict=True)]
    v = np.pad(volume.astype(np.float64), pad, mode="edge")
    (sz, sy, sx), (nz, ny, nx) = step_zyx, v.shape
    blocks = v.reshape(nz // sz, sz, ny // sy, sy, nx // sx, sx).mean(axis=(1, 3, 5))
    return np.floor(blocks + 0.5).astype(volume.dtype)


@pytest.fixture(autouse=True)
def on_local(local_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    point_storage(monkeypatch, str(local_root))


def _post(url: str, body: dict[str, Any]) -> None:
    r = requests.post(url, json=body, timeout=120)
    assert r.status_code == 200, r.text


def test_service_writes_near_isotropic_scales_equal_to_numpy(service_pool: ServicePool) -> None:
    service = service_pool.url("emwrite", "local")
    minz, n, (width, height) = 3, 9, (300, 260)
    source = unique_bucket("aniso")
    run = RunLayout(source, "r")
    tmp, ng, chunk = run.tmp, run.ng, run.chunk
    for b in (source, tmp, run.process, ng, chunk):
        storage.create_bucket(b)
    rng = np.random.default_rng(4)
    for z in range(minz, minz + n):
        image = cv2.GaussianBlur(rng.integers(0, 256, (height, width), np.uint8), (0, 0), 2)
        storage.write_bytes(f"gs://{source}/s{z}.png", cv2.imencode(".png", image)[1].tobytes())
        _post(
            service + "/alignedslice",
            {
                "img": f"s{z}.png", "transform": [1, 0, 0, 1, 0, 0], "bbox": [width, height],
                "dest": source, "dest-tmp": tmp, "slice": z, "run_id": "r", "clip-limit": 0,
            },
        )  # fmt: skip
    volume = {
        "dest": ng, "dest_raw": chunk, "minz": minz, "maxz": minz + n - 1,
        "bbox": [width, height], "writeRaw": True, "resolution": RES,
    }  # fmt: skip
    _post(service + "/ngmeta", volume)
    _post(service + "/ngshard", {**volume, "source": tmp, "start": [0, 0, 0]})

    info = json.loads(storage.read_bytes(f"{run.raw_url}/info"))
    assert [s["resolution"][2] for s in info["scales"]] == [40, 40, 40, 40, 80, 160]
    raw_url, jpeg_url = run.raw_url, run.jpeg_url
    level, _ = read_tensorstore(raw_url, 0)
    assert level.shape == (n, height, width) and level.std() > 3
    factors = downsample_factors_xyz(RES, 6)
    for s in range(6):
        if s:
            step = tuple(
                b // a for a, b in zip(factors[s - 1][::-1], factors[s][::-1], strict=True)
            )
            level = mean_steps(level, (step[0], step[1], step[2]))
        fx, fy, fz = factors[s]
        assert level.shape == (-(-n // fz), -(-height // fy), -(-width // fx)), s
        for read in (read_tensorstore, read_cloudvolume):
            got, offset = read(raw_url, s)
            assert offset == (0, 0, minz // fz), (s, read.__name__)
            np.testing.assert_array_equal(got, level, err_msg=f"scale {s} {read.__name__}")
            jpeg, _ = read(jpeg_url, s)
            err = np.abs(jpeg.astype(int) - level)
            assert jpeg.shape == level.shape and err.mean() < 6, (s, err.mean())


@pytest.mark.parametrize(
    ("bbox_xy", "minz", "maxz"), [((150, 70), 60, 389), ((130, 10), 0, 127), ((64, 64), 3, 3)]
)
def test_tensorstore_writes_each_cube_into_shards_of_its_own(
    bbox_xy: tuple[int, int], minz: int, maxz: int
) -> None:
    """Small cubes (64 voxels, chunks of 8, 5 scales), written cube after cube with
    tensorstore: every cube creates shard files no other cube touches, and reads back."""
    import tensorstore as ts

    cube, chunk = 64, 8
    info = build_info(bbox_xy, minz, maxz, RES, "raw", num_scales=5, chunk=chunk, cube=cube)
    ctx = ts.Context()
    kv = ts.KvStore.open({"driver": "memory"}, context=ctx).result()
    kv.write("vol/info", json.dumps(info)).result()
    layouts = scale_layouts(RES, 5, chunk, cube)
    for s in range(5):
        spec = {"driver": "neuroglancer_precomputed", "kvstore": {"driver": "memory",
                "path": "vol/"}, "scale_index": s}  # fmt: skip
        store = ts.open(spec, context=ctx, open=True).result()
        seen = {k: kv.read(k).result().value for k in kv.list().result()}
        cubes = plan_cubes(bbox_xy, minz, maxz, cube)
        boxes = [cube_bounds_xyz(c, bbox_xy, minz, maxz, s, cube, layouts[s].factor) for c in cubes]
        for c, (lo, hi) in zip(cubes, boxes, strict=True):
            shape = [h - lo_ for h, lo_ in zip(hi, lo, strict=True)]
            data = np.full([*shape, 1], (sum(c) * 37 + s) % 255 + 1, np.uint8)
            store[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].write(data).result()
            now = {k: kv.read(k).result().value for k in kv.list().result()}
            new = set(now) - set(seen)
            assert new and all(k.endswith(b".shard") for k in new), f"scale {s} cube {c}"
            # Files of earlier cubes are untouched: this cube's chunks are in its own.
            assert all(now[k] == v for k, v in seen.items()), f"scale {s} cube {c}"
            seen = now
        for c, (lo, hi) in zip(cubes, boxes, strict=True):
            got = store[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].read().result()
            assert (got == (sum(c) * 37 + s) % 255 + 1).all(), f"scale {s} cube {c}"


def test_cli_takes_xyz_resolution_and_an_intensity_window() -> None:
    import shlex

    from test_cli import TRIGGER, runner

    from emprocess.cli import app

    flags = ["--resolution", "4,4,40", "--intensity", "300,3800"]
    where = ["--composer-env", "e", "--location", "l", "--dry-run"]
    result = runner.invoke(app, [*TRIGGER, *flags, *where])
    assert result.exit_code == 0, result.output
    argv = shlex.split(result.output.strip())
    conf = json.loads(argv[argv.index("--conf") + 1])
    assert conf["resolution"] == [4, 4, 40] and conf["intensity"] == [300, 3800]
    result = runner.invoke(app, [*TRIGGER, "--resolution", "4,4,-1", *where])
    assert result.exit_code == 2 and "-1.0 nm" in result.output
    result = runner.invoke(app, [*TRIGGER, "--intensity", "3800,300", *where])
    assert result.exit_code == 2 and "low 3800" in result.output


def test_link_shows_true_physical_sizes() -> None:
    import neuroglancer

    from emprocess.view import geometry_from_info, neuroglancer_link, viewer_state

    geometry = geometry_from_info(build_info((3000, 2100), 10, 409, RES))
    state = neuroglancer.parse_url(
        neuroglancer_link(viewer_state([("em", "precomputed://gs://b_ng_r/v")], geometry))
    )
    assert list(state.dimensions.scales) == [4e-9, 4e-9, 40e-9]
    assert list(state.position) == [1500.0, 1050.0, 210.0]
    # The 3D view fits the physically longest side: 400 slices x 40 nm = 16 um, in 4 nm
    # canonical voxels, not 3000 voxels.
    assert state.projection_scale == pytest.approx(1.5 * 400 * 40 / 4)
