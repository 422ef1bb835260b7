"""From the pair answers of k neighbours to bad slices, one global solve and quality figures.

``collect`` calls :func:`global_alignment` (pure; no I/O): it picks each pair's model,
finds bad slices from the evidence, runs :func:`emprocess.kernels.solve.solve_affines`
and fits the canvas with :func:`emprocess.workflow.compose.fit_canvas`. Slice status:

* ``good``: placed by the solve from its own pairs.
* ``bad``: its image is bad by the evidence (named in ``skip_slices``; textureless; an
  exact duplicate of the slice before; no model to any neighbour; only models with too
  few inliers); left out of the solve,
  its transform bridged from the nearest good slices, its pixels per ``bad_slice_fill``.
* ``bridged``: its image looked fine, but every pair around it disagreed with the solve
  (dropped by the robust step); bridged like a bad slice, its own pixels kept.

Before the solve, :func:`plan_gap_pairs` asks for a second align round: pairs from the
good slices just before a run of bad slices to those just after it, so the solve has
evidence across the gap even when the run is as long as ``neighbors`` or longer. The DAG
plans it in ``align.plan_gaps`` and sends it in the batch tasks ``align.gap_pairs_{i}``
(:mod:`emprocess.workflow.gaps`); ``collect`` only reads the answers.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emprocess import affine
from emprocess.kernels.solve import DEFAULT_REGULARIZATION, solve_affines
from emprocess.records.tables import PairRow, SliceRow
from emprocess.workflow.compose import (
    Composition,
    PairChoice,
    choose_pair_transform,
    fit_canvas,
    model_found,
    qc_fields,
)

MIN_INLIERS = 30
"""A pair model with fewer inliers than this is not trusted as evidence."""
TEXTURE_FRACTION = 0.2
"""A slice with fewer SIFT features than this fraction of the median slice is textureless."""
DUPLICATE_RESIDUAL_PX = 1e-3
"""A pair this close to the identity, with inliers this close, shows one image twice."""
DOUBTFUL_RESIDUAL_PX = 2.0
"""A run whose worst used pair residual after the solve exceeds this is doubtful."""
DOUBTFUL_BAD_FRACTION = 0.05
"""... or whose share of bad or bridged slices exceeds this."""

MAX_GAP_SLICES = 8
"""A run of more bad slices in a row than this is not bridged by matching (reported);
conf ``neighbors``' description names it."""
GAP_PAIRS = 2
"""Pairs between good slices the solve should have across a gap: the nearest and one more."""

GOOD, BRIDGED, BAD = "good", "bridged", "bad"


@dataclass(frozen=True)
class SliceQC:
    """One slice's status after the global solve."""

    z: int
    status: str
    reason: str
    residual_px: float
    features: int | None


