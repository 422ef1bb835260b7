"""The intensity window of a run: one (low, high) grey range that maps every slice to 8 bits.

A run decides its window once (``auto``: robust percentiles of a sample of slices,
measured before alignment), and the alignment service and emwrite both apply it, so
the two stages see the same 8-bit pixels. Without a window (``None``) a slice keeps
today's mapping: uint8 as it is, uint16 divided by 257 (the full 16-bit range).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from emprocess.errors import InvalidInput

AUTO_SATURATED_PERCENT = 0.35
"""``auto`` clips this percent of the sampled pixels, half at each end: the alignment
recipe's contrast stretch (ImageJ's "saturated=0.35"), so the window is robust to a few
hot or dead pixels and to the empty corners of a slice."""

Window = tuple[float, float]


def check_window(window: Sequence[float], max_value: float = 65535.0) -> Window:
    """Return ``window`` as (low, high) if 0 <= low < high <= max_value, else raise InvalidInput."""
    if len(window) != 2:
        raise InvalidInput(f"intensity window must be [low, high], got {list(window)!r}")
    low, high = float(window[0]), float(window[1])
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InvalidInput(f"intensity window must be finite numbers, got [{low}, {high}]")
    if low >= high:
        raise InvalidInput(f"intensity window low {low:g} must be < high {high:g}")
    if low < 0 or high > max_value:
        raise InvalidInput(
            f"intensity window [{low:g}, {high:g}] must lie within [0, {max_value:g}]"
        )
    return low, high


def sample_step(width: int, height: int, pixels: int) -> int:
    """The smallest n such that every n-th pixel of every n-th row is at most ``pixels``."""
    step = 1
    while (width // step) * (height // step) > pixels:
        step += 1
    return step


def histogram(image: np.ndarray) -> np.ndarray:
    """Counts of every grey level of a uint8 (256 bins) or uint16 (65536 bins) image."""
    if image.dtype not in (np.uint8, np.uint16):
        raise InvalidInput(f"histogram needs a uint8 or uint16 image, got {image.dtype}")
    bins = 256 if image.dtype == np.uint8 else 65536
    return np.bincount(image.ravel(), minlength=bins)


def window_from_histogram(
    hist: np.ndarray, saturated_percent: float = AUTO_SATURATED_PERCENT
) -> Window:
    """The (low, high) grey levels that clip ``saturated_percent`` of the counts, half per end.

    Args:
        hist: counts per grey level (e.g. the sum of :func:`histogram` over sampled slices).
        saturated_percent: percent of pixels clipped in total, in [0, 50).

    Raises:
        InvalidInput: when the histogram is empty or the sample has (nearly) one grey
            level, so no window with low < high exists.
    """
    total = int(hist.sum())
    if total == 0:
        raise InvalidInput("cannot measure an intensity window: the sample has no pixels")
    clipped = int(total * saturated_percent / 200.0)
    low = int(np.searchsorted(np.cumsum(hist), clipped, side="right"))
    high = len(hist) - 1 - int(np.searchsorted(np.cumsum(hist[::-1]), clipped, side="right"))
    if high <= low:
        raise InvalidInput(
            f"cannot measure an intensity window: the sampled slices hold one grey level "
            f"({low}) once {saturated_percent}% of the pixels are clipped; give "
            "intensity [low, high] explicitly"
        )
    return float(low), float(high)


def window_lut(window: Window, bins: int) -> np.ndarray:
    """Lookup table grey level -> uint8: ``round((v - low) * 255 / (high - low))``, clipped."""
    low, high = window
    levels = np.arange(bins, dtype=np.float64)
    return np.clip(np.rint((levels - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


#: Pixels converted per step by :func:`to_uint8`: its temporaries (8 bytes per pixel for
#: the table lookup's indices) stay at 8 MiB whatever the slice's size.
BLOCK_PIXELS = 1 << 20


def to_uint8(image: np.ndarray, window: Window | None = None) -> np.ndarray:
    """Map a uint8 or uint16 image to uint8 through ``window``, or today's way without one.

    The mapping is a table lookup of every grey level (:func:`window_lut`; without a
    window, ``(v * 255 + 32767) // 65535`` for uint16), applied in row blocks of about
    ``BLOCK_PIXELS``: beyond the result it needs one block of temporaries, where the
    vectorised forms needed 4x (uint32 arithmetic) or 4.5x (``np.take``'s intp indices)
    the image. The results are the same bytes.

    Args:
        image: (H, W) uint8 or uint16 array.
        window: (low, high) grey levels that become 0 and 255; None keeps uint8 images as
            they are and scales uint16 over the full range (divide by 257).

    Returns:
        (H, W) uint8 array (``image`` itself when it is uint8 and there is no window).
    """
    if image.dtype not in (np.uint8, np.uint16):
        raise InvalidInput(f"slices must be uint8 or uint16, got {image.dtype}")
    if window is None and image.dtype == np.uint8:
        return image
    lut = (
        _FULL_RANGE_LUT
        if window is None
        else window_lut(window, 256 if image.dtype == np.uint8 else 65536)
    )
    if image.dtype == np.uint8 and image.ndim == 2:
        import cv2  # here: the workflow imports this module for check_window

        return cv2.LUT(np.ascontiguousarray(image), lut)  # 8-bit input only; in one pass
    out = np.empty(image.shape, np.uint8)
    rows = max(1, BLOCK_PIXELS // max(1, image[0].size if image.ndim else 1))
    for y in range(0, image.shape[0], rows):
        np.take(lut, image[y : y + rows], out=out[y : y + rows], mode="clip")  # in range
    return out


_FULL_RANGE_LUT = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
"""uint16 -> uint8 over the full range, rounded: today's mapping without a window."""
