"""A cube's pyramid written scale by scale, behind one seam for the output format.

:func:`write_pyramid` owns the scales: it reads scale 0 in z-slabs, hands every block
to each :class:`VolumeWriter`, and downsamples per :class:`~emprocess.kernels.ngmeta.ScaleLayout`
(2x2x2, or 2x2x1 while anisotropic voxels keep z). A writer owns the format:
:class:`PrecomputedWriter` writes neuroglancer precomputed shards with tensorstore;
another format (OME-Zarr) is another writer, not edits across the service.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from emprocess import storage
from emprocess.kernels.downsample import downsample_mean_steps
from emprocess.kernels.ngmeta import ScaleLayout
from emprocess.services.shardfiles import ShardFiles

Box = tuple[tuple[int, int, int], tuple[int, int, int]]
"""[lo, hi) voxel box (x, y, z) of one scale, in the scale's coordinates."""


class VolumeWriter(Protocol):
    """Where a cube's blocks go: one output volume in one format."""

    def write(self, scale: int, lo_xyz: tuple[int, int, int], data_zyx: np.ndarray) -> None:
        """Write a (z, y, x) or (z, y, x, channel) block of ``scale`` at voxel ``lo_xyz``."""


class ChannelsWriter:
    """Hands a writer ``count`` channels from ``first`` of (z, y, x, channel) blocks."""

    def __init__(self, inner: VolumeWriter, first: int, count: int) -> None:
        self.inner, self.first, self.count = inner, first, count

    def write(self, scale: int, lo_xyz: tuple[int, int, int], data_zyx: np.ndarray) -> None:
        """Write the block's channels (one channel as a (z, y, x) block)."""
        if self.count == 1:
            part = data_zyx[..., self.first]
        else:
            part = data_zyx[..., self.first : self.first + self.count]
        self.inner.write(scale, lo_xyz, part)


class PrecomputedWriter:
    """A neuroglancer precomputed volume (its ``info`` written already), one shard at a time."""

    def __init__(self, url: str, layouts: Sequence[ScaleLayout], context: Any) -> None:
        import tensorstore as ts

        spec = storage.kvstore_spec(url)
        self.shards = ShardFiles.of(url)  # stale locks removed, each shard read back
        self.layouts = list(layouts)
        self.stores = [
            ts.open(
                {"driver": "neuroglancer_precomputed", "kvstore": spec, "scale_index": s},
                open=True,
                context=context,
            ).result()
            for s in range(len(self.layouts))
        ]

    def write(self, scale: int, lo_xyz: tuple[int, int, int], data_zyx: np.ndarray) -> None:
        """Write the block, one transaction per shard of the scale's layout.

        ``lo`` lies on the scale's shard grid (blocks start at cube or slab corners), so
        each transaction overwrites every chunk of exactly one shard: tensorstore then
        writes the shard file whole, without reading what is there (a truncated file
        left by a failed request is replaced), and holds one shard's chunks at a time
        (128 MiB uncompressed at 512^3) rather than the block's.
        """
        import tensorstore as ts

        store = self.stores[scale]
        nz, ny, nx = data_zyx.shape[:3]
        channels = slice(None) if data_zyx.ndim == 4 else 0
        x, y, z = lo_xyz
        sx, sy, sz = self.layouts[scale].shard
        for dz in range(0, nz, sz):
            for dy in range(0, ny, sy):
                for dx in range(0, nx, sx):
                    part = data_zyx[dz : dz + sz, dy : dy + sy, dx : dx + sx]
                    pz, py, px = part.shape[:3]
                    key = self.shards.key(scale, (x + dx, y + dy, z + dz))
                    if key:
                        self.shards.remove_stale_locks(key)
                    txn = ts.Transaction()
                    view = store.with_transaction(txn)[
                        x + dx : x + dx + px, y + dy : y + dy + py, z + dz : z + dz + pz, channels
                    ]
                    view.write(np.swapaxes(part, 0, 2)).result()
                    txn.commit_async().result()
                    if key:
                        self.shards.check(scale, key)


ReadSlab = Callable[[int, int], np.ndarray]
"""Reads scale-0 slices [z_lo, z_hi) of the cube as a (z, y, x) array."""


def write_pyramid(
    read_slab: ReadSlab,
    boxes: Sequence[Box],
    layouts: Sequence[ScaleLayout],
    writers: Sequence[VolumeWriter],
    slab_z: int,
) -> dict[str, float]:
    """Write every scale of one cube to every writer.

    Scale 0 is read and written in z-slabs of ``slab_z`` (bounded memory); scale 1 is
    collected slab by slab, and each further scale is the previous one downsampled.

    Args:
        read_slab: the cube's scale-0 voxels of slices [z_lo, z_hi).
        boxes: the cube's [lo, hi) box at every scale (``ngmeta.cube_bounds_xyz``).
        layouts: every scale's layout (``ngmeta.scale_layouts``).
        writers: the output volumes.
        slab_z: slices per scale-0 slab, a multiple of the scale-0 shard depth.

    Returns:
        Seconds spent reading, writing and downsampling.
    """
    steps = [
        (b.factor[2] // a.factor[2], b.factor[1] // a.factor[1], b.factor[0] // a.factor[0])
        for a, b in itertools.pairwise(layouts)
    ]
    (lx, ly, lz), (_, _, hz) = boxes[0]
    timings = {"read_s": 0.0, "write_s": 0.0, "downsample_s": 0.0}
    halves: list[np.ndarray] = []
    for z_lo in range(lz, hz, slab_z):
        t = time.perf_counter()
        slab = read_slab(z_lo, min(hz, z_lo + slab_z))
        timings["read_s"] += time.perf_counter() - t
        t = time.perf_counter()
        for writer in writers:
            writer.write(0, (lx, ly, z_lo), slab)
        timings["write_s"] += time.perf_counter() - t
        if steps:
            t = time.perf_counter()
            halves.append(_downsample(slab, steps[0]))
            timings["downsample_s"] += time.perf_counter() - t
        del slab
    if not steps:
        return timings
    level = np.concatenate(halves) if len(halves) > 1 else halves[0]
    del halves
    for s in range(1, len(layouts)):
        lo, hi = boxes[s]
        expected = (hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0])
        if level.shape[:3] != expected:
            raise RuntimeError(f"scale {s} block is {level.shape}, expected {expected}")
        t = time.perf_counter()
        for writer in writers:
            writer.write(s, lo, level)
        timings["write_s"] += time.perf_counter() - t
        if s < len(steps):
            t = time.perf_counter()
            level = _downsample(level, steps[s])
            timings["downsample_s"] += time.perf_counter() - t
    return timings


def _downsample(volume: np.ndarray, step_zyx: tuple[int, int, int]) -> np.ndarray:
    """:func:`downsample_mean_steps` of a (z, y, x) block, or of each channel of a
    (z, y, x, channel) one."""
    if volume.ndim == 3:
        return downsample_mean_steps(volume, step_zyx)
    return np.stack(
        [
            downsample_mean_steps(np.ascontiguousarray(volume[..., c]), step_zyx)
            for c in range(volume.shape[3])
        ],
        axis=-1,
    )
