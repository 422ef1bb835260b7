"""Align one EM slice onto the previous one with SIFT + RANSAC: arrays in, result out.

Every transform here follows :mod:`emprocess.affine`: 6 numbers in mpicbg order
``[m00, m10, m01, m11, m02, m12]`` that map pixels of ``post`` (slice z+1) onto
pixels of ``pre`` (slice z), with pixel centres at integer coordinates and the
origin at the centre of the top-left pixel (OpenCV layout).

The recipe is the one of the Fiji script the project replaces (mpicbg SIFT,
``FeatureTransform.matchFeatures``, ``Model.filterRansac``), mapped onto OpenCV:

* Fiji does not upsample the image before its first octave; OpenCV always
  doubles it. We therefore hand OpenCV the image shrunk by 2, so that OpenCV's
  first octave sits at the native resolution like Fiji's (the first octave's
  1.6 px blur removes most of what the 2x box filter loses); this makes
  detection about 4x cheaper. Images no larger than ``dense_max_size`` keep
  OpenCV's doubled octave, because they have few features to spare. For an
  initial sigma below 1, Fiji itself upsamples, and so do we.
* Fiji's descriptor size 4 (4x4 spatial bins of 8 orientations) is OpenCV's
  fixed 128-number descriptor.
* Features are capped at the strongest ``max_features`` per image: matching
  cost grows with their product and the fit does not need thousands.
* After RANSAC, every model is refit by least squares on its inliers, dropping
  those beyond ``max_trust`` times the median residual (mpicbg's ``filter``);
  the translation's fit is the mean displacement of its inliers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from emprocess import affine
from emprocess.errors import InvalidInput

logger = logging.getLogger(__name__)

_IDENTITY = list(affine.IDENTITY)


class AlignParams(BaseModel):
    """Matching recipe: the Fiji script's settings plus the OpenCV-specific knobs.

    Fiji's defaults are kept; ``dense_max_size``, ``max_features`` and
    ``contrast_threshold`` have no Fiji counterpart and trade time for features.
    Every knob that costs time has an upper bound, so that any accepted recipe
    aligns a pair in a few seconds: the worst one (1024 px octaves, 2000 features,
    1 to 6 steps, every retry, 10000 RANSAC hypotheses, no model found) took 4.5 s
    on a 2048^2 pair on a shared core, against 0.2 s with the defaults. Types are
    strict (no ``true`` for 1, no ``"4"`` for 4).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    saturated_percent: float = Field(
        default=0.35,
        ge=0.0,
        lt=50.0,
        allow_inf_nan=False,
        description="Contrast stretch as ImageJ's 'Enhance Contrast saturated=': percent of "
        "pixels clipped, half at each end; also how uint16 input is scaled to 8 bits.",
    )
    feature_descriptor_size: int = Field(
        default=4,
        description="Fiji's fdSize: spatial bins per side of the SIFT descriptor. OpenCV's "
        "descriptor is fixed at 4x4 bins of 8 orientations, so only 4 is accepted.",
    )
    min_octave_size: int = Field(
        default=64,
        ge=16,
        le=1024,
        description="Smallest octave (shorter image side, px) whose features are used.",
    )
    max_octave_size: int = Field(
        default=1024,
        ge=64,
        le=1024,
        description="Largest octave (longer image side, px): larger images are matched after "
        "halving until they fit, like Fiji's maxOctaveSize.",
    )
    initial_sigma: float = Field(
        default=1.6, ge=0.5, le=6.0, description="Blur (px) of the first octave's base image."
    )
    steps: int = Field(
        default=3, ge=1, le=6, description="Scale steps per octave of the first attempt."
    )
    max_steps: int = Field(
        default=5,
        ge=1,
        le=6,
        description="While a model is missing, retry with one more step per octave up to this.",
    )
    retry_initial_sigma: float | None = Field(
        default=0.8,
        ge=0.5,
        le=6.0,
        description="Last retry at max_steps with this initial sigma (px); null skips it.",
    )
    dense_max_size: int = Field(
        default=300,
        ge=0,
        le=512,
        description="Images whose longer side (px, after max_octave_size halving) is at most "
        "this are matched with OpenCV's doubled first octave: more, better-placed features "
        "for small images at 4x the detection cost.",
    )
    max_features: int = Field(
        default=1000,
        ge=1,
        le=2000,
        description="Keep only the strongest N features per image; bounds the matching time.",
    )
    contrast_threshold: float = Field(
        default=0.04,
        gt=0.0,
        le=1.0,
        description="OpenCV SIFT contrast threshold (divided by steps inside OpenCV).",
    )
    ratio: float = Field(
        default=0.92,
        gt=0.0,
        le=1.0,
        description="Ratio test: keep a match when best / second-best descriptor distance is "
        "below this (Fiji's rod).",
    )
    ransac_iterations: int = Field(default=1000, ge=1, le=10_000, description="RANSAC hypotheses.")
    max_epsilon_px: float = Field(
        default=25.0,
        gt=0.0,
        le=1000.0,
        description="RANSAC inlier distance (px of the matched images).",
    )
    min_inlier_ratio: float = Field(
        default=0.05, ge=0.0, le=1.0, description="Minimum inliers / candidate matches for a model."
    )
    min_num_inliers: int = Field(
        default=20, ge=3, le=2000, description="Minimum inliers for a model."
    )
    max_trust: float = Field(
        default=3.0,
        gt=1.0,
        le=100.0,
        description="After RANSAC, drop inliers whose residual exceeds max_trust times the "
        "median and refit, until none is dropped (mpicbg's filter).",
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> AlignParams:
        if self.feature_descriptor_size != 4:
            raise ValueError(
                f"feature_descriptor_size={self.feature_descriptor_size} is not supported: "
                "OpenCV's SIFT descriptor has 4x4 spatial bins, so it must be 4"
            )
        if self.max_octave_size < self.min_octave_size:
            raise ValueError(
                f"max_octave_size={self.max_octave_size} must be >= "
                f"min_octave_size={self.min_octave_size}"
            )
        if self.max_steps < self.steps:
            raise ValueError(f"max_steps={self.max_steps} must be >= steps={self.steps}")
        return self


class AlignResult(BaseModel):
    """Outcome of :func:`align_pair`; pixel units are those of the arrays given."""

    width: int = Field(description="Width of post (px).")
    height: int = Field(description="Height of post (px).")
    width0: int = Field(description="Width of pre (px).")
    height0: int = Field(description="Height of pre (px).")
    affine: list[float] = Field(
        description="Affine post -> pre, mpicbg order; identity when not found."
    )
    translation: list[float] = Field(
        description="Translation post -> pre, mpicbg order; identity when not found."
    )
    affine_found: bool = Field(description="Whether an affine model was found.")
    translation_found: bool = Field(description="Whether a translation model was found.")
    affine_inliers: int = Field(description="Inlier matches of the affine (best try if not found).")
    translation_inliers: int = Field(description="Inlier matches of the translation.")
    affine_mean_residual_px: float | None = Field(
        description="Mean inlier residual of the affine (px); null when not found."
    )
    affine_max_residual_px: float | None = Field(
        description="Largest inlier residual of the affine (px); null when not found."
    )
    translation_mean_residual_px: float | None = Field(
        description="Mean inlier residual of the translation (px); null when not found."
    )
    translation_max_residual_px: float | None = Field(
        description="Largest inlier residual of the translation (px); null when not found."
    )
    features_pre: int = Field(description="SIFT features used in pre (last attempt).")
    features_post: int = Field(description="SIFT features used in post (last attempt).")
    matches: int = Field(description="Candidate matches after the ratio test (last attempt).")
    attempts: int = Field(description="Feature extractions run (1 + retries).")
    seconds: float = Field(description="Wall time of align_pair (s).")


def downsample_image(image: np.ndarray, factor: int) -> np.ndarray:
    """Shrink a 2-D image by an integer factor, averaging factor x factor blocks.

    The right and bottom rows that do not fill a whole block are dropped, so
    output pixel ``p`` averages exactly input pixels ``factor * p .. factor * p +
    factor - 1`` and :func:`emprocess.affine.rescale` converts transforms exactly.

    Args:
        image: (H, W) uint8 or uint16 array.
        factor: Integer shrink factor >= 1.

    Returns:
        (H // factor, W // factor) array of the same dtype.

    Raises:
        InvalidInput: For a bad factor, or an image smaller than one block.
    """
    if isinstance(factor, bool) or not isinstance(factor, int | np.integer) or factor < 1:
        raise InvalidInput(f"downsample factor must be an integer >= 1, got {factor!r}")
    _check_image(image, "image")
    if factor == 1:
        return image
    h, w = image.shape[0] // factor, image.shape[1] // factor
    if h == 0 or w == 0:
        raise InvalidInput(
            f"image of {image.shape[1]}x{image.shape[0]} px is smaller than downsample factor "
            f"{factor}"
        )
    block = np.ascontiguousarray(image[: h * factor, : w * factor])
    return cv2.resize(block, (w, h), interpolation=cv2.INTER_AREA)


def stretch_contrast(image: np.ndarray, saturated_percent: float) -> np.ndarray:
    """Linear contrast stretch to uint8, as ImageJ's "Enhance Contrast saturated=...".

    Half of ``saturated_percent`` of the pixels is clipped at each end (ImageJ's
    rule). A constant image becomes all zeros, which yields no features.

    Args:
        image: (H, W) uint8 or uint16 array.
        saturated_percent: Percent of pixels clipped in total, in [0, 50).

    Returns:
        (H, W) uint8 array.
    """
    hist = np.bincount(image.ravel(), minlength=256 if image.dtype == np.uint8 else 65536)
    clipped = int(image.size * saturated_percent / 200.0)
    cum_low = np.cumsum(hist)
    cum_high = np.cumsum(hist[::-1])
    low = int(np.searchsorted(cum_low, clipped, side="right"))
    high = len(hist) - 1 - int(np.searchsorted(cum_high, clipped, side="right"))
    if high <= low:
        return np.zeros(image.shape, dtype=np.uint8)
    levels = np.arange(len(hist), dtype=np.float32)
    lut = np.clip(np.rint((levels - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    return lut[image]


@dataclass(frozen=True)
class _Features:
    xy: np.ndarray  # (N, 2) float64 (x, y) in px
    descriptors: np.ndarray  # (N, 128) float32


def _native_factor(shape: tuple[int, ...], max_octave_size: int) -> int:
    """Power-of-two shrink that brings the longer side within max_octave_size.

    The shorter side is never shrunk below one pixel, so a sliver of an image
    still reaches SIFT (and yields no features) instead of raising.
    """
    factor = 1
    while max(shape) // factor > max_octave_size and min(shape) // (2 * factor) >= 1:
        factor *= 2
    return factor


def _extract_features(
    image8: np.ndarray, params: AlignParams, steps: int, sigma: float
) -> _Features:
    """SIFT features of a uint8 image, positions in its own px (see module docstring).

    Args:
        image8: (H, W) uint8 image already shrunk to at most max_octave_size.
        params: Matching recipe.
        steps: Scale steps per octave.
        sigma: Initial blur (px of ``image8``).
    """
    dense = sigma < 1.0 or max(image8.shape) <= params.dense_max_size
    factor, cv_sigma = (1, 2.0 * sigma) if dense else (2, sigma)
    if min(image8.shape) * (2 if dense else 1) < params.min_octave_size:
        # Even the first octave is below the minimum octave size: no usable feature.
        return _Features(np.empty((0, 2)), np.empty((0, 128), np.float32))
    small = downsample_image(image8, factor)
    sift = cv2.SIFT.create(
        nfeatures=params.max_features,
        nOctaveLayers=steps,
        contrastThreshold=params.contrast_threshold,
        edgeThreshold=10,
        sigma=cv_sigma,
        enable_precise_upscale=True,
    )
    keypoints, descriptors = sift.detectAndCompute(small, None)
    if not keypoints or descriptors is None:
        return _Features(np.empty((0, 2)), np.empty((0, 128), np.float32))
    # OpenCV packs the octave (relative to its input, -1 = doubled) in the low byte.
    octave = np.array([kp.octave & 0xFF for kp in keypoints], dtype=np.int64)
    octave[octave >= 128] -= 256
    keep = min(small.shape) * np.exp2(-octave) >= params.min_octave_size
    pts = np.array([kp.pt for kp in keypoints], dtype=np.float64)[keep]
    return _Features(pts * factor + (factor - 1) / 2.0, descriptors[keep])


def _match(post: _Features, pre: _Features, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Ratio-test matches post -> pre, minus every match whose pre point is shared.

    Returns:
        Two (M, 2) float64 arrays: post points and the pre points they match.
    """
    empty = (np.empty((0, 2)), np.empty((0, 2)))
    if len(post.xy) < 2 or len(pre.xy) < 2:
        return empty
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(post.descriptors, pre.descriptors, k=2)
    pairs = [(m[0].queryIdx, m[0].trainIdx) for m in knn if m[0].distance < ratio * m[1].distance]
    if not pairs:
        return empty
    query, train = np.array(pairs, dtype=np.int64).T
    # mpicbg drops ambiguous matches: several post features landing on one pre
    # location (OpenCV repeats a location once per dominant orientation).
    _, where, counts = np.unique(pre.xy[train], axis=0, return_inverse=True, return_counts=True)
    unique = counts[where.ravel()] == 1
    return post.xy[query[unique]], pre.xy[train[unique]]


@dataclass(frozen=True)
class _Fit:
    matrix: np.ndarray | None  # 2x3 post -> pre, None when no model
    inliers: int
    residuals: np.ndarray  # (inliers,) px, empty when no model


_NO_FIT = _Fit(None, 0, np.empty(0))


def _residuals(matrix: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    return np.linalg.norm(src @ matrix[:, :2].T + matrix[:, 2] - dst, axis=1)


def _fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
    """Least-squares affine src -> dst; None when the points are collinear."""
    src_c, dst_c = src.mean(axis=0), dst.mean(axis=0)
    linear_t, _, rank, _ = np.linalg.lstsq(src - src_c, dst - dst_c, rcond=None)
    if rank < 2:
        return None
    linear = linear_t.T
    return np.hstack([linear, (dst_c - linear @ src_c)[:, None]])


def _fit_translation(src: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
    """Least-squares translation src -> dst: the mean displacement."""
    return np.hstack([np.eye(2), (dst - src).mean(axis=0)[:, None]])


def _filter(
    src: np.ndarray,
    dst: np.ndarray,
    inliers: np.ndarray,
    fit: Callable[[np.ndarray, np.ndarray], np.ndarray | None],
    params: AlignParams,
) -> _Fit:
    """Refit on the inliers, dropping residuals above max_trust x median until stable."""
    while True:
        matrix = fit(src[inliers], dst[inliers])
        if matrix is None:
            return _Fit(None, len(inliers), np.empty(0))
        res = _residuals(matrix, src[inliers], dst[inliers])
        keep = res <= params.max_trust * float(np.median(res))
        if keep.all():
            ok = len(inliers) >= params.min_num_inliers
            return _Fit(matrix if ok else None, len(inliers), res)
        inliers = inliers[keep]
        if len(inliers) < params.min_num_inliers:
            return _Fit(None, len(inliers), np.empty(0))


def _enough(n_inliers: int, n_matches: int, params: AlignParams) -> bool:
    return n_inliers >= params.min_num_inliers and n_inliers >= params.min_inlier_ratio * n_matches


def _fit_affine_ransac(src: np.ndarray, dst: np.ndarray, params: AlignParams) -> _Fit:
    if len(src) < max(3, params.min_num_inliers):
        return _NO_FIT
    matrix, mask = cv2.estimateAffine2D(
        src,
        dst,
        method=cv2.RANSAC,
        ransacReprojThreshold=params.max_epsilon_px,
        maxIters=params.ransac_iterations,
        confidence=0.999,
        refineIters=0,  # the refit is _filter's least squares
    )
    if matrix is None or mask is None:
        return _NO_FIT
    inliers = np.flatnonzero(mask.ravel())
    if not _enough(len(inliers), len(src), params):
        return _Fit(None, len(inliers), np.empty(0))
    return _filter(src, dst, inliers, _fit_affine, params)


def _fit_translation_ransac(src: np.ndarray, dst: np.ndarray, params: AlignParams) -> _Fit:
    if len(src) < params.min_num_inliers:
        return _NO_FIT
    shifts = (dst - src).astype(np.float32)
    # One match defines a translation: try every match as the hypothesis, or a
    # fixed random subset when there are more matches than iterations.
    hypotheses = shifts
    if len(shifts) > params.ransac_iterations:
        pick = np.random.default_rng(0).choice(len(shifts), params.ransac_iterations, False)
        hypotheses = shifts[pick]
    eps2 = np.float32(params.max_epsilon_px**2)
    counts = np.concatenate(
        [
            (((chunk[:, None, :] - shifts[None, :, :]) ** 2).sum(axis=2) < eps2).sum(axis=1)
            for chunk in np.array_split(hypotheses, -(-len(hypotheses) // 256))
        ]
    )
    best = hypotheses[int(np.argmax(counts))]
    inliers = np.flatnonzero(((shifts - best) ** 2).sum(axis=1) < eps2)
    if not _enough(len(inliers), len(src), params):
        return _Fit(None, len(inliers), np.empty(0))
    return _filter(src, dst, inliers, _fit_translation, params)


def _check_image(image: object, name: str) -> None:
    if not isinstance(image, np.ndarray):
        raise InvalidInput(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.ndim != 2:
        raise InvalidInput(f"{name} must be a 2-D (height, width) array, got shape {image.shape}")
    if image.dtype not in (np.uint8, np.uint16):
        raise InvalidInput(f"{name} must be uint8 or uint16, got dtype {image.dtype}")
    if image.size == 0:
        raise InvalidInput(f"{name} is empty (shape {image.shape})")


def _better(old: _Fit, new: _Fit) -> _Fit:
    """The found fit, else the one with more inliers (reported when none is found)."""
    return new if new.matrix is not None or new.inliers >= old.inliers else old


def _params6(fit: _Fit) -> list[float]:
    return _IDENTITY.copy() if fit.matrix is None else affine.from_matrix(fit.matrix)


def _stat(fit: _Fit, reduce: Callable[[np.ndarray], np.floating]) -> float | None:
    return None if fit.matrix is None else float(reduce(fit.residuals))


def _prepare(image: np.ndarray, params: AlignParams) -> tuple[np.ndarray, int]:
    """Shrink to the largest octave Fiji would use, then contrast-stretch to uint8.

    Shrinking first keeps the histogram pass cheap on very large slices; the
    percentiles of the shrunk image are those of the full one within a grey level.
    """
    factor = _native_factor(image.shape, params.max_octave_size)
    return stretch_contrast(downsample_image(image, factor), params.saturated_percent), factor


def _features_in_input_px(
    image8: np.ndarray, factor: int, params: AlignParams, steps: int, sigma: float
) -> _Features:
    features = _extract_features(image8, params, steps, sigma)
    return _Features(features.xy * factor + (factor - 1) / 2.0, features.descriptors)


EXTRACTION_FIELDS = (
    "saturated_percent",
    "min_octave_size",
    "max_octave_size",
    "initial_sigma",
    "steps",
    "dense_max_size",
    "max_features",
    "contrast_threshold",
)
"""The :class:`AlignParams` fields that shape a slice's first-attempt features; the
others (ratio test, RANSAC, retries) act only on matching."""


def extraction_recipe(params: AlignParams) -> dict[str, float | int]:
    """The fields of ``params`` that shape :func:`extract_features`' answer (a cache key)."""
    return {name: getattr(params, name) for name in EXTRACTION_FIELDS}


@dataclass(frozen=True)
class SliceFeatures:
    """One slice's SIFT features of the ladder's first attempt (``steps``, ``initial_sigma``).

    Computed once per slice and matched against every neighbour: matching two stored
    sets gives exactly the answer of :func:`align_pair` on the two images, because the
    first attempt of a pair extracts each image's features on its own (nothing in the
    extraction depends on the other slice).

    Attributes:
        width: width (px) of the array the features were extracted from.
        height: its height (px).
        xy: (N, 2) float64 positions (x, y) in px of that array.
        descriptors: (N, 128) float32 SIFT descriptors.
    """

    width: int
    height: int
    xy: np.ndarray
    descriptors: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.xy)
        if self.xy.shape != (n, 2) or self.descriptors.shape != (n, 128):
            raise InvalidInput(
                f"features need (N, 2) positions and (N, 128) descriptors, got "
                f"{self.xy.shape} and {self.descriptors.shape}"
            )


def extract_features(image: np.ndarray, params: AlignParams | None = None) -> SliceFeatures:
    """The first attempt's features of one slice, as :func:`align_pair` extracts them.

    Args:
        image: (H, W) uint8 or uint16 image (already downsampled and windowed as the
            pair's images would be).
        params: Matching recipe; only :data:`EXTRACTION_FIELDS` matter.

    Raises:
        InvalidInput: When the image is not a non-empty 2-D uint8/uint16 array.
    """
    _check_image(image, "image")
    p = params or AlignParams()
    image8, factor = _prepare(image, p)
    f = _features_in_input_px(image8, factor, p, p.steps, p.initial_sigma)
    return SliceFeatures(image.shape[1], image.shape[0], f.xy, f.descriptors)


LaterFeatures = Callable[[int, float], tuple[_Features, _Features]]
"""(steps, sigma) -> the (pre, post) features of a retry."""


def _ladder(p: AlignParams) -> list[tuple[int, float]]:
    ladder = [(steps, p.initial_sigma) for steps in range(p.steps, p.max_steps + 1)]
    if p.retry_initial_sigma is not None:
        ladder.append((p.max_steps, p.retry_initial_sigma))
    return ladder


def align_pair(pre: np.ndarray, post: np.ndarray, params: AlignParams | None = None) -> AlignResult:
    """Find the affine and the translation that map ``post`` onto ``pre``.

    Follows the Fiji script: contrast stretch, SIFT, ratio test, RANSAC + robust
    least-squares refit for an affine and a translation model; while either is
    missing, retry with more scale steps per octave, then once with a smaller
    initial sigma. A model found by an earlier attempt is kept.

    Args:
        pre: (H0, W0) uint8 or uint16 image of slice z.
        post: (H, W) uint8 or uint16 image of slice z+1.
        params: Matching recipe; defaults to :class:`AlignParams`'s.

    Returns:
        The transforms in pixels of the given arrays (use
        :func:`emprocess.affine.rescale` for images that were downsampled).
        A model that cannot be found is the identity with ``*_found=False``.

    Raises:
        InvalidInput: When an image is not a non-empty 2-D uint8/uint16 array.
    """
    started = time.perf_counter()
    _check_image(pre, "pre")
    _check_image(post, "post")
    p = params or AlignParams()
    pre8, pre_factor = _prepare(pre, p)
    post8, post_factor = _prepare(post, p)

    def features(steps: int, sigma: float) -> tuple[_Features, _Features]:
        return (
            _features_in_input_px(pre8, pre_factor, p, steps, sigma),
            _features_in_input_px(post8, post_factor, p, steps, sigma),
        )

    first = features(p.steps, p.initial_sigma)
    return _run_ladder(pre.shape, post.shape, first, features, p, started)


def align_features(
    pre: SliceFeatures,
    post: SliceFeatures,
    params: AlignParams | None = None,
    images: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
) -> AlignResult:
    """:func:`align_pair` from stored first-attempt features; same answer, no decoding.

    The retries (more steps, a smaller sigma) need other features than the stored
    ones: only when the first attempt leaves a model missing is ``images`` called for
    the (pre, post) images, and the rest of the ladder runs on them as
    :func:`align_pair` would. Without ``images`` the answer is the first attempt's.

    Args:
        pre: features of slice z (:func:`extract_features`, same ``params``).
        post: features of slice z+1.
        params: Matching recipe; must be the one that extracted the features.
        images: gives the (pre, post) images the features were extracted from.
    """
    started = time.perf_counter()
    p = params or AlignParams()
    first = (_Features(pre.xy, pre.descriptors), _Features(post.xy, post.descriptors))
    later: LaterFeatures | None = None
    if images is not None:
        prepared: list[tuple[np.ndarray, int]] = []

        def later_features(steps: int, sigma: float) -> tuple[_Features, _Features]:
            if not prepared:
                pre_image, post_image = images()
                _check_image(pre_image, "pre")
                _check_image(post_image, "post")
                prepared.extend([_prepare(pre_image, p), _prepare(post_image, p)])
            (pre8, pre_factor), (post8, post_factor) = prepared
            return (
                _features_in_input_px(pre8, pre_factor, p, steps, sigma),
                _features_in_input_px(post8, post_factor, p, steps, sigma),
            )

        later = later_features
    shapes = (pre.height, pre.width), (post.height, post.width)
    return _run_ladder(shapes[0], shapes[1], first, later, p, started)


def _run_ladder(
    pre_shape: tuple[int, ...],
    post_shape: tuple[int, ...],
    first: tuple[_Features, _Features],
    later: LaterFeatures | None,
    p: AlignParams,
    started: float,
) -> AlignResult:
    """Match the first attempt's features, then retry up the ladder while a model is missing."""
    best_affine = best_translation = _NO_FIT
    n_pre = n_post = n_matches = attempts = 0
    for steps, sigma in _ladder(p):
        if not attempts:
            f_pre, f_post = first
        elif later is None:
            break
        else:
            f_pre, f_post = later(steps, sigma)
        attempts += 1
        src, dst = _match(f_post, f_pre, p.ratio)
        n_pre, n_post, n_matches = len(f_pre.xy), len(f_post.xy), len(src)
        if best_affine.matrix is None:
            best_affine = _better(best_affine, _fit_affine_ransac(src, dst, p))
        if best_translation.matrix is None:
            best_translation = _better(best_translation, _fit_translation_ransac(src, dst, p))
        logger.debug(
            "attempt %d (steps=%d, sigma=%.2f): %d/%d features, %d matches, "
            "affine %d inliers, translation %d inliers",
            attempts, steps, sigma, n_post, n_pre, n_matches,
            best_affine.inliers, best_translation.inliers,
        )  # fmt: skip
        if best_affine.matrix is not None and best_translation.matrix is not None:
            break

    return AlignResult(
        width=post_shape[1],
        height=post_shape[0],
        width0=pre_shape[1],
        height0=pre_shape[0],
        affine=_params6(best_affine),
        translation=_params6(best_translation),
        affine_found=best_affine.matrix is not None,
        translation_found=best_translation.matrix is not None,
        affine_inliers=best_affine.inliers,
        translation_inliers=best_translation.inliers,
        affine_mean_residual_px=_stat(best_affine, np.mean),
        affine_max_residual_px=_stat(best_affine, np.max),
        translation_mean_residual_px=_stat(best_translation, np.mean),
        translation_max_residual_px=_stat(best_translation, np.max),
        features_pre=n_pre,
        features_post=n_post,
        matches=n_matches,
        attempts=attempts,
        seconds=time.perf_counter() - started,
    )
