"""Quality along z: the normalised cross-correlation of each aligned slice with the next.

Janelia's FIB-SEM QC accepts neighbouring layers at NCC >= 0.98 on their data; here
the threshold of a run is set from its own distribution (:func:`ncc_threshold`), since
CLAHE, the thumbnail scale and the tissue's change between slices move the typical value.
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

    Chosen on the real stack (../shared/data/fibsem, 100 slices, registered): the NCC of
    neighbouring thumbnails (1/4 scale, CLAHE 0.02) is 0.969 to 0.986, median 0.981,
    so the threshold lands at 0.957 and no slice is flagged; a slice 4 px off (1 px in
    the thumbnail) falls to 0.80 and one 12 px off to 0.45, both flagged. A threshold
    from the run's own spread follows what a fixed one cannot: the tissue, the slice
    thickness, CLAHE and the thumbnail scale all move the typical value.
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
