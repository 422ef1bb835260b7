"""``emprocess bench drift``: alignment accuracy on real FIB-SEM resliced with known drift.

Reslices the registered slices of a folder (``img.%05d.png``) with a rigid random walk
(:mod:`emprocess_bench.reslice`), injects bad slices, aligns every pair with the alignment
service's own kernel (in this process, two threads; each slice's features extracted once
and matched by its pairs, as the service does since issue 19) and runs collect's global
solve.
It compares the transforms with two truths:

* ``raw``: the registered volume's frame. SIFT sees the registered volume itself move
  (its slices are registered to about 1 px, and structures run obliquely through z),
  so this figure includes drift no content-based alignment can remove.
* ``content``: the same method's alignment (same settings) of the undrifted stack,
  composed with the known drift: what the drift alone changes in the result.

It also prints the ``floor``: the undrifted stack's own alignment (same settings) against
the registered frame, which no drift correction can beat. Longer stacks than the folder
holds run through it forward and back (0..99, 98..0, ...), which keeps neighbouring
slices neighbours (the undrifted stack's repeated pairs are aligned once). ``answers`` names a JSON file that keeps the pair answers of a run
(written when missing, read when it matches the run's stack), so the solve can be
re-measured without aligning again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from emprocess import affine
from emprocess.kernels.align import (
    SliceFeatures,
    align_features,
    downsample_image,
    extract_features,
)
from emprocess.kernels.features import decode_features, encode_features
from emprocess.workflow.compose import compose_alignment
from emprocess.workflow.conf import RunConf
from emprocess.workflow.globalalign import BAD, GapPlan, global_alignment, plan_gap_pairs
from emprocess_bench.reslice import BLANK, DUPLICATE, NOISE, errors_px, reslice

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
    """Answers of every pair; pairs of identical images (the undrifted stack run forward and
    back repeats its slices) are aligned once."""
    small = [downsample_image(s, ds) for s in slices]
    first: dict[bytes, int] = {}
    same = [first.setdefault(s.tobytes(), z) for z, s in enumerate(small)]
    distinct = sorted({(same[a], same[b]) for a, b in pairs})
    used = sorted({z for pair in distinct for z in pair})

    def stored(z: int) -> SliceFeatures:
        # Through the bytes the service stores, as its pairs read them.
        return decode_features(encode_features(extract_features(small[z])), 1 << 30)[0]

    def align(p: tuple[int, int]) -> dict[str, Any]:
        a, b = p
        return align_features(
            features[a], features[b], images=lambda: (small[a], small[b])
        ).model_dump()

    with ThreadPoolExecutor(2) as pool:  # features once per slice, as the service's runs
        features = dict(zip(used, pool.map(stored, used), strict=True))
        found = dict(zip(distinct, pool.map(align, distinct), strict=True))
    return {(a, b): found[(same[a], same[b])] for a, b in pairs}


def _first_round(
    answers: dict[tuple[int, int], dict[str, Any]], k: int
) -> dict[tuple[int, int], dict[str, Any]]:
    return {p: a for p, a in answers.items() if p[1] - p[0] <= k}


def _gap_plan(
    answers: dict[tuple[int, int], dict[str, Any]], k: int, n: int, downsample: int
) -> GapPlan:
    """collect's second align round after the first round of ``k`` neighbours."""
    return plan_gap_pairs(_first_round(answers, k), 0, n - 1, downsample)


