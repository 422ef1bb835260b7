"""The benchmarks' big slices: the sample's tissue enlarged, 8- or 16-bit, written once."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from emprocess import storage
from emprocess.sample import generate_slice
from emprocess.settings import StorageEnv, load
from emprocess_bench.bigslices import STACK_RECORD, bits16_window, enlarge_slice, write_big_stack


def test_an_enlarged_slice_keeps_the_tissue_and_its_grey_levels() -> None:
    base = generate_slice(0, 256, 256, seed=1)
    big = enlarge_slice(base, 640, bits=8, seed=2)
    assert big.shape == (640, 640) and big.dtype == np.uint8
    # Shrunk back, it is the base up to the added noise (sd 5) and the resampling.
    back = cv2.resize(big, (256, 256), interpolation=cv2.INTER_AREA).astype(float)
    assert abs(back.mean() - base.mean()) < 1.0
    assert np.corrcoef(back.ravel(), base.ravel().astype(float))[0, 1] > 0.9
    # Not a tiling of a smaller texture: the right half is not the left half again.
    assert np.corrcoef(big[:, :320].ravel(), big[:, 320:].ravel())[0, 1] < 0.5
    # The same arguments give the same pixels; at the base's own size it is the base.
    assert np.array_equal(big, enlarge_slice(base, 640, bits=8, seed=2))
    assert np.array_equal(enlarge_slice(base, 256, bits=8), base)


def test_a_16_bit_slice_is_the_8_bit_one_through_the_window() -> None:
    base = generate_slice(0, 128, 128, seed=1)
    wide = enlarge_slice(base, 128, bits=16)
    assert wide.dtype == np.uint16
    low, high = bits16_window()
    eight = (wide.astype(float) - low) * 255 / (high - low)
    assert np.abs(eight - base).max() <= 1.0  # the low bits carry noise below one grey level
    with pytest.raises(ValueError, match="bits must be 8 or 16, got 12"):
        enlarge_slice(base, 128, bits=12)
    with pytest.raises(ValueError, match="at most 64 px"):
        enlarge_slice(base, 64)


def test_a_stack_is_written_once_and_rewritten_when_it_differs(tmp_path: Path) -> None:
    with storage.use(load(StorageEnv, storage_root=tmp_path)):
        record = write_big_stack("big-stack", 2, 96, bits=16)
        assert record["base_side"] == 96 and record["bits"] == 16
        folder = tmp_path / "big-stack"
        keys = storage.list_keys(storage.bucket_url("big-stack"))
        assert keys == ["img.00000.png", "img.00001.png", STACK_RECORD]
        image = cv2.imread(str(folder / "img.00001.png"), cv2.IMREAD_UNCHANGED)
        assert image.shape == (96, 96) and image.dtype == np.uint16
        stamp = (folder / "img.00000.png").stat().st_mtime_ns
        write_big_stack("big-stack", 2, 96, bits=16)  # the same stack: kept
        assert (folder / "img.00000.png").stat().st_mtime_ns == stamp
        write_big_stack("big-stack", 1, 96, bits=8)  # another: the old slices go
        keys = storage.list_keys(storage.bucket_url("big-stack"))
        assert keys == ["img.00000.png", STACK_RECORD]
        assert cv2.imread(str(folder / "img.00000.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint8


def test_a_16_bit_stack_is_widened_from_the_8_bit_one_beside_it(tmp_path: Path) -> None:
    with storage.use(load(StorageEnv, storage_root=tmp_path)):
        write_big_stack("eight", 2, 80, bits=8)
        write_big_stack("other", 2, 96, bits=8)
        for bucket, eight_bit in (("wide", "eight"), ("rendered", "other")):
            write_big_stack(bucket, 2, 80, bits=16, eight_bit=eight_bit)
        for z in (0, 1):
            name = f"img.{z:05d}.png"
            eight, wide, rendered = (
                cv2.imread(str(tmp_path / b / name), cv2.IMREAD_UNCHANGED)
                for b in ("eight", "wide", "rendered")
            )
            assert np.array_equal((wide - 300) // 16, eight)  # widened: the same slice
            # Another 8-bit stack (another size) is not used: rendered, the same tissue.
            assert np.abs((rendered.astype(int) - 300) // 16 - eight).max() <= 1
