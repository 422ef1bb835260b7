"""The one affine convention of the project: 6 numbers in mpicbg array order.

A transform is stored as ``[m00, m10, m01, m11, m02, m12]`` (mpicbg's
``AffineModel2D.toArray`` order, what Fiji returned and what transforms.json
holds). It maps a point ``(x, y)`` in pixel coordinates, origin at the top-left
of the image, to::

    x' = m00 * x + m01 * y + m02
    y' = m10 * x + m11 * y + m12

As a 2x3 matrix (OpenCV's layout) that is ``[[m00, m01, m02], [m10, m11, m12]]``.
Pixel coordinates follow OpenCV: the centre of the top-left pixel is (0, 0), x
grows to the right and y downwards, so a matrix goes straight to
``cv2.warpAffine``. For an alignment result the transform maps pixels of
``post`` (slice z+1) onto pixels of ``pre`` (slice z).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IDENTITY: tuple[float, ...] = (1.0, 0.0, 0.0, 1.0, 0.0, 0.0)


def to_matrix(params: Sequence[float]) -> np.ndarray:
    """Turn 6 mpicbg-ordered numbers into a float64 2x3 matrix (OpenCV layout)."""
    if len(params) != 6:
        raise ValueError(f"an affine needs 6 numbers, got {len(params)}: {list(params)!r}")
    m00, m10, m01, m11, m02, m12 = (float(v) for v in params)
    return np.array([[m00, m01, m02], [m10, m11, m12]], dtype=np.float64)


def from_matrix(matrix: np.ndarray) -> list[float]:
    """Turn a 2x3 (or 3x3 homogeneous) matrix into 6 mpicbg-ordered floats."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape not in ((2, 3), (3, 3)):
        raise ValueError(f"expected a 2x3 or 3x3 matrix, got shape {m.shape}")
    return [float(v) for v in (m[0, 0], m[1, 0], m[0, 1], m[1, 1], m[0, 2], m[1, 2])]


def to_homogeneous(params: Sequence[float]) -> np.ndarray:
    """3x3 homogeneous matrix of a transform."""
    return np.vstack([to_matrix(params), [0.0, 0.0, 1.0]])


def compose(outer: Sequence[float], inner: Sequence[float]) -> list[float]:
    """The transform that applies ``inner`` first, then ``outer``."""
    return from_matrix(to_homogeneous(outer) @ to_homogeneous(inner))


def invert(params: Sequence[float]) -> list[float]:
    """The inverse transform; raises ValueError when it is singular."""
    h = to_homogeneous(params)
    if abs(np.linalg.det(h[:2, :2])) < 1e-12:
        raise ValueError(f"affine {list(params)!r} is singular and has no inverse")
    return from_matrix(np.linalg.inv(h))


def apply(params: Sequence[float], points_xy: np.ndarray) -> np.ndarray:
    """Map an (N, 2) array of (x, y) points; returns (N, 2) float64."""
    pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    m = to_matrix(params)
    return pts @ m[:, :2].T + m[:, 2]


def translation(dx: float, dy: float) -> list[float]:
    """A pure translation by (dx, dy) pixels."""
    return [1.0, 0.0, 0.0, 1.0, float(dx), float(dy)]


def corners_xy(width: int, height: int) -> np.ndarray:
    """The 4 corners (x, y) of a width x height image, as pixel-edge coordinates."""
    return np.array([[0, 0], [width, 0], [0, height], [width, height]], dtype=np.float64)


def mean_corner_error(a: Sequence[float], b: Sequence[float], width: int, height: int) -> float:
    """Mean distance in pixels between where ``a`` and ``b`` send the image corners."""
    c = corners_xy(width, height)
    return float(np.linalg.norm(apply(a, c) - apply(b, c), axis=1).mean())


def rescale(params: Sequence[float], factor: float) -> list[float]:
    """Express a transform found on images shrunk by ``factor`` in full-size pixels.

    A pixel centre ``p`` of an image shrunk by an area filter of integer ``factor``
    sits at ``P = factor * p + (factor - 1) / 2`` in the full-size image, so the
    full-size transform is ``S A S^-1``. For small rotations this is, within a
    few hundredths of a pixel, CONTRACTS.md's "scale the translation part".
    """
    if factor <= 0:
        raise ValueError(f"rescale factor must be > 0, got {factor!r}")
    c = (factor - 1.0) / 2.0
    s = np.array([[factor, 0.0, c], [0.0, factor, c], [0.0, 0.0, 1.0]])
    return from_matrix(s @ to_homogeneous(params) @ np.linalg.inv(s))