def _align(
    answers: dict[tuple[int, int], dict[str, Any]],
    mode: str,
    k: int,
    n: int,
    size: tuple[int, int],
    downsample: int,
    regularization: float,
    gap_round: bool,
) -> tuple[dict[int, list[float]], list[int], list[int], int]:
    """Transforms, slices not placed by the solve, slices flagged bad, pairs across gaps."""
    sub = _first_round(answers, k)
    if mode == "chain":
        chain = {p[0]: a for p, a in sub.items()}
        return compose_alignment(chain, 0, n - 1, size, downsample).transforms, [], [], 0
    plan = _gap_plan(answers, k, n, downsample) if gap_round else None
    if plan is not None:
        sub.update({p: answers[p] for p in plan.pairs})
    result = global_alignment(sub, 0, n - 1, size, downsample, regularization, gap_plan=plan)
    bad = [s.z for s in result.slices if s.status != "good"]
    flagged = [s.z for s in result.slices if s.status == BAD]
    return result.composition.transforms, bad, flagged, 0 if plan is None else len(plan.pairs)


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
    regularization: float = RunConf.model_fields["regularization"].default,
    faults: bool = True,
    seed: int = 3,
    answers_file: Path | None = None,
    gap_round: bool = True,
) -> list[dict[str, Any]]:
    """Figures (px) per setting: the chain (neighbors 1, no solve) and the solve per k
    (with collect's second align round across gaps unless ``gap_round`` is False)."""
    images = load_pingpong(folder, n)
    injected = {z: k for z, k in FAULTS.items() if z < n} if faults else {}
    drifted, truth = reslice(images, crop, seed=seed, faults=injected)
    still, truth0 = reslice(images, crop, seed=seed, max_rotation_deg=0.0, max_shift_px=0.0)
    k_max = max(neighbors)
    pairs = [(z, z + d) for z in range(n - 1) for d in range(1, k_max + 1) if z + d < n]
    stack = {"n": n, "crop": crop, "downsample": downsample, "seed": seed, "faults": faults}
    t0 = time.perf_counter()
    answers, base_answers = _read_answers(answers_file, stack)
    kept = len(answers) + len(base_answers)
    for stack_images, found in ((drifted, answers), (still, base_answers)):
        missing = [p for p in pairs if p not in found]
        found.update(_align_all(stack_images, missing, downsample))
        if gap_round:  # the second round's pairs depend on the first round's answers
            wanted = {p for k in neighbors for p in _gap_plan(found, k, n, downsample).pairs}
            found.update(_align_all(stack_images, sorted(wanted - set(found)), downsample))
    cached = len(answers) + len(base_answers) == kept
    if answers_file is not None and not cached:
        _write_answers(answers_file, stack, answers, base_answers)
    align_s = time.perf_counter() - t0
    size = (crop, crop)
    rows = []
    settings: list[tuple[str, int]] = [("chain", 1)] + [("solve", k) for k in neighbors]
    for mode, k in settings:
        transforms, bad, flagged_bad, across = _align(
            answers, mode, k, n, size, downsample, regularization, gap_round
        )
        base, _, _, _ = _align(
            base_answers, mode, k, n, size, downsample, regularization, gap_round
        )
        content = _content_truth(truth, truth0, base, injected)
        row: dict[str, Any] = {
            "mode": mode,
            "neighbors": k,
            "flagged": flagged_bad,
            "gap_pairs": across,
        }
        for name, t in (("raw", truth), ("content", content)):
            figs = errors_px(transforms, t, bad)
            row[name] = {key: round(figs[key], 2) for key in ("anywhere", "neighbours", "bridged")}
        floor = errors_px(base, truth0)
        row["floor"] = {key: round(floor[key], 2) for key in ("anywhere", "neighbours")}
        row["floor"].update(_last_slice_motion(base, crop))
        rows.append(row)
    rows.append(
        {
            "align_s": round(align_s, 1),
            "pairs": len(answers) + len(base_answers),
            "injected": injected,
            "cached": cached,
            "gap_round": gap_round,
            "pair_noise": _pair_noise(answers, base_answers, truth, injected, crop),
        }
    )
    return rows


def _pair_noise(
    answers: dict[tuple[int, int], dict[str, Any]],
    base_answers: dict[tuple[int, int], dict[str, Any]],
    truth: dict[str, Any],
    injected: dict[int, str],
    crop: int,
) -> dict[int, dict[str, float]]:
    """Per distance d: how far the drifted pairs' affines are from the undrifted pairs'
    composed with the known drift (sd of the rotation in mrad and of the centre's shift in
    px; both pairs' errors count), and the median inliers: what the solve accumulates."""
    world = {int(z): t for z, t in truth["world"].items()}
    centre = np.array([[(crop - 1) / 2.0] * 2])
    out: dict[int, dict[str, float]] = {}
    for d in sorted({b - a for a, b in answers}):
        angles, shifts, inliers = [], [], []
        for (a, b), r in answers.items():
            base = base_answers.get((a, b))
            if b - a != d or base is None or any(z in injected for z in range(a, b + 1)):
                continue
            if not (r.get("affine_found") and base.get("affine_found")):
                continue
            expect = affine.compose(
                affine.invert(world[a]), affine.compose(base["affine"], world[b])
            )
            angles.append(_angle(r["affine"]) - _angle(expect))
            shifts.append((affine.apply(r["affine"], centre) - affine.apply(expect, centre))[0])
            inliers.append(r.get("affine_inliers") or 0)
        if len(angles) >= 2:
            out[d] = {
                "pairs": len(angles),
                "rotation_mrad": round(1e3 * float(np.std(angles)), 3),
                "centre_px": round(float(np.std(shifts, axis=0).mean()), 3),
                "inliers": float(np.median(inliers)),
            }
    return out


