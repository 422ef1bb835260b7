"""Peak memory of the emwrite service per request: ``emprocess bench memory``.

The emwrite service runs under gunicorn with one worker, as its container runs it
(``emprocess serve emwrite``, ``MALLOC_ARENA_MAX=2``), on a temporary local storage
root. For each slice case (side x bit depth) a non-periodic EM-like slice is made
(:func:`em_slice`: blurred noise of two scales for cell interiors, dark membranes where
a third field crosses zero, detector noise; 16-bit slices carry noise in their low
bits, as real ones do) and written as a PNG into the run's source bucket, then one
/alignedslice is sent (16-bit slices with the intensity window that maps them back to
8 bits). With ``cube_channels`` one /ngmeta and one /ngshard of a full cube of that many
channels (each with its own JPEG volume, ``jpeg_channels: each``, and the lossless
volume) follow, its tiles written straight into the tmp bucket.

Each row is one request: its status, wall time, and the worker's peak resident memory
(``VmHWM`` of /proc/PID/status, reset through /proc/PID/clear_refs before the request,
so each request's peak is its own). ``decode MiB`` is the peak of reading the file and
decoding it alone (``emprocess.images.decode_image``) in a fresh process, above that
process's baseline: the part of the request's peak that is the decoder's.

Big slices need several GiB: run them under ``flock /work/bigmem.lock`` on a shared
machine. ``--code DIR`` serves another checkout's ``emprocess`` (e.g. a worktree of
main) to measure before and after with the same command.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil
import requests

from emprocess import storage
from emprocess.layout import RunLayout, channel_prefix, tiles_key
from emprocess.localrun import free_port, stop_process, wait_http

log = logging.getLogger(__name__)

SOURCE = "bench-mem-src"
RUN_ID = "mem"
LAYOUT = RunLayout(SOURCE, RUN_ID)
MIB = 1 << 20
BITS16_GAIN, BITS16_OFFSET = 200.0, 2000.0
"""A 16-bit slice is the 8-bit texture (before rounding) as v * 200 + 2000 plus noise of
a few grey levels; the window [2000, 2000 + 255 * 200] maps it back to 8 bits."""
BAND_PX = 512
COARSE = (16, 4)  # the two texture fields are drawn at 1/16 and 1/4 of the resolution


def bits16_window() -> list[float]:
    """The intensity window sent with 16-bit slices."""
    return [BITS16_OFFSET, BITS16_OFFSET + 255 * BITS16_GAIN]


def em_slice(side: int, bits: int = 8, seed: int = 0) -> np.ndarray:
    """A side x side EM-like slice, uint8 or uint16, made in bands of ``BAND_PX`` rows.

    The fields are drawn at low resolution over the whole slice and enlarged band by
    band (bilinear, with two coarse rows of context), so the slice has no seams, no
    period and needs at most a band of float32 temporaries beyond the result.
    """
    rng = np.random.default_rng(seed)
    fields = []
    for f in COARSE + COARSE[:1]:
        n = -(-side // f) + 4
        field = cv2.GaussianBlur(rng.standard_normal((n, n), np.float32), (0, 0), 1.5)
        fields.append((f, field / field.std()))
    out = np.empty((side, side), np.uint16 if bits == 16 else np.uint8)
    for y0 in range(0, side, BAND_PX):
        y1 = min(side, y0 + BAND_PX)
        big = [_enlarge(field, f, y0, y1, side) for f, field in fields]
        value = 128.0 + 28.0 * big[0] + 14.0 * big[1]
        value -= 60.0 * np.exp(-((big[2] / 0.08) ** 2))  # membranes where the field is ~0
        value += rng.normal(0.0, 8.0, value.shape).astype(np.float32)
        if bits == 16:
            value = value * BITS16_GAIN + BITS16_OFFSET
            value += rng.normal(0.0, 6.0, value.shape).astype(np.float32)
            np.clip(value, 0, 65535, out=value)
        else:
            np.clip(value, 0, 255, out=value)
        out[y0:y1] = np.rint(value)
    return out


def _enlarge(field: np.ndarray, f: int, y0: int, y1: int, side: int) -> np.ndarray:
    """Rows [y0, y1) of ``field`` enlarged f times (bilinear), columns [0, side)."""
    r0 = max(0, y0 // f - 2)
    r1 = min(field.shape[0], -(-y1 // f) + 2)
    part = cv2.resize(
        field[r0:r1], (field.shape[1] * f, (r1 - r0) * f), interpolation=cv2.INTER_LINEAR
    )
    return part[y0 - r0 * f : y1 - r0 * f, :side]


def write_png(path: Path, image: np.ndarray) -> int:
    """Write ``image`` as a PNG (OpenCV's default, fast level); returns the file's bytes."""
    if not cv2.imwrite(str(path), image, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise RuntimeError(f"could not write {path}")
    return path.stat().st_size


# -- the service ---------------------------------------------------------------


@contextmanager
def emwrite_worker(
    root: Path, log_file: Path, code: Path | None = None
) -> Iterator[tuple[str, int]]:
    """The emwrite service under gunicorn, one worker; yields (URL, worker PID)."""
    port = free_port()
    env = {**os.environ, storage.ROOT_ENV: str(root), "MALLOC_ARENA_MAX": "2"}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    argv = [sys.executable, "-m", "emprocess.cli", "serve", "emwrite", "--port", str(port)]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            [*argv, "--workers", "1"],
            env=env,
            cwd=str(code) if code else None,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc=proc)
        (worker,) = [c for c in psutil.Process(proc.pid).children(recursive=True)]
        yield url, worker.pid
    finally:
        stop_process(proc)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def send(url: str, pid: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST one request; its status, wall and worker CPU seconds (every thread), and the
    worker's peak RSS during it."""
    worker = psutil.Process(pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status_kib(pid, "VmRSS")
    cpu0 = sum(worker.cpu_times()[:2])
    t0 = time.perf_counter()
    r = requests.post(url + path, json=body, timeout=3600)
    wall = time.perf_counter() - t0
    cpu = sum(worker.cpu_times()[:2]) - cpu0
    peak = _status_kib(pid, "VmHWM")
    if r.status_code != 200:
        log.warning("%s answered %d: %s", path, r.status_code, r.text[:300])
    return {
        "status": r.status_code,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_mib": peak / 1024,
        "base_mib": base / 1024,
    }


_DECODE_PEAK = """
import sys
from pathlib import Path
def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
import cv2, numpy
from emprocess.images import decode_image
base = hwm()
data = Path(sys.argv[1]).read_bytes()
image = decode_image(data, sys.argv[1])
print((hwm() - base) / 1024)
"""


def decode_peak_mib(path: Path, code: Path | None = None) -> float:
    """Peak MiB of reading and decoding ``path`` in a fresh process, above its baseline."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    out = subprocess.run(
        [sys.executable, "-c", _DECODE_PEAK, str(path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())


# -- the cases -----------------------------------------------------------------


def parse_case(text: str) -> tuple[int, int]:
    """``SIDE:BITS`` (e.g. ``20000:16``) as (side, bits)."""
    try:
        side_s, bits_s = text.split(":")
        side, bits = int(side_s), int(bits_s)
    except ValueError:
        raise ValueError(f"a slice case is SIDE:BITS, e.g. 20000:16, got {text!r}") from None
    if bits not in (8, 16) or not 64 <= side <= 65536:
        raise ValueError(f"slice case {text!r}: bits must be 8 or 16, side 64..65536")
    return side, bits


def _slice_row(
    url: str,
    pid: int,
    root: Path,
    side: int,
    bits: int,
    z: int,
    code: Path | None,
    data_dir: Path | None,
    corrections: bool = False,
) -> dict[str, Any]:
    name = f"mem.{side}.{bits}.{z}.png"
    path = root / SOURCE / name
    kept = None if data_dir is None else data_dir / name
    if kept is not None and kept.exists():
        os.link(kept, path)
    else:
        t0 = time.perf_counter()
        write_png(path, em_slice(side, bits, seed=z))
        log.info("%s made in %.1f s", name, time.perf_counter() - t0)
        if kept is not None and not kept.exists():
            os.link(path, kept)
    file_bytes = path.stat().st_size
    body: dict[str, Any] = {
        "img": name,
        "transform": _rotation(side, 0.3),
        "bbox": [canvas_side(side)] * 2,
        "dest": SOURCE,
        "dest-tmp": LAYOUT.tmp,
        "slice": z,
        "run_id": RUN_ID,
        **({"intensity_window": bits16_window()} if bits == 16 else {}),
        **({"destreak": 0.0, "intensity_gain_offset": [1.05, -3.0]} if corrections else {}),
    }
    row = send(url, pid, "/alignedslice", body)
    decode = decode_peak_mib(path, code)
    path.unlink()
    for written in (root / LAYOUT.tmp).glob("aligned/*"):  # none if it was refused
        written.unlink()
    case = f"{side}^2 {bits}-bit" + (" window" if bits == 16 else "")
    case += " corrected" if corrections else ""
    return {"endpoint": "/alignedslice", "case": case, "file_mb": file_bytes / 1e6,
            "decode_mib": decode, **row}  # fmt: skip


MAX_CANVAS_SIDE = 32768
"""The service's default canvas limit is 32768^2 pixels: a larger slice's canvas is cut
to it (the corners the rotation moves out are left out, as a crop of the canvas)."""


def canvas_side(side: int) -> int:
    """Side of the canvas of a slice rotated by 0.3 degrees about its centre (and a bit)."""
    return min(MAX_CANVAS_SIDE, side + 2 * (int(side * 0.003) + 16))


def _rotation(side: int, degrees: float) -> list[float]:
    """The 6 numbers (mpicbg order) rotating a slice about its centre to the canvas centre."""
    a = np.radians(degrees)
    c, s = float(np.cos(a)), float(np.sin(a))
    centre, shift = side / 2.0, canvas_side(side) / 2.0
    # x' = c x - s y + tx, y' = s x + c y + ty, the centre going to the canvas centre.
    return [c, s, -s, c, shift - (c * centre - s * centre), shift - (s * centre + c * centre)]


def _cube_rows(url: str, pid: int, root: Path, channels: int, depth: int) -> list[dict[str, Any]]:
    """/ngmeta and /ngshard of one 1024^2 x depth cube of ``channels`` channels."""
    from emprocess.kernels.tiles import encode_tiled_slice

    texture = em_slice(2048, 8, seed=99)
    rng = np.random.default_rng(0)
    for z in range(depth):
        x, y = (int(v) for v in rng.integers(0, 1024, 2))
        tile = texture[y : y + 1024, x : x + 1024]
        for c in range(channels):
            plane = np.ascontiguousarray(tile if c % 2 == 0 else 255 - tile) // (1 + c // 2)
            key = (channel_prefix(c) if channels > 1 else "aligned/") + tiles_key(z)
            storage.write_bytes(
                storage.bucket_url(LAYOUT.tmp, key), encode_tiled_slice(plane, codec="raw")
            )
    meta: dict[str, Any] = {
        "dest": LAYOUT.ng,
        "dest_raw": LAYOUT.chunk,
        "minz": 0,
        "maxz": depth - 1,
        "bbox": [1024, 1024],
        "writeRaw": True,
        "resolution": 8,
        **({"channels": channels, "jpeg_channels": "each"} if channels > 1 else {}),
    }
    case = f"cube 1024^2x{depth} c{channels} " + ("each+raw" if channels > 1 else "raw")
    rows = []
    for path, body in (
        ("/ngmeta", meta),
        ("/ngshard", {**meta, "source": LAYOUT.tmp, "start": [0, 0, 0]}),
    ):
        rows.append({"endpoint": path, "case": case, **send(url, pid, path, body)})
    return rows


def run_memory_benchmark(
    cases: list[tuple[int, int]],
    cube_channels: int = 0,
    cube_depth: int = 1024,
    code: Path | None = None,
    data_dir: Path | None = None,
    corrections: bool = False,
) -> list[dict[str, Any]]:
    """Send each slice case (and the cube) to a fresh emwrite worker; one row per request.

    ``corrections``: each /alignedslice also destreaks (vertical) and applies a gain and
    offset, as a run with ``destreak`` and ``intensity_correction: slice`` sends it.

    ``data_dir`` keeps the slices made (on the storage root's file system) for the next
    run: slice i of the cases is ``mem.SIDE.BITS.i.png``, the same for the same cases.
    """
    rows: list[dict[str, Any]] = []
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=data_dir) as tmp:
        root = Path(tmp) / "storage"
        root.mkdir()
        with storage.use(storage.settings().model_copy(update={"storage_root": root})):
            for bucket in (SOURCE, *LAYOUT.bucket_names().values()):
                storage.create_bucket(bucket)
            with emwrite_worker(root, Path(tmp) / "emwrite.log", code) as (url, pid):
                for z, (side, bits) in enumerate(cases):
                    rows.append(
                        _slice_row(url, pid, root, side, bits, z, code, data_dir, corrections)
                    )
                    print_row(rows[-1])
                if cube_channels:
                    for row in _cube_rows(url, pid, root, cube_channels, cube_depth):
                        rows.append(row)
                        print_row(row)
    return rows


HEADER = (
    f"{'endpoint':<14} {'case':<32} {'status':>6} {'wall s':>7} {'cpu s':>7} "
    + (f"{'peak MiB':>9} ")
    + (f"{'base MiB':>9} {'file MB':>8} {'decode MiB':>10}")
)


def print_row(row: dict[str, Any]) -> None:
    """One request's line of the table (the header before the first)."""
    if not getattr(print_row, "started", False):
        print(HEADER)
        print_row.started = True  # type: ignore[attr-defined]
    extra = f" {row['file_mb']:>8.0f} {row['decode_mib']:>10.0f}" if "file_mb" in row else ""
    print(
        f"{row['endpoint']:<14} {row['case']:<32} {row['status']:>6} {row['wall_s']:>7.1f} "
        f"{row['cpu_s']:>7.1f} {row['peak_mib']:>9.0f} {row['base_mib']:>9.0f}{extra}",
        flush=True,
    )
