"""Known-answer tests of the alignment kernel (emprocess.kernels.align)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from emprocess import affine
from emprocess.errors import InvalidInput
from emprocess.kernels.align import (
    AlignParams,
    AlignResult,
    align_pair,
    downsample_image,
    stretch_contrast,
)
from emprocess_bench.align import (
    make_pair,
    print_align_benchmark,
    run_align_benchmark,
    synthetic_texture,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IDENTITY = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]

# Brief's accuracy targets: mean corner error over the full-resolution image.
TOL_DS1_PX = 0.3
TOL_DS4_PX = 1.5


def _truth(tx: float, ty: float, rot_deg: float, scale: float, shear: float) -> list[float]:
    """post -> pre: rotate, scale x/y by (1 + scale, 1 - scale), shear, then shift."""
    th = math.radians(rot_deg)
    rotation = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    linear = rotation @ np.array([[1.0 + scale, shear], [0.0, 1.0 - scale]])
    return affine.from_matrix(np.hstack([linear, [[tx], [ty]]]))


# The corners of the brief's range (+-200 px, +-2 deg, +-1 % scale and shear) and a mild case.
TRUTHS = [
    _truth(200.0, -200.0, 2.0, 0.01, -0.01),
    _truth(-200.0, 170.0, -2.0, -0.01, 0.01),
    _truth(13.7, 41.2, 0.4, 0.003, 0.002),
]


def _error(result: AlignResult, truth: list[float], factor: int, size: tuple[int, int]) -> float:
    return affine.mean_corner_error(affine.rescale(result.affine, factor), truth, *size)


def _align(pre: np.ndarray, post: np.ndarray, factor: int) -> AlignResult:
    return align_pair(downsample_image(pre, factor), downsample_image(post, factor))


@pytest.fixture(scope="module")
def texture() -> np.ndarray:
    """1024 px synthetic texture plus a 256 px margin on every side."""
    return synthetic_texture(1024 + 512, 1024 + 512, seed=11)


@pytest.fixture(scope="module")
def real_pair() -> tuple[np.ndarray, np.ndarray]:
    paths = [DATA / "iso.03493.png", DATA / "iso.03494.png"]
    if not all(p.exists() for p in paths):
        pytest.fail(
            f"real FIB-SEM slices not found in {DATA}: ../shared/data must sit beside the checkout"
        )
    pre, post = (cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in paths)
    if pre is None or post is None:
        pytest.fail(f"could not decode the slices in {DATA}")
    return pre, post


@pytest.mark.parametrize("truth", TRUTHS, ids=["corner+", "corner-", "mild"])
@pytest.mark.parametrize("factor, tol", [(1, TOL_DS1_PX), (4, TOL_DS4_PX)])
def test_recovers_known_affine_of_synthetic_texture(
    texture: np.ndarray, truth: list[float], factor: int, tol: float
) -> None:
    pre, post = make_pair(texture, truth, 1024, 1024, margin=256)
    result = _align(pre, post, factor)
    assert result.affine_found
    assert _error(result, truth, factor, (1024, 1024)) < tol
    assert result.affine_inliers >= 20
    assert result.affine_mean_residual_px is not None
    assert result.affine_mean_residual_px < 1.0


@pytest.mark.parametrize("truth", TRUTHS[:2], ids=["corner+", "corner-"])
def test_recovers_known_affine_of_warped_real_slice(
    real_pair: tuple[np.ndarray, np.ndarray], truth: list[float]
) -> None:
    base = cv2.copyMakeBorder(real_pair[0], 256, 256, 256, 256, cv2.BORDER_REFLECT_101)
    pre, post = make_pair(base, truth, 520, 520, margin=256)
    result = align_pair(pre, post)
    assert result.affine_found
    assert _error(result, truth, 1, (520, 520)) < TOL_DS1_PX


def test_integer_crops_give_the_exact_shift_and_direction(texture: np.ndarray) -> None:
    # No interpolation: post pixel q is base pixel q + (70, 30) = pre pixel q + (70 - 10, 30 - 90).
    pre = texture[90 : 90 + 600, 10 : 10 + 640]
    post = texture[30 : 30 + 520, 70 : 70 + 560]
    result = align_pair(pre, post)
    expected = affine.translation(60.0, -60.0)
    assert (result.width, result.height, result.width0, result.height0) == (560, 520, 640, 600)
    assert result.translation_found
    assert result.affine_found
    np.testing.assert_allclose(result.translation, expected, atol=0.05)
    assert affine.mean_corner_error(result.affine, expected, 560, 520) < 0.1


def test_real_consecutive_slices(real_pair: tuple[np.ndarray, np.ndarray]) -> None:
    pre, post = real_pair
    # iso.03494 was stored shifted right: its first 50 columns are black.
    assert int((post.max(axis=0) == 0).sum()) == 50
    forward = align_pair(pre, post)
    assert forward.affine_found and forward.translation_found
    assert abs(forward.translation[4] - -50.0) < 1.0
    assert abs(forward.translation[5]) < 1.0
    assert forward.translation[:4] == [1.0, 0.0, 0.0, 1.0]
    assert affine.mean_corner_error(forward.affine, forward.translation, 520, 520) < 1.0
    # Aligning the other way round must give the inverse.
    backward = align_pair(post, pre)
    assert backward.affine_found
    assert affine.mean_corner_error(affine.invert(backward.affine), forward.affine, 520, 520) < 0.3


def test_consecutive_slices_of_the_sample_stack() -> None:
    from emprocess import sample

    slices, truth = sample.generate_stack(3, 768, 768, seed=7)
    for z in range(2):
        expected = truth["pairs"][str(z)]
        for factor, tol in ((1, TOL_DS1_PX), (4, TOL_DS4_PX)):
            result = _align(slices[z], slices[z + 1], factor)
            assert result.affine_found, (z, factor)
            assert _error(result, expected, factor, (768, 768)) < tol, (z, factor)


def test_uint16_input_matches_like_uint8(texture: np.ndarray) -> None:
    truth = TRUTHS[2]
    pre, post = make_pair(texture, truth, 520, 520, margin=256)
    # A 12-bit-like range in the middle of uint16: the percentile stretch must undo it.
    pre16, post16 = (im.astype(np.uint16) * 16 + 1000 for im in (pre, post))
    result = align_pair(pre16, post16)
    assert result.affine_found
    assert _error(result, truth, 1, (520, 520)) < TOL_DS1_PX


def test_image_larger_than_max_octave_size_is_matched_shrunk(texture: np.ndarray) -> None:
    truth = TRUTHS[2]
    pre, post = make_pair(texture, truth, 1024, 1024, margin=256)
    result = align_pair(pre, post, AlignParams(max_octave_size=512))
    assert result.affine_found
    # Matched at half resolution: twice the full-resolution tolerance.
    assert _error(result, truth, 1, (1024, 1024)) < 2 * TOL_DS1_PX


def _assert_nothing_found(result: AlignResult) -> None:
    assert not result.affine_found and not result.translation_found
    assert result.affine == IDENTITY and result.translation == IDENTITY
    assert result.affine_mean_residual_px is None and result.translation_max_residual_px is None


def test_no_overlap_finds_no_model() -> None:
    pre = synthetic_texture(512, 512, seed=1)
    post = synthetic_texture(512, 512, seed=2)
    result = align_pair(pre, post)
    _assert_nothing_found(result)
    assert result.features_pre > 100 and result.features_post > 100
    assert result.attempts == 4  # steps 3, 4, 5, then sigma 0.8


@pytest.mark.parametrize("blank", ["pre", "post", "both"])
def test_blank_image_finds_no_model(blank: str) -> None:
    tissue = synthetic_texture(400, 400, seed=3)
    empty = np.full((400, 400), 117, dtype=np.uint8)
    pre = empty if blank in ("pre", "both") else tissue
    post = empty if blank in ("post", "both") else tissue
    result = align_pair(pre, post)
    _assert_nothing_found(result)
    assert result.matches == 0


@pytest.mark.parametrize("shape", [(1, 1), (20, 20), (3, 2000), (2000, 1)])
def test_tiny_or_sliver_images_find_no_model(shape: tuple[int, int]) -> None:
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    result = align_pair(image, image)
    _assert_nothing_found(result)
    assert result.features_pre == 0


def test_affine_found_first_is_kept_while_the_ladder_hunts_for_the_translation(
    texture: np.ndarray,
) -> None:
    # A 60 degree turn: SIFT still matches, but no single shift fits 5 % of the matches.
    truth = affine.from_matrix(cv2.getRotationMatrix2D((300.0, 300.0), 60.0, 1.0))
    pre, post = make_pair(texture, truth, 600, 600, margin=256)
    result = align_pair(pre, post)
    assert result.affine_found
    assert _error(result, truth, 1, (600, 600)) < TOL_DS1_PX
    assert not result.translation_found
    assert result.translation == IDENTITY
    assert result.translation_inliers < 20
    assert result.attempts == 4


def test_same_input_gives_the_same_result(texture: np.ndarray) -> None:
    pre, post = make_pair(texture, TRUTHS[2], 400, 400, margin=256)
    first, second = (align_pair(pre, post).model_dump(exclude={"seconds"}) for _ in range(2))
    assert first == second


def test_retry_ladder_length_follows_params() -> None:
    blank = np.zeros((128, 128), dtype=np.uint8)
    params = AlignParams(steps=2, max_steps=4, retry_initial_sigma=None)
    assert align_pair(blank, blank, params).attempts == 3


def test_result_has_the_contract_keys(texture: np.ndarray) -> None:
    result = align_pair(texture[:300, :320], texture[:300, :320]).model_dump()
    assert {"width", "height", "width0", "height0", "affine", "translation"} <= result.keys()
    assert (result["width"], result["height"]) == (320, 300)
    np.testing.assert_allclose(result["affine"], IDENTITY, atol=1e-6)


@pytest.mark.parametrize(
    "pre, message",
    [
        (np.zeros((64, 64, 3), np.uint8), "2-D"),
        (np.zeros(64, np.uint8), "2-D"),
        (np.zeros((64, 64), np.float32), "float32"),
        (np.zeros((64, 64), np.int16), "int16"),
        (np.zeros((0, 64), np.uint8), "empty"),
        ([[0, 1], [2, 3]], "numpy array"),
    ],
)
def test_bad_images_raise_invalid_input(pre: object, message: str) -> None:
    good = np.zeros((64, 64), np.uint8)
    with pytest.raises(InvalidInput, match=message) as info:
        align_pair(pre, good)  # type: ignore[arg-type]
    assert "pre" in str(info.value)
    with pytest.raises(InvalidInput, match="post"):
        align_pair(good, pre)  # type: ignore[arg-type]


def test_downsample_image_averages_whole_blocks() -> None:
    image = np.arange(7 * 9, dtype=np.uint16).reshape(7, 9) * 100
    small = downsample_image(image, 3)
    assert small.dtype == np.uint16 and small.shape == (2, 3)
    expected = image[:6, :9].reshape(2, 3, 3, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(small, np.rint(expected), atol=1)
    assert downsample_image(image, 1) is image


@pytest.mark.parametrize(
    "factor, message", [(0, "integer >= 1"), (2.0, "integer >= 1"), (True, "integer"), (8, "8")]
)
def test_downsample_image_rejects_bad_factors(factor: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        downsample_image(np.zeros((5, 5), np.uint8), factor)  # type: ignore[arg-type]


def test_stretch_contrast_clips_the_saturated_tails() -> None:
    # 1000 pixels: 10 at 0, 980 ramping 50..99 (uint16), 10 at 60000.
    values = np.concatenate([np.zeros(10), np.repeat(np.arange(50, 99), 20), [60000] * 10])
    image = values.astype(np.uint16).reshape(20, 50)
    # 2 % saturated clips 1 % = 10 pixels at each end, exactly the outliers.
    out = stretch_contrast(image, 2.0).ravel()
    assert out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    np.testing.assert_array_equal(out[values == 50], 0)
    np.testing.assert_array_equal(out[values == 98], 255)
    np.testing.assert_array_equal(out[values == 74], round((74 - 50) * 255 / 48))
    assert not stretch_contrast(np.full((8, 8), 9, np.uint8), 0.35).any()


def test_align_params_defaults_are_the_fiji_recipe() -> None:
    p = AlignParams()
    assert (p.saturated_percent, p.feature_descriptor_size, p.ratio) == (0.35, 4, 0.92)
    assert (p.min_octave_size, p.max_octave_size, p.steps, p.max_steps) == (64, 1024, 3, 5)
    assert (p.initial_sigma, p.retry_initial_sigma) == (1.6, 0.8)
    assert (p.ransac_iterations, p.max_epsilon_px) == (1000, 25.0)
    assert (p.min_inlier_ratio, p.min_num_inliers, p.max_trust) == (0.05, 20, 3.0)
    assert all(f.description for f in AlignParams.model_fields.values())


def test_align_params_rejects_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="rod"):
        AlignParams.model_validate({"rod": 0.9})


@pytest.mark.parametrize(
    "values, words",
    [
        ({"ratio": 1.5}, ["ratio", "1.5"]),
        ({"min_num_inliers": 2}, ["min_num_inliers", "2"]),
        ({"saturated_percent": 50}, ["saturated_percent", "50"]),
        ({"ransac_iterations": 0}, ["ransac_iterations", "0"]),
        ({"max_epsilon_px": -1}, ["max_epsilon_px", "-1"]),
        ({"feature_descriptor_size": 8}, ["feature_descriptor_size=8", "must be 4"]),
        ({"max_octave_size": 128, "min_octave_size": 256}, ["max_octave_size=128", "256"]),
        ({"steps": 4, "max_steps": 3}, ["max_steps=3", "steps=4"]),
    ],
)
def test_align_params_rejects_out_of_range_values(values: dict, words: list[str]) -> None:
    with pytest.raises(ValidationError) as info:
        AlignParams(**values)
    for word in words:
        assert word in str(info.value)


def test_benchmark_rows_report_time_and_accuracy(capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_align_benchmark(sizes=(512,), downsamples=(1, 2), repeats=1)
    assert [(r["size"], r["downsample"]) for r in rows] == [(512, 1), (512, 2)]
    for row in rows:
        assert row["found"]
        assert 0 < row["cpu_s"] < 30 and 0 < row["wall_s"] < 30
        assert row["error_px"] < TOL_DS1_PX * row["downsample"]
    print_align_benchmark(rows)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "err px" in lines[0]


def test_benchmark_rejects_zero_repeats() -> None:
    with pytest.raises(InvalidInput, match="repeats must be >= 1, got 0"):
        run_align_benchmark(repeats=0)
