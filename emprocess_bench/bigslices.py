"""Stacks of EM-like slices of any size for benchmarks (20,000^2 and more), 8- or 16-bit.

:mod:`emprocess.sample` renders slices of up to 8,192 px a side. A larger slice is the
sample's slice at 8,192 px resampled to the size asked (bilinear, in strips of rows, so
the image is never held as floats) with fresh detector noise at full resolution: no
tile repeats (a mirrored or tiled texture would give SIFT matches at the period), the
tissue's profiles are that factor larger, and consecutive slices keep the sample's
known drift, scaled by the factor. 16-bit slices are the 8-bit ones as
``v * 16 + 300`` (12 bits of signal in 16, as :mod:`emprocess_bench.emwrite` writes them)
plus noise in the low bits; made from an 8-bit stack already written beside them when
there is one (a decode instead of a render). Slices are written as PNG at compression
level 1.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np

from emprocess import storage
from emprocess.sample import MAX_SIZE_PX, iter_slices

log = logging.getLogger(__name__)

BITS16_SCALE, BITS16_OFFSET = 16, 300
NOISE_SIGMA = 5.0
"""Detector noise added at full resolution (grey levels of 8 bits), as the sample's."""
STRIP_ROWS = 1024
STACK_RECORD = "stack.json"
"""What a written stack is (size, slices, bits, base side), so a benchmark can reuse it."""


def bits16_window() -> list[float]:
    """The intensity window that maps a 16-bit slice back onto its 8-bit grey levels."""
    return [float(BITS16_OFFSET), float(BITS16_OFFSET + 255 * BITS16_SCALE)]


def enlarge_slice(base: np.ndarray, side: int, bits: int = 8, seed: int = 0) -> np.ndarray:
    """(side, side) slice from a square uint8 ``base``: resampled, noisy, 8- or 16-bit.

    Args:
        base: (n, n) uint8 slice, n <= side.
        side: the side of the slice made, px.
        bits: 8 (uint8) or 16 (uint16, ``v * 16 + 300`` plus noise).
        seed: of the full-resolution noise (the same arguments give the same pixels).
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    n = base.shape[0]
    if base.shape != (n, n) or base.dtype != np.uint8 or n > side:
        raise ValueError(
            f"base must be a square uint8 image of at most {side} px, got {base.shape}"
        )
    out = np.empty((side, side), np.uint8 if bits == 8 else np.uint16)
    s = n / side  # base px per output px
    rng = np.random.default_rng(seed)
    for y0 in range(0, side, STRIP_ROWS):
        rows = min(STRIP_ROWS, side - y0)
        if n == side:  # the sample's own slice, with its own noise
            band = base[y0 : y0 + rows].astype(np.float32)
        else:
            # Output pixel centre (x, y) samples base pixel (x * s + (s - 1) / 2, ...).
            m = np.array([[s, 0.0, (s - 1) / 2], [0.0, s, y0 * s + (s - 1) / 2]])
            band = cv2.warpAffine(
                base,
                m,
                (side, rows),
                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                borderMode=cv2.BORDER_REPLICATE,
            ).astype(np.float32)
            band += rng.normal(0.0, NOISE_SIGMA, band.shape).astype(np.float32)
        np.clip(band, 0, 255, out=band)
        eight = np.rint(band).astype(np.uint8)
        out[y0 : y0 + rows] = eight if bits == 8 else widen(eight, rng)
    return out


def widen(eight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The 16-bit slice of an 8-bit one: ``v * 16 + 300`` plus noise in the low 4 bits."""
    wide = eight.astype(np.uint16) * BITS16_SCALE
    wide += rng.integers(BITS16_OFFSET, BITS16_OFFSET + BITS16_SCALE, eight.shape, np.uint16)
    return wide


def write_big_stack(
    bucket: str,
    slices: int,
    side: int,
    bits: int = 8,
    seed: int = 0,
    template: str = "img.%05d.png",
    eight_bit: str | None = None,
) -> dict[str, Any]:
    """Write ``slices`` EM-like slices of ``side``^2 px to ``bucket`` (created if missing).

    Keeps them when the bucket's :data:`STACK_RECORD` says the same stack is there. A
    16-bit stack is made from the 8-bit one in bucket ``eight_bit`` when that holds the
    same stack at 8 bits, else rendered.

    Returns:
        The stack record: side, slices, bits, base side, seed, template.
    """
    base_side = min(side, MAX_SIZE_PX)
    record: dict[str, Any] = {
        "side": side,
        "slices": slices,
        "bits": bits,
        "base_side": base_side,
        "seed": seed,
        "template": template,
    }
    storage.create_bucket(bucket)
    url = storage.bucket_url(bucket, STACK_RECORD)
    if storage.exists(url) and json.loads(storage.read_bytes(url)) == record:
        return record
    for key in storage.list_keys(storage.bucket_url(bucket)):
        storage.delete(storage.bucket_url(bucket, key))
    source = None
    if bits == 16 and eight_bit is not None:
        found = storage.bucket_url(eight_bit, STACK_RECORD)
        if storage.exists(found) and json.loads(storage.read_bytes(found)) == {
            **record,
            "bits": 8,
        }:
            source = eight_bit
    for z, image in _slices(record, source):
        ok, png = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise RuntimeError(f"PNG encoding of slice {z} failed")
        del image
        storage.write_bytes(storage.bucket_url(bucket, template % z), png.tobytes(), "image/png")
        log.info("wrote slice %d of %d (%d^2 px, %d-bit)", z + 1, slices, side, bits)
    storage.write_bytes(url, json.dumps(record).encode(), "application/json")
    return record


def _slices(record: dict[str, Any], eight_bit: str | None) -> Iterator[tuple[int, np.ndarray]]:
    """(z, image) of a stack: rendered, or widened from the 8-bit slices in ``eight_bit``."""
    side, bits, seed = record["side"], record["bits"], record["seed"]
    if eight_bit is None:
        base_side = record["base_side"]
        for z, base in iter_slices(record["slices"], base_side, base_side, seed):
            yield z, enlarge_slice(base, side, bits, seed=seed * 1_000_003 + z)
        return
    for z in range(record["slices"]):
        url = storage.bucket_url(eight_bit, record["template"] % z)
        eight = cv2.imdecode(np.frombuffer(storage.read_bytes(url), np.uint8), cv2.IMREAD_UNCHANGED)
        if eight is None:
            raise RuntimeError(f"{url} could not be decoded")
        yield z, widen(eight, np.random.default_rng(seed * 1_000_003 + z))
