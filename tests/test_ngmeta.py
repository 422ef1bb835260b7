"""The info builder, and proof that every shard file belongs to exactly one /ngshard cube."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tensorstore as ts

from emprocess.errors import InvalidInput
from emprocess.kernels.ngmeta import (
    MAX_SHARD_PX,
    build_info,
    compressed_morton_code,
    cube_bounds_xyz,
    plan_cubes,
    shard_filename,
    shard_number,
)


def morton_ids(grid_size_xyz: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Compressed Morton id of every chunk of a grid, vectorised (neuroglancer volume.md).

    Returns (ids, positions) with positions of shape (n, 3) in x, y, z order.
    """
    pos = np.stack(
        np.meshgrid(*(np.arange(g, dtype=np.uint64) for g in grid_size_xyz), indexing="ij"), -1
    ).reshape(-1, 3)
    ids = np.zeros(len(pos), np.uint64)
    j = 0
    for i in range(64):
        for d in range(3):
            if 2**i < grid_size_xyz[d]:
                ids |= ((pos[:, d] >> np.uint64(i)) & np.uint64(1)) << np.uint64(j)
                j += 1
    return ids, pos


def test_compressed_morton_known_answers() -> None:
    # x and y interleave while both have bits; z has a single chunk and adds none.
    assert compressed_morton_code((1, 2, 0), (4, 4, 1)) == 0b1001
    assert compressed_morton_code((3, 0, 0), (4, 1, 1)) == 0b11
    # Once y runs out of bits only x and z continue: grid (8, 2, 4), position (5, 1, 3).
    # bit 0: x0=1 y0=1 z0=1; bit 1: x1=0 z1=1; bit 2: x2=1 -> 0b1_10_111.
    assert compressed_morton_code((5, 1, 3), (8, 2, 4)) == 0b110111
    # A worked example published for a real volume (DocSavage's sharding worksheet):
    # chunks of 64 in a 42943 x 56068 x 82276 volume, block (335, 438, 1024).
    grid = [math.ceil(s / 64) for s in (42943, 56068, 82276)]
    code = compressed_morton_code((335, 438, 1024), grid)
    assert code == 0x434522D9
    spec = {"hash": "identity", "preshift_bits": 9, "minishard_bits": 6, "shard_bits": 16}
    assert shard_number(code, spec) == 0x868A
    ids, pos = morton_ids([5, 3, 9])
    for k in range(0, len(ids), 7):
        assert compressed_morton_code(pos[k].tolist(), (5, 3, 9)) == int(ids[k])


def test_info_has_the_standard_shape() -> None:
    info = build_info((2500, 1100), 1000, 3100, 8, "jpeg")
    assert set(info) == {"@type", "type", "data_type", "num_channels", "scales"}
    assert info["@type"] == "neuroglancer_multiscale_volume"
    assert (info["type"], info["data_type"], info["num_channels"]) == ("image", "uint8", 1)
    sizes = [s["size"] for s in info["scales"]]
    assert sizes == [
        [2500, 1100, 2101],
        [1250, 550, 1051],
        [625, 275, 526],
        [313, 138, 263],
        [157, 69, 132],
        [79, 35, 66],
    ]
    assert [s["voxel_offset"] for s in info["scales"]] == [
        [0, 0, 1000],
        [0, 0, 500],
        [0, 0, 250],
        [0, 0, 125],
        [0, 0, 62],
        [0, 0, 31],
    ]
    assert [s["resolution"] for s in info["scales"]] == [
        [r, r, r] for r in (8, 16, 32, 64, 128, 256)
    ]
    assert [s["key"] for s in info["scales"]][:2] == ["8_8_8", "16_16_16"]
    assert [s["chunk_sizes"] for s in info["scales"]] == [[[c] * 3] for c in (64,) * 5 + (32,)]
    for s in info["scales"]:
        assert set(s) == {
            "key",
            "size",
            "voxel_offset",
            "resolution",
            "chunk_sizes",
            "encoding",
            "sharding",
        }
        assert s["encoding"] == "jpeg" and s["sharding"]["data_encoding"] == "raw"
        assert s["sharding"]["@type"] == "neuroglancer_uint64_sharded_v1"
        assert s["sharding"]["hash"] == "identity"
        assert s["sharding"]["minishard_index_encoding"] == "gzip"
    raw = build_info((2500, 1100), 1000, 3100, 8, "raw")
    assert {s["encoding"] for s in raw["scales"]} == {"raw"}
    assert {s["sharding"]["data_encoding"] for s in raw["scales"]} == {"raw"}
    gz = build_info((2500, 1100), 1000, 3100, 8, "raw", raw_data_encoding="gzip")
    assert {s["sharding"]["data_encoding"] for s in gz["scales"]} == {"gzip"}
    assert build_info((2500, 1100), 1000, 3100, 8, "jpeg", raw_data_encoding="gzip") == info
    json.dumps(info)  # JSON-ready


