"""Neuroglancer precomputed ``info`` and the /ngshard cube plan, with one shard per cube.

Volume layout: x and y are canvas pixels from 0; z is slice number, with the chunk grid
starting at ``minz`` (``voxel_offset`` z). The volume is cut into cubes of ``cube``
(1024) voxels per side at scale 0, z counted from ``minz``, and each /ngshard request
writes one cube at every scale. Chunks never span two cubes (the chunk side is
``min(chunk, cube >> scale)``) and the sharding bits are chosen so that every shard
file holds chunks of exactly one cube (at most ``MAX_SHARD_PX`` per side, so a 1024^3
cube at scale 0 is 8 shards of 512^3): no two requests ever write the same file.

Why that works: a chunk id is the compressed Morton code of the chunk's grid position
(neuroglancer volume.md): bit i of x, y, z in turn, for bit positions i from 0 up,
skipping a dimension once ``2**i >= grid_size``. A cube spans ``2**k`` chunks per side,
so the low bits i < k of every coordinate give the position inside the cube and all
higher bits give the cube; the interleaving puts the former in the lowest
``b = sum(min(k, bits_d))`` bits of the id. With ``preshift_bits + minishard_bits = b``
and ``shard_bits = total_bits - b``, the shard number (bits [b, total) of the id under
the identity hash) is a function of the cube alone, and different cubes get different
shard numbers.

Anisotropic voxels (e.g. 4 x 4 x 40 nm): scale s is scale 0 shrunk by a factor per axis
(:func:`downsample_factors_xyz`, neuroglancer's and igneous's near-isotropic rule: x and y
halve until the voxels are near cubic, then all three). A cube then spans
``cube / factor`` voxels per axis at that scale, chunks are ``min(chunk, that)`` per axis,
and a shard covers the same number ``2**k`` of chunks along every axis (``k`` from the
axis with the fewest), so the within-shard Morton bits stay the lowest ones and the proof
above holds unchanged; along the long axis a cube just has more shards.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from emprocess.errors import InvalidInput
from emprocess.geometry import CUBE_PX, Box

log = logging.getLogger(__name__)

DEFAULT_CUBE_PX = CUBE_PX
DEFAULT_CHUNK_PX = 64
DEFAULT_NUM_SCALES = 6
# A shard holds at most this many voxels per side. A shard nested in a cube still
# belongs to one request, and the writer commits one z-slab of shards at a time,
# so a full 1024^3 cube never sits uncompressed in one tensorstore transaction.
MAX_SHARD_PX = 512

Encoding = Literal["jpeg", "raw"]
DataEncoding = Literal["raw", "gzip"]
#: How the lossless pyramid stores its chunks inside the shards by default. Measured
#: with tensorstore on EM data (``emprocess bench emwrite --codecs``): gzip
#: (its level is fixed) costs 35 ns of CPU per voxel written for 0.81 of the bytes,
#: seven times JPEG's 5 ns; PNG level 1 33 ns for 0.83, PNG at the default level 56 ns
#: for 0.63; uncompressed 2 ns. Neuroglancer, tensorstore and cloud-volume read all
#: of them.
RAW_DATA_ENCODING: DataEncoding = "raw"


ResolutionNm = float | Sequence[float]
"""Voxel size at scale 0 in nm: one number (isotropic) or (x, y, z)."""


def resolution_xyz(resolution_nm: ResolutionNm) -> tuple[float, float, float]:
    """(x, y, z) in nm from one number or three; each must be finite and > 0."""
    values = list(resolution_nm) if isinstance(resolution_nm, Sequence) else [resolution_nm] * 3
    try:
        res = [float(v) for v in values]
    except (TypeError, ValueError):
        res = []
    if len(res) != 3 or not all(math.isfinite(r) and r > 0 for r in res):
        raise InvalidInput(
            f"resolution must be a finite number of nm > 0, or [x, y, z] of them, "
            f"got {resolution_nm!r}"
        )
    return res[0], res[1], res[2]


def downsample_factors_xyz(
    resolution_nm: ResolutionNm, num_scales: int
) -> list[tuple[int, int, int]]:
    """Each scale's shrink factor per axis relative to scale 0: near-isotropic downsampling.

    neuroglancer's ``compute_near_isotropic_downsampling_scales`` (igneous uses the same):
    each step doubles the axis with the smallest current voxel, and every other axis
    whose voxel is closer to that doubled size when doubled too. Isotropic voxels double
    all three every step; 4 x 4 x 40 nm gives x, y factors 1, 2, 4, 8, 16, 32 and z
    factors 1, 1, 1, 1, 2, 4 (voxels 4x4x40, 8x8x40, 16x16x40, 32x32x40, 64x64x80, ...).
    """
    res = resolution_xyz(resolution_nm)
    factor = [1, 1, 1]
    out = [(1, 1, 1)]
    while len(out) < num_scales:
        voxel = [f * r for f, r in zip(factor, res, strict=True)]
        smallest = min(range(3), key=lambda d: voxel[d])
        target = voxel[smallest] * 2
        factor[smallest] *= 2
        for d in range(3):
            if d != smallest and abs(voxel[d] - target) > abs(voxel[d] * 2 - target):
                factor[d] *= 2
        out.append((factor[0], factor[1], factor[2]))
    return out


@dataclass(frozen=True)
class ScaleLayout:
    """How one scale is cut, all per axis (x, y, z) in the scale's voxels."""

    factor: tuple[int, int, int]  # shrink factor relative to scale 0
    cube: tuple[int, int, int]  # what one /ngshard cube spans
    chunk: tuple[int, int, int]
    shard: tuple[int, int, int]  # what one shard file spans (divides ``cube``)


