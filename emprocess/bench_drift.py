"""``emprocess bench drift``: alignment accuracy on real FIB-SEM resliced with known drift.

Reslices the registered slices of a folder (``img.%05d.png``) with a rigid random walk
(:mod:`emprocess.drift`), injects bad slices, aligns every pair with the alignment
service's own kernel (in this process, two threads) and runs collect's global solve.
It compares the transforms with two truths:

* ``raw``: the registered volume's frame. SIFT sees the registered volume itself move
  (its slices are registered to about 1 px, and structures run obliquely through z),
  so this figure includes drift no content-based alignment can remove.
* ``content``: the same method's alignment (same settings) of the undrifted stack,
  composed with the known drift: what the drift alone changes in the result.

Longer stacks than the folder holds run through it forward and back (0..99, 98..0, ...),
which keeps neighbouring slices neighbours.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from emprocess import affine
from emprocess.drift import BLANK, DUPLICATE, NOISE, errors_px, reslice
from emprocess.kernels.align import align_pair, downsample_image
from emprocess.workflow.compose import compose_alignment
from emprocess.workflow.globalalign import BAD, global_alignment

FAULTS = {20: BLANK, 40: NOISE, 60: BLANK, 61: NOISE, 80: DUPLICATE}


def load_pingpong(folder: Path, n: int) -> list[np.ndarray]:
    """n slices from the folder's img.%05d.png, forward then back as often as needed."""
    files = sorted(folder.glob("img.*.png"))
    if len(files) < 2:
        raise ValueError(f"{folder} holds fewer than 2 slices named img.NNNNN.png")
    images: list[np.ndarray] = []
    for f in files:
        image = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise ValueError(f"cannot read {f}")
        images.append(image)
    period = 2 * (len(images) - 1)
    order = [i % period for i in range(n)]
    return [images[i if i < len(images) else period - i] for i in order]


def _align_all(
    slices: Sequence[np.ndarray], pairs: Sequence[tuple[int, int]], ds: int
) -> dict[tuple[int, int], dict[str, Any]]:
    small = [downsample_image(s, ds) for s in slices]
    with ThreadPoolExecutor(2) as pool:
        answers = pool.map(lambda p: align_pair(small[p[0]], small[p[1]]).model_dump(), pairs)
        return dict(zip(pairs, answers, strict=True))


def _align(
    answers: dict[tuple[int, int], dict[str, Any]],
    mode: str,
    k: int,
    n: int,
    size: tuple[int, int],
    downsample: int,
    regularization: float,
) -> tuple[dict[int, list[float]], list[int], list[int]]:
    """Transforms, slices not placed by the solve, and slices flagged bad."""
    sub = {p: a for p, a in answers.items() if p[1] - p[0] <= k}
    if mode == "chain":
        chain = {p[0]: a for p, a in sub.items()}
        return compose_alignment(chain, 0, n - 1, size, downsample).transforms, [], []
    result = global_alignment(sub, 0, n - 1, size, downsample, regularization)
    bad = [s.z for s in result.slices if s.status != "good"]
    return result.composition.transforms, bad, [s.z for s in result.slices if s.status == BAD]


def _content_truth(
    truth: dict[str, Any],
    truth0: dict[str, Any],
    base: dict[int, list[float]],
    injected: dict[int, str],
) -> dict[str, Any]:
    """Drifted px -> registered px -> the undrifted stack's run (same settings)."""
    world = {}
    for z in range(len(base)):
        src = z - 1 if injected.get(z) == DUPLICATE else z  # a duplicate shows z - 1
        raw_to_base = affine.compose(base[src], affine.invert(truth0["world"][str(src)]))
        world[str(z)] = affine.compose(raw_to_base, truth["world"][str(z)])
    return {**truth, "world": world}


def run_drift_benchmark(
    folder: Path,
    n: int = 100,
    crop: int = 440,
    downsample: int = 1,
    neighbors: Sequence[int] = (1, 2, 3),
    regularization: float = 1.0,
    faults: bool = True,
    seed: int = 3,
) -> list[dict[str, Any]]:
    """Figures (px) per setting: the chain (neighbors 1, no solve) and the solve per k."""
    images = load_pingpong(folder, n)
    injected = {z: k for z, k in FAULTS.items() if z < n} if faults else {}
    drifted, truth = reslice(images, crop, seed=seed, faults=injected)
    still, truth0 = reslice(images, crop, seed=seed, max_rotation_deg=0.0, max_shift_px=0.0)
    k_max = max(neighbors)
    pairs = [(z, z + d) for z in range(n - 1) for d in range(1, k_max + 1) if z + d < n]
    t0 = time.perf_counter()
    answers = _align_all(drifted, pairs, downsample)
    base_answers = _align_all(still, pairs, downsample)
    align_s = time.perf_counter() - t0
    size = (crop, crop)
    rows = []
    settings: list[tuple[str, int]] = [("chain", 1)] + [("solve", k) for k in neighbors]
    for mode, k in settings:
        transforms, bad, flagged_bad = _align(answers, mode, k, n, size, downsample, regularization)
        base, _, _ = _align(base_answers, mode, k, n, size, downsample, regularization)
        content = _content_truth(truth, truth0, base, injected)
        row: dict[str, Any] = {"mode": mode, "neighbors": k, "flagged": flagged_bad}
        for name, t in (("raw", truth), ("content", content)):
            figs = errors_px(transforms, t, bad)
            row[name] = {key: round(figs[key], 2) for key in ("anywhere", "neighbours", "bridged")}
        rows.append(row)
    rows.append({"align_s": round(align_s, 1), "pairs": 2 * len(pairs), "injected": injected})
    return rows


def print_drift_benchmark(rows: Sequence[dict[str, Any]], n: int, downsample: int) -> None:
    *settings, info = rows
    print(
        f"{n} slices, align downsample {downsample}: {info['pairs']} pairs aligned in "
        f"{info['align_s']} s; injected {info['injected']}"
    )
    print("px, worst over a 5x5 grid of points: anywhere | between neighbouring good slices |")
    print("bad slices vs the truth bridged from their good neighbours")
    for r in settings:
        label = "chain (today)" if r["mode"] == "chain" else f"solve, {r['neighbors']} neighbours"
        print(f"  {label:<22} raw {r['raw']}  content {r['content']}  flagged bad {r['flagged']}")
