"""Micro-benchmarks of the emwrite kernels: ``python -m emprocess_bench.kernels [--slice PX]``.

Single-threaded OpenCV unless ``--threads`` says otherwise, so numbers are per core.
``--slice 16384`` also runs the /alignedslice path (warp, CLAHE, tile encoding) on a
synthetic slice window by window and reports the peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from emprocess import affine
from emprocess.kernels.clahe import clahe_source_region, clahe_window, plan_windows
from emprocess.kernels.downsample import downsample_mean_2x
from emprocess.kernels.tiles import (
    build_header,
    decode_tile,
    encode_tile,
    parse_header,
)
from emprocess.kernels.warp import warp_window

REAL_SLICES = Path(__file__).resolve().parents[2] / "shared" / "data"
TRANSFORM = affine.compose(affine.translation(40.5, 20.25), [0.995, 0.03, -0.03, 0.995, 0, 0])


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Fastest of ``repeat`` runs, in seconds (the machine is shared)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def em_tile() -> np.ndarray:
    """A 1024 x 1024 EM tile built from the two real slices without exact repeats."""
    a_path, b_path = REAL_SLICES / "iso.03493.png", REAL_SLICES / "iso.03494.png"
    if a_path.is_file() and b_path.is_file():
        a = np.asarray(cv2.imread(str(a_path), cv2.IMREAD_UNCHANGED))
        b = np.asarray(cv2.imread(str(b_path), cv2.IMREAD_UNCHANGED))
        # Mirrored copies: deflate cannot match reversed rows, so no fake redundancy.
        return np.block([[a, b[:, ::-1]], [b[::-1, :], a[::-1, ::-1]]])[:1024, :1024].copy()
    print("real slices not found; using synthetic texture")
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 255, (30, 30)).astype(np.float32)
    img = cv2.resize(coarse, (1024, 1024), interpolation=cv2.INTER_CUBIC) * 0.4 + rng.normal(
        90, 14, (1024, 1024)
    )
    return np.clip(img, 0, 255).astype(np.uint8)


def _png_encoder(params: list[int]) -> Callable[[np.ndarray], bytes]:
    def encode(x: np.ndarray) -> bytes:
        return bytes(cv2.imencode(".png", x, params)[1])

    return encode


def _png_decode(b: bytes) -> np.ndarray:
    out = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED)
    assert out is not None
    return np.asarray(out)


def _raw_decode(b: bytes) -> np.ndarray:
    return np.frombuffer(b, np.uint8)


def _zlib_decode(b: bytes) -> np.ndarray:
    return np.frombuffer(zlib.decompress(b), np.uint8)


def bench_codecs() -> None:
    tile = em_tile()
    mb = tile.nbytes / 1e6
    codecs: dict[str, tuple[Callable[[np.ndarray], bytes], Callable[[bytes], np.ndarray]]] = {
        "raw": (lambda x: x.tobytes(), _raw_decode),
        "zlib level 1": (lambda x: zlib.compress(x.tobytes(), 1), _zlib_decode),
        "png level 0": (_png_encoder([cv2.IMWRITE_PNG_COMPRESSION, 0]), _png_decode),
        "png level 1": (_png_encoder([cv2.IMWRITE_PNG_COMPRESSION, 1]), _png_decode),
        "png level 6 (old)": (_png_encoder([cv2.IMWRITE_PNG_COMPRESSION, 6]), _png_decode),
        "png 1 up+rle (new)": (encode_tile, _png_decode),
    }
    print("tile codecs on a 1024x1024 EM tile (MB/s of pixels, one core):")
    for name, (enc, dec) in codecs.items():
        buf = enc(tile)
        assert np.array_equal(dec(buf).reshape(tile.shape), tile)
        te = best_of(lambda: [enc(tile) for _ in range(5)]) / 5  # noqa: B023
        td = best_of(lambda: [dec(buf) for _ in range(5)]) / 5  # noqa: B023
        print(
            f"  {name:20s} ratio {len(buf) / tile.nbytes:5.3f}"
            f"  encode {mb / te:7.1f}  decode {mb / td:7.1f}"
        )
    payload = encode_tile(tile)
    index = parse_header(build_header(1024, 1024, 1024, np.uint8, "png", [payload]))
    td = best_of(lambda: decode_tile(index, 0, 0, payload))
    print(f"  decode_tile (png + CRC check)        decode {mb / td:7.1f}")


def bench_warp_clahe(side: int) -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (side, side), dtype=np.uint8)
    mpix = side * side / 1e6
    t = best_of(lambda: warp_window(img, TRANSFORM, (0, 0, side, side)), 2)
    t_cv = best_of(
        lambda: cv2.warpAffine(
            img, affine.to_matrix(TRANSFORM), (side, side), flags=cv2.INTER_CUBIC
        ),
        2,
    )
    print(
        f"warp_window {side}^2 bicubic: {mpix / t:6.1f} Mpx/s (cv2.warpAffine {mpix / t_cv:6.1f})"
    )
    hw = (side, side)
    win = (0, 0, side, side)
    t = best_of(lambda: clahe_window(img, (0, 0), hw, win, 0.02, 1024), 2)
    print(f"clahe_window {side}^2 kernel 1024: {mpix / t:6.1f} Mpx/s")


def bench_downsample() -> None:
    for dtype in (np.uint8, np.uint16):
        vol = np.random.default_rng(2).integers(0, 200, (256, 256, 256)).astype(dtype)
        t = best_of(lambda: downsample_mean_2x(vol), 5)  # noqa: B023
        print(f"downsample_mean_2x 256^3 {np.dtype(dtype).name}: {vol.nbytes / t / 1e9:5.2f} GB/s")
    slab = np.random.default_rng(3).integers(0, 256, (64, 1024, 1024), dtype=np.uint8)
    t = best_of(lambda: downsample_mean_2x(slab), 3)
    print(f"downsample_mean_2x 64x1024x1024 uint8: {slab.nbytes / t / 1e9:5.2f} GB/s")


def bench_slice(side: int, window_px: int, threads: int) -> None:
    """The /alignedslice path on one synthetic side x side slice, window by window."""
    rng = np.random.default_rng(4)
    img = np.empty((side, side), np.uint8)
    for r in range(0, side, 1024):  # filled in strips: no float64 copy of the whole slice
        img[r : r + 1024] = rng.integers(60, 200, (min(1024, side - r), side), dtype=np.uint8)
    canvas_hw = (side + 64, side + 64)
    t0 = time.perf_counter()
    payloads: dict[tuple[int, int], bytes] = {}
    for win in plan_windows(canvas_hw[1], canvas_hw[0], window_px):
        src = clahe_source_region(win, canvas_hw, 1024)
        region = warp_window(img, TRANSFORM, src)
        out = clahe_window(region, src[:2], canvas_hw, win, 0.02, 1024)
        del region
        x0, y0, w, h = win
        for ty in range(0, h, 1024):
            for tx in range(0, w, 1024):
                tile = out[ty : ty + 1024, tx : tx + 1024]
                payloads[((y0 + ty) // 1024, (x0 + tx) // 1024)] = encode_tile(tile)
        del out
    ordered = [payloads[k] for k in sorted(payloads)]
    header = build_header(canvas_hw[1], canvas_hw[0], 1024, np.uint8, "png", ordered)
    total = len(header) + sum(len(p) for p in ordered)
    dt = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"alignedslice path {side}^2, windows {window_px}, {threads} OpenCV threads: "
        f"{dt:.1f} s, {total / 1e6:.0f} MB of tiles, peak RSS {peak_mib:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slice", type=int, default=0, help="also run the slice path at this size")
    parser.add_argument("--window", type=int, default=12288, help="window size for --slice")
    parser.add_argument("--threads", type=int, default=1, help="cv2.setNumThreads")
    parser.add_argument("--side", type=int, default=4096, help="image side for warp and CLAHE")
    args = parser.parse_args()
    cv2.setNumThreads(args.threads)
    if args.slice:
        # First, so that the peak RSS is this path's and not the other benchmarks'.
        bench_slice(args.slice, args.window, args.threads)
        return
    bench_codecs()
    bench_warp_clahe(args.side)
    bench_downsample()


if __name__ == "__main__":
    main()