def scale_layouts(
    resolution_nm: ResolutionNm,
    num_scales: int = DEFAULT_NUM_SCALES,
    chunk: int = DEFAULT_CHUNK_PX,
    cube: int = DEFAULT_CUBE_PX,
) -> list[ScaleLayout]:
    """The layout of every scale: factors, cube, chunk and shard sides (see module doc)."""
    _check_cube_chunk(cube, chunk)
    out = []
    for s, factor in enumerate(downsample_factors_xyz(resolution_nm, num_scales)):
        if max(factor) > cube:
            raise InvalidInput(f"scale {s} leaves less than one voxel per cube of {cube}")
        cube_s = tuple(cube // f for f in factor)
        chunk_s = tuple(max(1, min(chunk, c)) for c in cube_s)
        k = min(_bits(min(c, MAX_SHARD_PX) // ch) for c, ch in zip(cube_s, chunk_s, strict=True))
        shard_s = tuple(ch << k for ch in chunk_s)
        out.append(
            ScaleLayout(
                factor,
                (cube_s[0], cube_s[1], cube_s[2]),
                (chunk_s[0], chunk_s[1], chunk_s[2]),
                (shard_s[0], shard_s[1], shard_s[2]),
            )
        )
    return out


def plan_cubes(
    bbox_xy: tuple[int, int],
    minz: int,
    maxz: int,
    cube: int = DEFAULT_CUBE_PX,
) -> list[tuple[int, int, int]]:
    """Every /ngshard request's ``start`` [x, y, z], in units of ``cube``.

    Cube (cx, cy, cz) covers canvas x [cx * cube, (cx + 1) * cube), y likewise, and
    slices ``minz + cz * cube`` .. ``minz + (cz + 1) * cube - 1`` (clipped to the volume),
    so a ``minz`` that is not a multiple of ``cube`` still gives full cubes.

    Args:
        bbox_xy: canvas (width, height) in pixels.
        minz: first slice, inclusive.
        maxz: last slice, inclusive.
        cube: cube side in scale-0 voxels.

    Returns:
        (cx, cy, cz) tuples, z slowest, then y, then x.
    """
    size_xyz = _size0_xyz(bbox_xy, minz, maxz)
    _check_cube_chunk(cube, 1)
    nx, ny, nz = (math.ceil(s / cube) for s in size_xyz)
    return [(cx, cy, cz) for cz in range(nz) for cy in range(ny) for cx in range(nx)]


def scale_size_xyz(size0_xyz: Sequence[int], scale: int) -> tuple[int, int, int]:
    """Volume size in voxels at ``scale``: ceil(size0 / 2**scale) per axis."""
    f = 1 << scale
    sx, sy, sz = (-(-int(s) // f) for s in size0_xyz)
    return sx, sy, sz


def scaled_size_xyz(size0_xyz: Sequence[int], factor_xyz: Sequence[int]) -> tuple[int, int, int]:
    """Volume size in voxels shrunk by ``factor_xyz``: ceil(size0 / factor) per axis."""
    sx, sy, sz = (-(-int(s) // int(f)) for s, f in zip(size0_xyz, factor_xyz, strict=True))
    return sx, sy, sz


def scale_chunk_px(scale: int, chunk: int = DEFAULT_CHUNK_PX, cube: int = DEFAULT_CUBE_PX) -> int:
    """Chunk side at ``scale``: ``chunk``, shrunk so that a chunk never spans two cubes."""
    return max(1, min(chunk, cube >> scale))


def cube_bounds_xyz(
    start: Sequence[int],
    bbox_xy: tuple[int, int],
    minz: int,
    maxz: int,
    scale: int,
    cube: int = DEFAULT_CUBE_PX,
    factor_xyz: Sequence[int] | None = None,
) -> Box:
    """Voxel box [lo, hi) of cube ``start`` at ``scale``, in the scale's coordinates.

    The coordinates include ``voxel_offset`` (so z starts at ``minz >> scale``), i.e.
    they index the scale exactly as neuroglancer and tensorstore do.

    Args:
        start: the cube (cx, cy, cz) from ``plan_cubes``.
        bbox_xy: canvas (width, height) in pixels.
        minz: first slice, inclusive.
        maxz: last slice, inclusive.
        scale: pyramid level, 0 = full resolution.
        cube: cube side in scale-0 voxels.
        factor_xyz: the scale's shrink factor per axis (:func:`downsample_factors_xyz`);
            None means 2**scale on every axis (isotropic voxels).

    Returns:
        (lo_xyz, hi_xyz), hi exclusive and clipped to the volume.
    """
    factor = [1 << scale] * 3 if factor_xyz is None else [int(f) for f in factor_xyz]
    size_xyz = scaled_size_xyz(_size0_xyz(bbox_xy, minz, maxz), factor)
    sides = [cube // f for f in factor]
    if min(sides) < 1:
        raise InvalidInput(f"scale {scale} leaves less than one voxel per cube of {cube}")
    offset = (0, 0, minz // factor[2])
    lo = [0, 0, 0]
    hi = [0, 0, 0]
    for d in range(3):
        c = int(start[d])
        if c < 0 or c * sides[d] >= size_xyz[d]:
            raise InvalidInput(f"cube start {list(start)!r} is outside the volume {size_xyz}")
        lo[d] = offset[d] + c * sides[d]
        hi[d] = offset[d] + min(size_xyz[d], (c + 1) * sides[d])
    return Box((lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2]))


def compressed_morton_code(grid_xyz: Sequence[int], grid_size_xyz: Sequence[int]) -> int:
    """Neuroglancer's compressed Morton code (chunk id) of one chunk grid position.

    Bit i of x, y, z in that order for i = 0, 1, ..., where a dimension contributes
    bit i only while ``2**i < grid_size`` (neuroglancer precomputed volume.md).
    """
    code = 0
    j = 0
    for i in range(max(_bits(g) for g in grid_size_xyz)):
        for d in range(3):
            if (1 << i) < grid_size_xyz[d]:
                code |= ((int(grid_xyz[d]) >> i) & 1) << j
                j += 1
    return code


def shard_number(chunk_id: int, sharding: dict[str, Any]) -> int:
    """Shard that holds ``chunk_id`` under an identity-hash sharding spec."""
    if sharding.get("hash") != "identity":
        raise InvalidInput(f"only the identity hash is supported, got {sharding.get('hash')!r}")
    hashed = chunk_id >> sharding["preshift_bits"]
    return (hashed >> sharding["minishard_bits"]) & ((1 << sharding["shard_bits"]) - 1)


def shard_filename(shard: int, shard_bits: int) -> str:
    """``<shard>.shard``: lowercase hex zero-padded to ceil(shard_bits / 4) digits."""
    digits = -(-shard_bits // 4)
    return f"{shard:0{digits}x}.shard" if digits else f"{shard:x}.shard"


def sharding_spec(
    size_xyz: Sequence[int],
    chunk_px: int | Sequence[int],
    cube_px: int | Sequence[int],
    data_encoding: DataEncoding,
) -> dict[str, Any]:
    """Sharding for one scale such that each shard holds exactly one cube's chunks.

    Args:
        size_xyz: the scale's size in voxels.
        chunk_px: the scale's chunk side in voxels, or one per axis; divides ``cube_px``.
        cube_px: the box one shard covers at this scale in voxels (a cube, ``cube >>
            scale``, or a power-of-two part of one), or one per axis; it must span the
            same number of chunks along every axis.
        data_encoding: "raw" (stored as they are: JPEG chunks, or uncompressed voxels)
            or "gzip".

    Returns:
        A ``neuroglancer_uint64_sharded_v1`` spec. Of the ``b`` within-cube bits (see
        module doc), half (rounded down) index minishards and the rest are preshifted,
        so runs of ``2**preshift_bits`` Morton-adjacent chunks share a minishard index.
    """
    chunks = [int(chunk_px)] * 3 if isinstance(chunk_px, int) else [int(c) for c in chunk_px]
    boxes = [int(cube_px)] * 3 if isinstance(cube_px, int) else [int(c) for c in cube_px]
    for box, ch in zip(boxes, chunks, strict=True):
        _check_cube_chunk(box, ch)
    spans = {box // ch for box, ch in zip(boxes, chunks, strict=True)}
    if len(spans) != 1:
        raise InvalidInput(
            f"a shard box {boxes} must span the same number of chunks {chunks} on every axis"
        )
    k = _bits(spans.pop())
    grid = [math.ceil(int(s) / ch) for s, ch in zip(size_xyz, chunks, strict=True)]
    bits = [_bits(g) for g in grid]
    within = sum(min(k, b) for b in bits)
    minishard_bits = within // 2
    return {
        "@type": "neuroglancer_uint64_sharded_v1",
        "hash": "identity",
        "preshift_bits": within - minishard_bits,
        "minishard_bits": minishard_bits,
        "shard_bits": sum(bits) - within,
        "minishard_index_encoding": "gzip",
        "data_encoding": data_encoding,
    }


def build_info(
    bbox_xy: tuple[int, int],
    minz: int,
    maxz: int,
    resolution_nm: ResolutionNm,
    encoding: Encoding = "jpeg",
    num_scales: int = DEFAULT_NUM_SCALES,
    chunk: int = DEFAULT_CHUNK_PX,
    cube: int = DEFAULT_CUBE_PX,
    raw_data_encoding: DataEncoding = RAW_DATA_ENCODING,
    data_type: Literal["uint8", "uint16"] = "uint8",
    num_channels: int = 1,
) -> dict[str, Any]:
    """The precomputed ``info`` of the JPEG pyramid or of the lossless raw pyramid.

    Scale s has ``size`` ceil(size0 / f) with size0 = [width, height, maxz - minz + 1]
    and f its factor per axis (2**s for isotropic voxels, see
    :func:`downsample_factors_xyz`), ``voxel_offset`` [0, 0, floor(minz / f_z)],
    ``resolution`` resolution_nm * f, the chunk size and sharding of
    :func:`scale_layouts`. At coarse scales the floor puts the data up to one voxel
    (less than f_z slices) below its true z position when minz is not a multiple of
    f_z: the pyramid is built from cubes that start at minz, and voxel offsets must be
    integers.

    The JPEG pyramid stores JPEG chunks as they are ("data_encoding": "raw"); the raw
    pyramid stores exact voxels ("encoding": "raw") inside the shards, uncompressed by
    default (``RAW_DATA_ENCODING``: gzip cost seven times the CPU of JPEG) or
    gzipped; neuroglancer and tensorstore read either at every scale.
    JPEG quality is not part of the info format; the writer sets it.

    Args:
        bbox_xy: canvas (width, height) in pixels.
        minz: first slice, inclusive (>= 0).
        maxz: last slice, inclusive (>= minz).
        resolution_nm: voxel size at scale 0 in nanometres: one number or (x, y, z).
        encoding: "jpeg" (the viewed pyramid) or "raw" (lossless).
        num_scales: number of scales, at most log2(cube) + 1.
        chunk: largest chunk side in voxels, a power of two.
        cube: side of the cube one /ngshard request writes, a power of two.
        raw_data_encoding: "raw" (uncompressed) or "gzip": the shard data encoding of
            the lossless pyramid; the JPEG pyramid's is always "raw".
        data_type: "uint8", or "uint16" for a lossless pyramid of 16-bit voxels (JPEG
            is 8-bit only).
        num_channels: channels per voxel; a JPEG volume holds 1 or 3 (the format's).

    Returns:
        The info as a JSON-ready dict with standard keys only.
    """
    size0 = _size0_xyz(bbox_xy, minz, maxz)
    _check_cube_chunk(cube, chunk)
    if encoding not in ("jpeg", "raw"):
        raise InvalidInput(f"encoding must be 'jpeg' or 'raw', got {encoding!r}")
    if raw_data_encoding not in ("raw", "gzip"):
        raise InvalidInput(f"raw_data_encoding must be 'raw' or 'gzip', got {raw_data_encoding!r}")
    if data_type not in ("uint8", "uint16") or (encoding == "jpeg" and data_type != "uint8"):
        raise InvalidInput(f"a {encoding} volume cannot hold {data_type!r} voxels")
    if num_channels not in ((1, 3) if encoding == "jpeg" else (1, 2, 3, 4)):
        raise InvalidInput(f"a {encoding} volume cannot hold {num_channels} channels")
    res0 = resolution_xyz(resolution_nm)
    max_scales = _bits(cube) + 1
    if not 1 <= num_scales <= max_scales:
        raise InvalidInput(
            f"num_scales must be in [1, {max_scales}] for cube {cube}, got {num_scales}"
        )

    scales = []
    for layout in scale_layouts(res0, num_scales, chunk, cube):
        res = [_nm(r * f) for r, f in zip(res0, layout.factor, strict=True)]
        size = scaled_size_xyz(size0, layout.factor)
        scales.append(
            {
                "key": "_".join(str(r) for r in res),
                "size": list(size),
                "voxel_offset": [0, 0, minz // layout.factor[2]],
                "resolution": res,
                "chunk_sizes": [list(layout.chunk)],
                "encoding": encoding,
                "sharding": sharding_spec(
                    size,
                    layout.chunk,
                    layout.shard,
                    "raw" if encoding == "jpeg" else raw_data_encoding,
                ),
            }
        )
    log.debug("built %s info for size %s with %d scales", encoding, size0, num_scales)
    return {
        "@type": "neuroglancer_multiscale_volume",
        "type": "image",
        "data_type": data_type,
        "num_channels": num_channels,
        "scales": scales,
    }


def _nm(value: float) -> float | int:
    """A resolution as JSON writes it best: 8 rather than 8.0."""
    return int(value) if value.is_integer() else value


def _bits(n: int) -> int:
    """Bits needed for values 0 .. n-1 (0 for n <= 1)."""
    return max(0, int(n) - 1).bit_length()


def _size0_xyz(bbox_xy: Sequence[int], minz: int, maxz: int) -> tuple[int, int, int]:
    if len(bbox_xy) != 2 or min(int(v) for v in bbox_xy) < 1:
        raise InvalidInput(f"bbox must be [width, height] >= 1 px, got {bbox_xy!r}")
    if minz < 0 or maxz < minz:
        raise InvalidInput(f"need 0 <= minz <= maxz, got minz={minz}, maxz={maxz}")
    return int(bbox_xy[0]), int(bbox_xy[1]), int(maxz) - int(minz) + 1


def _check_cube_chunk(cube: int, chunk: int) -> None:
    for name, v in (("cube", cube), ("chunk", chunk)):
        if v < 1 or v & (v - 1):
            raise InvalidInput(f"{name} must be a power of two >= 1, got {v}")
    if chunk > cube:
        raise InvalidInput(f"chunk {chunk} must not exceed cube {cube}")