@dataclass(frozen=True)
class GapPlan:
    """The second align round of :func:`plan_gap_pairs`.

    Attributes:
        pairs: (pre, post) slice pairs to align in addition to the first round's.
        gaps: runs (first, last) of bad slices with good slices on both sides, bridged
            by matching.
        too_long: runs (first, last) longer than the limit: left to interpolation.
    """

    pairs: list[tuple[int, int]]
    gaps: list[tuple[int, int]]
    too_long: list[tuple[int, int]]

    def to_json(self) -> dict[str, Any]:
        """align/gaps.json: the pairs asked and the gaps, as lists."""
        return {
            "pairs": [list(p) for p in self.pairs],
            "gaps": [list(g) for g in self.gaps],
            "too_long": [list(g) for g in self.too_long],
            "max_gap_slices": MAX_GAP_SLICES,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> GapPlan:
        """The plan back from align/gaps.json (:meth:`to_json`)."""

        def runs(key: str) -> list[tuple[int, int]]:
            return [(int(a), int(b)) for a, b in doc.get(key, [])]

        return cls(runs("pairs"), runs("gaps"), runs("too_long"))


@dataclass(frozen=True)
class GlobalAlignment:
    """Result of :func:`global_alignment`: the composition plus the quality records."""

    composition: Composition
    slices: list[SliceQC]
    pair_residual_px: list[float | None]
    pair_used: list[bool]
    gaps: list[int]
    gap_plan: GapPlan | None = None

    def fill(self, mode: str) -> dict[int, int | None]:
        """Bad slice z -> the slice standing in for it (``nearest``) or None (``zeros``)."""
        if mode == "own":
            return {}
        bad = [s.z for s in self.slices if s.status == BAD]
        good = np.array([s.z for s in self.slices if s.status != BAD])
        if mode == "zeros" or len(good) == 0:
            return {z: None for z in bad}
        return {z: int(good[np.argmin(np.abs(good - z) * 2 + (good > z))]) for z in bad}

    def summary(self) -> dict[str, Any]:
        """complete.json's ``alignment``: pair residuals, slice counts, bad slices, doubt."""
        used = [
            r
            for r, u in zip(self.pair_residual_px, self.pair_used, strict=True)
            if u and r is not None
        ]
        counts = {k: sum(s.status == k for s in self.slices) for k in (GOOD, BRIDGED, BAD)}
        worst = max(used) if used else None
        median = statistics.median(used) if used else None
        why = []
        if worst is not None and worst > DOUBTFUL_RESIDUAL_PX:
            why.append(f"worst pair residual {worst:.2f} px > {DOUBTFUL_RESIDUAL_PX} px")
        if counts[BAD] + counts[BRIDGED] > DOUBTFUL_BAD_FRACTION * len(self.slices):
            why.append(
                f"{counts[BAD] + counts[BRIDGED]} of {len(self.slices)} slices bad or bridged"
            )
        if self.gaps:
            why.append(f"no pair crosses before slices {self.gaps[:10]} (identity link)")
        flagged = [s for s in self.slices if s.status != GOOD]
        plan = self.gap_plan
        return {
            "pairs": len(self.pair_used),
            "pairs_used": len(used),
            "pair_residual_px": {
                "median": None if median is None else round(median, 4),
                "worst": None if worst is None else round(worst, 4),
            },
            "slices": counts,
            "flagged": [{"z": s.z, "status": s.status, "reason": s.reason} for s in flagged[:100]],
            "gaps": self.gaps[:100],
            "gap_pairs": 0 if plan is None else len(plan.pairs),
            "gaps_too_long": [] if plan is None else [list(g) for g in plan.too_long[:100]],
            "doubtful": bool(why),
            "why": "; ".join(why),
        }


def _solve_model(result: Mapping[str, Any], downsample_factor: int) -> list[float] | None:
    """The affine when found (the solve regularizes it), else the translation, else None."""
    for model in ("affine", "translation"):
        inliers = result.get(f"{model}_inliers")
        # Legacy answers have no flags and no counts: an identity meant "not found".
        if model_found(result, model) and (inliers is None or inliers >= MIN_INLIERS):
            params = [float(v) for v in result[model]]
            return affine.rescale(params, downsample_factor) if downsample_factor != 1 else params
    return None


def _features(results: Mapping[tuple[int, int], Mapping[str, Any]]) -> dict[int, int]:
    """Most SIFT features seen of each slice over its answers."""
    out: dict[int, int] = {}
    for (pre, post), r in results.items():
        for z, key in ((pre, "features_pre"), (post, "features_post")):
            if r.get(key) is not None:
                out[z] = max(out.get(z, 0), int(r[key]))
    return out


def _identical(result: Mapping[str, Any]) -> bool:
    """The pair's images are one image: its affine is the identity with no residual."""
    residual = result.get("affine_mean_residual_px")
    if not result.get("affine_found") or residual is None or residual > DUPLICATE_RESIDUAL_PX:
        return False
    return bool(np.allclose(result["affine"], affine.IDENTITY, atol=DUPLICATE_RESIDUAL_PX))


def _evidence_bad(
    n: int,
    minz: int,
    results: Mapping[tuple[int, int], Mapping[str, Any]],
    models: Mapping[tuple[int, int], list[float] | None],
    skip: Sequence[int],
) -> dict[int, str]:
    """Bad slices (index) and why, from the answers alone."""
    reasons: dict[int, str] = {}
    features = _features(results)
    median = statistics.median(features.values()) if features else 0
    for z in sorted(set(skip)):
        reasons[z - minz] = "named in skip_slices"
    for z, count in features.items():
        if z - minz not in reasons and count < TEXTURE_FRACTION * median:
            reasons[z - minz] = f"textureless: {count} SIFT features (median slice {median:g})"
    for (pre, post), r in sorted(results.items()):
        if post == pre + 1 and post - minz not in reasons and _identical(r):
            reasons[post - minz] = f"exact duplicate of slice {pre}"
    found = np.zeros(n, dtype=bool)  # a trusted model to some neighbour
    weak = np.zeros(n, dtype=bool)  # some model, perhaps with too few inliers
    seen = np.zeros(n, dtype=bool)
    for (pre, post), r in results.items():
        ends = [pre - minz, post - minz]
        seen[ends] = True
        if models[(pre, post)] is not None:
            found[ends] = True
        if model_found(r, "affine") or model_found(r, "translation"):
            weak[ends] = True
    for i in np.flatnonzero(seen & ~found):
        if int(i) not in reasons:
            reasons[int(i)] = (
                f"too few inliers (< {MIN_INLIERS}) to every neighbour"
                if weak[i]
                else "no model to any neighbour"
            )
    return reasons


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs (first, last) of consecutive integers in sorted ``indices``."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def _good_near(start: int, step: int, n: int, bad: Mapping[int, str], count: int) -> list[int]:
    """The ``count`` nearest good slice indices from ``start`` on in direction ``step``."""
    out: list[int] = []
    i = start
    while 0 <= i < n and len(out) < count and abs(i - start) <= MAX_GAP_SLICES:
        if i not in bad:
            out.append(i)
        i += step
    return out


def plan_gap_pairs(
    results: Mapping[tuple[int, int], Mapping[str, Any]],
    minz: int,
    maxz: int,
    downsample_factor: int = 1,
    skip_slices: Sequence[int] = (),
    max_gap: int = MAX_GAP_SLICES,
) -> GapPlan:
    """Pairs across every run of bad slices that the first round left with too few.

    For a run of bad slices (by the evidence of the first round's ``results``, and
    ``skip_slices``) with good slices on both sides, the pairs between the two nearest
    good slices before it and the two nearest after it are taken nearest first (by
    distance in z) until :data:`GAP_PAIRS` good pairs with a trusted model cross the run;
    pairs already asked are not asked again. Runs longer than ``max_gap`` slices, where
    matching across is unlikely to succeed, are only reported.
    """
    n = maxz - minz + 1
    models = {key: _solve_model(r, downsample_factor) for key, r in results.items()}
    bad = _evidence_bad(n, minz, results, models, skip_slices)
    trusted: dict[int, list[int]] = {}  # good pre -> good posts with a trusted model
    for (a, b), m in models.items():
        if m is not None and a - minz not in bad and b - minz not in bad:
            trusted.setdefault(a - minz, []).append(b - minz)
    span = max((b - a for a, posts in trusted.items() for b in posts), default=1)
    asked: set[tuple[int, int]] = set()
    gaps: list[tuple[int, int]] = []
    too_long: list[tuple[int, int]] = []
    for first, last in _runs(sorted(bad)):
        if first == 0 or last == n - 1:
            continue  # nothing beyond the stack's end to match with
        if last - first + 1 > max_gap:
            too_long.append((minz + first, minz + last))
            continue
        gaps.append((minz + first, minz + last))
        have = sum(b > last for a in range(max(0, last - span), first) for b in trusted.get(a, ()))
        before = _good_near(first - 1, -1, n, bad, GAP_PAIRS)
        after = _good_near(last + 1, 1, n, bad, GAP_PAIRS)
        candidates = sorted(
            ((a, b) for a in before for b in after), key=lambda p: (p[1] - p[0], -p[0])
        )
        for a, b in candidates:
            if have >= GAP_PAIRS:
                break
            pair = (minz + a, minz + b)
            if pair not in results and pair not in asked:
                asked.add(pair)
                have += 1
    return GapPlan(sorted(asked), gaps, too_long)


def global_alignment(
    results: Mapping[tuple[int, int], Mapping[str, Any]],
    minz: int,
    maxz: int,
    slice_size_xy: tuple[int, int],
    downsample_factor: int = 1,
    regularization: float = DEFAULT_REGULARIZATION,
    skip_slices: Sequence[int] = (),
    gap_plan: GapPlan | None = None,
) -> GlobalAlignment:
    """Global transforms of slices minz..maxz from the answers of all pairs (pre, post).

    Args:
        results: (pre, post) -> the alignment service's answer (post onto pre).
        minz: first slice, inclusive; the result is in its frame (or, when it is bad,
            in the first good slice's).
        maxz: last slice, inclusive.
        slice_size_xy: (width, height) of every slice at full resolution.
        downsample_factor: the factor the service shrank the slices by.
        regularization: the solve's pull toward rigid (conf ``regularization``).
        skip_slices: slices named bad by hand.
        gap_plan: the second align round whose answers ``results`` holds (for the records).
    """
    n = maxz - minz + 1
    keys = sorted(results)
    models = {key: _solve_model(results[key], downsample_factor) for key in keys}
    bad = _evidence_bad(n, minz, results, models, skip_slices)
    excluded = np.zeros(n, dtype=bool)
    excluded[list(bad)] = True
    usable = [key for key in keys if models[key] is not None]
    pre = np.array([a - minz for a, _ in usable], dtype=np.int64)
    post = np.array([b - minz for _, b in usable], dtype=np.int64)
    mats = np.array([models[key] for key in usable], dtype=np.float64).reshape(-1, 6)
    # Equal weights: weighing pairs by 1 / distance in z (their errors grow with it) was
    # measured worse on real FIB-SEM (emprocess bench drift).
    solved = solve_affines(n, pre, post, mats, slice_size_xy, regularization, excluded)
    residual = dict(zip(usable, solved.pair_residual_px.tolist(), strict=True))
    used = dict(zip(usable, solved.pair_used.tolist(), strict=True))
    features = _features(results)
    slices = []
    for i in range(n):
        z = minz + i
        if i in bad:
            status, reason = BAD, bad[i]
        elif not solved.solved[i]:
            status, reason = BRIDGED, "every pair around it disagrees with the solve"
        else:
            status, reason = GOOD, ""
        slices.append(
            SliceQC(z, status, reason, float(solved.slice_residual_px[i]), features.get(z))
        )
    transforms = {minz + i: [float(v) for v in solved.transforms[i]] for i in range(n)}
    shifted, bbox = fit_canvas(transforms, slice_size_xy)
    pairs = []
    for key in keys:
        choice = choose_pair_transform(results[key], key[0], downsample_factor)
        model = models[key]
        pairs.append(dataclasses.replace(choice, post=key[1], transform=model or choice.transform))
    return GlobalAlignment(
        composition=Composition(transforms=shifted, bbox_xy=bbox, pairs=pairs),
        slices=slices,
        pair_residual_px=[residual.get(key) for key in keys],
        pair_used=[used.get(key, False) for key in keys],
        gaps=[minz + g for g in solved.gaps],
        gap_plan=gap_plan,
    )


def pair_rows(pairs: Sequence[PairChoice], align: GlobalAlignment) -> list[PairRow]:
    """qc.csv's rows with the solve: :func:`qc_fields` plus the pair's residual in
    the solve and whether it was used."""
    return [
        PairRow(**qc_fields(p), solve_residual_px=r, used=u)
        for p, r, u in zip(pairs, align.pair_residual_px, align.pair_used, strict=True)
    ]


def pairs_csv(pairs: Sequence[PairChoice], align: GlobalAlignment) -> str:
    """qc.csv with the solve: qc_csv's columns plus ``solve_residual_px`` and ``used``."""
    return PairRow.rows_to_csv(pair_rows(pairs, align))


def slice_rows(slices: Sequence[SliceQC]) -> list[SliceRow]:
    """align/slices.csv's rows: each slice's status after the solve."""
    return [
        SliceRow(
            z=s.z, status=s.status, residual_px=s.residual_px, features=s.features, reason=s.reason
        )
        for s in slices
    ]


def slices_csv(slices: Sequence[SliceQC]) -> str:
    """align/slices.csv: ``z,status,residual_px,features,reason`` (reason quoted)."""
    return SliceRow.rows_to_csv(slice_rows(slices))
