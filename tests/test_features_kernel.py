"""Features once per slice (issue 19): stored features match like the images they came from."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from emprocess.errors import InvalidInput
from emprocess.kernels.align import (
    AlignParams,
    SliceFeatures,
    align_features,
    align_pair,
    extract_features,
)
from emprocess.kernels.features import decode_features, encode_features, max_encoded_bytes

FIBSEM = Path(__file__).resolve().parents[2] / "shared" / "data" / "fibsem"


@pytest.fixture(scope="module")
def stack() -> list[np.ndarray]:
    """Seven consecutive real FIB-SEM slices (520^2, 8-bit)."""
    paths = [FIBSEM / f"img.{z:05d}.png" for z in range(7)]
    if not all(p.exists() for p in paths):
        pytest.fail(
            f"real FIB-SEM stack not found in {FIBSEM}: ../shared/data must sit beside the checkout"
        )
    return [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in paths]


def _same(a: dict, b: dict) -> None:
    a, b = dict(a), dict(b)
    a.pop("seconds"), b.pop("seconds")
    assert a == b


@pytest.mark.parametrize("d", [1, 3, 6])
def test_stored_features_match_exactly_like_the_images(stack: list[np.ndarray], d: int) -> None:
    """Every field of the answer (but the time) equals align_pair's, through the bytes."""
    features = [
        decode_features(encode_features(extract_features(s)), max_encoded_bytes(1000))[0]
        for s in stack
    ]
    for z in range(len(stack) - d):
        expected = align_pair(stack[z], stack[z + d]).model_dump()
        got = align_features(features[z], features[z + d]).model_dump()
        _same(got, expected)
        assert got["attempts"] == 1 and got["affine_found"]


def test_retry_decodes_the_images_once_and_answers_like_align_pair(
    stack: list[np.ndarray],
) -> None:
    """A pair without a model on the first attempt climbs the ladder on the images."""
    blank = np.zeros_like(stack[0])
    params = AlignParams(max_steps=4)
    calls = []

    def images() -> tuple[np.ndarray, np.ndarray]:
        calls.append(1)
        return stack[0], blank

    got = align_features(
        extract_features(stack[0], params), extract_features(blank, params), params, images
    )
    expected = align_pair(stack[0], blank, params)
    _same(got.model_dump(), expected.model_dump())
    assert got.attempts == 3 and len(calls) == 1 and not got.affine_found
    # Without images only the first attempt is possible.
    first = align_features(extract_features(stack[0], params), extract_features(blank, params))
    assert first.attempts == 1 and not first.affine_found


def test_encoding_is_deterministic_and_keeps_the_header(stack: list[np.ndarray]) -> None:
    f = extract_features(stack[0])
    data = encode_features(f, {"recipe": {"steps": 3}, "slice": "gs://b/img.00000.png"})
    assert data == encode_features(f, {"slice": "gs://b/img.00000.png", "recipe": {"steps": 3}})
    back, header = decode_features(data, len(data))
    assert np.array_equal(back.xy, f.xy) and np.array_equal(back.descriptors, f.descriptors)
    assert (back.width, back.height) == (520, 520)
    assert header["recipe"] == {"steps": 3} and header["count"] == len(f.xy)


def test_bad_bytes_are_refused_naming_why(stack: list[np.ndarray]) -> None:
    data = encode_features(extract_features(stack[0]))
    with pytest.raises(InvalidInput, match="exceeds 100"):
        decode_features(data, 100)
    with pytest.raises(InvalidInput, match="magic"):
        decode_features(b"\x80\x04pickle" + data[8:], len(data))
    with pytest.raises(InvalidInput, match="array bytes"):
        decode_features(data[:-4], len(data))
    with pytest.raises(InvalidInput, match="header length"):
        decode_features(data[:8] + b"\xff\xff\xff\x00" + data[12:], len(data))
    with pytest.raises(InvalidInput, match="positions"):
        SliceFeatures(4, 4, np.zeros((3, 2)), np.zeros((2, 128), np.float32))