def test_sharding_bits_of_two_reference_volumes() -> None:
    def bits(info: dict) -> list[tuple[int, int, int]]:
        return [
            (
                s["sharding"]["preshift_bits"],
                s["sharding"]["minishard_bits"],
                s["sharding"]["shard_bits"],
            )
            for s in info["scales"]
        ]

    # 16 x 16 x 4 cubes of 1024^3: 10 shard bits at every scale, one shard per cube,
    # but at scale 0 each cube is 8 shards of 512^3 (3 more shard bits).
    assert bits(build_info((16384, 16384), 0, 4095, 8)) == [
        (5, 4, 13),
        (5, 4, 10),
        (3, 3, 10),
        (2, 1, 10),
        (0, 0, 10),
        (0, 0, 10),
    ]
    # 2 x 2 x 1 cubes; z is a single chunk at every scale and adds no bits; at scale 0
    # each cube is 2 x 2 shards of 512 x 512 x 64.
    assert bits(build_info((2048, 2048), 0, 63, 8)) == [
        (3, 3, 4),
        (3, 3, 2),
        (2, 2, 2),
        (1, 1, 2),
        (0, 0, 2),
        (0, 0, 2),
    ]


def test_plan_cubes_counts_z_from_minz() -> None:
    assert plan_cubes((2500, 1100), 1000, 3100) == [
        (x, y, z) for z in range(3) for y in range(2) for x in range(3)
    ]
    # 1000..2047 is 1048 slices: two cubes, the first starting at slice 1000.
    assert plan_cubes((1024, 1024), 1000, 2047) == [(0, 0, 0), (0, 0, 1)]
    assert plan_cubes((1, 1), 5, 5) == [(0, 0, 0)]
    assert cube_bounds_xyz((2, 1, 1), (2500, 1100), 1000, 3100, 0) == (
        (2048, 1024, 2024),
        (2500, 1100, 3048),
    )
    assert cube_bounds_xyz((2, 1, 2), (2500, 1100), 1000, 3100, 3) == (
        (256, 128, 381),
        (313, 138, 388),
    )
    with pytest.raises(InvalidInput, match="outside"):
        cube_bounds_xyz((3, 0, 0), (2500, 1100), 1000, 3100, 0)


VOLUMES = [
    # bbox_xy, minz, maxz
    ((2500, 1100), 1000, 3100),  # odd sizes, minz = 1000 spanning z cubes
    ((4096, 1024), 0, 1023),  # exact multiples, x grid larger than y and z
    ((1000, 3000), 7, 70),  # thin in z, non-multiples of 64
    ((700, 500), 12, 12),  # a single slice
    ((100, 37), 0, 99),  # smaller than one cube
    ((1024, 1024), 1000, 2047),  # two z cubes of which the second is 24 slices
    ((5000, 300), 0, 2500),  # more cubes in x than anything else
]


@pytest.mark.parametrize(("bbox_xy", "minz", "maxz"), VOLUMES)
def test_every_shard_belongs_to_exactly_one_cube(
    bbox_xy: tuple[int, int], minz: int, maxz: int
) -> None:
    cube = 1024
    info = build_info(bbox_xy, minz, maxz, 8)
    planned = set(plan_cubes(bbox_xy, minz, maxz, cube))
    for s, scale in enumerate(info["scales"]):
        chunk = scale["chunk_sizes"][0][0]
        grid = [math.ceil(n / chunk) for n in scale["size"]]
        ids, pos = morton_ids(grid)
        sh = scale["sharding"]
        shard = (ids >> np.uint64(sh["preshift_bits"] + sh["minishard_bits"])) & np.uint64(
            (1 << sh["shard_bits"]) - 1
        )
        cube_side_chunks = (cube >> s) // chunk
        cube_of = pos // np.uint64(cube_side_chunks)
        pairs = {(int(a), tuple(int(v) for v in c)) for a, c in zip(shard, cube_of, strict=True)}
        shards_of_cube: dict[tuple[int, ...], set[int]] = {}
        cubes_of_shard: dict[int, set[tuple[int, ...]]] = {}
        for a, c in pairs:
            shards_of_cube.setdefault(c, set()).add(a)
            cubes_of_shard.setdefault(a, set()).add(c)
        assert all(len(v) == 1 for v in cubes_of_shard.values()), f"scale {s}"
        # A shard is at most MAX_SHARD_PX per side: it lies in one such block of its cube.
        block_of = pos // np.uint64(max(1, min(cube >> s, MAX_SHARD_PX) // chunk))
        blocks_of_shard: dict[int, set[tuple[int, ...]]] = {}
        for a, b in zip(shard, block_of, strict=True):
            blocks_of_shard.setdefault(int(a), set()).add(tuple(int(v) for v in b))
        assert all(len(v) == 1 for v in blocks_of_shard.values()), f"scale {s}"
        if cube >> s <= MAX_SHARD_PX:
            assert all(len(v) == 1 for v in shards_of_cube.values()), f"scale {s}"
        assert set(shards_of_cube) == planned, f"scale {s}"
        # Shard numbers use all shard bits without overflow (no silent aliasing).
        assert (
            int(ids.max()) >> (sh["preshift_bits"] + sh["minishard_bits"] + sh["shard_bits"]) == 0
        )
        # Every chunk lies inside its cube's bounds from cube_bounds_xyz.
        for c in planned:
            lo, hi = cube_bounds_xyz(c, bbox_xy, minz, maxz, s, cube)
            sel = (cube_of == np.array(c, np.uint64)).all(axis=1)
            first = pos[sel].min(axis=0) * chunk + np.array(scale["voxel_offset"])
            assert tuple(int(v) for v in first) == lo
            assert all(h > lo_ for h, lo_ in zip(hi, lo, strict=True))


