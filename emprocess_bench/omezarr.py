"""/ngshard CPU and peak memory per full 1024^3 cube: the lossless volume as OME-Zarr against
precomputed (conf ``raw_format``).

One cube's 1024 tiled slices are written once into the tmp bucket (as
:func:`emprocess_bench.emwrite.measure_full_cube` does), then /ngmeta + /ngshard run in a fresh
process per variant: JPEG only, JPEG + precomputed raw (``raw_format`` absent), JPEG +
OME-Zarr, JPEG + both. The lossless volume's own cost is a variant's CPU less the JPEG-only
one's. Run as ``python -m emprocess_bench.omezarr [--depth N] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import numpy as np

from emprocess import storage
from emprocess.layout import RunLayout
from emprocess_bench.emwrite import MB
from emprocess_bench.emwrite_phases import (
    CONTAINER_MALLOC_ARENA_MAX,
    clear_buckets,
    environment,
    run_phase,
    storage_root,
)
from emprocess_bench.emwrite_stack import RUN_ID, SOURCE, _em_texture, volume_payload

VARIANTS: dict[str, dict[str, Any]] = {
    "jpeg only": {"writeRaw": False},
    "jpeg + precomputed raw": {},
    "jpeg + ome-zarr": {"raw_format": "ome-zarr"},
    "jpeg + both": {"raw_format": "both"},
}


def write_cube_tiles(bucket: str, depth: int) -> None:
    """``depth`` drifting 1024^2 crops of an EM-like texture as tiled slices of ``bucket``."""
    from emprocess.kernels.tiles import encode_tiled_slice

    storage.create_bucket(bucket)
    texture = _em_texture(2048, seed=2)
    rng = np.random.default_rng(0)
    for z in range(depth):
        x, y = (int(v) for v in rng.integers(0, 1024, 2))
        tile = np.ascontiguousarray(texture[y : y + 1024, x : x + 1024])
        storage.write_bytes(
            storage.bucket_url(bucket, f"aligned/{z:06d}.tiles"),
            encode_tiled_slice(tile, codec="raw"),
        )


def measure_cube_formats(depth: int = 1024, repeats: int = 1) -> dict[str, dict[str, Any]]:
    """CPU s, wall s and peak RSS (MiB) of /ngmeta + /ngshard of one 1024^2 x ``depth``
    cube for every :data:`VARIANTS` entry, and the objects each writes."""
    cube_run = RunLayout(f"{SOURCE}-cube", RUN_ID)  # emwrite takes one run's buckets
    src = cube_run.tmp
    write_cube_tiles(src, depth)
    out: dict[str, dict[str, Any]] = {}
    for name, fields in VARIANTS.items():
        meta = volume_payload((1024, 1024), 0, depth - 1, True, cube_run)
        meta.update(fields)
        if meta.get("writeRaw") is False:
            meta.pop("dest_raw", None)
        buckets = [b for b in (meta["dest"], meta.get("dest_raw")) if b]

        def fresh(buckets: list[str] = buckets) -> None:
            clear_buckets(*buckets)

        row = run_phase("ngshard", meta, src, repeats=repeats, fresh=fresh)
        objects = {b: len(storage.list_keys(f"gs://{b}/")) for b in buckets}
        out[name] = {**row, "mb": depth * 1024 * 1024 / MB, "objects": objects}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=1024, help="slices in the cube")
    parser.add_argument("--repeats", type=int, default=1, help="fresh runs per variant")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with (
        storage_root(None),
        environment(MALLOC_ARENA_MAX=str(CONTAINER_MALLOC_ARENA_MAX)),
    ):
        result = measure_cube_formats(args.depth, args.repeats)
    base = result["jpeg only"]["cpu_s"]
    print(f"/ngmeta + /ngshard of one 1024 x 1024 x {args.depth} cube (fastest of {args.repeats})")
    print(f"{'variant':26s} {'cpu s':>7s} {'wall s':>7s} {'lossless cpu s':>15s} {'peak MiB':>9s}")
    for name, r in result.items():
        extra = r["cpu_s"] - base
        print(
            f"{name:26s} {r['cpu_s']:7.2f} {r['wall_s']:7.2f} {extra:15.2f} "
            f"{r['peak_rss_mib']:9.0f}  objects {r['objects']}"
        )
    pre, zarr = result["jpeg + precomputed raw"], result["jpeg + ome-zarr"]
    print(
        f"ome-zarr / precomputed: /ngshard CPU {zarr['cpu_s'] / pre['cpu_s']:.2f}x, lossless "
        f"part {(zarr['cpu_s'] - base) / max(pre['cpu_s'] - base, 1e-9):.2f}x, peak RSS "
        f"{zarr['peak_rss_mib'] / pre['peak_rss_mib']:.2f}x"
    )
    if args.json:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
