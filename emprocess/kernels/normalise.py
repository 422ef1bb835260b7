"""Per-slice intensity normalisation: measure each slice, map it to a reference smooth along z.

Beam-current drift makes whole FIB-SEM slices brighter or darker (flicker along z). Each
slice's mean and spread (standard deviation) are measured at reduced resolution inside
the canvas's common area (the part every slice covers, so all slices are measured on the
same tissue), the reference is their running interquartile mean along z (flicker is per slice, the
tissue's own change is slow), and slice z gets the gain and offset that give it the
reference's mean and spread: ``v -> gain * v + offset`` in the slice's own grey units
(:func:`emprocess.kernels.correct.apply_gain_offset`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from emprocess import affine
from emprocess.errors import InvalidInput
from emprocess.geometry import RectXY

MEASURE_MAX_PX = 1024
"""The common area is measured with at most this many pixels per side."""
REFERENCE_WINDOW = 31
"""Slices in the running reference (odd): its error against the clean stack falls as
1 / sqrt(window) (on the real stack, 100 slices, +-10% gain and +-10 grey levels of
flicker: per-slice mean error median / max 2.7 / 8.3 grey levels with 15 slices, 2.5 /
4.6 with 31, against 6.5 / 22.6 uncorrected), while the tissue's own change along z over 31 slices of 10 nm is
small (the clean stack's mean moves by 7 grey levels over 100 slices)."""
MIN_PIXELS = 64
"""A measurement on fewer pixels (a slice barely in the common area) is not used."""
MAX_GAIN = 4.0
"""Gains are kept within [1 / MAX_GAIN, MAX_GAIN]: beam flicker is a few percent; a
slice that would need more is broken (blank, noise), and a huge gain would only blow
its noise up (the /alignedslice request also refuses gains above 64)."""


@dataclass(frozen=True)
class SliceStats:
    """Grey statistics of one slice inside the common area, in the slice's units."""

    mean: float
    std: float
    pixels: int


def common_area(
    footprints: Sequence[tuple[float, float, float, float]],
) -> RectXY:
    """The canvas pixels inside every footprint's (x0, y0, x1, y1) box.

    Raises:
        InvalidInput: when the boxes do not overlap.
    """
    x0 = max(f[0] for f in footprints)
    y0 = max(f[1] for f in footprints)
    x1 = min(f[2] for f in footprints)
    y1 = min(f[3] for f in footprints)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise InvalidInput(
            f"the slices have no common area (intersection [{x0:g}, {y0:g}, {x1:g}, {y1:g}])"
        )
    return RectXY(math.ceil(x0), math.ceil(y0), math.floor(x1), math.floor(y1))


def footprint(
    transform: Sequence[float], width: int, height: int
) -> tuple[float, float, float, float]:
    """Canvas (x0, y0, x1, y1) of the largest box inside a ``width`` x ``height`` slice
    placed by ``transform`` (mpicbg order), for rotations and shears of a few degrees:
    the corners' inner bounds."""
    m = affine.to_matrix(list(transform))
    corners = np.array([[0, 0, 1], [width, 0, 1], [0, height, 1], [width, height, 1]], float)
    xy = corners @ m.T
    xs, ys = np.sort(xy[:, 0]), np.sort(xy[:, 1])
    return float(xs[1]), float(ys[1]), float(xs[2]), float(ys[2])


def measure_slice(
    image: np.ndarray,
    transform: Sequence[float],
    area_xyxy: Sequence[int],
    *,
    max_px: int = MEASURE_MAX_PX,
) -> SliceStats:
    """Mean and spread of ``image`` warped into the canvas, inside ``area_xyxy``, at reduced resolution.

    Args:
        image: (H, W) uint8 or uint16 slice as decoded.
        transform: 6 numbers (mpicbg order) mapping slice pixels into the canvas.
        area_xyxy: canvas box (x0, y0, x1, y1) measured, e.g. :func:`common_area`.
        max_px: the box is shrunk by an integer factor to at most this many px per side.

    Returns:
        Statistics of the canvas pixels that the slice covers inside the box.
    """
    if image.dtype not in (np.uint8, np.uint16) or image.ndim != 2:
        raise InvalidInput(f"measure needs a 2D uint8 or uint16 slice, got {image.dtype}")
    x0, y0, x1, y1 = (int(v) for v in area_xyxy)
    if x1 <= x0 or y1 <= y0:
        raise InvalidInput(f"measured area {list(area_xyxy)} is empty")
    k = max(1, math.ceil(max(x1 - x0, y1 - y0) / max_px))
    small = (
        image
        if k == 1
        else cv2.resize(
            image,
            (-(-image.shape[1] // k), -(-image.shape[0] // k)),
            interpolation=cv2.INTER_AREA,
        )
    )
    # A pixel s' of the shrunk slice is slice pixel k * s' + (k - 1) / 2; the canvas
    # pixel p is measured at (p - (x0, y0)) / k.
    m = affine.to_matrix(list(transform))
    a, t = m[:, :2], m[:, 2]
    c = np.full(2, (k - 1) / 2.0)
    warp = np.hstack([a, ((a @ c + t - np.array([x0, y0], float)) / k)[:, None]])
    size = (-(-(x1 - x0) // k), -(-(y1 - y0) // k))
    values = cv2.warpAffine(
        small.astype(np.float32), warp, size, flags=cv2.INTER_LINEAR, borderValue=0.0
    )
    inside = cv2.warpAffine(
        np.ones(small.shape, np.uint8), warp, size, flags=cv2.INTER_NEAREST, borderValue=0
    ).astype(bool)
    picked = values[inside]
    if picked.size == 0:
        return SliceStats(0.0, 0.0, 0)
    return SliceStats(float(picked.mean()), float(picked.std()), int(picked.size))


def running_reference(values: np.ndarray, window: int) -> np.ndarray:
    """Interquartile mean of ``values`` over ``window`` neighbours (fewer at the ends).

    The mean of the middle half: nearly as steady as the mean against per-slice flicker,
    and a blank or saturated slice in the window does not move it.
    """
    half = window // 2
    out = np.empty(len(values))
    for i in range(len(values)):
        near = np.sort(values[max(0, i - half) : i + half + 1])
        q = len(near) // 4
        out[i] = near[q : len(near) - q].mean()
    return out


def plan_gain_offset(
    stats: Mapping[int, SliceStats], window: int = REFERENCE_WINDOW
) -> dict[int, tuple[float, float]]:
    """Slice z -> (gain, offset) that maps its mean and spread to the reference's.

    The reference is :func:`running_reference` (``window`` slices, fewer at the ends)
    of the measured spreads, then of the means once the gains are applied, in z order. Slices measured on fewer than MIN_PIXELS
    pixels, or with no spread, keep (1, 0) and are left out of the reference.

    Raises:
        InvalidInput: for an even or non-positive window.
    """
    if window < 1 or window % 2 == 0:
        raise InvalidInput(f"reference window {window} must be an odd number of slices >= 1")
    usable = sorted(z for z, s in stats.items() if s.pixels >= MIN_PIXELS and s.std > 0)
    out = {z: (1.0, 0.0) for z in stats}
    if not usable:
        return out
    means = np.array([stats[z].mean for z in usable])
    stds = np.array([stats[z].std for z in usable])
    # Gain first (the spread is not moved by an offset), then the offset of the slices
    # with their gain corrected: their means no longer carry the gain's flicker.
    gains = np.clip(running_reference(stds, window) / stds, 1.0 / MAX_GAIN, MAX_GAIN)
    scaled = gains * means
    offsets = np.clip(running_reference(scaled, window) - scaled, -65535.0, 65535.0)
    for i, z in enumerate(usable):
        out[z] = (float(gains[i]), float(offsets[i]))
    return out