def _open_scale(ctx: ts.Context, scale: int) -> ts.TensorStore:
    spec = {
        "driver": "neuroglancer_precomputed",
        "kvstore": {"driver": "memory", "path": "vol/"},
        "scale_index": scale,
    }
    return ts.open(spec, context=ctx, open=True).result()


@pytest.mark.parametrize(
    ("bbox_xy", "minz", "maxz"), [((150, 70), 60, 189), ((64, 64), 3, 3), ((130, 10), 0, 127)]
)
def test_tensorstore_writes_each_cube_into_its_own_predicted_shard(
    bbox_xy: tuple[int, int], minz: int, maxz: int
) -> None:
    # Same logic at a smaller scale: cubes of 64 voxels, chunks of 8, 4 scales.
    cube, chunk = 64, 8
    info = build_info(bbox_xy, minz, maxz, 4, "raw", num_scales=4, chunk=chunk, cube=cube)
    ctx = ts.Context()
    kv = ts.KvStore.open({"driver": "memory"}, context=ctx).result()
    kv.write("vol/info", json.dumps(info)).result()
    for s, scale in enumerate(info["scales"]):
        store = _open_scale(ctx, s)
        sh = scale["sharding"]
        chunk_s = scale["chunk_sizes"][0][0]
        grid = [math.ceil(n / chunk_s) for n in scale["size"]]
        seen: set[bytes] = {k for k in kv.list().result()}
        for c in plan_cubes(bbox_xy, minz, maxz, cube):
            lo, hi = cube_bounds_xyz(c, bbox_xy, minz, maxz, s, cube)
            shape = [h - lo_ for h, lo_ in zip(hi, lo, strict=True)]
            data = np.full([*shape, 1], (sum(c) * 37 + s) % 255 + 1, np.uint8)
            store[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].write(data).result()
            now = set(kv.list().result())
            new = now - seen
            first_chunk = [(lo[d] - scale["voxel_offset"][d]) // chunk_s for d in range(3)]
            expected = shard_number(compressed_morton_code(first_chunk, grid), sh)
            key = f"vol/{scale['key']}/{shard_filename(expected, sh['shard_bits'])}".encode()
            assert new == {key}, f"scale {s} cube {c}: {new}"
            seen = now
        # Read everything back: each cube holds its own value, nothing was overwritten.
        for c in plan_cubes(bbox_xy, minz, maxz, cube):
            lo, hi = cube_bounds_xyz(c, bbox_xy, minz, maxz, s, cube)
            got = store[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].read().result()
            assert (got == (sum(c) * 37 + s) % 255 + 1).all()


def test_tensorstore_accepts_the_jpeg_info() -> None:
    info = build_info((100, 80), 10, 29, 8, "jpeg", num_scales=2)
    ctx = ts.Context()
    kv = ts.KvStore.open({"driver": "memory"}, context=ctx).result()
    kv.write("vol/info", json.dumps(info)).result()
    store = _open_scale(ctx, 0)
    assert store.domain.inclusive_min == (0, 0, 10, 0)
    assert store.domain.exclusive_max == (100, 80, 30, 1)
    store.write(np.full((100, 80, 20, 1), 120, np.uint8)).result()
    got = store.read().result()
    assert np.abs(got.astype(int) - 120).max() <= 2  # JPEG of a flat image


def test_build_info_rejects_bad_input() -> None:
    with pytest.raises(InvalidInput, match="minz"):
        build_info((10, 10), 5, 4, 8)
    with pytest.raises(InvalidInput, match="bbox"):
        build_info((0, 10), 0, 4, 8)
    with pytest.raises(InvalidInput, match="resolution"):
        build_info((10, 10), 0, 4, 0)
    with pytest.raises(InvalidInput, match="encoding"):
        build_info((10, 10), 0, 4, 8, "png")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="raw_data_encoding"):
        build_info((10, 10), 0, 4, 8, "raw", raw_data_encoding="zstd")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="num_scales"):
        build_info((10, 10), 0, 4, 8, num_scales=12)
    with pytest.raises(InvalidInput, match="power of two"):
        build_info((10, 10), 0, 4, 8, chunk=48)
