"""``emprocess bench corrections``: destreaking and intensity normalisation on real FIB-SEM with known faults.

Takes the registered slices of a folder (``img.%05d.png``, 8-bit) as the clean stack,
injects known faults and runs the corrections' kernels exactly as /alignedslice runs
them (``correct_slice`` then ``render_slice``: window, warp, CLAHE, tiles):

* flicker: slice z's grey values become ``g_z * v + o_z`` (``g_z`` uniform in
  1 +- gain, ``o_z`` uniform in +-offset grey levels, clipped);
* curtaining: vertical stripes, a column profile of band-limited noise (periods 4 to
  64 px, flat spectrum in that band, a new profile per slice) of standard deviation
  ``stripe`` grey levels, added to every row.

It prints, per fault and correction, the per-slice mean and spread (standard deviation)
error against the clean stack's output through the same path, for the lossless 8-bit
voxels (``clip 0``: no CLAHE; ``clip 0.02``: the default CLAHE; the lossless volume
holds the JPEG volume's voxels) and their JPEG (quality 75, the volume's), the stripe
power left (power of the residual against the clean slice on the stripe line, in the
stripe band) and the correlation with the clean slice, and the CPU seconds per slice
of each correction. ``--bits 16`` runs the same on the slices scaled to 16 bits
(x 257, faults scaled alike), errors given in 8-bit grey levels.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from emprocess.kernels import tiles
from emprocess.kernels.correct import SliceCorrection, correct_slice
from emprocess.kernels.normalise import measure_slice, plan_gain_offset
from emprocess.kernels.render import render_slice

IDENTITY = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
STRIPE_BAND_PX = (4.0, 64.0)
JPEG_QUALITY = 75


@dataclass(frozen=True)
class Faults:
    gain: float = 0.1
    offset: float = 10.0
    stripe: float = 12.0
    seed: int = 0


def load_stack(folder: Path, n: int) -> list[np.ndarray]:
    files = sorted(folder.glob("img.*.png"))[:n]
    if len(files) < 2:
        raise ValueError(f"{folder} holds fewer than 2 slices named img.NNNNN.png")
    stack = [cv2.imread(str(f), cv2.IMREAD_UNCHANGED) for f in files]
    if any(im is None or im.dtype != np.uint8 or im.ndim != 2 for im in stack):
        raise ValueError(f"{folder}: the slices must be 8-bit grey images")
    return [np.asarray(im) for im in stack]


def stripe_profile(width: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """A column profile of flat-spectrum noise in STRIPE_BAND_PX periods, of std ``std``."""
    f = np.fft.rfftfreq(width)
    band = (f >= 1.0 / STRIPE_BAND_PX[1]) & (f <= 1.0 / STRIPE_BAND_PX[0])
    spectrum = np.zeros(f.size, complex)
    spectrum[band] = rng.normal(size=band.sum()) + 1j * rng.normal(size=band.sum())
    profile = np.fft.irfft(spectrum, width)
    return profile / profile.std() * std


def stripe_power(residual: np.ndarray) -> float:
    """Mean power, in the stripe band, of the column means of ``residual`` (vertical stripes)."""
    spectrum = np.fft.rfft(residual.astype(np.float64).mean(axis=0))
    f = np.fft.rfftfreq(residual.shape[1])
    band = (f >= 1.0 / STRIPE_BAND_PX[1]) & (f <= 1.0 / STRIPE_BAND_PX[0])
    return float(np.mean(np.abs(spectrum[band]) ** 2))


def _clip(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    top = 255 if dtype == np.uint8 else 65535
    return np.clip(np.rint(values), 0, top).astype(dtype)


def inject(
    clean: Sequence[np.ndarray], faults: Faults, flicker: bool, stripes: bool, scale: float
) -> list[np.ndarray]:
    rng = np.random.default_rng(faults.seed)
    out = []
    for image in clean:
        g = 1.0 + rng.uniform(-faults.gain, faults.gain)
        o = rng.uniform(-faults.offset, faults.offset) * scale
        v = image.astype(np.float64)
        if flicker:
            v = g * v + o
        if stripes:
            v = v + stripe_profile(image.shape[1], faults.stripe * scale, rng)[None, :]
        out.append(_clip(v, image.dtype))
    return out


def volume_voxels(image: np.ndarray, clip_limit: float) -> np.ndarray:
    """The 8-bit voxels /alignedslice writes for ``image`` (identity transform)."""
    h, w = image.shape
    window = None if image.dtype == np.uint8 else (0.0, 65535.0)
    rendered = render_slice(image, IDENTITY, (w, h), clip_limit, window)
    return tiles.decode_tiled_slice(rendered.tiles_object)


def jpeg(image: np.ndarray) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    return np.asarray(cv2.imdecode(data, cv2.IMREAD_GRAYSCALE))


def _corrections(
    stack: Sequence[np.ndarray], normalise: bool, destreak: bool
) -> tuple[list[SliceCorrection], float, float]:
    """Each slice's correction as the run decides it, and the CPU s per slice of measuring."""
    t0 = time.process_time()
    table: dict[int, tuple[float, float]] = {}
    if normalise:
        h, w = stack[0].shape
        stats = {z: measure_slice(im, IDENTITY, (0, 0, w, h)) for z, im in enumerate(stack)}
        table = plan_gain_offset(stats)
    measure_s = (time.process_time() - t0) / len(stack)
    deg = 0.0 if destreak else None
    out = [SliceCorrection(deg, *table.get(z, (1.0, 0.0))) for z in range(len(stack))]
    return out, measure_s, 0.0


