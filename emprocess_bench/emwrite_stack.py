"""The emwrite benchmark's inputs, made in the parent process (unmeasured): a synthetic
stack in a bench run's buckets and the /alignedslice and /ngmeta bodies that write it."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from emprocess import affine, storage
from emprocess.layout import RunLayout

SOURCE = "bench-src"
RUN_ID = "bench"
LAYOUT = RunLayout(SOURCE, RUN_ID)
TEMPLATE = "img.%05d.png"


def global_transforms(
    world: dict[str, list[float]], width: int, height: int
) -> tuple[dict[int, list[float]], tuple[int, int]]:
    """Slice -> canvas transforms and the canvas (width, height) for a stack's world transforms.

    The canvas is the bounding box of every transformed slice, shifted to start at 0, 0
    (what the DAG's "collect" step does with the chained pairwise transforms).
    """
    corners = np.concatenate(
        [affine.apply(t, affine.corners_xy(width, height)) for t in world.values()]
    )
    lo, hi = np.floor(corners.min(0)), np.ceil(corners.max(0))
    shift = affine.translation(-lo[0], -lo[1])
    transforms = {int(z): affine.compose(shift, t) for z, t in world.items()}
    return transforms, (int(hi[0] - lo[0]), int(hi[1] - lo[1]))


BITS16_SCALE, BITS16_OFFSET = 16, 300
"""A 16-bit benchmark stack is the 8-bit one as v * 16 + 300 (12 bits of signal in 16),
sent with the window that maps it back: the same pixels after the window, so the rows
compare the cost of 16-bit slices with the same work after the intensity step."""


def bits16_window() -> list[float]:
    return [float(BITS16_OFFSET), float(BITS16_OFFSET + 255 * BITS16_SCALE)]


def write_stack(
    slices: int, size: int, seed: int = 0, bits: int = 8, channels: int = 1
) -> dict[str, Any]:
    """Create the run's buckets and write the synthetic stack to SOURCE.

    Args:
        bits: 8, or 16 for the stack as 16-bit PNGs (see ``BITS16_SCALE``).
        channels: 1, or 3 for RGB PNGs (see :func:`colour_slice`), sent with ``channels``.

    Returns:
        ``{"transforms": {z: 6 numbers}, "bbox": (width, height), "minz", "maxz"}``.
    """
    from emprocess.images import decode_image
    from emprocess.sample import write_sample

    for bucket in RunLayout(SOURCE, RUN_ID).bucket_names().values():
        storage.create_bucket(bucket)
    truth = write_sample(
        storage.bucket_url(SOURCE, ""), slices, size, size, seed, template=TEMPLATE
    )
    if bits == 16:
        for z in range(slices):
            url = storage.bucket_url(SOURCE, TEMPLATE % z)
            image = decode_image(storage.read_bytes(url), url)
            wide = image.astype(np.uint16) * BITS16_SCALE + BITS16_OFFSET
            storage.write_bytes(url, cv2.imencode(".png", wide)[1].tobytes())
    if channels == 3:
        for z in range(slices):
            url = storage.bucket_url(SOURCE, TEMPLATE % z)
            rgb = colour_slice(decode_image(storage.read_bytes(url), url))
            storage.write_bytes(url, cv2.imencode(".png", rgb[:, :, ::-1])[1].tobytes())
    transforms, bbox = global_transforms(truth["world"], size, size)
    return {
        "transforms": transforms,
        "bbox": bbox,
        "minz": 0,
        "maxz": slices - 1,
        "bits": bits,
        "channels": channels,
    }


def colour_slice(grey: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB of a benchmark slice: the slice, its negative, and its half."""
    return np.dstack([grey, 255 - grey if grey.dtype == np.uint8 else ~grey, grey // 2])


def aligned_slice_payloads(stack: dict[str, Any], clip_limit: float = 0.02) -> list[dict]:
    """One /alignedslice body per slice."""
    return [
        {
            "img": TEMPLATE % z,
            "transform": t,
            "bbox": list(stack["bbox"]),
            "dest": SOURCE,
            "dest-tmp": LAYOUT.tmp,
            "slice": z,
            "run_id": RUN_ID,
            "clip-limit": clip_limit,
            **({"intensity_window": bits16_window()} if stack.get("bits") == 16 else {}),
            **({"raw_dtype": "uint16"} if stack.get("raw_bits") == 16 else {}),
            **({"channels": stack["channels"]} if stack.get("channels", 1) > 1 else {}),
        }
        for z, t in sorted(stack["transforms"].items())
    ]


def volume_payload(
    bbox: tuple[int, int],
    minz: int,
    maxz: int,
    write_raw: bool,
    run: RunLayout = LAYOUT,
    raw_bits: int = 8,
    channels: int = 1,
) -> dict[str, Any]:
    """The /ngmeta body of ``run``'s volumes (buckets created); /ngshard adds ``source``
    (the run's tmp bucket: emwrite takes only one run's buckets) and ``start``."""
    body: dict[str, Any] = {
        "dest": run.ng,
        "minz": minz,
        "maxz": maxz,
        "bbox": list(bbox),
        "writeRaw": write_raw,
        "resolution": 8,
        **({"raw_dtype": "uint16"} if raw_bits == 16 else {}),
        **({"channels": channels} if channels > 1 else {}),
    }
    storage.create_bucket(body["dest"])
    if write_raw:
        body["dest_raw"] = run.chunk
        storage.create_bucket(body["dest_raw"])
    return body


def _em_texture(side: int, seed: int = 1) -> np.ndarray:
    """A side x side EM-like image: one synthetic slice mirrored to fill the square."""
    from emprocess.sample import generate_slice

    base = min(side, 2048)
    tile = generate_slice(0, base, base, seed)
    reps = math.ceil(side / base)
    rows = [
        np.concatenate([tile[:, ::-1] if (i + j) % 2 else tile for j in range(reps)], axis=1)
        for i in range(reps)
    ]
    full = np.concatenate([r[::-1] if i % 2 else r for i, r in enumerate(rows)], axis=0)
    return np.ascontiguousarray(full[:side, :side])
