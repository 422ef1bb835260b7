"""A slice's stored SIFT features as bytes and back: a JSON header and two raw arrays.

The format is plain on purpose (never pickle, nothing executable): the magic
``EMFEAT1\\n``, the header's length as a little-endian uint32, the UTF-8 JSON header
(``count``, ``width``, ``height``, plus whatever the writer records: the recipe and the
slice that made the features), then ``count x 2`` little-endian float64 positions and
``count x 128`` little-endian float32 descriptors. Encoding is deterministic (sorted
JSON keys, no timestamps), so writing the features of one slice twice gives the same
bytes. Decoding checks every length against the header before building an array, and
refuses more than ``max_bytes`` (a reader bounds the object before loading it).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from emprocess.errors import InvalidInput
from emprocess.kernels.align import SliceFeatures

MAGIC = b"EMFEAT1\n"
DESCRIPTOR_SIZE = 128
MAX_HEADER_BYTES = 64 * 1024
"""A header is a few hundred bytes; more is not a features object of ours."""
BYTES_PER_FEATURE = 2 * 8 + DESCRIPTOR_SIZE * 4


def max_encoded_bytes(max_features: int) -> int:
    """The largest object holding ``max_features`` features (OpenCV may keep a few more
    than asked when strengths tie: twice as many are allowed)."""
    return len(MAGIC) + 4 + MAX_HEADER_BYTES + 2 * max_features * BYTES_PER_FEATURE


def encode_features(features: SliceFeatures, header: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of ``features``; ``header`` (JSON-ready) is stored beside the arrays."""
    n = len(features.xy)
    head: dict[str, Any] = dict(header or {})
    head.update(count=n, width=features.width, height=features.height)
    text = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    if len(text) > MAX_HEADER_BYTES:
        raise InvalidInput(f"features header of {len(text)} bytes exceeds {MAX_HEADER_BYTES}")
    xy = np.ascontiguousarray(features.xy, dtype="<f8")
    descriptors = np.ascontiguousarray(features.descriptors, dtype="<f4")
    return b"".join(
        [MAGIC, struct.pack("<I", len(text)), text, xy.tobytes(), descriptors.tobytes()]
    )


def decode_features(data: bytes, max_bytes: int) -> tuple[SliceFeatures, dict[str, Any]]:
    """The features and the header of :func:`encode_features`' bytes.

    Raises:
        InvalidInput: more than ``max_bytes``, a wrong magic, a bad header, or arrays
            whose length does not match the header's count.
    """
    if len(data) > max_bytes:
        raise InvalidInput(f"features object of {len(data)} bytes exceeds {max_bytes}")
    start = len(MAGIC) + 4
    if len(data) < start or data[: len(MAGIC)] != MAGIC:
        raise InvalidInput("not a features object (no EMFEAT1 magic)")
    (head_len,) = struct.unpack("<I", data[len(MAGIC) : start])
    if head_len > MAX_HEADER_BYTES or start + head_len > len(data):
        raise InvalidInput(f"features header length {head_len} is out of range")
    try:
        header = json.loads(data[start : start + head_len])
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"features header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise InvalidInput("features header is not a JSON object")
    counts: dict[str, int] = {}
    for name in ("count", "width", "height"):
        value = header.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidInput(f"features header {name}={value!r} is not a count")
        counts[name] = value
    n, width, height = counts["count"], counts["width"], counts["height"]
    body = start + head_len
    if len(data) - body != n * BYTES_PER_FEATURE:
        raise InvalidInput(
            f"features object holds {len(data) - body} array bytes, {n} features need "
            f"{n * BYTES_PER_FEATURE}"
        )
    xy = np.frombuffer(data, dtype="<f8", count=2 * n, offset=body).reshape(n, 2)
    descriptors = np.frombuffer(
        data, dtype="<f4", count=DESCRIPTOR_SIZE * n, offset=body + 16 * n
    ).reshape(n, DESCRIPTOR_SIZE)
    features = SliceFeatures(width, height, xy.astype(np.float64), descriptors.astype(np.float32))
    return features, header
