"""Quality along z: the normalised cross-correlation of each aligned slice with the next.

Janelia's FIB-SEM QC accepts neighbouring layers at NCC >= 0.98 on their (smooth,
16-bit) data; here the threshold of a run is set from its own distribution (see
:func:`doubtful_slices`), since CLAHE, JPEG-free thumbnails and tissue change between
thin slices move the typical value.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from emprocess.errors import InvalidInput

MIN_PIXELS = 64
"""An NCC over fewer common pixels is not measured (None)."""


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """Pearson correlation of ``a`` and ``b`` over ``mask`` (default: where both are non-zero).

    Zero is the canvas's fill outside a slice, so by default only pixels both slices
    cover count. Returns None with fewer than MIN_PIXELS pixels or no spread in either.
    """
    if a.shape != b.shape:
        raise InvalidInput(f"ncc needs images of one shape, got {a.shape} and {b.shape}")
    if mask is None:
        mask = (a != 0) & (b != 0)
    x = a[mask].astype(np.float64)
    y = b[mask].astype(np.float64)
    if x.size < MIN_PIXELS:
        return None
    x -= x.mean()
    y -= y.mean()
    denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
    if denom == 0.0:
        return None
    return float((x * y).sum() / denom)


DOUBTFUL_MADS = 6.0
"""A slice is doubtful when its NCC with the next is this many median absolute
deviations below the run's median NCC (or below DOUBTFUL_FLOOR)."""
DOUBTFUL_FLOOR = 0.5
"""Below this a neighbour correlation is doubtful whatever the run's spread."""


def ncc_threshold(values: Mapping[int, float | None]) -> float:
    """The run's doubt threshold: median - DOUBTFUL_MADS x 1.4826 MAD, at least DOUBTFUL_FLOOR.

    On the real stack (../shared/data/fibsem, 100 slices, raw) the NCC of neighbours is
    0.93-0.96 with a MAD of about 0.005, so the threshold lands near 0.90; a slice shifted
    by 8 px or swapped in from elsewhere falls to 0.3-0.6.
    """
    got = np.array([v for v in values.values() if v is not None])
    if got.size == 0:
        return DOUBTFUL_FLOOR
    median = float(np.median(got))
    mad = 1.4826 * float(np.median(np.abs(got - median)))
    return max(DOUBTFUL_FLOOR, median - DOUBTFUL_MADS * mad)


def doubtful_slices(values: Mapping[int, float | None]) -> list[int]:
    """Slices z whose NCC with z+1 is below :func:`ncc_threshold`, in z order."""
    limit = ncc_threshold(values)
    return sorted(z for z, v in values.items() if v is not None and v < limit)
