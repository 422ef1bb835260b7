"""Known answers for warp_window and the seam-free windowed CLAHE."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from emprocess import affine
from emprocess.errors import InvalidInput
from emprocess.kernels.clahe import (
    clahe_canvas,
    clahe_margin,
    clahe_source_region,
    clahe_window,
    opencv_clip_limit,
    plan_windows,
)
from emprocess.kernels.warp import warp_window

ROTATE = affine.compose(affine.translation(37.25, -11.5), [0.98, 0.06, -0.06, 0.98, 0, 0])


def em_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth blobs plus noise, roughly like an EM slice, uint8."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // 40 + 2, w // 40 + 2)).astype(np.float32)
    base = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    img = 0.4 * base + rng.normal(90, 12, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- warp


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_any_window_equals_the_full_warp(dtype: type) -> None:
    img = em_like(300, 360).astype(dtype) * (1 if dtype == np.uint8 else 257)
    full = warp_window(img, ROTATE, (0, 0, 420, 380))
    assert full.dtype == dtype and full.shape == (380, 420)
    windows = [(0, 0, 420, 380), (5, 7, 100, 61), (333, 1, 87, 379), (200, 150, 1, 1)]
    for x0, y0, w, h in windows:
        part = warp_window(img, ROTATE, (x0, y0, w, h))
        np.testing.assert_array_equal(part, full[y0 : y0 + h, x0 : x0 + w])
    # Many blocks: windows on and off the block grid, ending anywhere, stitch exactly.
    blocked = warp_window(img, ROTATE, (0, 0, 420, 380), block_px=64)
    assert blocked.dtype == dtype
    for x0, y0, w, h in [*windows, (64, 128, 256, 192), (63, 65, 130, 200), (-40, -7, 99, 50)]:
        part = warp_window(img, ROTATE, (x0, y0, w, h), block_px=64)
        sx, sy = max(x0, 0), max(y0, 0)
        np.testing.assert_array_equal(
            part[sy - y0 :, sx - x0 :][: 380 - sy, : 420 - sx], blocked[sy : y0 + h, sx : x0 + w]
        )
    # The block grid is part of the definition, but only at the fixed-point level.
    diff = np.abs(blocked.astype(np.int64) - full)
    assert diff.max() <= (1 if dtype == np.uint8 else 257) and 0 < (diff > 0).mean() < 0.05
    # A window hanging off the canvas: the overlap matches, the rest is fill 0.
    off = warp_window(img, ROTATE, (-10, 370, 40, 30))
    np.testing.assert_array_equal(off[:10, 10:], full[370:380, 0:30])
    assert not off[:, :10].any() and not off[10:].any()


def test_integer_translation_moves_pixels_exactly() -> None:
    img = em_like(50, 70)
    out = warp_window(img, affine.translation(12, 5), (0, 0, 90, 60))
    expected = np.zeros((60, 90), np.uint8)
    expected[5:55, 12:82] = img
    np.testing.assert_array_equal(out, expected)


def _bicubic_reference(img: np.ndarray, transform: list[float], w: int, h: int) -> np.ndarray:
    """Slow float64 bicubic (a = -0.75, outside = 0) of the inverse map, independent of cv2."""

    def weights(t: np.ndarray) -> np.ndarray:
        a = -0.75
        d = np.abs(t)
        return np.where(
            d <= 1,
            (a + 2) * d**3 - (a + 3) * d**2 + 1,
            np.where(d < 2, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a, 0.0),
        )

    ys, xs = np.mgrid[0:h, 0:w]
    src = affine.apply(affine.invert(transform), np.stack([xs.ravel(), ys.ravel()], 1))
    sx, sy = src[:, 0], src[:, 1]
    fx, fy = np.floor(sx).astype(int), np.floor(sy).astype(int)
    acc = np.zeros(sx.shape)
    padded = np.pad(img.astype(np.float64), 4)
    for j in range(-1, 3):
        for i in range(-1, 3):
            px = np.clip(fx + i + 4, 0, padded.shape[1] - 1)
            py = np.clip(fy + j + 4, 0, padded.shape[0] - 1)
            acc += padded[py, px] * weights(sx - (fx + i)) * weights(sy - (fy + j))
    return np.clip(np.rint(acc), 0, 255).reshape(h, w)


def test_rotation_matches_an_independent_bicubic_reference() -> None:
    img = em_like(80, 90, seed=3)
    out = warp_window(img, ROTATE, (0, 0, 140, 90)).astype(np.float64)
    ref = _bicubic_reference(img, ROTATE, 140, 90)
    # OpenCV quantises sample positions to 1/32 px and weights to 15 bits.
    assert np.abs(out - ref).max() <= 2
    assert np.abs(out - ref).mean() < 0.2
    # The transform direction matters: the inverse would give something else entirely.
    wrong = warp_window(img, affine.invert(ROTATE), (0, 0, 140, 90)).astype(np.float64)
    assert np.abs(wrong - ref).mean() > 10


def test_warp_rejects_bad_input() -> None:
    img = em_like(20, 20)
    with pytest.raises(InvalidInput, match="singular"):
        warp_window(img, [1, 2, 2, 4, 0, 0], (0, 0, 5, 5))
    with pytest.raises(InvalidInput, match="dtype"):
        warp_window(img.astype(np.float32), affine.IDENTITY, (0, 0, 5, 5))
    with pytest.raises(InvalidInput, match="width and height"):
        warp_window(img, affine.IDENTITY, (0, 0, 0, 5))
    with pytest.raises(InvalidInput, match="integers"):
        warp_window(img, affine.IDENTITY, (0.5, 0, 5, 5))  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="2-D"):
        warp_window(img[None], affine.IDENTITY, (0, 0, 5, 5))


# ---------------------------------------------------------------- CLAHE


def _padded_reference(canvas: np.ndarray, clip: float, k: int) -> np.ndarray:
    """The definition: reflect-pad to whole tiles, one OpenCV CLAHE call, crop."""
    h, w = canvas.shape
    padded = np.pad(canvas, ((0, -h % k), (0, -w % k)), mode="reflect")
    grid = (padded.shape[1] // k, padded.shape[0] // k)
    return cv2.createCLAHE(clipLimit=256 * clip, tileGridSize=grid).apply(padded)[:h, :w]


@pytest.fixture(scope="module")
def canvas() -> np.ndarray:
    img = em_like(1900, 2500, seed=1)
    img[:, :300] = 0  # a fill-0 margin, as after warping
    return img


@pytest.fixture(scope="module")
def canvas_clahe(canvas: np.ndarray) -> np.ndarray:
    return clahe_canvas(canvas, 0.02, 1024)


def test_full_canvas_follows_the_definition(canvas: np.ndarray, canvas_clahe: np.ndarray) -> None:
    np.testing.assert_array_equal(canvas_clahe, _padded_reference(canvas, 0.02, 1024))
    # Where the canvas is whole tiles this is plain OpenCV CLAHE with 1024 px tiles.
    whole = canvas[:1024, :2048]
    plain = cv2.createCLAHE(clipLimit=5.12, tileGridSize=(2, 1)).apply(whole)
    np.testing.assert_array_equal(clahe_canvas(whole, 0.02, 1024), plain)


@pytest.mark.parametrize("window_px", [1024, 2048])
def test_stitched_windows_equal_the_full_canvas(
    canvas: np.ndarray, canvas_clahe: np.ndarray, window_px: int
) -> None:
    h, w = canvas.shape
    stitched = np.full_like(canvas, 7)
    windows = plan_windows(w, h, window_px)
    for win in windows:
        x0, y0, ww, wh = win
        sx, sy, sw, sh = clahe_source_region(win, (h, w), 1024)
        # The service warps exactly the source region; give exactly that.
        region = canvas[sy : sy + sh, sx : sx + sw].copy()
        stitched[y0 : y0 + wh, x0 : x0 + ww] = clahe_window(
            region, (sx, sy), (h, w), win, 0.02, 1024
        )
    np.testing.assert_array_equal(stitched, canvas_clahe)


@pytest.mark.parametrize("shape", [(700, 900), (300, 513)])  # 513: a last tile of 1 px
def test_unaligned_windows_are_exact_too(shape: tuple[int, int]) -> None:
    img = em_like(*shape, seed=2)
    full = clahe_canvas(img, 0.05, 256)
    for win in [(1, 2, 3, 4), (100, 30, 412, 233), (500, 200, 13, 100), (512, 299, 1, 1)]:
        sx, sy, sw, sh = clahe_source_region(win, img.shape, 256)
        got = clahe_window(img[sy : sy + sh, sx : sx + sw], (sx, sy), img.shape, win, 0.05, 256)
        x0, y0, w, h = win
        np.testing.assert_array_equal(got, full[y0 : y0 + h, x0 : x0 + w])
    # A region larger than needed (here the whole canvas) gives the same answer.
    got = clahe_window(img, (0, 0), img.shape, (300, 160, 200, 100), 0.05, 256)
    np.testing.assert_array_equal(got, full[160:260, 300:500])


def test_preserve_zero_keeps_the_fill_margin_black(
    canvas: np.ndarray, canvas_clahe: np.ndarray
) -> None:
    h, w = canvas.shape
    plain = canvas_clahe
    assert plain[:, :300].min() > 0  # CLAHE lifts the black margin
    kept = clahe_canvas(canvas, 0.02, 1024, preserve_zero=True)
    assert not kept[:, :300].any()
    np.testing.assert_array_equal(kept[canvas > 0], plain[canvas > 0])
    win = (0, 1024, 1024, 876)
    sx, sy, sw, sh = clahe_source_region(win, (h, w))
    part = clahe_window(canvas[sy : sy + sh, sx : sx + sw], (sx, sy), (h, w), win, 0.02, 1024, True)
    np.testing.assert_array_equal(part, kept[1024:, :1024])


def test_source_region_and_margin() -> None:
    assert clahe_margin(1024) == 1024
    # Tile-aligned window: one tile of context on each side, clamped to the canvas.
    assert clahe_source_region((2048, 1024, 2048, 1024), (4000, 5000)) == (1024, 0, 3976, 3072)
    assert clahe_source_region((0, 0, 1024, 1024), (1900, 2500)) == (0, 0, 2048, 1900)
    # Unaligned: back to the grid line, then one more tile.
    assert clahe_source_region((1500, 10, 10, 10), (1900, 2500)) == (0, 0, 2500, 1900)
    with pytest.raises(InvalidInput, match="inside the canvas"):
        clahe_source_region((2000, 0, 600, 10), (1900, 2500))


def test_region_missing_pixels_is_rejected(canvas: np.ndarray) -> None:
    h, w = canvas.shape
    with pytest.raises(InvalidInput, match="does not cover"):
        clahe_window(canvas[:, 1:], (1, 0), (h, w), (1024, 0, 1024, 1024), 0.02)


def test_clip_zero_is_identity_and_positive_clip_raises_contrast() -> None:
    img = (em_like(600, 600, seed=4) // 4 + 100).astype(np.uint8)  # low contrast
    np.testing.assert_array_equal(clahe_canvas(img, 0.0, 256), img)
    out = clahe_canvas(img, 0.02, 256)
    assert out.std() > 2 * img.std()
    stronger = clahe_canvas(img, 0.2, 256)
    assert stronger.std() > out.std()
    with pytest.raises(InvalidInput, match="clip-limit"):
        clahe_canvas(img, -0.1, 256)
    with pytest.raises(InvalidInput, match="power of two"):
        clahe_canvas(img, 0.02, 1000)


def _single_tile_reference(img: np.ndarray, clip: float) -> np.ndarray:
    """Clip-redistribute-equalise of one tile, written from the algorithm (OpenCV's variant)."""
    n = img.size
    hist = np.bincount(img.ravel(), minlength=256).astype(np.int64)
    limit = max(int(clip * n), 1)  # scikit-image's count: clip_limit * tile pixels
    excess = int(np.maximum(hist - limit, 0).sum())
    hist = np.minimum(hist, limit) + excess // 256
    residual = excess % 256
    if residual:
        step = max(256 // residual, 1)
        hist[0 : step * residual : step] += 1
    lut = np.rint(np.cumsum(hist).astype(np.float32) * np.float32(255 / n))
    return np.clip(lut, 0, 255).astype(np.uint8)[img]


def test_clip_limit_counts_like_scikit_image() -> None:
    assert opencv_clip_limit(0.02) == pytest.approx(5.12)
    img = (em_like(256, 256, seed=5) // 3 + 60).astype(np.uint8)
    for clip in (0.005, 0.02, 0.1):
        np.testing.assert_array_equal(
            clahe_canvas(img, clip, 256), _single_tile_reference(img, clip)
        )


def test_plan_windows_tiles_the_canvas() -> None:
    assert plan_windows(16384, 16384) == [
        (0, 0, 8192, 8192),
        (8192, 0, 8192, 8192),
        (0, 8192, 8192, 8192),
        (8192, 8192, 8192, 8192),
    ]
    assert plan_windows(12288, 500) == [(0, 0, 12288, 500)]
    for w, h, win in [(2500, 1900, 1024), (30001, 777, 12288), (1, 1, 1024)]:
        cover = np.zeros((h, w), np.int32)
        for x0, y0, ww, wh in plan_windows(w, h, win):
            assert x0 % 1024 == 0 and y0 % 1024 == 0 and ww <= win and wh <= win
            cover[y0 : y0 + wh, x0 : x0 + ww] += 1
        assert (cover == 1).all()
    with pytest.raises(InvalidInput, match="multiple"):
        plan_windows(100, 100, 1000)
