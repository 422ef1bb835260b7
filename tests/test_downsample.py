"""downsample_mean_2x against a slow loop over output voxels; shrink_mean (thumbnails)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from emprocess.errors import InvalidInput
from emprocess.kernels.downsample import downsample_mean_2x, downsampled_shape, shrink_mean


def slow_mean_2x(vol: np.ndarray, reduce_axes: tuple[bool, ...]) -> np.ndarray:
    """Mean of the voxels that exist in each 2-block, rounded half up, one voxel at a time."""
    out_shape = tuple((n + 1) // 2 if r else n for n, r in zip(vol.shape, reduce_axes, strict=True))
    out = np.empty(out_shape, dtype=vol.dtype)
    for idx in itertools.product(*(range(n) for n in out_shape)):
        block = vol[
            tuple(
                slice(2 * i, 2 * i + 2) if r else slice(i, i + 1)
                for i, r in zip(idx, reduce_axes, strict=True)
            )
        ]
        total, count = int(block.sum(dtype=np.int64)), block.size
        out[idx] = (2 * total + count) // (2 * count)  # floor(total / count + 1/2)
    return out


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize(
    "shape", [(5, 7, 9), (4, 6, 8), (1, 1, 1), (1, 3, 2), (33, 3, 5), (2, 1, 7)]
)
def test_matches_slow_reference(dtype: type, shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    vol = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True, dtype=dtype)
    got = downsample_mean_2x(vol)
    assert got.dtype == dtype and got.shape == downsampled_shape(shape)
    np.testing.assert_array_equal(got, slow_mean_2x(vol, (True, True, True)))
    got_xy = downsample_mean_2x(vol, downsample_z=False)
    np.testing.assert_array_equal(got_xy, slow_mean_2x(vol, (False, True, True)))


def test_extremes_do_not_overflow_and_round_half_up() -> None:
    vol = np.full((3, 3, 3), 255, np.uint8)
    np.testing.assert_array_equal(downsample_mean_2x(vol), np.full((2, 2, 2), 255))
    big = np.full((2, 2, 2), 65535, np.uint16)
    assert downsample_mean_2x(big)[0, 0, 0] == 65535
    # Sum 4 over 8 voxels is exactly one half: rounds up to 1; 3 / 8 rounds down to 0.
    half = np.zeros((2, 2, 2), np.uint8)
    half[0, 0, :] = 2
    assert downsample_mean_2x(half)[0, 0, 0] == 1
    half[0, 0, 1] = 1
    assert downsample_mean_2x(half)[0, 0, 0] == 0


@pytest.mark.parametrize("value", [0, 1, 128, 255])
def test_constant_volume_stays_constant_through_a_pyramid(value: int) -> None:
    vol = np.full((37, 50, 63), value, np.uint8)
    for _ in range(6):
        vol = downsample_mean_2x(vol)
        assert (vol == value).all()
    assert vol.shape == (1, 1, 1)


def test_two_dimensional_image() -> None:
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (11, 6), dtype=np.uint8)
    got = downsample_mean_2x(img)
    assert got.shape == (6, 3)
    np.testing.assert_array_equal(got, slow_mean_2x(img, (True, True)))


def test_large_block_spanning_several_z_batches() -> None:
    rng = np.random.default_rng(8)
    vol = rng.integers(0, 256, (41, 64, 66), dtype=np.uint8)
    expected = vol.reshape(41, 32, 2, 33, 2)[:40].reshape(20, 2, 32, 2, 33, 2)
    means = (expected.sum(axis=(1, 3, 5), dtype=np.int64) + 4) // 8
    got = downsample_mean_2x(vol)
    np.testing.assert_array_equal(got[:20], means)
    last = (vol[40].reshape(32, 2, 33, 2).sum(axis=(1, 3), dtype=np.int64) + 2) // 4
    np.testing.assert_array_equal(got[20], last)


def test_rejects_bad_input() -> None:
    with pytest.raises(InvalidInput, match="uint8 and uint16"):
        downsample_mean_2x(np.zeros((2, 2, 2), np.float32))
    with pytest.raises(InvalidInput, match="shape"):
        downsample_mean_2x(np.zeros((2, 2, 2, 2), np.uint8))
    with pytest.raises(InvalidInput, match="empty"):
        downsample_mean_2x(np.zeros((0, 2, 2), np.uint8))


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 53), (64, 64), (213, 170)])
def test_shrink_mean_is_the_block_mean(factor: int, shape: tuple[int, int]) -> None:
    img = np.random.default_rng(factor).integers(0, 256, shape, dtype=np.uint8)
    got = shrink_mean(img, factor)
    h, w = shape
    assert got.shape == (-(-h // factor), -(-w // factor)) and got.dtype == np.uint8
    padded = np.pad(
        img.astype(np.float64), ((0, -h % factor), (0, -w % factor)), constant_values=np.nan
    )
    blocks = padded.reshape(got.shape[0], factor, got.shape[1], factor)
    want = np.nanmean(blocks, axis=(1, 3))  # the last row and column: the pixels that exist
    # Rounded to nearest (OpenCV may break ties either way).
    assert np.abs(got - want).max() <= 0.5 + 1e-9


def test_shrink_mean_of_pieces_is_the_shrink_of_the_whole() -> None:
    """Windows that start on multiples of the factor give the same thumbnail pixels."""
    img = np.random.default_rng(9).integers(0, 256, (70, 90), dtype=np.uint8)
    whole = shrink_mean(img, 4)
    left, right = shrink_mean(img[:, :48], 4), shrink_mean(img[:, 48:], 4)
    np.testing.assert_array_equal(np.concatenate([left, right], axis=1), whole)
    with pytest.raises(InvalidInput, match="factor"):
        shrink_mean(img, 0)
    with pytest.raises(InvalidInput, match="2-D"):
        shrink_mean(img[None], 2)