def _stats(vox: Sequence[np.ndarray]) -> np.ndarray:
    return np.array([[v.mean(), v.std()] for v in vox])


def run_corrections_benchmark(
    folder: Path, slices: int = 100, faults: Faults | None = None, bits: int = 8
) -> list[dict[str, Any]]:
    """One row per (fault, correction): errors vs the clean stack and CPU per slice."""
    faults = faults or Faults()
    clean = load_stack(folder, slices)
    scale = 1.0
    if bits == 16:
        clean = [(im.astype(np.uint32) * 257).astype(np.uint16) for im in clean]
        scale = 257.0
    reference: dict[float, np.ndarray] = {}
    ref_vox: dict[float, list[np.ndarray]] = {}
    for clip in (0.0, 0.02):
        ref_vox[clip] = [volume_voxels(im, clip) for im in clean]
        reference[clip] = _stats(ref_vox[clip])
    ref_jpeg = {clip: _stats([jpeg(v) for v in ref_vox[clip]]) for clip in ref_vox}
    cases = [
        ("flicker", True, False, False, False),
        ("flicker", True, False, True, False),
        ("stripes", False, True, False, False),
        ("stripes", False, True, False, True),
        ("flicker+stripes", True, True, True, True),
        ("clean", False, False, True, True),
    ]
    rows = []
    for name, flicker, stripes, normalise, destreak in cases:
        faulty = inject(clean, faults, flicker, stripes, scale)
        corrections, measure_s, _ = _corrections(faulty, normalise, destreak)
        t0 = time.process_time()
        corrected = [correct_slice(im, c) for im, c in zip(faulty, corrections, strict=True)]
        correct_s = (time.process_time() - t0) / len(faulty)
        row: dict[str, Any] = {
            "fault": name,
            "correction": "+".join(
                [k for k, on in (("slice", normalise), ("destreak", destreak)) if on]
            )
            or "none",
            "measure_s": measure_s,
            "correct_s": correct_s,
        }
        for clip in (0.0, 0.02):
            vox = [volume_voxels(im, clip) for im in corrected]
            err = np.abs(_stats(vox) - reference[clip])
            row[f"mean_err_{clip:g}"] = (float(np.median(err[:, 0])), float(err[:, 0].max()))
            row[f"std_err_{clip:g}"] = (float(np.median(err[:, 1])), float(err[:, 1].max()))
            jerr = np.abs(_stats([jpeg(v) for v in vox]) - ref_jpeg[clip])
            row[f"jpeg_mean_err_{clip:g}"] = (float(np.median(jerr[:, 0])), float(jerr[:, 0].max()))
            row[f"jpeg_std_err_{clip:g}"] = (float(np.median(jerr[:, 1])), float(jerr[:, 1].max()))
        injected = [
            stripe_power(f.astype(np.float64) - c) for f, c in zip(faulty, clean, strict=True)
        ]
        left = [
            stripe_power(o.astype(np.float64) - c) for o, c in zip(corrected, clean, strict=True)
        ]
        if stripes:
            ratio = np.array(injected) / np.maximum(np.array(left), 1e-12)
            row["stripe_reduction"] = (float(np.median(ratio)), float(ratio.min()))
        corr = [
            float(np.corrcoef(o.ravel(), c.ravel())[0, 1])
            for o, c in zip(corrected, clean, strict=True)
        ]
        row["corr_clean"] = (float(np.median(corr)), float(min(corr)))
        rows.append(row)
    return rows


