"""CLAHE on a tile grid anchored to the canvas origin, computable window by window without seams.

The reference result ("CLAHE of the whole canvas") is defined as: pad the canvas on the
right and bottom by reflection (OpenCV's ``BORDER_REFLECT_101``, which is also what
``cv2.CLAHE`` does internally for sizes that do not divide) up to a multiple of
``kernel_size``, run ``cv2.createCLAHE`` with square ``kernel_size`` tiles, crop back.
So every tile is ``kernel_size`` px square and starts at a multiple of ``kernel_size``;
the canvas's last partial tile takes its histogram from its own pixels plus their
mirror image.

Why windows are exact: a tile's lookup table depends only on its own pixels, and an
output pixel depends only on its own value and the tables of the (up to) 4 tiles whose
centres surround it, i.e. its own tile and the neighbours towards it. OpenCV computes
the interpolation weights as ``x / kernel_size - 0.5`` in float32, which is exact for
power-of-two kernels and shifts by an integer between a crop starting at a multiple of
``kernel_size`` and the canvas. So CLAHE of a crop that is aligned to the tile grid and
holds the window's tiles plus one tile on every side (clamped to the canvas; at the
canvas edge the crop reaches the edge and is padded exactly like the canvas) gives the
window's pixels bit-identically (tested for kernels 256 and 1024).

Cost: OpenCV interpolates every pixel of the image it is given, the reflected padding
included (its own padding only evens sizes out to the tile count, so it cannot make
1024 px tiles of a canvas that is not a multiple of 1024). A canvas just over a tile
boundary pays for up to twice its area: 2168 x 2131 -> 3072^2, about 55 ms on one
core instead of about 25; at 16384^2 the padding adds 12%. A hand-written
interpolation over the real pixels only (cv2.remap on a table of the tiles' LUTs) was
measured at about 40 ms, so OpenCV's CLAHE stays.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import cv2
import numpy as np

from emprocess.errors import InvalidInput
from emprocess.kernels.warp import WindowXYWH, check_window

log = logging.getLogger(__name__)

DEFAULT_KERNEL_PX = 1024
DEFAULT_CLIP_LIMIT = 0.02
#: Histogram bins of uint8 data; OpenCV divides its clip limit by this number.
_HIST_BINS = 256


def opencv_clip_limit(clip_limit: float) -> float:
    """Convert a scikit-image style clip limit to OpenCV's ``clipLimit``.

    ``skimage.exposure.equalize_adapthist(clip_limit=c)`` clips each tile's
    256-bin histogram at ``int(c * tile_pixels)`` counts; ``cv2.createCLAHE(clipLimit=L)``
    clips at ``int(L * tile_pixels / 256)``. Equal limits therefore need ``L = 256 * c``
    (0.02 -> 5.12, i.e. 20971 counts per bin for 1024 x 1024 tiles in both). Only the
    limit matches: OpenCV redistributes the clipped counts and interpolates between
    tiles slightly differently from scikit-image, so outputs are close, not identical.
    """
    return float(clip_limit) * _HIST_BINS


def clahe_margin(kernel_size: int = DEFAULT_KERNEL_PX) -> int:
    """Pixels of canvas context needed on every side of a tile-aligned window.

    One whole tile: an output pixel interpolates between its tile's table and the
    neighbouring tile's table. For a window whose edges are not multiples of
    ``kernel_size`` the context reaches back to the previous grid line plus one tile;
    ``clahe_source_region`` gives the exact rectangle in every case.
    """
    _check_kernel(kernel_size)
    return kernel_size


def clahe_source_region(
    window: WindowXYWH,
    canvas_shape_hw: tuple[int, int],
    kernel_size: int = DEFAULT_KERNEL_PX,
) -> WindowXYWH:
    """The canvas rectangle whose pixels ``clahe_window`` needs to produce ``window``.

    Args:
        window: (x0, y0, width, height) wanted, in canvas pixels, inside the canvas.
        canvas_shape_hw: (height, width) of the whole canvas in pixels.
        kernel_size: CLAHE tile side in pixels (a power of two).

    Returns:
        (x0, y0, width, height): the window's tiles plus one tile on every side,
        aligned to the tile grid and clamped to the canvas.
    """
    _check_kernel(kernel_size)
    canvas_h, canvas_w = _check_canvas(canvas_shape_hw)
    x0, y0, w, h = check_window(window)
    if x0 < 0 or y0 < 0 or x0 + w > canvas_w or y0 + h > canvas_h:
        raise InvalidInput(
            f"window {window!r} must lie inside the canvas of width {canvas_w}, height {canvas_h}"
        )
    k = kernel_size
    sx0 = max(0, (x0 // k - 1) * k)
    sy0 = max(0, (y0 // k - 1) * k)
    sx1 = min(canvas_w, (-(-(x0 + w) // k) + 1) * k)
    sy1 = min(canvas_h, (-(-(y0 + h) // k) + 1) * k)
    return sx0, sy0, sx1 - sx0, sy1 - sy0


def clahe_window(
    canvas_region: np.ndarray,
    region_origin_xy: tuple[int, int],
    canvas_shape_hw: tuple[int, int],
    window: WindowXYWH,
    clip_limit: float = DEFAULT_CLIP_LIMIT,
    kernel_size: int = DEFAULT_KERNEL_PX,
    preserve_zero: bool = False,
) -> np.ndarray:
    """CLAHE of one window of the canvas, identical to that window of ``clahe_canvas``.

    Args:
        canvas_region: canvas pixels, shape (height, width), uint8, covering at least
            ``clahe_source_region(window, canvas_shape_hw, kernel_size)``.
        region_origin_xy: canvas position (x, y) of ``canvas_region[0, 0]``.
        canvas_shape_hw: (height, width) of the whole canvas in pixels.
        window: (x0, y0, width, height) to return, in canvas pixels.
        clip_limit: scikit-image style normalised clip limit (see ``opencv_clip_limit``);
            0 disables CLAHE and the window's pixels come back unchanged.
        kernel_size: CLAHE tile side in pixels, a power of two; tiles are anchored at
            canvas (0, 0).
        preserve_zero: keep pixels that are 0 in the input at 0. Plain CLAHE lifts the
            fill-0 canvas outside the warped slice to a dark grey (about 6 for clip 0.02,
            the lowest table entry of an all-0 tile); with this the margin stays black,
            which also compresses better. Zeros still count in the tile histograms.

    Returns:
        uint8 array of shape (window height, window width). It may be a view into a
        larger temporary array (or into ``canvas_region`` when clip_limit is 0).

    Raises:
        InvalidInput: wrong dtype, a region that misses needed pixels, bad clip limit.
    """
    region = np.asarray(canvas_region)
    if region.ndim != 2 or region.dtype != np.uint8:
        raise InvalidInput(
            f"canvas_region must be a 2-D uint8 array, got {region.dtype} {region.shape}"
        )
    clip = _check_clip(clip_limit)
    need = clahe_source_region(window, canvas_shape_hw, kernel_size)
    rx0, ry0 = (int(v) for v in region_origin_xy)
    nx0, ny0, nw, nh = need
    ox, oy = nx0 - rx0, ny0 - ry0
    if ox < 0 or oy < 0 or ox + nw > region.shape[1] or oy + nh > region.shape[0]:
        raise InvalidInput(
            f"canvas_region at {(rx0, ry0)} of shape {region.shape} does not cover the "
            f"canvas rectangle {need} (x0, y0, width, height) that window {window!r} needs"
        )
    x0, y0, w, h = check_window(window)
    if clip == 0.0:
        return region[y0 - ry0 : y0 - ry0 + h, x0 - rx0 : x0 - rx0 + w]
    crop = region[oy : oy + nh, ox : ox + nw]
    out = _clahe_tiles(crop, clip, kernel_size)
    wy, wx = y0 - ny0, x0 - nx0
    result = out[wy : wy + h, wx : wx + w]
    if preserve_zero:
        np.copyto(result, 0, where=crop[wy : wy + h, wx : wx + w] == 0)
    return result


def clahe_canvas(
    canvas: np.ndarray,
    clip_limit: float = DEFAULT_CLIP_LIMIT,
    kernel_size: int = DEFAULT_KERNEL_PX,
    preserve_zero: bool = False,
) -> np.ndarray:
    """CLAHE of a whole canvas (uint8, shape (height, width)); see the module docstring."""
    arr = np.asarray(canvas)
    if arr.ndim != 2:
        raise InvalidInput(f"canvas must be 2-D (height, width), got shape {arr.shape}")
    h, w = arr.shape
    return clahe_window(arr, (0, 0), (h, w), (0, 0, w, h), clip_limit, kernel_size, preserve_zero)


def plan_windows(
    canvas_w: int,
    canvas_h: int,
    window_px: int = 12288,
    align_px: int = DEFAULT_KERNEL_PX,
) -> list[WindowXYWH]:
    """Split the canvas into windows of at most ``window_px`` per side, row-major.

    Windows are aligned to ``align_px`` (the CLAHE kernel and the output tile size, so
    every output tile lies in exactly one window) and balanced: a 16384-px side with
    ``window_px`` 12288 gives two 8192-px windows rather than 12288 + 4096, which lowers
    the peak memory at the same total work. With ``clahe_source_region`` each window is
    computed from at most ``window_px + 2 * align_px`` px per side.

    Args:
        canvas_w: canvas width in pixels (>= 1).
        canvas_h: canvas height in pixels (>= 1).
        window_px: largest window side in pixels, a multiple of ``align_px``.
        align_px: grid that window edges (except the canvas's far edges) lie on.

    Returns:
        (x0, y0, width, height) windows tiling the canvas without overlap.
    """
    _check_canvas((canvas_h, canvas_w))
    if align_px < 1 or window_px < align_px or window_px % align_px:
        raise InvalidInput(
            f"window_px {window_px} must be a positive multiple of align_px {align_px}"
        )
    xs = _split_axis(canvas_w, window_px, align_px)
    ys = _split_axis(canvas_h, window_px, align_px)
    return [(x0, y0, x1 - x0, y1 - y0) for (y0, y1) in ys for (x0, x1) in xs]


def _split_axis(length: int, window_px: int, align_px: int) -> list[tuple[int, int]]:
    """Balanced [start, end) pieces of one axis, starts on multiples of ``align_px``."""
    cells = math.ceil(length / align_px)
    pieces = math.ceil(cells / (window_px // align_px))
    step = math.ceil(cells / pieces) * align_px
    return [(s, min(length, s + step)) for s in range(0, length, step)]


def _clahe_tiles(crop: np.ndarray, clip: float, kernel_size: int) -> np.ndarray:
    """OpenCV CLAHE of a crop starting on the tile grid, padded to whole tiles."""
    h, w = crop.shape
    pad_h, pad_w = -h % kernel_size, -w % kernel_size
    if pad_h or pad_w:
        # Reflection across the canvas edge, like cv2.CLAHE's own padding; only happens
        # when the crop ends at the canvas edge, so it matches the full-canvas padding.
        crop = cv2.copyMakeBorder(crop, 0, pad_h, 0, pad_w, cv2.BORDER_REFLECT_101)
    grid = (crop.shape[1] // kernel_size, crop.shape[0] // kernel_size)
    engine = cv2.createCLAHE(clipLimit=opencv_clip_limit(clip), tileGridSize=grid)
    out = engine.apply(np.ascontiguousarray(crop))
    return out[:h, :w]


def _check_clip(clip_limit: float) -> float:
    clip = float(clip_limit)
    if not math.isfinite(clip) or clip < 0:
        raise InvalidInput(f"clip-limit must be a finite number >= 0, got {clip_limit!r}")
    return clip


def _check_kernel(kernel_size: int) -> None:
    # Power of two keeps OpenCV's float32 interpolation weights exact (see module doc).
    if kernel_size < 2 or kernel_size & (kernel_size - 1):
        raise InvalidInput(f"CLAHE kernel_size must be a power of two >= 2, got {kernel_size}")


def _check_canvas(canvas_shape_hw: Sequence[int]) -> tuple[int, int]:
    if len(canvas_shape_hw) != 2 or min(canvas_shape_hw) < 1:
        raise InvalidInput(f"canvas_shape_hw must be (height, width) >= 1, got {canvas_shape_hw!r}")
    return int(canvas_shape_hw[0]), int(canvas_shape_hw[1])