def _angle(m: Sequence[float]) -> float:
    return float(np.arctan2(m[1] - m[2], m[0] + m[3]))


def _last_slice_motion(transforms: dict[int, list[float]], crop: int) -> dict[str, float]:
    """The last slice's rotation (mrad) and centre shift (px) relative to the first."""
    zs = sorted(transforms)
    m00, m10, m01, m11, _, _ = rel = affine.compose(
        affine.invert(transforms[zs[0]]), transforms[zs[-1]]
    )
    centre = np.array([[(crop - 1) / 2.0] * 2])
    shift = affine.apply(rel, centre) - centre
    return {
        "rotation_mrad": round(1e3 * float(np.arctan2(m10 - m01, m00 + m11)), 2),
        "centre_px": round(float(np.linalg.norm(shift)), 2),
    }


def _write_answers(
    path: Path,
    stack: dict[str, Any],
    answers: dict[tuple[int, int], dict[str, Any]],
    base: dict[tuple[int, int], dict[str, Any]],
) -> None:
    doc = {
        "stack": stack,
        "drifted": [[a, b, r] for (a, b), r in answers.items()],
        "undrifted": [[a, b, r] for (a, b), r in base.items()],
    }
    path.write_text(json.dumps(doc))


def _read_answers(
    path: Path | None, stack: dict[str, Any]
) -> tuple[dict[tuple[int, int], dict[str, Any]], dict[tuple[int, int], dict[str, Any]]]:
    """The kept answers (drifted, undrifted) when the file holds this stack's; else empty."""
    if path is None or not path.exists():
        return {}, {}
    doc = json.loads(path.read_text())
    if doc.get("stack") != stack:
        return {}, {}
    drifted, undrifted = ({(a, b): r for a, b, r in doc[key]} for key in ("drifted", "undrifted"))
    return drifted, undrifted


def print_drift_benchmark(rows: Sequence[dict[str, Any]], n: int, downsample: int) -> None:
    *settings, info = rows
    how = "read from the answers file" if info["cached"] else f"aligned in {info['align_s']} s"
    print(f"{n} slices, align downsample {downsample}: {info['pairs']} pairs {how}")
    print(
        "second align round: "
        + ("on (+N: pairs it asked across gaps)" if info["gap_round"] else "off")
    )
    print(f"injected {info['injected']}")
    print("px, worst over a 5x5 grid of points (targets: 1.5 anywhere, 0.5 neighbours, 1 bridged)")
    print("  anywhere | between neighbouring good slices | bad slices vs their interpolated truth")
    print("  floor: the undrifted stack aligned alike, vs the registered frame (its last")
    print("  slice's rotation and centre shift against the first are listed below)")
    print(
        f"  {'':<22} {'vs registered frame':<22} {'vs undrifted, alike':<22} "
        f"{'floor':<13} flagged bad"
    )
    for r in settings:
        label = "chain (today)" if r["mode"] == "chain" else f"solve, {r['neighbors']} neighbours"
        if r["gap_pairs"]:
            label += f" +{r['gap_pairs']}"
        cells = []
        for key in ("raw", "content"):
            f = r[key]
            bridged = f"{f['bridged']:.2f}" if r["flagged"] else "-"
            cells.append(f"{f['anywhere']:6.2f} {f['neighbours']:6.2f} {bridged:>6}   ")
        floor = f"{r['floor']['anywhere']:6.2f} {r['floor']['neighbours']:6.2f}"
        flagged = "none" if not r["flagged"] else r["flagged"]
        print(f"  {label:<22} {cells[0]} {cells[1]} {floor}   {flagged}")
    print("pair noise (drifted pair vs undrifted pair + known drift, sd; what the solve sums up):")
    for d, f in info["pair_noise"].items():
        print(
            f"  d={d}: rotation {f['rotation_mrad']} mrad, centre {f['centre_px']} px "
            f"over {f['pairs']} pairs, median inliers {f['inliers']:g}"
        )
    for r in settings:
        label = "chain (today)" if r["mode"] == "chain" else f"solve, {r['neighbors']} neighbours"
        f = r["floor"]
        print(
            f"  floor, {label}: last slice turned {f['rotation_mrad']} mrad, "
            f"centre moved {f['centre_px']} px"
        )
