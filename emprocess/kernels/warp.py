"""Warp a slice into any window of the global canvas, bit-identical to the full warp."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np

from emprocess import affine
from emprocess.errors import InvalidInput

log = logging.getLogger(__name__)

#: A rectangle of the canvas: (x0, y0, width, height) in canvas pixels.
WindowXYWH = tuple[int, int, int, int]

# cv2.remap stores source coordinates as int16 internally, so neither side of the
# source image may reach SHRT_MAX.
MAX_SOURCE_SIDE_PX = 32766

# Output rows computed per cv2.remap call: bounds the float32 coordinate maps to
# 2 * 4 B * rows * width (32 MiB for 16384-px-wide windows) whatever the window size.
_STRIP_ROWS = 256


def warp_window(
    image: np.ndarray,
    transform: Sequence[float],
    window: WindowXYWH,
    *,
    strip_rows: int = _STRIP_ROWS,
) -> np.ndarray:
    """Warp ``image`` into the canvas and return one window of the canvas.

    ``transform`` maps image pixels to canvas pixels (``emprocess.affine``: 6 numbers in
    mpicbg order, pixel centres at integer coordinates). Each output pixel at canvas
    position (X, Y) samples the image bicubically (OpenCV's ``INTER_CUBIC``, a = -0.75)
    at ``inverse(transform)(X, Y)``; samples whose 4x4 support leaves the image see 0
    (``BORDER_CONSTANT``), so the slice edge fades to 0 over about two pixels and the
    canvas outside the slice is 0.

    Why not ``cv2.warpAffine`` with a shifted matrix: warpAffine rounds its row and
    column terms to fixed point separately, so a shifted window differs from the same
    region of the full warp in about 1 pixel in 30 (by 1 grey level). Here the source
    coordinate of every canvas pixel is computed in float64 from its *global* (X, Y)
    by the same expression whatever the window, and ``cv2.remap`` then treats each
    pixel independently, so any window is bit-identical to the full warp.

    Args:
        image: source slice, shape (height, width), uint8 or uint16; both sides at most
            ``MAX_SOURCE_SIDE_PX``.
        transform: 6 numbers, image -> canvas (see ``emprocess.affine``).
        window: (x0, y0, width, height) of the wanted canvas region, in canvas pixels;
            may extend beyond the canvas or the warped slice (those pixels are 0).
        strip_rows: output rows per remap call; only memory and speed depend on it.

    Returns:
        Array of shape (height, width) of the window, same dtype as ``image``.

    Raises:
        InvalidInput: bad dtype, shape, window, or a singular transform.
    """
    src = np.asarray(image)
    if src.ndim != 2:
        raise InvalidInput(f"image must be 2-D (height, width), got shape {src.shape}")
    if src.dtype not in (np.uint8, np.uint16):
        raise InvalidInput(f"image dtype must be uint8 or uint16, got {src.dtype}")
    if src.size == 0 or max(src.shape) > MAX_SOURCE_SIDE_PX:
        raise InvalidInput(
            f"image shape {src.shape} must be non-empty with sides <= {MAX_SOURCE_SIDE_PX} px"
        )
    x0, y0, width, height = check_window(window)
    if strip_rows < 1:
        raise InvalidInput(f"strip_rows must be >= 1, got {strip_rows}")
    try:
        inv = affine.to_matrix(affine.invert(transform))
    except ValueError as exc:
        raise InvalidInput(f"transform {list(transform)!r} is unusable: {exc}") from exc
    if not np.all(np.isfinite(inv)):
        raise InvalidInput(f"transform {list(transform)!r} has non-finite values")

    src = np.ascontiguousarray(src)
    out = np.empty((height, width), dtype=src.dtype)
    (a, b, c), (d, e, f) = inv
    xs = np.arange(x0, x0 + width, dtype=np.float64)
    # Column terms are shared by every strip; the row terms use the global Y of each row.
    ax = a * xs
    dx = d * xs
    for r0 in range(0, height, strip_rows):
        r1 = min(height, r0 + strip_rows)
        ys = np.arange(y0 + r0, y0 + r1, dtype=np.float64)[:, None]
        map_x = (ax[None, :] + (b * ys + c)).astype(np.float32)
        map_y = (dx[None, :] + (e * ys + f)).astype(np.float32)
        cv2.remap(
            src,
            map_x,
            map_y,
            interpolation=cv2.INTER_CUBIC,
            dst=out[r0:r1],
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
    log.debug("warped %s image into window %s", src.shape, window)
    return out


def check_window(window: Sequence[int]) -> WindowXYWH:
    """Validate an (x0, y0, width, height) window and return it as ints."""
    if len(window) != 4:
        raise InvalidInput(f"window must be (x0, y0, width, height), got {window!r}")
    x0, y0, width, height = (int(v) for v in window)
    if (x0, y0, width, height) != tuple(window):
        raise InvalidInput(f"window values must be integers, got {window!r}")
    if width < 1 or height < 1:
        raise InvalidInput(f"window width and height must be >= 1, got {window!r}")
    return x0, y0, width, height
