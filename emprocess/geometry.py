"""The grid every volume is cut on: the tile/cube side, and the one box type.

``TILE_PX`` is the side of a tile of the tmp bucket's tiled slices and of an /ngshard
cube (the original's ``shard-size`` 1024, which requests still carry and must equal).
Tiles and cubes share it so that one cube reads exactly one tile of each of its slices.

Boxes are half-open, ``[lo, hi)``, in voxels, axes in (x, y, z) order; arrays cut from
them are (z, y, x). Both types are named tuples, so they unpack and compare as the
plain tuples earlier code used.

Standard library only: kernels, services and the DAG's parse-time code import it.
"""

from __future__ import annotations

from typing import NamedTuple

TILE_PX = 1024
"""Side of a tile of a tiled slice, and of an /ngshard cube, in scale-0 voxels."""
CUBE_PX = TILE_PX
"""Side of an /ngshard cube at scale 0: one tile of each of its slices."""

XYZ = tuple[int, int, int]


class RectXY(NamedTuple):
    """A rectangle of the canvas, ``[x0, x1) x [y0, y1)`` in pixels."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def tile_xy(self, tile_px: int = TILE_PX) -> tuple[int, int]:
        """The (tx, ty) of the one tile holding the rectangle; ValueError when it spans two."""
        tx, ty = self.x0 // tile_px, self.y0 // tile_px
        if (self.x1 - 1) // tile_px != tx or (self.y1 - 1) // tile_px != ty or self.x1 <= self.x0:
            raise ValueError(f"{self} is not inside one {tile_px} px tile")
        return tx, ty


class Box(NamedTuple):
    """A ``[lo, hi)`` voxel box of one scale, (x, y, z), in the scale's coordinates."""

    lo: XYZ
    hi: XYZ

    @property
    def shape_zyx(self) -> XYZ:
        """The shape of the (z, y, x) array the box holds."""
        return self.hi[2] - self.lo[2], self.hi[1] - self.lo[1], self.hi[0] - self.lo[0]

    @property
    def rect_xy(self) -> RectXY:
        """The box seen from above."""
        return RectXY(self.lo[0], self.lo[1], self.hi[0], self.hi[1])

    @classmethod
    def of(cls, rect: RectXY, z_lo: int, z_hi: int) -> Box:
        """The box over ``rect`` of slices ``[z_lo, z_hi)``."""
        return cls((rect.x0, rect.y0, z_lo), (rect.x1, rect.y1, z_hi))
