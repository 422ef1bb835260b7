"""One aligned slice rendered: intensity window, warp, CLAHE, tiles and thumbnail, arrays in, bytes out.

The work of POST /alignedslice without its storage: the service decodes the slice,
maps it to 8 bits, lets the source go, calls :func:`stream_slice` and writes its tiles
while they are made (``storage.write_stream``); the benchmark drives the same function
through the service. Memory stays bounded: the canvas is processed in windows of at
most ``window_px`` per side (plus one CLAHE tile of context), which stitch
bit-identically (see :mod:`emprocess.kernels.clahe`), and a tile is held only until
every tile before it in the object's row-major order is made (at most one row of
windows), never the whole tiles object. :func:`render_slice` joins the same bytes in
memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from emprocess.geometry import TILE_PX
from emprocess.kernels import tiles
from emprocess.kernels.clahe import clahe_source_region, clahe_window, plan_windows
from emprocess.kernels.downsample import shrink_mean
from emprocess.kernels.intensity import Window, to_uint8
from emprocess.kernels.warp import warp_window

THUMB_MAX_PX = 4096
# A thumbnail is at least 4x smaller than the canvas: they are for looking at, and
# the PNG of a 2x thumbnail of a 2168 x 2131 canvas cost 21 ms against 5.6 ms at 4x
# (a tenth of the whole /alignedslice).
THUMB_MIN_FACTOR = 4
THUMB_PNG_PARAMS = tiles.PNG_FAST_PARAMS


@dataclass(frozen=True)
class RenderedSlice:
    """A slice in the canvas: its tiles object (header + tiles) and its thumbnail."""

    tiles_object: bytes
    thumbnail: np.ndarray  # (ceil(h / f), ceil(w / f)) uint8, f = thumbnail_factor


def thumbnail_factor(width: int, height: int) -> int:
    """Power-of-two shrink factor of the thumbnail: >= THUMB_MIN_FACTOR, sides <= THUMB_MAX_PX."""
    f = 1 << max(0, math.ceil(math.log2(max(width, height) / THUMB_MAX_PX)))
    return max(f, THUMB_MIN_FACTOR)


@dataclass
class StreamedTiles:
    """A slice's tiles object made while it is written: ``parts`` yields the tiles
    row-major as they are made; ``header()`` (``header_nbytes`` long) is ready once
    ``parts`` is exhausted, and so is ``thumbnail`` (of a :func:`stream_slice`)."""

    parts: Iterator[bytes]
    header: Callable[[], bytes]
    header_nbytes: int
    thumbnail: np.ndarray | None = None

    def join(self) -> bytes:
        """The whole object in memory (small slices, tests)."""
        payloads = list(self.parts)
        return b"".join([self.header(), *payloads])


def stream_slice(
    image: np.ndarray,
    transform: Sequence[float],
    bbox_xy: tuple[int, int],
    clip_limit: float,
    window: Window | None = None,
    *,
    tile_px: int = TILE_PX,
    window_px: int = 12288,
    codec: tiles.Codec = "raw",
) -> StreamedTiles:
    """Map to 8 bits, warp into the canvas (bicubic, fill 0), CLAHE, cut into tiles.

    Memory: the 8-bit slice, one processing window (``window_px`` plus a CLAHE tile of
    context per side, warped and equalised) and the tiles that wait for a tile before
    them in row-major order (at most one row of windows' worth): the tiles object is
    never whole in memory when the caller writes ``parts`` as they come.

    Args:
        image: (H, W) uint8 or uint16 slice as decoded (a uint16 one is mapped to 8 bits
            first; callers that can drop it pass ``to_uint8(image, window)`` instead).
        transform: 6 numbers (mpicbg order) mapping slice pixels into the canvas.
        bbox_xy: canvas (width, height) in pixels.
        clip_limit: CLAHE clip limit; 0 skips CLAHE.
        window: the run's intensity window; None keeps uint8 as is, uint16 / 257.
        tile_px: tile side (also the CLAHE kernel and window granularity).
        window_px: largest processing window side.
        codec: how tiles are stored ("raw" or "png").
    """
    width, height = bbox_xy
    image = to_uint8(image, window)
    f = thumbnail_factor(width, height)
    thumb = np.zeros((-(-height // f), -(-width // f)), np.uint8)
    order = tiles.TileOrder(width, height, tile_px, np.uint8, codec)
    nx = -(-width // tile_px)

    def parts() -> Iterator[bytes]:
        with ThreadPoolExecutor(2) as pool:
            for win in plan_windows(width, height, window_px, tile_px):
                x0, y0, w, h = win
                region = clahe_source_region(win, (height, width)) if clip_limit > 0 else win
                canvas = warp_window(image, list(transform), region)
                out = clahe_window(
                    canvas, region[:2], (height, width), win, clip_limit, preserve_zero=True
                )
                del canvas
                made: dict[int, Any] = {}
                for ty in range(y0 // tile_px, -(-(y0 + h) // tile_px)):
                    for tx in range(x0 // tile_px, -(-(x0 + w) // tile_px)):
                        ox, oy = tx * tile_px - x0, ty * tile_px - y0
                        tile = out[oy : oy + tile_px, ox : ox + tile_px]
                        if codec == "raw":  # a copy: no thread needed
                            made[ty * nx + tx] = tiles.encode_tile(tile, codec)
                        else:
                            made[ty * nx + tx] = pool.submit(tiles.encode_tile, tile, codec)
                small = shrink_mean(out, f)  # windows start on multiples of f
                thumb[y0 // f : y0 // f + small.shape[0], x0 // f : x0 // f + small.shape[1]] = (
                    small
                )
                for i, job in made.items():
                    yield from order.add(i, job if isinstance(job, bytes) else job.result())
                del out, made

    return StreamedTiles(parts(), order.header, order.header_nbytes, thumb)


def render_slice(
    image: np.ndarray,
    transform: Sequence[float],
    bbox_xy: tuple[int, int],
    clip_limit: float,
    window: Window | None = None,
    *,
    tile_px: int = TILE_PX,
    window_px: int = 12288,
    codec: tiles.Codec = "raw",
) -> RenderedSlice:
    """:func:`stream_slice` with the tiles object joined in memory (same arguments)."""
    streamed = stream_slice(
        image,
        transform,
        bbox_xy,
        clip_limit,
        window,
        tile_px=tile_px,
        window_px=window_px,
        codec=codec,
    )
    data = streamed.join()
    assert streamed.thumbnail is not None
    return RenderedSlice(data, streamed.thumbnail)


def colour_thumbnail(thumbs: Sequence[np.ndarray]) -> np.ndarray:
    """One thumbnail of a colour slice from its channels' (RGB(A) order): BGR for
    OpenCV from the first three, the first alone when there are fewer."""
    if len(thumbs) < 3:
        return thumbs[0]
    return np.dstack([thumbs[2], thumbs[1], thumbs[0]])


def encode_thumbnail(thumb: np.ndarray, name: str) -> bytes:
    """The thumbnail as TIFF when the slice ``name`` is one, else as a fast PNG."""
    ext = os.path.splitext(name)[1].lower()
    if ext in (".tif", ".tiff"):
        ok, data = cv2.imencode(ext, thumb)
    else:
        ok, data = cv2.imencode(".png", thumb, THUMB_PNG_PARAMS)
    if not ok:
        raise RuntimeError(f"could not encode the thumbnail of {name}")
    return data.tobytes()


def stream_source_tiles(
    image: np.ndarray,
    transform: Sequence[float],
    bbox_xy: tuple[int, int],
    *,
    tile_px: int = TILE_PX,
    window_px: int = 12288,
    codec: tiles.Codec = "raw",
) -> StreamedTiles:
    """The slice warped into the canvas at its own bit depth (no window, no CLAHE), as tiles
    made while they are written (see :class:`StreamedTiles`).

    What a lossless volume that keeps 16-bit source values is built from.

    Args:
        image: (H, W) uint8 or uint16 slice as decoded.
        transform: 6 numbers (mpicbg order) mapping slice pixels into the canvas.
        bbox_xy: canvas (width, height) in pixels.
        tile_px: tile side.
        window_px: largest processing window side.
        codec: how tiles are stored ("raw" or "png").
    """
    width, height = bbox_xy
    nx = -(-width // tile_px)
    order = tiles.TileOrder(width, height, tile_px, image.dtype, codec)

    def parts() -> Iterator[bytes]:
        for win in plan_windows(width, height, window_px, tile_px):
            x0, y0, w, h = win
            out = warp_window(image, list(transform), win)
            for ty in range(y0 // tile_px, -(-(y0 + h) // tile_px)):
                for tx in range(x0 // tile_px, -(-(x0 + w) // tile_px)):
                    ox, oy = tx * tile_px - x0, ty * tile_px - y0
                    tile = out[oy : oy + tile_px, ox : ox + tile_px]
                    yield from order.add(ty * nx + tx, tiles.encode_tile(tile, codec))
            del out

    return StreamedTiles(parts(), order.header, order.header_nbytes)


def render_source_tiles(
    image: np.ndarray,
    transform: Sequence[float],
    bbox_xy: tuple[int, int],
    *,
    tile_px: int = TILE_PX,
    window_px: int = 12288,
    codec: tiles.Codec = "raw",
) -> bytes:
    """:func:`stream_source_tiles` joined in memory (same arguments)."""
    return stream_source_tiles(
        image, transform, bbox_xy, tile_px=tile_px, window_px=window_px, codec=codec
    ).join()
