"""OME-Zarr 0.5 metadata of the lossless volume: one Zarr v3 group, one sharded array per scale.

The multiscale mirrors the precomputed lossless pyramid of :mod:`emprocess.kernels.ngmeta`
scale for scale (its :class:`~emprocess.kernels.ngmeta.ScaleLayout`: the same factors, so
anisotropic stacks get the same x/y-first pyramid), in Zarr's axis order: arrays are
(z, y, x), or (c, z, y, x) with channels, C order, ``dimension_names`` the axis names.

Index 0 of every array's z is slice ``minz`` (a precomputed volume shifts it by
``voxel_offset`` instead; Zarr has no offset): the cubes of /ngshard start at ``minz``, so
the shard grid (``chunk_grid`` = the layout's shard box, at most 512 per side, dividing the
cube) lines up with the cubes and every shard file belongs to exactly one /ngshard request
at every scale, with no Morton arithmetic. The slice position is put back by a
``translation`` of ``minz`` slices (corner convention: voxel i of scale s covers slices
``minz + i * f_z`` to ``minz + (i + 1) * f_z - 1``), written only when ``minz`` > 0.

Chunks (the sharding codec's inner chunks) are the precomputed volume's, 64^3 at the fine
scales: a neuroglancer cross-section at full resolution reads 64 slices of each chunk it
shows, the same trade as the precomputed volume's (measured there), and an analysis read
of a block gets 256 KiB per chunk. They are stored uncompressed (``bytes`` codec only), as
the precomputed lossless chunks are (``ngmeta.RAW_DATA_ENCODING``): every compressor cost
several times the write CPU for a fifth to a third of the bytes. The shard index is
``bytes`` + ``crc32c`` at the shard's end (tensorstore's and zarr-python's default).

Pure functions: JSON-ready dicts in, no storage.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from emprocess.errors import InvalidInput
from emprocess.kernels.ngmeta import (
    ResolutionNm,
    ScaleLayout,
    resolution_xyz,
    scale_layouts,
    scaled_size_xyz,
)

OME_VERSION = "0.5"
UNIT = "nanometer"
ZARR_JSON = "zarr.json"
"""The metadata document of every Zarr v3 node (group or array)."""

DataType = Literal["uint8", "uint16"]


def axis_names(num_channels: int) -> list[str]:
    """The arrays' dimension names: z, y, x, with a ``c`` axis first for channels."""
    return (["c"] if num_channels > 1 else []) + ["z", "y", "x"]


def dataset_path(scale: int) -> str:
    """Path of scale ``scale``'s array inside the group: ``"0"`` (full resolution), ``"1"``..."""
    return str(scale)


def array_shape(size0_xyz: Sequence[int], layout: ScaleLayout, num_channels: int) -> list[int]:
    """The array shape of one scale, (c,) z, y, x: the volume shrunk by the layout's factors."""
    sx, sy, sz = scaled_size_xyz(size0_xyz, layout.factor)
    return ([num_channels] if num_channels > 1 else []) + [sz, sy, sx]


def array_metadata(
    size0_xyz: Sequence[int], layout: ScaleLayout, data_type: DataType, num_channels: int
) -> dict[str, Any]:
    """The ``zarr.json`` of one scale's array: sharded (one shard per layout shard box),
    uncompressed inner chunks of the layout's chunk box, fill value 0.

    The channel axis is whole in every chunk, so a chunk holds all channels of its voxels
    (neuroglancer reads a channel axis that spans one chunk).
    """
    c = [num_channels] if num_channels > 1 else []
    shard = c + list(reversed(layout.shard))
    chunk = c + list(reversed(layout.chunk))
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": array_shape(size0_xyz, layout, num_channels),
        "data_type": data_type,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shard}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": chunk,
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                    "index_codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "crc32c"},
                    ],
                    "index_location": "end",
                },
            }
        ],
        "dimension_names": axis_names(num_channels),
        "attributes": {},
    }


def _number(value: float) -> float | int:
    """8 rather than 8.0 in the JSON."""
    return int(value) if float(value).is_integer() else float(value)


def group_metadata(
    layouts: Sequence[ScaleLayout],
    resolution_nm: ResolutionNm,
    minz: int,
    num_channels: int,
    name: str,
) -> dict[str, Any]:
    """The group's ``zarr.json``: OME-Zarr 0.5 ``multiscales`` under ``attributes.ome``.

    Args:
        layouts: every scale's layout (``ngmeta.scale_layouts``), high to low resolution.
        resolution_nm: scale 0's voxel size in nm: one number or (x, y, z).
        minz: the first slice (array index 0 of z).
        num_channels: 1 (grey) or more (a ``c`` axis first).
        name: the multiscale's name (the run id).
    """
    rx, ry, rz = resolution_xyz(resolution_nm)
    channel_axis = [{"name": "c", "type": "channel"}] if num_channels > 1 else []
    axes = channel_axis + [{"name": a, "type": "space", "unit": UNIT} for a in ("z", "y", "x")]
    datasets = []
    for s, layout in enumerate(layouts):
        fx, fy, fz = layout.factor
        scale = [1] * len(channel_axis) + [_number(rz * fz), _number(ry * fy), _number(rx * fx)]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if minz > 0:
            shift = [0] * len(channel_axis) + [_number(rz * minz), 0, 0]
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": dataset_path(s), "coordinateTransformations": transforms})
    return {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {
            "ome": {
                "version": OME_VERSION,
                "multiscales": [
                    {
                        "name": name,
                        "axes": axes,
                        "datasets": datasets,
                        "type": "mean",
                        "metadata": {
                            "description": "each scale the block mean of the one above "
                            "(2 per axis halved, rounded half up), as the precomputed volume"
                        },
                    }
                ],
            }
        },
    }


def volume_documents(
    bbox_xy: tuple[int, int],
    minz: int,
    maxz: int,
    resolution_nm: ResolutionNm,
    num_scales: int,
    data_type: DataType,
    num_channels: int,
    name: str,
    cube: int,
) -> dict[str, bytes]:
    """Every metadata document of the volume, by key relative to the group: ``zarr.json``
    and ``S/zarr.json`` per scale, as the bytes to write (the same input, the same bytes).
    """
    if not 1 <= num_channels <= 4:
        raise InvalidInput(f"an OME-Zarr volume holds 1 to 4 channels, got {num_channels}")
    if data_type not in ("uint8", "uint16"):
        raise InvalidInput(f"an OME-Zarr volume holds uint8 or uint16, got {data_type!r}")
    if minz < 0 or maxz < minz:
        raise InvalidInput(f"need 0 <= minz <= maxz, got minz={minz}, maxz={maxz}")
    layouts = scale_layouts(resolution_nm, num_scales, cube=cube)
    size0 = (int(bbox_xy[0]), int(bbox_xy[1]), maxz - minz + 1)
    docs = {ZARR_JSON: group_metadata(layouts, resolution_nm, minz, num_channels, name)}
    for s, layout in enumerate(layouts):
        docs[f"{dataset_path(s)}/{ZARR_JSON}"] = array_metadata(
            size0, layout, data_type, num_channels
        )
    return {key: _encode(doc) for key, doc in docs.items()}


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=1).encode()


def z_offset(minz: int, layout: ScaleLayout) -> int:
    """What to subtract from a scale's z (precomputed coordinates, ``minz // f_z`` at
    the first voxel) to get the array's z index."""
    return minz // layout.factor[2]
