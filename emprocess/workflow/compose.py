"""Combine pairwise alignment results into one global transform per slice (pure; no I/O).

Conventions are :mod:`emprocess.affine`'s: 6 numbers in mpicbg order, mapping pixel
(x, y), origin at the centre of the top-left pixel. A pair result maps slice z+1
("post") onto slice z ("pre"). The alignment service already reports transforms with
that top-left origin, so CONTRACTS.md's "move the origin to the image's top-left" needs
no further step here; "scale the translation part back" is :func:`emprocess.affine.rescale`.

Global transforms map each slice into the frame of slice ``minz``, shifted so that the
bounding box of all transformed slices starts at (0, 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from emprocess import affine
from emprocess.records.tables import QcRow, TransformRow

SHEAR_TRANSLATION_MAX = 0.0008
"""Use the translation model when the affine's |m01| is at most this (CONTRACTS.md)."""


@dataclass(frozen=True)
class PairChoice:
    """The transform chosen for one pair (pre = z, post = z + 1), at full resolution."""

    pre: int
    post: int
    model: str  # "affine", "translation" or "identity"
    transform: list[float]
    m01: float | None = None
    affine_inliers: int | None = None
    translation_inliers: int | None = None
    affine_residual_px: float | None = None
    translation_residual_px: float | None = None


@dataclass(frozen=True)
class Composition:
    """Global transforms of every slice and the canvas they fill."""

    transforms: dict[int, list[float]]
    bbox_xy: tuple[int, int]
    pairs: list[PairChoice] = field(default_factory=list)


def model_found(result: Mapping[str, Any], model: str) -> bool:
    """Whether the answer found ``model`` ("affine" or "translation"), legacy answers too."""
    flag = result.get(f"{model}_found")
    if flag is not None:
        return bool(flag)
    # Legacy responses have no flag: an identity transform meant "not found".
    params = result.get(model)
    return params is not None and list(map(float, params)) != list(affine.IDENTITY)


def choose_pair_transform(
    result: Mapping[str, Any], pre: int, downsample_factor: int = 1
) -> PairChoice:
    """Pick the model of one pair result and express it at full resolution.

    The affine is used unless its rotation/shear term is small in magnitude
    (|m01| <= ``SHEAR_TRANSLATION_MAX``; the original compared without ``abs`` and took
    the translation for any negative m01) or it was not found; then the translation,
    when found; else the identity.

    Args:
        result: the alignment service's answer (``affine``, ``translation``,
            ``affine_found``, ``translation_found``, inlier counts, residuals).
        pre: the pair's first slice z; post is z + 1.
        downsample_factor: the factor the service shrank the slices by.
    """
    affine_ok = model_found(result, "affine")
    translation_ok = model_found(result, "translation")
    m01 = float(result["affine"][2]) if result.get("affine") is not None else None
    if affine_ok and m01 is not None and abs(m01) > SHEAR_TRANSLATION_MAX:
        model = "affine"
    elif translation_ok:
        model = "translation"
    elif affine_ok:
        model = "affine"
    else:
        model = "identity"
    if model == "identity":
        transform = list(affine.IDENTITY)
    else:
        params = [float(v) for v in result[model]]
        transform = affine.rescale(params, downsample_factor) if downsample_factor != 1 else params
    return PairChoice(
        pre=pre,
        post=pre + 1,
        model=model,
        transform=transform,
        m01=m01,
        affine_inliers=result.get("affine_inliers"),
        translation_inliers=result.get("translation_inliers"),
        affine_residual_px=result.get("affine_mean_residual_px"),
        translation_residual_px=result.get("translation_mean_residual_px"),
    )


def compose_global(
    pair_transforms: Mapping[int, Sequence[float]],
    minz: int,
    maxz: int,
    slice_size_xy: tuple[int, int],
) -> tuple[dict[int, list[float]], tuple[int, int]]:
    """Chain pairwise transforms from ``minz`` upward and fit the canvas around all slices.

    Args:
        pair_transforms: z -> transform mapping slice z+1 onto slice z (full resolution),
            for every z in [minz, maxz).
        minz: first slice, inclusive.
        maxz: last slice, inclusive.
        slice_size_xy: (width, height) of every slice in pixels.

    Returns:
        (transforms, bbox_xy): z -> transform from slice z into the canvas, and the canvas
        (width, height) in pixels; the box of all transformed slice corners starts at (0, 0).

    Raises:
        ValueError: when a pair between minz and maxz is missing.
    """
    missing = [z for z in range(minz, maxz) if z not in pair_transforms]
    if missing:
        shown = ", ".join(str(z) for z in missing[:10])
        raise ValueError(f"{len(missing)} pair transforms missing, for pre slices {shown}")
    chained: dict[int, list[float]] = {minz: list(affine.IDENTITY)}
    for z in range(minz, maxz):
        chained[z + 1] = affine.compose(chained[z], pair_transforms[z])
    return fit_canvas(chained, slice_size_xy)