def print_corrections_benchmark(rows: Sequence[dict[str, Any]], slices: int, bits: int) -> None:
    print(
        f"corrections on {slices} real slices, {bits}-bit; per-slice errors of the volume's "
        "mean and spread (std) in 8-bit grey levels vs the clean stack through the same "
        "path, as median / max over slices; lossless = the 8-bit voxels, JPEG = quality 75"
    )
    cols = [
        ("lossless mean", "mean_err_0"),
        ("lossless std", "std_err_0"),
        ("JPEG mean", "jpeg_mean_err_0"),
        ("JPEG std", "jpeg_std_err_0"),
        ("CLAHE mean", "mean_err_0.02"),
        ("CLAHE std", "std_err_0.02"),
        ("CLAHE JPEG mean", "jpeg_mean_err_0.02"),
    ]
    print(
        f"{'fault':16} {'correction':15} "
        + " ".join(f"{name:>15}" for name, _ in cols)
        + f" {'stripe power /':>15} {'corr w/ clean':>15} {'CPU s/slice':>11}"
    )

    def pair(v: tuple[float, float] | None, fmt: str = ".2f") -> str:
        return "-" if v is None else f"{v[0]:{fmt}} / {v[1]:{fmt}}"

    for r in rows:
        cpu = r["measure_s"] + r["correct_s"]
        print(
            f"{r['fault']:16} {r['correction']:15} "
            + " ".join(f"{pair(r[key]):>15}" for _, key in cols)
            + f" {pair(r.get('stripe_reduction'), '.1f'):>15}"
            f" {pair(r['corr_clean'], '.4f'):>15} {cpu:>11.4f}"
        )
    print(
        "CLAHE columns: the default clip-limit 0.02, which equalises each slice's histogram "
        "and so already hides a global flicker; the lossless and JPEG columns are clip 0."
    )


def destreak_cost(folder: Path, side_px: int, bits: int = 8) -> dict[str, float]:
    """CPU seconds and peak traced memory of destreaking one ``side_px`` square slice
    tiled from the folder's first slice (a real slice size without a real slice that big)."""
    import tracemalloc

    tile = load_stack(folder, 2)[0]
    reps = -(-side_px // tile.shape[0]), -(-side_px // tile.shape[1])
    image = np.tile(tile, reps)[:side_px, :side_px]
    if bits == 16:
        image = (image.astype(np.uint16) * 257).astype(np.uint16)
    image = np.ascontiguousarray(image)
    tracemalloc.start()
    t0 = time.process_time()
    out = correct_slice(image, SliceCorrection(destreak_deg=0.0))
    cpu = time.process_time() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del out
    megapixels = side_px * side_px / 1e6
    return {
        "side_px": side_px,
        "cpu_s": cpu,
        "cpu_s_per_mpx": cpu / megapixels,
        "peak_mib": peak / 2**20,
        "slice_mib": image.nbytes / 2**20,
        "beyond_mib": (peak - image.nbytes) / 2**20,  # the output is the slice's size
    }


def print_destreak_cost(row: dict[str, float]) -> None:
    print(
        f"destreak of one {row['side_px']:.0f} x {row['side_px']:.0f} slice: CPU "
        f"{row['cpu_s']:.3f} s ({row['cpu_s_per_mpx']:.3f} s per megapixel), peak memory "
        f"traced {row['peak_mib']:.0f} MiB: its output ({row['slice_mib']:.0f} MiB, as the "
        f"slice, which is not traced) and {row['beyond_mib']:.0f} MiB besides"
    )
