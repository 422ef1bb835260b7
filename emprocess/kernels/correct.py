"""FIB-SEM slice corrections before warping: curtaining removal and per-slice gain/offset.

Destreaking removes curtaining: stripes constant along the milling direction ``d``. A
stripe pattern is a 1D profile across ``d``, the same on every line along ``d``; content
has a profile too (the mean of its own columns), but one that changes from one stretch
along ``d`` to the next. So each block of the slice is cut into strips along ``d`` (about
``STRIP_PX`` long), each strip's profile across ``d`` is measured (the mean of every line
along ``d``), and per frequency of the block's mean profile the part that the strips agree
on beyond their disagreement is taken as stripes: the profile's spectrum is multiplied by
``1 - N / P`` (clipped to [0, 1]; ``P`` its power, ``N`` the power the strips'
disagreement leaves in a mean of them, both averaged over ``SMOOTH_BINS`` frequencies)
and that estimate subtracted from every line of the block. Where there are no stripes
``P`` is about ``N`` and little is removed (on the clean real slices 2 grey levels per
pixel on average, their spread being 35); structures along ``d`` shorter than the block
vary between strips and are kept (Münch et al. 2009 damp a fixed band of wavelet
coefficients instead; this shrinkage follows the measured spectrum, like a Wiener filter
whose noise is measured along the stripes). The price: stripes much shorter than a
block along ``d`` are only partly removed, as the strips disagree on them.

The slice is cut into blocks of about ``block_px`` (a slice up to 1.5 blocks is one
block: no padding, every measurement inside the slice), overlapping by half and blended
by weights that sum to 1 (a sin^2 cross-fade), so the correction varies smoothly and
follows stripes that come and go. Memory stays bounded at any slice size: one band of
``block_px`` rows by the slice width and half of one (float32) besides the slice and its
output.

Per-slice intensity correction maps grey value ``v`` to ``gain * v + offset`` (clipped to
the dtype's range, rounded), with the gain and offset decided once per run by
:mod:`emprocess.kernels.normalise`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from emprocess.errors import InvalidInput

DESTREAK_BLOCK_PX = 512
"""Block side of the blockwise filter: stripes are estimated per block, so they may come
and go at this scale."""
STRIP_PX = 128
"""Length along the stripes of the strips whose profiles are compared: long enough that
a strip averages its content, short enough that a block has several (4 at 512)."""
MAX_PERIOD_PX = 128.0
"""Profile periods longer than this are shading, not curtaining, and kept."""
SMOOTH_BINS = 21
"""Powers are averaged over this many frequency bins of the (mirrored, so twice the
block long) profile: a stripe spectrum is smooth, a single bin's power is noisy."""
MIN_STRIP_PX = 8
"""A block shorter than two strips of this many lines along the stripes is left alone."""


@dataclass(frozen=True)
class SliceCorrection:
    """What :func:`correct_slice` does to one slice; the defaults do nothing.

    Attributes:
        destreak_deg: stripe direction in degrees from vertical (0: vertical stripes;
            positive tilts their top to the left, like a backslash, with y down); None:
            no destreaking.
        gain, offset: grey value v becomes ``gain * v + offset`` (in the slice's units).
    """

    destreak_deg: float | None = None
    gain: float = 1.0
    offset: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self.destreak_deg is None and self.gain == 1.0 and self.offset == 0.0


def correct_slice(image: np.ndarray, correction: SliceCorrection | None) -> np.ndarray:
    """The slice destreaked, then gain/offset applied; ``image`` itself when there is nothing to do.

    Args:
        image: (H, W) uint8 or uint16 slice as decoded.
        correction: what to do; None or the identity returns ``image`` unchanged.

    Returns:
        (H, W) array of ``image``'s dtype.
    """
    if correction is None or correction.is_identity:
        return image
    if image.dtype not in (np.uint8, np.uint16) or image.ndim != 2:
        raise InvalidInput(
            f"corrections need a 2D uint8 or uint16 slice, got {image.dtype} {image.shape}"
        )
    out = image
    if correction.destreak_deg is not None:
        out = destreak(out, correction.destreak_deg)
    if correction.gain != 1.0 or correction.offset != 0.0:
        out = apply_gain_offset(out, correction.gain, correction.offset)
    return out


LUT_BLOCK_PIXELS = 1 << 20
"""Pixels looked up at a time: numpy widens the indices of a lookup to 8 bytes each, so a
whole 32,766^2 slice at once would take 8 GiB besides the slice (8 MiB a block)."""