def fit_canvas(
    transforms: Mapping[int, Sequence[float]], slice_size_xy: tuple[int, int]
) -> tuple[dict[int, list[float]], tuple[int, int]]:
    """Shift transforms so the box of all transformed slice corners starts at (0, 0).

    Returns:
        (transforms, bbox_xy): the shifted transforms and the canvas (width, height) in px.
    """
    corners = affine.corners_xy(*slice_size_xy)
    lo_x = lo_y = math.inf
    hi_x = hi_y = -math.inf
    for transform in transforms.values():
        pts = affine.apply(transform, corners)
        lo_x, lo_y = min(lo_x, float(pts[:, 0].min())), min(lo_y, float(pts[:, 1].min()))
        hi_x, hi_y = max(hi_x, float(pts[:, 0].max())), max(hi_y, float(pts[:, 1].max()))
    # Snap to whole pixels; the rounding guard keeps 1023.9999999 from growing the canvas.
    shift_x, shift_y = math.floor(round(lo_x, 6)), math.floor(round(lo_y, 6))
    bbox = (math.ceil(round(hi_x, 6)) - shift_x, math.ceil(round(hi_y, 6)) - shift_y)
    shift = affine.translation(-shift_x, -shift_y)
    return {z: affine.compose(shift, t) for z, t in transforms.items()}, bbox


def compose_alignment(
    results: Mapping[int, Mapping[str, Any]],
    minz: int,
    maxz: int,
    slice_size_xy: tuple[int, int],
    downsample_factor: int = 1,
) -> Composition:
    """From the alignment service's pair results to global transforms and the canvas.

    Args:
        results: pre slice z -> the service's answer for the pair (z, z + 1).
        minz: first slice, inclusive.
        maxz: last slice, inclusive.
        slice_size_xy: (width, height) of every slice at full resolution.
        downsample_factor: the factor the service shrank the slices by.
    """
    pairs = [choose_pair_transform(results[z], z, downsample_factor) for z in sorted(results)]
    transforms, bbox = compose_global(
        {p.pre: p.transform for p in pairs}, minz, maxz, slice_size_xy
    )
    return Composition(transforms=transforms, bbox_xy=bbox, pairs=pairs)


def identity_alignment(minz: int, maxz: int, slice_size_xy: tuple[int, int]) -> Composition:
    """``skip_align``: every slice keeps its place; the canvas is the slice size."""
    transforms = {z: list(affine.IDENTITY) for z in range(minz, maxz + 1)}
    return Composition(transforms=transforms, bbox_xy=(slice_size_xy[0], slice_size_xy[1]))


def transforms_csv(transforms: Mapping[int, Sequence[float]]) -> str:
    """transforms.csv: ``slice,m00,m10,m01,m11,m02,m12`` (mpicbg order), one row per slice."""
    return TransformRow.rows_to_csv(TransformRow.of(z, transforms[z]) for z in sorted(transforms))


def qc_fields(p: PairChoice) -> dict[str, Any]:
    """:class:`QcRow`'s fields of one pair: model used, |m01|, inlier counts and mean
    residuals (px)."""
    return {
        "pre": p.pre,
        "post": p.post,
        "model": p.model,
        "m01": p.m01,
        "affine_inliers": p.affine_inliers,
        "translation_inliers": p.translation_inliers,
        "affine_residual_px": p.affine_residual_px,
        "translation_residual_px": p.translation_residual_px,
    }


def qc_row(p: PairChoice) -> QcRow:
    """qc.csv's row of one pair (:func:`qc_fields`)."""
    return QcRow(**qc_fields(p))


def qc_csv(pairs: Sequence[PairChoice]) -> str:
    """Per-pair QC table (align/qc.csv without the global solve), one :func:`qc_row` each."""
    return QcRow.rows_to_csv(qc_row(p) for p in pairs)
