"""``emprocess bench solve``: time and peak memory of collect's global solve at scale."""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from emprocess import affine
from emprocess.workflow.globalalign import global_alignment

SIZE_XY = (2048, 2048)


def synthetic_answers(
    n: int, k: int, seed: int = 0
) -> tuple[dict[tuple[int, int], dict[str, Any]], np.ndarray]:
    """Alignment answers of a rigid random walk (pairs to k neighbours, with noise), and
    the true global transforms (n, 6)."""
    rng = np.random.default_rng(seed)
    angles = np.cumsum(np.radians(rng.uniform(-0.15, 0.15, n)))
    shifts = np.cumsum(rng.uniform(-6, 6, (n, 2)), axis=0)
    c, s = np.cos(angles), np.sin(angles)
    truth = np.stack([c, s, -s, c, shifts[:, 0], shifts[:, 1]], axis=1)
    h = np.zeros((n, 3, 3))
    h[:, 0, :] = truth[:, [0, 2, 4]]
    h[:, 1, :] = truth[:, [1, 3, 5]]
    h[:, 2, 2] = 1
    inv = np.linalg.inv(h)
    answers = {}
    for d in range(1, k + 1):
        m = inv[:-d] @ h[d:]  # post -> pre
        noise = rng.normal(0, 1, (n - d, 6)) * [2e-5, 2e-5, 2e-5, 2e-5, 0.05, 0.05]
        six = np.stack([m[:, 0, 0], m[:, 1, 0], m[:, 0, 1], m[:, 1, 1], m[:, 0, 2], m[:, 1, 2]], 1)
        six += noise
        for z in range(n - d):
            params = six[z].tolist()
            answers[(z, z + d)] = {
                "affine": params,
                "translation": params,
                "affine_found": True,
                "translation_found": True,
                "affine_inliers": 300,
                "translation_inliers": 300,
                "affine_mean_residual_px": 0.3,
                "translation_mean_residual_px": 0.4,
                "features_pre": 1000,
                "features_post": 1000,
            }
    return answers, truth


def run_solve_benchmark(sizes: Sequence[int], k: int) -> list[dict[str, Any]]:
    """Run :func:`global_alignment` (what collect runs) on synthetic answers of each size.

    Peak memory is the process's peak resident size (sizes run in ascending order, so the
    largest run's figure is its own).
    """
    rows = []
    for n in sorted(sizes):
        answers, truth = synthetic_answers(n, k)
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = global_alignment(answers, 0, n - 1, SIZE_XY, 1)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        found = result.composition.transforms
        canvas = affine.compose(found[0], affine.invert(truth[0].tolist()))
        corners = affine.corners_xy(*SIZE_XY)
        worst = max(
            float(
                np.linalg.norm(
                    affine.apply(found[z], corners)
                    - affine.apply(affine.compose(canvas, truth[z].tolist()), corners),
                    axis=1,
                ).max()
            )
            for z in range(0, n, max(1, n // 1000))
        )
        rows.append(
            {
                "slices": n,
                "neighbors": k,
                "pairs": len(answers),
                "seconds": round(seconds, 2),
                "cpu_seconds": round(cpu, 2),
                "peak_rss_mib": round(peak_mib),
                "worst_corner_px": round(worst, 2),
            }
        )
    return rows


def print_solve_benchmark(rows: Sequence[dict[str, Any]]) -> None:
    print(f"global solve (collect), {SIZE_XY[0]} px slices, synthetic pairs with noise:")
    for r in rows:
        gib = r["peak_rss_mib"] / 1024
        print(
            f"  {r['slices']:>6} slices x {r['neighbors']} neighbours ({r['pairs']} pairs): "
            f"{r['seconds']:.3f} s ({r['cpu_seconds']:.3f} s CPU), peak memory {gib:.2f} GiB "
            "(process RSS), "
            f"worst corner vs truth {r['worst_corner_px']} px"
            + ("  [target < 60 s, < 2 GiB]" if r["slices"] >= 50_000 else "")
        )
