"""Both IO seams of the tmp bucket's tiled slices: a slice's tiles written while they are
made, and boxes of a cube read back from the tiles of its slices.

The reader goes through a tensorstore kvstore of the tiles' folder: each slice costs two
range reads, its header and then its tile (the tile's offset is in the header); they are
issued asynchronously ``READ_BATCH`` slices at a time, so on GCS the round trips overlap,
and tensorstore's HTTP client costs about 0.5 ms of CPU per read where
google-cloud-storage's costs 3 ms.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.geometry import TILE_PX, RectXY
from emprocess.kernels import tiles
from emprocess.kernels.render import StreamedTiles
from emprocess.layout import tiles_key

if TYPE_CHECKING:
    from emprocess.volume import TiledSlices

READ_BATCH = 64  # slices whose tile reads are in flight at once (64 MiB of tiles)


def write_streamed(url: str, streamed: StreamedTiles, compute: list[float]) -> None:
    """Write a tiles object while it is made; add the seconds spent making it to compute[0]."""

    def timed() -> Iterator[bytes]:
        parts = iter(streamed.parts)
        while True:
            t = time.perf_counter()
            part = next(parts, None)
            compute[0] += time.perf_counter() - t
            if part is None:
                return
            yield part

    storage.write_stream(url, timed(), streamed.header, streamed.header_nbytes)


def _read_range(kv: Any, key: str, lo: int, hi: int) -> Any:
    """Start an async read of bytes [lo, hi) of ``key``."""
    return kv.read(key, byte_range=slice(lo, hi))


def _range_result(future: Any, what: str) -> bytes | None:
    """The bytes of a finished range read; None if the object is missing.

    A range beyond the object's end means the object was cut short: the caller's
    input is bad (400). Other storage errors propagate (500, retried by the DAG).
    """
    try:
        result = future.result()
    except ValueError as e:
        if str(e).startswith("OUT_OF_RANGE"):  # its text may name a local path: left out
            raise InvalidInput(f"{what} is cut short") from None
        raise
    return bytes(result.value) if result.state == "value" else None


class TileReader:
    """Reads scale-0 boxes of the canvas from one kind of tiled slices.

    Args:
        slices: which tiles (bucket, folder, pixel type).
        bbox_xy: the canvas (width, height) the slices were tiled from.
        context: the request's tensorstore context.
    """

    def __init__(self, slices: TiledSlices, bbox_xy: tuple[int, int], context: Any) -> None:
        import tensorstore as ts

        self.slices = slices
        self.width, self.height = bbox_xy
        self.dtype = np.dtype(slices.dtype)
        spec = storage.kvstore_spec(slices.folder_url)
        self.kv = ts.KvStore.open(spec, context=context).result()

    def __call__(self, z_lo: int, z_hi: int, rect: RectXY) -> np.ndarray:
        """Slices z_lo..z_hi-1 within ``rect`` (x0, y0, x1, y1), canvas pixels inside one
        tile, as a (z, y, x) array (a ``services.pyramid.ReadSlab``)."""
        box = RectXY(*rect)
        cx, cy = box.tile_xy(TILE_PX)
        slab: np.ndarray = np.empty((z_hi - z_lo, box.height, box.width), self.dtype)
        head_len = tiles.header_nbytes(self.width, self.height, TILE_PX)
        for b_lo in range(z_lo, z_hi, READ_BATCH):
            zs = range(b_lo, min(z_hi, b_lo + READ_BATCH))
            heads = [_read_range(self.kv, tiles_key(z), 0, head_len) for z in zs]
            bodies = []
            for z, head in zip(zs, heads, strict=True):
                url = self.slices.url(z)
                try:
                    data = _range_result(head, url)
                    index = (
                        None
                        if data is None
                        else tiles.parse_header(data, self.width, self.height, TILE_PX)
                    )
                except InvalidInput as e:
                    raise InvalidInput(f"aligned slice {z} ({url}) is unusable: {e}") from None
                if index is None:
                    raise InvalidInput(
                        f"aligned slice {z} is missing ({url}); run /alignedslice first"
                    )
                bodies.append(
                    (index, _read_range(self.kv, tiles_key(z), *index.byte_range(cx, cy)))
                )
            for z, (index, body) in zip(zs, bodies, strict=True):
                url = self.slices.url(z)
                try:
                    data = _range_result(body, url)
                    if data is None:
                        raise InvalidInput("it vanished while it was read")
                    tile = tiles.decode_tile(index, cx, cy, data)
                except InvalidInput as e:
                    raise InvalidInput(f"aligned slice {z} ({url}) is unusable: {e}") from None
                if tile.dtype != self.dtype:
                    raise InvalidInput(
                        f"aligned slice {z} ({url}) is {tile.dtype}, expected {self.dtype}"
                    )
                ox, oy = box.x0 - cx * TILE_PX, box.y0 - cy * TILE_PX
                slab[z - z_lo] = tile[oy : oy + box.height, ox : ox + box.width]
        return slab
