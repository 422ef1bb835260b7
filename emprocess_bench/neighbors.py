"""Alignment cost per neighbour count: pairs that decode both slices vs features once per slice.

Drives the alignment service's own request functions in this process (no HTTP), on a
synthetic stack of PNG slices in a temporary local storage root:

* "pairs" (before issue 19): one POST / per pair without ``run_id``
  (:func:`emprocess.services.align.align_request`): each pair decodes both slices and
  extracts both slices' features, so each slice is decoded and extracted 2k times.
* "features once": one POST /features per slice
  (:func:`emprocess.services.features.features_request`), then one POST / per pair with
  ``run_id`` (:func:`emprocess.services.features.align_with_features`), which reads the
  two stored feature sets and matches them.

CPU seconds are the process's (every thread), measured around the requests only.
The answers of the two ways are compared field by field (all but the time).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from emprocess import layout, storage
from emprocess.models import AlignRequest, FeaturesRequest
from emprocess.settings import ServiceEnv, StorageEnv, load
from emprocess_bench.align import add_noise, synthetic_texture

BUCKET = "bench-neighbors"
MAX_SHIFT_PX = 12


def write_stack(n: int, side: int, seed: int = 0) -> list[str]:
    """``n`` PNG slices of ``side`` px, each a crop of one texture shifted by a few px."""
    storage.create_bucket(BUCKET)
    storage.create_bucket(layout.process_bucket(BUCKET))
    rng = np.random.default_rng(seed)
    base = synthetic_texture(side + 2 * MAX_SHIFT_PX, side + 2 * MAX_SHIFT_PX, seed)
    urls = []
    for z in range(n):
        dx, dy = rng.integers(0, 2 * MAX_SHIFT_PX, size=2)
        crop = add_noise(base[dy : dy + side, dx : dx + side], 4.0, rng)
        ok, png = cv2.imencode(".png", crop)
        assert ok
        url = f"gs://{BUCKET}/img.{z:05d}.png"
        storage.write_bytes(url, png.tobytes())
        urls.append(url)
    return urls


def pair_list(n: int, k: int) -> list[tuple[int, int]]:
    """The run's pairs (z, z + d), d = 1 .. k (as :func:`~emprocess.workflow.payloads.align_pair_list`)."""
    return [(z, z + d) for z in range(n - 1) for d in range(1, k + 1) if z + d < n]


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    drop = ("seconds", "features")
    return {k: v for k, v in a.items() if k not in drop} == {
        k: v for k, v in b.items() if k not in drop
    }


def run_neighbors_benchmark(
    n: int = 16, side: int = 2048, neighbors: Sequence[int] = (1, 3, 6), downsample: int = 1
) -> list[dict[str, Any]]:
    """One row per neighbour count: CPU and wall seconds of both ways, and their answers'
    agreement."""
    from emprocess.services.align import align_request
    from emprocess.services.features import align_with_features, features_request

    rows, max_pixels = [], load(ServiceEnv).align_max_pixels  # as the service reads it
    with tempfile.TemporaryDirectory() as tmp, storage.use(StorageEnv(storage_root=Path(tmp))):
        urls = write_stack(n, side)
        for k in neighbors:
            pairs = pair_list(n, k)
            requests = [
                AlignRequest(pre=urls[a], post=urls[b], downsample=downsample) for a, b in pairs
            ]
            cpu0, wall0 = time.process_time(), time.perf_counter()
            before = [align_request(r, max_pixels=max_pixels) for r in requests]
            cpu_before, wall_before = time.process_time() - cpu0, time.perf_counter() - wall0
            run_id = f"bench-k{k}"  # its own features: nothing carried over between rows
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for url in urls:
                features_request(
                    FeaturesRequest(img=url, run_id=run_id, downsample=downsample),
                    max_pixels=max_pixels,
                )
            cpu_features = time.process_time() - cpu0
            after = [
                align_with_features(r.model_copy(update={"run_id": run_id}), max_pixels=max_pixels)
                for r in requests
            ]
            cpu_after, wall_after = time.process_time() - cpu0, time.perf_counter() - wall0
            rows.append(
                {
                    "neighbors": k,
                    "slices": n,
                    "side": side,
                    "pairs": len(pairs),
                    "cpu_before_s": round(cpu_before, 2),
                    "wall_before_s": round(wall_before, 2),
                    "cpu_after_s": round(cpu_after, 2),
                    "cpu_features_s": round(cpu_features, 2),
                    "wall_after_s": round(wall_after, 2),
                    "identical": sum(_same(a, b) for a, b in zip(after, before, strict=True)),
                    "retry_decoded": sum(a["features"]["retry_decoded"] for a in after),
                }
            )
    return rows


def print_neighbors_benchmark(rows: Sequence[dict[str, Any]]) -> None:
    """The rows as a table, with each way's cost relative to its own 1-neighbour row."""
    if not rows:
        return
    first = rows[0]
    print(
        f"{first['slices']} slices of {first['side']}^2 px (synthetic PNG), align CPU s of the "
        "service's request functions, one process:"
    )
    print(
        "  neighbors  pairs | pairs decode both: CPU s (x k=1)  wall s | features once: "
        "CPU s (extract) (x k=1)  wall s | answers identical"
    )
    for r in rows:
        x_before = r["cpu_before_s"] / max(first["cpu_before_s"], 1e-9)
        x_after = r["cpu_after_s"] / max(first["cpu_after_s"], 1e-9)
        print(
            f"  {r['neighbors']:9d} {r['pairs']:6d} | {r['cpu_before_s']:13.2f} ({x_before:4.2f}x)"
            f" {r['wall_before_s']:7.2f} | {r['cpu_after_s']:8.2f} ({r['cpu_features_s']:6.2f})"
            f" ({x_after:4.2f}x) {r['wall_after_s']:7.2f} | {r['identical']}/{r['pairs']}"
            + (f" ({r['retry_decoded']} decoded for a retry)" if r["retry_decoded"] else "")
        )