def apply_gain_offset(image: np.ndarray, gain: float, offset: float) -> np.ndarray:
    """``round(gain * v + offset)`` clipped to the dtype's range, by a lookup table (in
    blocks of rows: memory is the output and one block of widened indices)."""
    if not (math.isfinite(gain) and math.isfinite(offset) and gain > 0):
        raise InvalidInput(f"gain {gain!r} must be finite and > 0, offset {offset!r} finite")
    top = 255 if image.dtype == np.uint8 else 65535
    levels = np.arange(top + 1, dtype=np.float64)
    lut = np.clip(np.rint(levels * gain + offset), 0, top).astype(image.dtype)
    out = np.empty_like(image)
    rows = max(1, LUT_BLOCK_PIXELS // max(1, image.shape[-1]))
    for y in range(0, image.shape[0], rows):
        np.take(lut, image[y : y + rows], out=out[y : y + rows])
    return out


def destreak(
    image: np.ndarray, angle_deg: float = 0.0, *, block_px: int = DESTREAK_BLOCK_PX
) -> np.ndarray:
    """Curtaining stripes along ``angle_deg`` removed where they stand out of the content.

    Args:
        image: (H, W) uint8 or uint16 slice.
        angle_deg: stripe direction in degrees from vertical, in [-90, 90] (see
            :class:`SliceCorrection`).
        block_px: block side (even, >= 16); memory besides the slice and the output is
            about ``1.5 * block_px * W * 4`` bytes (W the slice's side across the
            stripes) plus a few blocks of ``block_px**2 * 8`` bytes.

    Returns:
        (H, W) array of ``image``'s dtype, rounded and clipped to its range; ``image``'s
        values exactly where no stripes were found.
    """
    if image.dtype not in (np.uint8, np.uint16) or image.ndim != 2:
        raise InvalidInput(f"destreak needs a 2D uint8 or uint16 slice, got {image.dtype}")
    if not (math.isfinite(angle_deg) and -90.0 <= angle_deg <= 90.0):
        raise InvalidInput(f"destreak angle {angle_deg!r} must be within [-90, 90] degrees")
    if block_px < 16 or block_px % 2:
        raise InvalidInput(f"destreak block_px {block_px} must be even and >= 16")
    out = np.empty_like(image)
    if abs(angle_deg) > 45.0:
        # Nearer horizontal: the transposed views have them nearer vertical (no copy).
        _destreak_into(image.T, out.T, math.copysign(90.0, angle_deg) - angle_deg, block_px)
    else:
        _destreak_into(image, out, angle_deg, block_px)
    return out


def _destreak_into(image: np.ndarray, out: np.ndarray, angle_deg: float, block_px: int) -> None:
    """:func:`destreak` for stripes within 45 degrees of vertical, band of rows by band."""
    height, width = image.shape
    top = 255 if image.dtype == np.uint8 else 65535
    # Along a stripe, x moves by `shear` px per row down (positive angle: a backslash).
    shear = math.tan(math.radians(angle_deg))
    col_spans = _spans(width, block_px)
    row_spans = _spans(height, block_px)
    # The correction to subtract, rows y0 .. y1 of the current band; the rows the next
    # band shares (y_done .. y1) move to its top when this one is done.
    buffer = np.zeros((max(y1 - y0 for y0, _, y1, _ in row_spans), width), np.float32)
    carried = 0
    for y0, y_done, y1, wy in row_spans:
        band = buffer[: y1 - y0]
        band[carried:] = 0.0
        for x0, _, x1, wx in col_spans:
            field = _stripe_field(image[y0:y1, x0:x1], shear)
            if field is not None:
                field *= wx.astype(np.float32)
                band[:, x0:x1] += wy.astype(np.float32)[:, None] * field
        done = y_done - y0
        rows = image[y0:y_done].astype(np.float32)
        rows -= band[:done]
        out[y0:y_done] = np.clip(np.rint(rows, out=rows), 0, top, out=rows)
        del rows
        carried = y1 - y_done
        buffer[:carried] = band[done:]


def _spans(length: int, block_px: int) -> list[tuple[int, int, int, np.ndarray]]:
    """Overlapping blocks ``[start, stop)`` covering ``[0, length)``, all inside it.

    Each is ``(start, done, stop, weights)``: positions before ``done`` get no weight from
    later blocks; the weights of all blocks sum to 1 at every position (a sin^2 rise over
    the previous block's cos^2 fall). Up to 1.5 blocks long: one block, weight 1.
    """
    if length <= block_px * 3 // 2:
        return [(0, length, length, np.ones(length))]
    hops = round(2 * length / block_px)
    edge = [round(j * length / hops) for j in range(hops + 1)]
    spans = []
    for j in range(hops - 1):
        start, mid, stop = edge[j], edge[j + 1], edge[j + 2]
        rise = np.sin(0.5 * np.pi * (np.arange(mid - start) + 0.5) / (mid - start)) ** 2
        fall = np.cos(0.5 * np.pi * (np.arange(stop - mid) + 0.5) / (stop - mid)) ** 2
        last = j == hops - 2
        if j == 0:
            rise[:] = 1.0
        if last:
            fall[:] = 1.0
        weights = np.concatenate([rise, fall])
        spans.append((start, stop if last else mid, stop, weights))
    return spans


def _stripe_field(block: np.ndarray, shear: float) -> np.ndarray | None:
    """The stripes of ``block`` (rows along them, ``shear`` px right per row), as float32.

    Returns None where there is nothing to remove, else an array ``block``'s shape or
    a (1, w) row (vertical stripes) to broadcast.
    """
    rows, cols = block.shape
    if rows < 2 * MIN_STRIP_PX or cols < 16:
        return None
    edges = _strip_edges(rows)
    if shear == 0.0:
        sums = np.stack([block[a:b].sum(axis=0, dtype=np.float64) for a, b in pairwise(edges)])
        counts = np.diff(edges).astype(np.float64)[:, None]
        mean = sums.sum(axis=0) / rows
    else:
        geometry = _tilt_geometry(rows, cols, shear)
        nbins = geometry.counts.shape[1]
        sums = np.zeros((len(edges) - 1, nbins))
        for k, (a, b) in enumerate(pairwise(edges)):
            values = block[a:b].ravel().astype(np.float64)
            upper = geometry.frac[a * cols : b * cols] * values
            lo = geometry.lo[a * cols : b * cols]
            sums[k] = np.bincount(lo, values - upper, nbins)
            sums[k] += np.bincount(lo + 1, upper, nbins)
        counts = geometry.counts
        total = counts.sum(axis=0)
        seen = total > 0.5
        grid = np.flatnonzero(seen)
        # Bins no pixel reaches (none but at the ends) take their neighbours' value.
        mean = np.interp(np.arange(total.size), grid, sums.sum(axis=0)[seen] / total[seen])
    each = np.where(counts > 0.5, sums / np.maximum(counts, 1e-9), mean)
    profile = _shrink(mean, each - mean)
    if profile is None:
        return None
    if shear == 0.0:
        return profile[None, :].astype(np.float32)
    y = np.arange(rows, dtype=np.float64)[:, None]
    u = np.arange(cols, dtype=np.float64)[None, :] - shear * y + max(0.0, (rows - 1) * shear)
    return np.interp(u, np.arange(profile.size), profile).astype(np.float32)


def _strip_edges(rows: int) -> np.ndarray:
    """Where the strips along the stripes of a block ``rows`` long start and end."""
    strips = max(2, round(rows / STRIP_PX))
    return np.linspace(0, rows, strips + 1).round().astype(np.int64)


@dataclass(frozen=True)
class _TiltGeometry:
    """Each pixel's profile bin along tilted stripes (row-major), linear weights."""

    lo: np.ndarray  # (rows * cols,) int: the bin at or before the pixel's u
    frac: np.ndarray  # (rows * cols,) float32: the weight of bin lo + 1
    counts: np.ndarray  # (strips, nbins): the weight each strip puts in each bin


@functools.lru_cache(maxsize=4)
def _tilt_geometry(rows: int, cols: int, shear: float) -> _TiltGeometry:
    """Profile coordinate u = x - shear * y (+ an offset so that u >= 0), 1 px bins."""
    y = np.arange(rows, dtype=np.float64)[:, None]
    u = (np.arange(cols, dtype=np.float64)[None, :] - shear * y).ravel()
    u += max(0.0, (rows - 1) * shear)
    lo = np.floor(u).astype(np.int32)
    frac = (u - lo).astype(np.float32)
    nbins = cols + math.ceil((rows - 1) * abs(shear)) + 1
    counts = np.zeros((len(_strip_edges(rows)) - 1, nbins))
    for k, (a, b) in enumerate(pairwise(_strip_edges(rows))):
        upper = frac[a * cols : b * cols].astype(np.float64)
        counts[k] = np.bincount(lo[a * cols : b * cols], 1.0 - upper, nbins)
        counts[k] += np.bincount(lo[a * cols : b * cols] + 1, upper, nbins)
    return _TiltGeometry(lo, frac, counts)


def _shrink(mean: np.ndarray, deviations: np.ndarray) -> np.ndarray | None:
    """The stripes in the profile ``mean``, given each strip's ``deviations`` from it.

    Both are mirrored (so the profile's ends meet) before their FFT; per frequency the
    mean's spectrum is scaled by ``1 - N / P``, N the power the strips' spread leaves in
    their mean, P the mean's power (both smoothed); periods over MAX_PERIOD_PX get 0.
    """
    n = mean.size
    strips = deviations.shape[0]
    spectrum = np.fft.rfft(np.concatenate([mean, mean[::-1]]) - mean.mean())
    spread = np.fft.rfft(np.concatenate([deviations, deviations[:, ::-1]], axis=1), axis=1)
    noise = _smooth((spread.real**2 + spread.imag**2).sum(axis=0) / (strips * (strips - 1)))
    power = _smooth(spectrum.real**2 + spectrum.imag**2)
    gain = np.clip(1.0 - noise / np.maximum(power, 1e-30), 0.0, 1.0)
    gain[np.fft.rfftfreq(2 * n) < 1.0 / MAX_PERIOD_PX] = 0.0
    if not gain.any():
        return None
    return np.fft.irfft(gain * spectrum, 2 * n)[:n]


def _smooth(power: np.ndarray) -> np.ndarray:
    """The mean over the SMOOTH_BINS bins around each (fewer at the ends)."""
    half = SMOOTH_BINS // 2
    total = np.concatenate([[0.0], np.cumsum(power)])
    at = np.arange(power.size)
    lo, hi = np.maximum(at - half, 0), np.minimum(at + half + 1, power.size)
    return (total[hi] - total[lo]) / (hi - lo)
