"""Throughput and peak memory of the emwrite service: ``python -m emprocess_bench.emwrite``.

A synthetic stack (``emprocess.sample``, known drift) goes through the service
functions in-process, under a temporary local storage root:
/alignedslice for every slice, then /ngmeta and /ngshard for every cube, once
JPEG-only and once with the lossless raw pyramid. Each phase runs in a fresh
``spawn`` subprocess, so its peak RSS (``peak_rss_mib``) is its own and no
phase's memory masks another's.

Throughput is MB (10^6 bytes, uint8 voxels) per second: of the decoded input
slices (``slices * size * size``) for /alignedslice, of the canvas voxels (a
little more, because of the drift) for /ngshard and end to end, which is also
given per input byte. "Per core" divides by CPU seconds (user + system of the
process and its children, every thread counted); "wall" by elapsed seconds on
this machine. OpenCV runs with ``cv2.setNumThreads(cv_threads)``. The machine
may be shared: ``repeats`` runs each phase several times and keeps the fastest.

``--slice-px 16384`` also measures one /alignedslice of a slice that size, and
``--cube`` one full 1024^3 /ngshard cube (its 1024 tiled slices are written
straight into the tmp bucket with the "raw" tile codec), each in its own process.
``--tile-codec png`` runs the phases with PNG tiles in the tmp bucket, and
``--codecs`` compares tensorstore's precomputed codecs for the lossless pyramid.
Phase processes get ``MALLOC_ARENA_MAX=2`` as in the container (``--glibc-arenas``
leaves glibc's default).

The stack and the request bodies are made by :mod:`emprocess_bench.emwrite_stack`, the
phase processes run and measured by :mod:`emprocess_bench.emwrite_phases`.

Call the functions from a ``if __name__ == "__main__":`` block: the phases start
``spawn`` processes, which import the caller's main module.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import cv2
import numpy as np

from emprocess import storage
from emprocess.layout import RunLayout
from emprocess_bench.emwrite_phases import (
    CONTAINER_MALLOC_ARENA_MAX,
    _cpu_s,
    clear_buckets,
    phase_env,
    run_phase,
    storage_root,
)
from emprocess_bench.emwrite_stack import (
    LAYOUT,
    RUN_ID,
    SOURCE,
    _em_texture,
    aligned_slice_payloads,
    colour_slice,
    global_transforms,
    volume_payload,
    write_stack,
)

log = logging.getLogger(__name__)

MB = 1e6


def _rates(row: dict[str, float], megabytes: float, basis: str) -> dict[str, Any]:
    return {
        **row,
        "mb": megabytes,
        "basis": basis,
        "mb_per_cpu_s": megabytes / row["cpu_s"],
        "mb_per_wall_s": megabytes / row["wall_s"],
    }


def run_emwrite_benchmark(
    slices: int = 64,
    size: int = 2048,
    write_raw: bool = True,
    *,
    cv_threads: int = 1,
    repeats: int = 1,
    tile_codec: str | None = None,
    malloc_arena_max: int | None = CONTAINER_MALLOC_ARENA_MAX,
    slice_px: int = 0,
    cube: bool = False,
    codecs: bool = False,
    root: str | None = None,
    bits: int = 8,
    raw_bits: int = 8,
    channels: int = 1,
) -> dict[str, Any]:
    """Measure every emwrite phase on a synthetic stack; see the module docstring.

    Args:
        slices: slices in the stack; 0 skips the stack (only ``slice_px`` / ``cube``).
        size: side of each (square) input slice in pixels.
        write_raw: also measure /ngshard with the lossless raw pyramid.
        cv_threads: ``cv2.setNumThreads`` in every phase process.
        repeats: fresh processes per phase; the fastest counts, the largest RSS.
        tile_codec: "raw" or "png" for the tmp bucket's tiles (EMPROCESS_TILE_CODEC);
            None keeps the service's default.
        malloc_arena_max: MALLOC_ARENA_MAX of the phase processes, as the container
            sets it; None leaves glibc's default (8 arenas per core).
        slice_px: if > 0, also one /alignedslice of a slice this size (peak RSS).
        cube: also one full 1024^3 /ngshard cube with the raw pyramid (peak RSS).
        codecs: also :func:`measure_volume_codecs` (in this process).
        root: storage root to use instead of a temporary folder (kept afterwards).
        bits: 8, or 16 for a stack of 16-bit slices sent with an intensity window (the
            MB basis stays pixels, 10^6 per MB, so the rows compare with 8-bit ones).
        raw_bits: 16 (with ``bits`` 16) for a uint16 lossless volume (``raw_dtype``).
        channels: 1, or 3 for RGB slices kept in 3 channels (the MB basis stays pixels,
            10^6 per MB, so the rows compare with grey ones: bytes are 3x).

    Returns:
        ``{"stack": {...}, "phases": {name: row}, "big_slice": row, "full_cube": row}``,
        each row with cpu_s, wall_s, peak_rss_mib, base_rss_mib, mb (10^6 bytes of its
        basis: "input" pixels or "canvas" voxels), mb_per_cpu_s and mb_per_wall_s.
    """
    out: dict[str, Any] = {
        "cv_threads": cv_threads,
        "repeats": repeats,
        "malloc_arena_max": malloc_arena_max,
        "phases": {},
    }
    with storage_root(root):
        env = phase_env(tile_codec, malloc_arena_max)
        if slices:
            out.update(
                _run_stack(
                    slices, size, write_raw, cv_threads, repeats, bits, raw_bits, channels,
                    env=env,
                )
            )  # fmt: skip
        if slice_px:
            out["big_slice"] = measure_big_slice(slice_px, cv_threads, repeats, env=env)
        if cube:
            out["full_cube"] = measure_full_cube(
                cv_threads, repeats=repeats, channels=channels, env=env
            )
    if codecs:
        out["volume_codecs"] = measure_volume_codecs()
    out["tile_codec"] = env["EMPROCESS_TILE_CODEC"]
    return out


def _run_stack(
    slices: int,
    size: int,
    write_raw: bool,
    cv_threads: int,
    repeats: int,
    bits: int = 8,
    raw_bits: int = 8,
    channels: int = 1,
    *,
    env: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    stack = write_stack(slices, size, bits=bits, channels=channels)
    stack["raw_bits"] = raw_bits
    bbox, minz, maxz = stack["bbox"], stack["minz"], stack["maxz"]
    input_mb = slices * size * size / MB
    canvas_mb = slices * bbox[0] * bbox[1] / MB
    info = {
        "slices": slices,
        "size": size,
        "bits": bits,
        "raw_bits": raw_bits,
        "channels": channels,
        "canvas": list(bbox),
        "input_mb": input_mb,
        "canvas_mb": canvas_mb,
        "setup_s": time.perf_counter() - t0,
    }
    log.info("stack ready: %s", info)
    bodies = aligned_slice_payloads(stack)
    phases: dict[str, Any] = {}
    tmp = LAYOUT.tmp
    outputs = (tmp, LAYOUT.process)
    row = run_phase(
        "alignedslice",
        bodies,
        cv_threads=cv_threads,
        repeats=repeats,
        fresh=functools.partial(clear_buckets, *outputs),
        env=env,
    )
    phases["alignedslice"] = _rates(row, input_mb, "input")
    variants = [("jpeg", False)] + ([("raw", True)] if write_raw else [])
    for tag, raw in variants:
        meta = volume_payload(bbox, minz, maxz, raw, LAYOUT, stack["raw_bits"], channels)
        volumes = [b for b in (meta["dest"], meta.get("dest_raw")) if b]
        row = run_phase(
            "ngshard",
            meta,
            tmp,
            cv_threads=cv_threads,
            repeats=repeats,
            fresh=functools.partial(clear_buckets, *volumes),
            env=env,
        )
        phases[f"ngshard_{tag}"] = _rates(row, canvas_mb, "canvas")
    for tag, _ in variants:
        parts = [phases["alignedslice"], phases[f"ngshard_{tag}"]]
        row = {k: sum(r[k] for r in parts) for k in ("cpu_s", "wall_s")}
        row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in parts)
        row["base_rss_mib"] = max(r["base_rss_mib"] for r in parts)
        phases[f"end_to_end_{tag}"] = _rates(row, canvas_mb, "canvas")
        phases[f"end_to_end_{tag}_per_input"] = _rates(row, input_mb, "input")
    return {"stack": info, "phases": phases}


def measure_big_slice(
    side: int, cv_threads: int = 1, repeats: int = 1, env: dict[str, str | None] | None = None
) -> dict[str, Any]:
    """Peak RSS and speed of one /alignedslice of a side x side slice (rotated 0.3 deg)."""
    for bucket in (SOURCE, LAYOUT.process, LAYOUT.tmp):
        storage.create_bucket(bucket)
    image = _em_texture(side)
    ok, png = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    name = "big.png"
    storage.write_bytes(storage.bucket_url(SOURCE, name), png.tobytes())
    del image, png
    angle = math.radians(0.3)
    rot = [math.cos(angle), math.sin(angle), -math.sin(angle), math.cos(angle), 0.0, 0.0]
    transforms, bbox = global_transforms({"0": rot}, side, side)
    body = {
        "img": name,
        "transform": transforms[0],
        "bbox": list(bbox),
        "dest": SOURCE,
        "dest-tmp": LAYOUT.tmp,
        "slice": 999_999,
        "run_id": RUN_ID,
    }
    row = run_phase("alignedslice", [body], cv_threads=cv_threads, repeats=repeats, env=env)
    return {"side": side, "canvas": list(bbox), **_rates(row, side * side / MB, "input")}


def measure_full_cube(
    cv_threads: int = 1,
    depth: int = 1024,
    repeats: int = 1,
    channels: int = 1,
    env: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """Peak RSS and speed of /ngshard on one full 1024 x 1024 x ``depth`` cube, JPEG + raw
    (``channels`` 3: an RGB cube, see :func:`colour_slice`)."""
    from emprocess.kernels.tiles import encode_tiled_slice

    cube_run = RunLayout(f"{SOURCE}-cube", RUN_ID)
    src = cube_run.tmp
    storage.create_bucket(src)
    texture = _em_texture(2048, seed=2)
    rng = np.random.default_rng(0)
    for z in range(depth):
        # A drifting 1024^2 crop of the texture: every slice differs, as real ones do.
        x, y = (int(v) for v in rng.integers(0, 1024, 2))
        tile = texture[y : y + 1024, x : x + 1024]
        planes = [tile] if channels == 1 else np.moveaxis(colour_slice(tile), 2, 0)
        for c, plane in enumerate(planes):
            key = f"aligned/{z:06d}.tiles" if channels == 1 else f"aligned/c{c}/{z:06d}.tiles"
            storage.write_bytes(
                storage.bucket_url(src, key),
                encode_tiled_slice(np.ascontiguousarray(plane), codec="raw"),
            )
    meta = volume_payload((1024, 1024), 0, depth - 1, True, cube_run, channels=channels)
    row = run_phase("ngshard", meta, src, cv_threads=cv_threads, repeats=repeats, env=env)
    return {"shape_xyz": [1024, 1024, depth], **_rates(row, depth * 1024 * 1024 / MB, "canvas")}


# -- codecs of the lossless pyramid ------------------------------------------


def measure_volume_codecs(depth: int = 128, side: int = 512) -> dict[str, dict[str, float]]:
    """CPU per voxel and size of tensorstore's precomputed codecs on EM-like data.

    The volume is ``depth`` drifting crops of the real slices mirrored into a 2048 px
    texture (``bench_kernels.em_tile``; synthetic texture without them), written as
    one 64^3-chunked, sharded scale in one transaction, as /ngshard writes, in this
    process (single runs; the machine may be shared).

    Returns:
        {codec: {"write_ns_per_voxel", "read_ns_per_voxel", "ratio" (bytes / voxels),
        "exact"}}.
    """
    import tensorstore as ts

    from emprocess.kernels import ngmeta
    from emprocess_bench.kernels import em_tile

    tile = em_tile()
    big = np.block([[tile, tile[:, ::-1]], [tile[::-1], tile[::-1, ::-1]]])
    rng = np.random.default_rng(0)
    limit = big.shape[0] - side
    vol = np.stack([big[y : y + side, x : x + side] for x, y in rng.integers(0, limit, (depth, 2))])
    codecs: dict[str, tuple[str, ngmeta.DataEncoding, dict[str, int]]] = {
        "raw, gzip shards (before)": ("raw", "gzip", {}),
        "raw, uncompressed shards (now)": ("raw", "raw", {}),
        "png level 1": ("png", "raw", {"png_level": 1}),
        "png default level": ("png", "raw", {}),
        "jpeg (the viewed pyramid)": ("jpeg", "raw", {}),
    }
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-codecs-") as tmp:
        for i, (name, (encoding, data_encoding, extra)) in enumerate(codecs.items()):
            path = f"{tmp}/{i}/"
            sharding = ngmeta.sharding_spec((side, side, depth), 64, side, data_encoding)
            scale = {
                "size": [side, side, depth],
                "encoding": encoding,
                "chunk_size": [64, 64, 64],
                "resolution": [8, 8, 8],
                "sharding": sharding,
                **extra,
            }
            store = ts.open(
                {
                    "driver": "neuroglancer_precomputed",
                    "kvstore": {"driver": "file", "path": path},
                    "multiscale_metadata": {
                        "type": "image",
                        "data_type": "uint8",
                        "num_channels": 1,
                    },
                    "scale_metadata": scale,
                    "create": True,
                }
            ).result()
            cpu0 = _cpu_s()
            txn = ts.Transaction()
            store.with_transaction(txn)[..., 0].write(vol.transpose(2, 1, 0)).result()
            txn.commit_async().result()
            write_s = _cpu_s() - cpu0
            size = sum(
                os.path.getsize(os.path.join(d, f))
                for d, _, files in os.walk(path)
                for f in files
                if f != "info"
            )
            cpu0 = _cpu_s()
            back = (
                ts.open(
                    {
                        "driver": "neuroglancer_precomputed",
                        "kvstore": {"driver": "file", "path": path},
                    }
                )
                .result()
                .read()
                .result()
            )
            read_s = _cpu_s() - cpu0
            out[name] = {
                "write_ns_per_voxel": write_s * 1e9 / vol.size,
                "read_ns_per_voxel": read_s * 1e9 / vol.size,
                "ratio": size / vol.size,
                "exact": bool(np.array_equal(back[..., 0], vol.transpose(2, 1, 0))),
            }
    return out


# -- report ---------------------------------------------------------------------


def print_emwrite_benchmark(result: dict[str, Any]) -> None:
    """Print the figures of :func:`run_emwrite_benchmark` as a table."""
    print(
        f"cv2 threads {result['cv_threads']}, tile codec {result['tile_codec']}, "
        f"MALLOC_ARENA_MAX {result['malloc_arena_max']}, fastest of {result['repeats']} "
        f"run(s), {os.cpu_count()} cores"
    )
    rows = dict(result.get("phases", {}))
    if "stack" in result:
        st = result["stack"]
        print(
            f"stack: {st['slices']} slices of {st['size']}^2, {st.get('bits', 8)}-bit, "
            f"{st.get('channels', 1)} channel(s), raw volume {st.get('raw_bits', 8)}-bit "
            f"({st['input_mb']:.0f} MB input), "
            f"canvas {st['canvas'][0]}x{st['canvas'][1]} ({st['canvas_mb']:.0f} MB)"
        )
    if "big_slice" in result:
        big = result["big_slice"]
        rows[f"alignedslice {big['side']}^2 (canvas {big['canvas'][0]})"] = big
    if "full_cube" in result:
        rows["ngshard 1024^3 jpeg+raw"] = result["full_cube"]
    if "volume_codecs" in result:
        print("precomputed codecs (CPU ns per voxel, bytes per voxel):")
        for name, c in result["volume_codecs"].items():
            print(
                f"  {name:32s} write {c['write_ns_per_voxel']:6.2f}  read "
                f"{c['read_ns_per_voxel']:6.2f}  ratio {c['ratio']:.3f}  lossless {c['exact']}"
            )
    if not rows:
        return
    print(
        f"{'phase':34s} {'basis':>6s} {'MB':>6s} {'CPU s':>7s} {'wall s':>7s} "
        f"{'MB/s/core':>9s} {'MB/s wall':>9s} {'peak RSS MiB':>12s}"
    )
    for name, r in rows.items():
        print(
            f"{name:34s} {r['basis']:>6s} {r['mb']:6.0f} {r['cpu_s']:7.2f} {r['wall_s']:7.2f} "
            f"{r['mb_per_cpu_s']:9.1f} {r['mb_per_wall_s']:9.1f} {r['peak_rss_mib']:12.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=64, help="0: no stack")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--no-raw", action="store_true", help="skip the raw-pyramid phase")
    parser.add_argument("--cv-threads", type=int, default=1, help="cv2.setNumThreads per phase")
    parser.add_argument("--repeats", type=int, default=1, help="fresh runs per phase")
    parser.add_argument("--tile-codec", choices=["raw", "png"], help="tiles of the tmp bucket")
    parser.add_argument(
        "--glibc-arenas",
        action="store_true",
        help="leave MALLOC_ARENA_MAX unset (the container sets 2)",
    )
    parser.add_argument("--slice-px", type=int, default=0, help="also one slice of this side")
    parser.add_argument("--cube", action="store_true", help="also one full 1024^3 cube")
    parser.add_argument("--codecs", action="store_true", help="also the precomputed codecs")
    parser.add_argument("--bits", type=int, choices=[8, 16], default=8, help="input slices")
    parser.add_argument("--raw-bits", type=int, choices=[8, 16], default=8, help="raw volume")
    parser.add_argument("--channels", type=int, choices=[1, 3], default=1, help="RGB slices")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = run_emwrite_benchmark(
        args.slices,
        args.size,
        not args.no_raw,
        cv_threads=args.cv_threads,
        repeats=args.repeats,
        tile_codec=args.tile_codec,
        malloc_arena_max=None if args.glibc_arenas else CONTAINER_MALLOC_ARENA_MAX,
        slice_px=args.slice_px,
        cube=args.cube,
        codecs=args.codecs,
        bits=args.bits,
        raw_bits=args.raw_bits,
        channels=args.channels,
    )
    print_emwrite_benchmark(result)
    if args.json:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
