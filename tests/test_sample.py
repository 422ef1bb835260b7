"""Known answers for the synthetic FIB-SEM stack: its ground truth, limits, looks and files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from emprocess import affine, sample
from emprocess.errors import InvalidInput

SIZE = 512
CENTRE = (SIZE - 1) / 2.0


@pytest.fixture(scope="module")
def stack() -> tuple[list[np.ndarray], dict]:
    return sample.generate_stack(6, SIZE, SIZE, seed=3)


def ncc(a: np.ndarray, b: np.ndarray, border: int = SIZE // 4) -> float:
    """Normalised cross-correlation of the central regions of two images."""
    x = a[border:-border, border:-border].astype(np.float64)
    y = b[border:-border, border:-border].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    return float((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum()))


def warp(post: np.ndarray, params: list[float]) -> np.ndarray:
    return cv2.warpAffine(post, affine.to_matrix(params), (post.shape[1], post.shape[0]))


def decompose(params: list[float], centre: float) -> tuple[np.ndarray, float, float, float]:
    """Centre displacement (px), rotation (deg), scale - 1 and shear of a drift step."""
    m = affine.to_matrix(params)
    c = np.array([centre, centre])
    shift = m[:, :2] @ c + m[:, 2] - c
    angle = math.atan2(m[1, 0], m[0, 0])
    rot = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    upper = rot @ m[:, :2]  # [[s, shear], [0, s]] by construction
    return shift, math.degrees(angle), upper[0, 0] - 1.0, upper[0, 1]


# --- ground truth -----------------------------------------------------------------------------


def test_pairs_warp_post_onto_pre(stack: tuple[list[np.ndarray], dict]) -> None:
    slices, truth = stack
    assert sorted(truth["pairs"], key=int) == [str(z) for z in range(5)]
    for z in range(5):
        pre, post = slices[z], slices[z + 1]
        pair = truth["pairs"][str(z)]
        aligned = ncc(pre, warp(post, pair))
        # The wrong direction (inverse) and no warp at all must both be clearly worse.
        assert aligned > 0.85, (z, aligned)
        assert aligned > ncc(pre, post) + 0.2, z
        assert aligned > ncc(pre, warp(post, affine.invert(pair))) + 0.2, z


def test_sift_matching_recovers_the_pairs(stack: tuple[list[np.ndarray], dict]) -> None:
    slices, truth = stack
    sift = cv2.SIFT.create()
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    for z in (0, 3):
        kp_pre, des_pre = sift.detectAndCompute(slices[z], None)
        kp_post, des_post = sift.detectAndCompute(slices[z + 1], None)
        good = [
            m for m, n in matcher.knnMatch(des_post, des_pre, k=2) if m.distance < 0.8 * n.distance
        ]
        src = np.array([kp_post[m.queryIdx].pt for m in good], np.float32)
        dst = np.array([kp_pre[m.trainIdx].pt for m in good], np.float32)
        found, inliers = cv2.estimateAffine2D(src, dst, ransacReprojThreshold=2.0)
        assert found is not None and inliers.sum() > 100, z
        error = affine.mean_corner_error(
            affine.from_matrix(found), truth["pairs"][str(z)], SIZE, SIZE
        )
        assert error < 0.5, (z, error)


def test_pairs_are_relative_world_transforms(stack: tuple[list[np.ndarray], dict]) -> None:
    _, truth = stack
    world = truth["world"]
    for z in range(5):
        relative = affine.compose(affine.invert(world[str(z)]), world[str(z + 1)])
        assert np.allclose(relative, truth["pairs"][str(z)], atol=1e-9)


def test_truth_fields_and_json(stack: tuple[list[np.ndarray], dict]) -> None:
    _, truth = stack
    assert truth["image"] == "img.%05d.png"
    assert (truth["minz"], truth["maxz"], truth["width"], truth["height"]) == (0, 5, SIZE, SIZE)
    assert truth["seed"] == 3
    assert "emprocess.affine" in truth["convention"]
    assert sorted(truth["world"], key=int) == [str(z) for z in range(6)]
    assert json.loads(json.dumps(truth)) == truth


def test_slices_change_gradually_with_z(stack: tuple[list[np.ndarray], dict]) -> None:
    slices, truth = stack
    # Bring slice 5 onto slice 0 by chaining the pairs: 0 <- 1 <- ... <- 5.
    chained = list(affine.IDENTITY)
    for z in range(5):
        chained = affine.compose(chained, truth["pairs"][str(z)])
    near = ncc(slices[0], warp(slices[1], truth["pairs"]["0"]))
    far = ncc(slices[0], warp(slices[5], chained))
    assert 0.5 < far < near - 0.01 < 0.99


# --- drift limits -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "drift",
    [sample.Drift(), sample.Drift(max_shift_px=4.0, max_rotation_deg=0.1, max_scale=0.0)],
)
def test_drift_stays_within_its_limits(drift: sample.Drift) -> None:
    n, size = 1500, 1024
    truth = sample.ground_truth(n, size, size, seed=11, drift=drift)
    centre = (size - 1) / 2.0
    steps = [decompose(truth["pairs"][str(z)], centre) for z in range(n - 1)]
    shifts = np.array([s[0] for s in steps])
    assert np.abs(shifts).max() <= drift.max_shift_px + 1e-6
    # Not degenerate: the typical step uses a good part of the allowed range.
    assert np.abs(shifts).mean() > 0.3 * drift.max_shift_px
    assert max(abs(s[1]) for s in steps) <= drift.max_rotation_deg + 1e-9
    assert max(abs(s[2]) for s in steps) <= drift.max_scale + 1e-9
    assert max(abs(s[3]) for s in steps) <= drift.max_shear + 1e-9
    # The accumulated drift is bounded: every slice stays inside its world.
    world_w, world_h = truth["world_size"]
    corners = affine.corners_xy(size, size) - 0.5
    offsets = []
    for z in range(n):
        pts = affine.apply(truth["world"][str(z)], corners)
        assert (
            pts.min() >= 0.0 and pts[:, 0].max() <= world_w - 1 and pts[:, 1].max() <= world_h - 1
        )
        offsets.append(affine.apply(truth["world"][str(z)], np.array([[centre, centre]]))[0])
    spread = np.ptp(np.array(offsets), axis=0)
    assert np.all(spread <= 2 * drift.max_offset_px + 1e-6)


# --- determinism --------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    a, truth_a = sample.generate_stack(2, 128, 96, seed=5)
    b, truth_b = sample.generate_stack(2, 128, 96, seed=5)
    c, truth_c = sample.generate_stack(2, 128, 96, seed=6)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))
    assert truth_a == truth_b
    assert a[0].tobytes() != c[0].tobytes()
    assert truth_a["pairs"] != truth_c["pairs"]


def test_slices_do_not_depend_on_stack_length_or_first_z() -> None:
    short = dict(sample.iter_slices(2, 160, 128, seed=9, first_z=40))
    longer = dict(sample.iter_slices(4, 160, 128, seed=9))
    assert sorted(short) == [40, 41]
    assert np.array_equal(short[41], longer[1])
    alone = sample.generate_slice(43, 160, 128, seed=9, first_z=40)
    assert np.array_equal(alone, longer[3])
    t_short = sample.ground_truth(2, 160, 128, seed=9, first_z=40, template="s_%d.png")
    t_long = sample.ground_truth(4, 160, 128, seed=9)
    assert (t_short["minz"], t_short["maxz"], t_short["image"]) == (40, 41, "s_%d.png")
    assert t_short["pairs"]["40"] == t_long["pairs"]["0"]
    assert t_short["world"]["41"] == t_long["world"]["1"]


# --- looks --------------------------------------------------------------------------------------


def test_slices_look_like_em(stack: tuple[list[np.ndarray], dict]) -> None:
    slices, _ = stack
    img = slices[2]
    assert img.dtype == np.uint8 and img.shape == (SIZE, SIZE)
    p1, p50, p99 = np.percentile(img, [1, 50, 99])
    assert p1 < 90 and p99 > 180 and 120 < p50 < 190, (p1, p50, p99)
    # Membranes, extracellular space and mitochondria: a minority of dark pixels.
    dark = float((img < 110).mean())
    assert 0.08 < dark < 0.45, dark
    # Thin dark lines: a black-hat filter (closing minus image) finds them. Real 8 nm
    # data gives ~0.05; plain noise of the same contrast gives ~0.7.
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
    lines = float((cv2.morphologyEx(img, cv2.MORPH_BLACKHAT, kernel) > 40).mean())
    assert 0.03 < lines < 0.3, lines
    assert len(cv2.SIFT.create().detect(img, None)) > 500
    assert len(cv2.ORB.create(nfeatures=5000).detect(img, None)) > 500


# --- bad arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"n_slices": 0}, "n_slices must be within [1, "),
        ({"n_slices": 2.5}, "n_slices must be an integer, got 2.5"),
        ({"n_slices": True}, "got True"),
        ({"width": 63}, "width must be within [64, 8192], got 63"),
        ({"width": "512"}, "width must be an integer, got '512'"),
        ({"height": 9000}, "height must be within [64, 8192], got 9000"),
        ({"seed": -1}, "seed must be within [0, "),
        ({"first_z": -3}, "first_z must be within [0, "),
        ({"template": "img.png"}, "'img.png'"),
        ({"template": "img.%s.%s"}, "'img.%s.%s'"),
        ({"template": "a/%05d.png"}, "'a/%05d.png'"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, fragment: str) -> None:
    args: dict = {"n_slices": 2, "width": 128, "height": 128, "seed": 0, "first_z": 0}
    args.update(kwargs)
    with pytest.raises(InvalidInput) as info:
        sample.ground_truth(**args)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "field, value",
    [("max_shift_px", -1.0), ("max_rotation_deg", 10.0), ("max_scale", 0.5), ("max_shear", "x")],
)
def test_bad_drift_limits_are_named(field: str, value: object) -> None:
    with pytest.raises(InvalidInput, match=f"drift {field} must be within .* got {value!r}"):
        sample.Drift(**{field: value})  # type: ignore[arg-type]


def test_slice_before_the_first_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"z - first_z must be within .* got -1"):
        sample.generate_slice(4, 128, 128, first_z=5)


def test_iter_slices_refuses_at_the_call() -> None:
    with pytest.raises(InvalidInput, match="n_slices must be within"):
        sample.iter_slices(0, 128, 128)


# --- files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_url", [False, True])
def test_write_sample_writes_pngs_and_truth(tmp_path: Path, as_url: bool) -> None:
    dest = tmp_path / "stack"
    truth = sample.write_sample(
        f"file://{dest}" if as_url else str(dest), 3, 96, 80, seed=4, first_z=7
    )
    names = sorted(p.name for p in dest.iterdir())
    assert names == ["img.00007.png", "img.00008.png", "img.00009.png", "truth.json"]
    assert json.loads((dest / "truth.json").read_text()) == truth
    assert (truth["minz"], truth["maxz"]) == (7, 9)
    expected = dict(sample.iter_slices(3, 96, 80, seed=4, first_z=7))
    for z, img in expected.items():
        back = cv2.imread(str(dest / (truth["image"] % z)), cv2.IMREAD_UNCHANGED)
        assert back is not None and back.dtype == np.uint8 and np.array_equal(back, img)
