"""Reslice a registered stack with a known rigid random-walk drift and inject bad slices.

For checking the alignment against the truth on real FIB-SEM (tests and ``emprocess
bench drift``): output slice z shows the registered slice z seen through the rigid map
``world[z]`` (output px -> registered px), cropped so no border enters. ``truth`` has
the keys of :mod:`emprocess.sample`'s truth.json that the checks read (``width``,
``height``, ``minz``, ``maxz``, ``world``) plus the injected ``faults``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from emprocess import affine

BLANK, NOISE, DUPLICATE = "blank", "noise", "duplicate"


def random_walk(
    n: int,
    seed: int,
    max_rotation_deg: float = 0.15,
    max_shift_px: float = 6.0,
    pull: float = 0.1,
) -> list[tuple[float, float, float]]:
    """(angle rad, dx, dy) per slice: uniform steps up to the maxima, pulled back to 0.

    The pull (a fraction of the position taken off every step) keeps a long walk inside
    the crop margin while every step stays within the maxima.
    """
    rng = np.random.default_rng(seed)
    a = dx = dy = 0.0
    out = [(0.0, 0.0, 0.0)]
    for _ in range(n - 1):
        da = math.radians(rng.uniform(-max_rotation_deg, max_rotation_deg))
        sx, sy = rng.uniform(-max_shift_px, max_shift_px, 2)
        a += float(
            np.clip(da - pull * a, -math.radians(max_rotation_deg), math.radians(max_rotation_deg))
        )
        dx += float(np.clip(sx - pull * dx, -max_shift_px, max_shift_px))
        dy += float(np.clip(sy - pull * dy, -max_shift_px, max_shift_px))
        out.append((a, dx, dy))
    return out


def rigid_about(
    angle: float, dx: float, dy: float, centre_out: float, centre_in: float
) -> list[float]:
    """Rotation by ``angle`` about the output centre, moved to the input centre, plus (dx, dy)."""
    c, s = math.cos(angle), math.sin(angle)
    tx = centre_in + dx - (c * centre_out - s * centre_out)
    ty = centre_in + dy - (s * centre_out + c * centre_out)
    return [c, s, -s, c, tx, ty]


def reslice(
    images: Sequence[np.ndarray],
    crop: int,
    seed: int = 0,
    faults: dict[int, str] | None = None,
    **walk: float,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Warp each registered slice by its drift, crop ``crop`` px square, inject ``faults``.

    Args:
        images: registered slices (all one size, uint8).
        crop: side of the square output slices (leave room for the drift).
        seed: of the random walk.
        faults: z -> ``blank`` (flat grey), ``noise`` (grey noise) or ``duplicate`` (an
            exact copy of output slice z - 1; its truth is then slice z - 1's).
        **walk: :func:`random_walk`'s maxima.

    Returns:
        (slices, truth) with ``truth["world"][str(z)]`` the 6 numbers output px ->
        registered px.
    """
    faults = faults or {}
    h, w = images[0].shape
    walk_steps = random_walk(len(images), seed, **walk)
    rng = np.random.default_rng(seed + 1)
    centre_out, centre_in = (crop - 1) / 2.0, (min(h, w) - 1) / 2.0
    slices: list[np.ndarray] = []
    world: dict[str, list[float]] = {}
    for z, (image, (a, dx, dy)) in enumerate(zip(images, walk_steps, strict=True)):
        m = rigid_about(a, dx, dy, centre_out, centre_in)
        out = cv2.warpAffine(
            image,
            affine.to_matrix(m),
            (crop, crop),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
        )
        kind = faults.get(z)
        if kind == BLANK:
            out = np.full_like(out, int(image.mean()))
        elif kind == NOISE:
            out = rng.normal(image.mean(), image.std(), out.shape).clip(0, 255).astype(np.uint8)
        elif kind == DUPLICATE:
            out, m = slices[z - 1].copy(), world[str(z - 1)]
        elif kind is not None:
            raise ValueError(f"unknown fault {kind!r} for slice {z}")
        slices.append(out)
        world[str(z)] = [float(v) for v in m]
    truth = {
        "width": crop,
        "height": crop,
        "minz": 0,
        "maxz": len(images) - 1,
        "world": world,
        "faults": {str(z): k for z, k in sorted(faults.items())},
    }
    return slices, truth


def errors_px(
    transforms: Mapping[int, Sequence[float]], truth: Mapping[str, Any], bad: Sequence[int] = ()
) -> dict[str, Any]:
    """Compare a run's transforms with the truth at a 5 x 5 grid of points over the slice.

    A point of slice z lands at ``G_z(p)``; the truth says it should land where slice
    minz's transform puts the same registered point: ``G_0 W_0^-1 W_z (p)``. Bad slices
    are compared with the truth interpolated from their nearest good neighbours (what
    bridging can know). Returns the worst error over all good slices (``anywhere``), the
    worst change of error between neighbouring good slices (``neighbours``), the worst
    error of a bad slice against its bridge truth (``bridged``), and the per-slice figures.
    """
    size = int(truth["width"])
    grid = np.linspace(0, size - 1, 5)
    pts = np.array([(x, y) for x in grid for y in grid])
    world = {int(z): t for z, t in truth["world"].items()}
    zs = sorted(transforms)
    z0 = zs[0]
    canvas = affine.compose(transforms[z0], affine.invert(world[z0]))
    good = [z for z in zs if z not in set(bad)]

    def landing(z: int, truth_z: Sequence[float]) -> np.ndarray:
        return affine.apply(transforms[z], pts) - affine.apply(affine.compose(canvas, truth_z), pts)

    err = {z: landing(z, world[z]) for z in good}
    per = {z: float(np.linalg.norm(err[z], axis=1).max()) for z in good}
    nb = [float(np.linalg.norm(err[b] - err[a], axis=1).max()) for a, b in itertools.pairwise(good)]
    bridged = {}
    for z in bad:
        lo = max((g for g in good if g < z), default=None)
        hi = min((g for g in good if g > z), default=None)
        ends = [g for g in (lo, hi) if g is not None]
        if len(ends) == 2:
            f = (z - lo) / (hi - lo)  # type: ignore[operator]
            t = [(1 - f) * a + f * b for a, b in zip(world[lo], world[hi], strict=True)]  # type: ignore[index]
        else:
            t = world[ends[0]]
        bridged[z] = float(np.linalg.norm(landing(z, t), axis=1).max())
    return {
        "anywhere": max(per.values()),
        "neighbours": max(nb) if nb else 0.0,
        "bridged": max(bridged.values()) if bridged else 0.0,
        "per_slice": per,
        "per_bad_slice": bridged,
    }
