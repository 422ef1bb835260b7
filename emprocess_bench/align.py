"""Benchmark of the alignment kernel: time and accuracy per image size and downsample factor."""

from __future__ import annotations

import time
from collections.abc import Sequence

import cv2
import numpy as np

from emprocess import affine
from emprocess.errors import InvalidInput
from emprocess.kernels.align import AlignParams, AlignResult, align_pair, downsample_image

# A small affine of the kind consecutive slices show: shift, 0.5 deg, 0.3% scale.
BENCH_TRUTH: tuple[float, ...] = tuple(
    affine.compose(
        affine.translation(37.3, -21.6),
        affine.from_matrix(cv2.getRotationMatrix2D((0.0, 0.0), 0.5, 1.003)),
    )
)


def synthetic_texture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """FIB-SEM-like texture: grey cells with dark membranes, dark organelles, vesicles.

    Args:
        width: Image width (px).
        height: Image height (px).
        seed: Random seed; the same seed gives the same image.

    Returns:
        (height, width) uint8 array.
    """
    rng = np.random.default_rng(seed)
    canvas = np.full((height, width), 150, dtype=np.uint8)
    area = width * height
    # Cells (outlined), organelles (dark, filled) and vesicles (small rings),
    # each count scaled to the area so the density does not depend on size.
    for count, r_min, r_max, kind in (
        (area // 2500, 12, 70, "cell"),
        (area // 6000, 5, 25, "organelle"),
        (area // 1500, 2, 6, "vesicle"),
    ):
        centres = rng.uniform((0, 0), (width, height), size=(count, 2)).astype(np.int32)
        axes = rng.uniform(r_min, r_max, size=(count, 2)).astype(np.int32)
        angles = rng.uniform(0, 180, size=count)
        fills = rng.integers(120, 230, size=count)
        for (cx, cy), (ax, ay), angle, fill in zip(centres, axes, angles, fills, strict=True):
            centre, size = (int(cx), int(cy)), (int(ax), int(ay))
            if kind == "cell":
                cv2.ellipse(canvas, centre, size, float(angle), 0, 360, int(fill), -1)
                cv2.ellipse(canvas, centre, size, float(angle), 0, 360, 40, 2)
            elif kind == "organelle":
                cv2.ellipse(canvas, centre, size, float(angle), 0, 360, int(fill) // 3, -1)
            else:
                cv2.ellipse(canvas, centre, size, float(angle), 0, 360, 60, 1)
    blurred = cv2.GaussianBlur(canvas, (0, 0), 1.0)
    return add_noise(blurred, 6.0, rng)


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add Gaussian noise of ``sigma`` grey levels to a uint8 image, clipped to 0..255."""
    noisy = image.astype(np.float32)
    noisy += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def make_pair(
    base: np.ndarray,
    truth: Sequence[float],
    width: int,
    height: int,
    margin: int,
    noise_sigma: float = 4.0,
    seed: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a (pre, post) pair from ``base`` whose true post -> pre transform is ``truth``.

    ``post`` is ``base[margin:margin + height, margin:margin + width]``: post pixel
    ``q`` is base pixel ``q + margin``. ``pre`` is ``base`` warped by
    ``S = truth o shift(-margin)``, which moves base pixel ``b`` to pre pixel
    ``S b``; so post pixel ``q`` lands on pre pixel ``truth(q)``. Independent
    noise is then added to each image.

    Args:
        base: (H, W) uint8 texture with at least ``margin`` px around the crop.
        truth: Transform post -> pre, 6 numbers in mpicbg order.
        width: Width of both images (px).
        height: Height of both images (px).
        margin: Offset of post inside base (px).
        noise_sigma: Gaussian noise added to each image (grey levels).
        seed: Seed of that noise.

    Returns:
        (pre, post), each (height, width) uint8.
    """
    warp = affine.compose(truth, affine.translation(-margin, -margin))
    pre = cv2.warpAffine(base, affine.to_matrix(warp), (width, height), flags=cv2.INTER_CUBIC)
    post = base[margin : margin + height, margin : margin + width]
    rng = np.random.default_rng(seed)
    return add_noise(pre, noise_sigma, rng), add_noise(post, noise_sigma, rng)


def _timed_align(
    pre: np.ndarray, post: np.ndarray, factor: int, params: AlignParams | None
) -> tuple[AlignResult, float, float]:
    """Downsample and align once; returns the result, wall seconds and CPU seconds."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = align_pair(downsample_image(pre, factor), downsample_image(post, factor), params)
    return result, time.perf_counter() - wall0, time.process_time() - cpu0


def run_align_benchmark(
    sizes: Sequence[int] = (2048, 8192),
    downsamples: Sequence[int] = (1, 2, 4),
    repeats: int = 3,
    params: AlignParams | None = None,
) -> list[dict[str, float | int | bool]]:
    """Time :func:`align_pair` (with the downsampling step) on synthetic square pairs.

    Call ``cv2.setNumThreads(1)`` first to measure one core; CPU seconds are
    ``time.process_time`` of this process, so they count every thread.

    Args:
        sizes: Side lengths (px) of the full-resolution pairs.
        downsamples: Integer factors applied before matching.
        repeats: Runs per case (>= 1); the fastest wall and CPU times are reported.
        params: Matching recipe; defaults to :class:`AlignParams`'s.

    Returns:
        One row per (size, downsample) with ``size``, ``downsample``,
        ``wall_s``, ``cpu_s``, ``error_px`` (mean corner error of the affine in
        full-resolution px), ``found``, ``inliers`` and ``features``.
    """
    if repeats < 1:
        raise InvalidInput(f"repeats must be >= 1, got {repeats}")
    rows: list[dict[str, float | int | bool]] = []
    for size in sizes:
        margin = 128
        base = synthetic_texture(size + 2 * margin, size + 2 * margin, seed=size)
        pre, post = make_pair(base, BENCH_TRUTH, size, size, margin)
        del base
        for factor in downsamples:
            runs = [_timed_align(pre, post, factor, params) for _ in range(repeats)]
            result = runs[-1][0]
            full = affine.rescale(result.affine, factor)
            rows.append(
                {
                    "size": size,
                    "downsample": factor,
                    "wall_s": min(run[1] for run in runs),
                    "cpu_s": min(run[2] for run in runs),
                    "error_px": affine.mean_corner_error(full, BENCH_TRUTH, size, size),
                    "found": result.affine_found,
                    "inliers": result.affine_inliers,
                    "features": min(result.features_pre, result.features_post),
                }
            )
    return rows


def print_align_benchmark(rows: Sequence[dict[str, float | int | bool]]) -> None:
    """Print benchmark rows as a table."""
    print(
        f"{'size':>6} {'down':>4} {'wall s':>8} {'cpu s':>8} {'err px':>8} "
        f"{'found':>5} {'inliers':>7} {'features':>8}"
    )
    for r in rows:
        print(
            f"{r['size']:>6} {r['downsample']:>4} {r['wall_s']:>8.3f} {r['cpu_s']:>8.3f} "
            f"{r['error_px']:>8.3f} {r['found']!s:>5} {r['inliers']:>7} {r['features']:>8}"
        )


if __name__ == "__main__":
    cv2.setNumThreads(1)
    print_align_benchmark(run_align_benchmark())
