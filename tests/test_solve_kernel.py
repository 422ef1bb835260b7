"""The global solve kernel and the bad-slice evidence, on synthetic pair data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emprocess import affine
from emprocess.kernels.solve import solve_affines
from emprocess.workflow.globalalign import global_alignment

SIZE = (400, 300)


def rigid(angle_deg: float, dx: float, dy: float) -> list[float]:
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return [c, s, -s, c, dx, dy]


def truth_walk(n: int, seed: int) -> list[list[float]]:
    """Global rigid transforms (slice z -> slice 0's frame), slice 0 the identity."""
    rng = np.random.default_rng(seed)
    steps = [rigid(rng.uniform(-0.15, 0.15), *rng.uniform(-6, 6, 2)) for _ in range(n - 1)]
    out = [list(affine.IDENTITY)]
    for step in steps:
        out.append(affine.compose(out[-1], step))
    return out


def pairs_of(truth: list[list[float]], k: int, noise: float = 0.0, seed: int = 1):
    rng = np.random.default_rng(seed)
    pre, post, models = [], [], []
    for z in range(len(truth)):
        for d in range(1, k + 1):
            if z + d < len(truth):
                m = np.array(affine.compose(affine.invert(truth[z]), truth[z + d]))
                m += rng.normal(0, noise, 6) * [1e-3, 1e-3, 1e-3, 1e-3, 1, 1]
                pre.append(z), post.append(z + d), models.append(m)
    return np.array(pre), np.array(post), np.array(models)


def corner_error(a: np.ndarray, b: list[list[float]]) -> float:
    return max(
        float(
            np.abs(
                affine.apply(a[z], affine.corners_xy(*SIZE))
                - affine.apply(b[z], affine.corners_xy(*SIZE))
            ).max()
        )
        for z in range(len(b))
    )


def test_exact_pairs_give_the_truth_and_slice_0_stays_fixed() -> None:
    truth = truth_walk(30, 0)
    pre, post, models = pairs_of(truth, 3)
    r = solve_affines(30, pre, post, models, SIZE, 0.1)
    assert corner_error(r.transforms, truth) < 1e-6
    assert np.allclose(r.transforms[0], affine.IDENTITY)
    assert r.solved.all() and r.pair_used.all() and r.gaps == []
    assert r.pair_residual_px.max() < 1e-6


def test_a_wrong_pair_is_dropped_and_the_rest_hold() -> None:
    truth = truth_walk(30, 2)
    pre, post, models = pairs_of(truth, 2, noise=0.05)
    wrong = np.flatnonzero((pre == 10) & (post == 12))[0]
    models[wrong] = affine.compose(models[wrong], affine.translation(25, -15))
    r = solve_affines(30, pre, post, models, SIZE, 0.1)
    assert not r.pair_used[wrong] and r.pair_used.sum() == len(pre) - 1
    assert r.pair_residual_px[wrong] > 20
    assert corner_error(r.transforms, truth) < 1.0


def test_excluded_slices_are_bridged_and_gaps_linked() -> None:
    truth = truth_walk(20, 3)
    pre, post, models = pairs_of(truth, 2)
    excluded = np.zeros(20, dtype=bool)
    excluded[[5, 12, 13]] = True  # 12, 13 in a row: no pair of 2 neighbours crosses
    r = solve_affines(20, pre, post, models, SIZE, 0.1, excluded)
    assert list(np.flatnonzero(~r.solved)) == [5, 12, 13]
    assert r.gaps == [14]
    expected5 = (np.array(truth[4]) + np.array(truth[6])) / 2
    assert np.allclose(r.transforms[5], expected5)
    # Before the gap the truth holds; after it, the identity link replaces the drift.
    solved_before = [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert corner_error(r.transforms[solved_before], [truth[z] for z in solved_before]) < 1e-6


def test_regularization_keeps_a_biased_chain_from_scaling() -> None:
    """Every pair says 'scale 1.001' (a bias): without the pull the stack grows 10%."""
    n = 100
    pre = np.arange(n - 1)
    post = pre + 1
    models = np.tile([1.001, 0, 0, 1.001, 0, 0], (n - 1, 1))
    free = solve_affines(n, pre, post, models, SIZE, 0.0)
    pulled = solve_affines(n, pre, post, models, SIZE, 0.5)
    assert free.transforms[-1][0] == pytest.approx(1.001 ** (n - 1), rel=1e-3)
    assert abs(pulled.transforms[-1][0] - 1) < abs(free.transforms[-1][0] - 1) / 3
    # The default (10) is nearly rigid: the bias leaves under 0.01% (0.02 px at the edge).
    rigid = solve_affines(n, pre, post, models, SIZE)
    assert abs(rigid.transforms[-1][0] - 1) < 1e-4 and abs(rigid.transforms[-1][3] - 1) < 1e-4


def test_bad_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        solve_affines(3, np.array([0]), np.array([1, 2]), np.zeros((1, 6)), SIZE)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        solve_affines(3, np.array([0]), np.array([3]), np.zeros((1, 6)), SIZE)


def _answer(model: list[float], inliers: int = 200, features: tuple[int, int] = (900, 900)) -> dict:
    return {
        "affine": model,
        "translation": model,
        "affine_found": True,
        "translation_found": True,
        "affine_inliers": inliers,
        "translation_inliers": inliers,
        "affine_mean_residual_px": 0.2,
        "translation_mean_residual_px": 0.3,
        "features_pre": features[0],
        "features_post": features[1],
    }


def test_global_alignment_flags_the_evidence_and_writes_records() -> None:
    truth = truth_walk(12, 4)
    results = {}
    for z in range(12):
        for d in (1, 2, 3):
            if z + d < 12:
                results[(z, z + d)] = _answer(affine.compose(affine.invert(truth[z]), truth[z + d]))
    for key in list(results):
        if 4 in key:  # slice 4 is blank: no features, no model
            r = results[key]
            r.update(affine_found=False, translation_found=False, affine_inliers=0)
            r["features_pre" if key[0] == 4 else "features_post"] = 0
        if 8 in key:  # slice 8 is noise: features, no model
            results[key].update(affine_found=False, translation_found=False, affine_inliers=3)
    for key in results:
        if 2 in key and 4 not in key:  # slice 2: models, but weak ones
            results[key].update(affine_inliers=25, translation_inliers=25)
    results[(6, 7)].update(affine=list(affine.IDENTITY), affine_mean_residual_px=0.0)
    g = global_alignment(results, 0, 11, SIZE, skip_slices=[10])
    flagged = {s.z: (s.status, s.reason) for s in g.slices if s.status != "good"}
    assert flagged == {
        2: ("bad", "too few inliers (< 30) to every neighbour"),
        4: ("bad", "textureless: 0 SIFT features (median slice 900)"),
        7: ("bad", "exact duplicate of slice 6"),
        8: ("bad", "no model to any neighbour"),
        10: ("bad", "named in skip_slices"),
    }
    summary = g.summary()
    assert summary["slices"] == {"good": 7, "bridged": 0, "bad": 5}
    assert summary["doubtful"] and "5 of 12 slices" in summary["why"]
    assert g.fill("nearest") == {2: 1, 4: 3, 7: 6, 8: 9, 10: 9} and g.fill("zeros")[4] is None
    assert g.fill("own") == {}


def test_a_slice_whose_pairs_all_disagree_is_bridged() -> None:
    truth = truth_walk(12, 5)
    results = {}
    for z in range(12):
        for d in (1, 2):
            if z + d < 12:
                results[(z, z + d)] = _answer(affine.compose(affine.invert(truth[z]), truth[z + d]))
    offsets = {(3, 5): (40, 0), (4, 5): (0, 40), (5, 6): (-40, 0), (5, 7): (0, -40)}
    for key, (dx, dy) in offsets.items():
        model = results[key]["affine"]
        results[key]["affine"] = affine.compose(affine.translation(dx, dy), model)
    g = global_alignment(results, 0, 11, SIZE)
    flagged = {s.z: (s.status, s.reason) for s in g.slices if s.status != "good"}
    assert flagged == {5: ("bridged", "every pair around it disagrees with the solve")}
    assert g.fill("nearest") == {}  # bridged slices keep their own pixels
    shifted = g.composition.transforms
    canvas = affine.compose(shifted[0], affine.invert(truth[0]))
    for z in (4, 6, 11):
        assert affine.mean_corner_error(shifted[z], affine.compose(canvas, truth[z]), *SIZE) < 1e-6


def test_legacy_answers_without_flags_or_counts_still_solve() -> None:
    """The Fiji service's answers: only ``affine`` and ``translation``; identity = not found."""
    truth = truth_walk(8, 6)
    results = {}
    for z in range(8):
        for d in (1, 2):
            if z + d < 8:
                model = affine.compose(affine.invert(truth[z]), truth[z + d])
                results[(z, z + d)] = {"affine": model, "translation": list(affine.IDENTITY)}
    for key in [k for k in results if 3 in k]:
        results[key] = {"affine": list(affine.IDENTITY), "translation": list(affine.IDENTITY)}
    g = global_alignment(results, 0, 7, SIZE)
    assert {s.z: s.reason for s in g.slices if s.status != "good"} == {
        3: "no model to any neighbour"
    }
    found = g.composition.transforms
    canvas = affine.compose(found[0], affine.invert(truth[0]))
    for z in (1, 2, 4, 7):
        assert affine.mean_corner_error(found[z], affine.compose(canvas, truth[z]), *SIZE) < 1e-6
