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


def to_uint8(image: np.ndarray, window: Window | None = None) -> np.ndarray:
    """Map a uint8 or uint16 image to uint8 through ``window``, or today's way without one.

    Args:
        image: (H, W) uint8 or uint16 array.
        window: (low, high) grey levels that become 0 and 255; None keeps uint8 images as
            they are and scales uint16 over the full range (divide by 257).

    Returns:
        (H, W) uint8 array (``image`` itself when it is uint8 and there is no window).
    """
    if image.dtype not in (np.uint8, np.uint16):
        raise InvalidInput(f"slices must be uint8 or uint16, got {image.dtype}")
    if window is None:
        if image.dtype == np.uint8:
            return image
        return ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    lut = window_lut(window, 256 if image.dtype == np.uint8 else 65536)
    # A table lookup costs ~1 ns per pixel; cv2.LUT takes 8-bit input only.
    return np.take(lut, image)
