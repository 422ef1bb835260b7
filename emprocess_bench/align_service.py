"""Peak memory and time of one alignment request on big slices, through the real service.

``emprocess bench align-service --size 20000 --bits 16`` builds a pair of non-periodic
EM-like slices (:func:`emprocess_bench.align.synthetic_texture`, cut with a known affine,
independent noise; 16-bit as ``v * 16 + 300`` plus 4 bits of noise) as PNG files in a
temporary local storage root, starts the alignment service under gunicorn (one worker,
its default settings unless ``--max-pixels``), posts the pair at ``--downsample`` and
prints the answer's status, wall seconds, the worker's peak RSS (VmHWM, reset before the
request through /proc/PID/clear_refs) and the recovered affine's mean corner error in
full-resolution pixels. Building a 20,000^2 pair takes ~4 GiB in this process: run it
under ``flock /work/bigmem.lock`` on a shared machine. Nothing is written to the repository.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import requests

from emprocess import affine, storage
from emprocess.localrun import local_services
from emprocess.settings import StorageEnv
from emprocess_bench.align import BENCH_TRUTH, make_pair, synthetic_texture

SOURCE = "bench-align-src"
MARGIN = 128


def write_pair(size: int, bits: int, seed: int = 0) -> None:
    """Write img.00000.png (pre) and img.00001.png (post) of ``size``^2 into SOURCE."""
    base = synthetic_texture(size + 2 * MARGIN, size + 2 * MARGIN, seed=seed)
    pre, post = make_pair(base, BENCH_TRUTH, size, size, MARGIN)
    del base
    rng = np.random.default_rng(seed + 1)
    storage.create_bucket(SOURCE)
    for z, image in enumerate((pre, post)):
        if bits == 16:
            wide = image.astype(np.uint16)
            wide *= 16
            wide += rng.integers(300, 316, size=image.shape, dtype=np.uint16)
            image = wide
        ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        assert ok
        storage.write_bytes(f"gs://{SOURCE}/img.{z:05d}.png", encoded.tobytes())
        del encoded, image


def _worker_pid(master: int) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == master:
                return int(entry)
    raise RuntimeError(f"gunicorn master {master} has no worker")


def _status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def run_align_service_benchmark(
    size: int, bits: int, downsample: int = 4, max_pixels: int | None = None
) -> dict[str, Any]:
    """One request of a ``size``^2 pair of ``bits``-bit PNGs; see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="bench-align-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        settings = StorageEnv(storage_root=root)
        with storage.use(settings):
            t0 = time.perf_counter()
            write_pair(size, bits)
            build_s = time.perf_counter() - t0
            file_mb = (
                sum((root / SOURCE / f"img.{z:05d}.png").stat().st_size for z in (0, 1)) / 2 / 1e6
            )
        env = {} if max_pixels is None else {"EMPROCESS_ALIGN_MAX_PIXELS": str(max_pixels)}
        with local_services(Path(tmp) / "logs", env=env, storage_settings=settings) as urls:
            master = _align_master(urls.align)
            pid = _worker_pid(master)
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            before = _status_mib(pid, "VmRSS")
            body: dict[str, Any] = {
                "pre": f"gs://{SOURCE}/img.00000.png",
                "post": f"gs://{SOURCE}/img.00001.png",
                "downsample": downsample,
            }
            t0 = time.perf_counter()
            answer = requests.post(urls.align, json=body, timeout=900)
            wall_s = time.perf_counter() - t0
            peak = _status_mib(pid, "VmHWM")
    row: dict[str, Any] = {
        "size": size, "bits": bits, "downsample": downsample, "file_mb": file_mb,
        "build_s": build_s, "status": answer.status_code, "wall_s": wall_s,
        "rss_before_mib": before, "peak_mib": peak, "error_px": float("nan"), "message": "",
    }  # fmt: skip
    if answer.status_code == 200:
        found = answer.json()["affine"]
        full = affine.rescale(found, downsample)
        row["error_px"] = affine.mean_corner_error(full, BENCH_TRUTH, size, size)
    else:
        row["message"] = answer.text[:200]
    return row


def _align_master(url: str) -> int:
    """The pid of the gunicorn master listening on ``url``'s port (the worker's parent)."""
    port = int(url.rsplit(":", 1)[1])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    owners = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                link = os.readlink(f"/proc/{entry}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    owners.add(int(entry))
        except OSError:
            continue
    # master and worker both hold the listening socket: the master is the other's parent
    for pid in owners:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        if parent in owners:
            return parent
    raise RuntimeError(f"no gunicorn master and worker on port {port}: {owners}")


def print_align_service_benchmark(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'size':>6} {'bits':>4} {'down':>4} {'file MB':>8} {'status':>6} {'wall s':>7} "
        f"{'peak MiB':>8} {'err px':>7}"
    )
    for r in rows:
        print(
            f"{r['size']:>6} {r['bits']:>4} {r['downsample']:>4} {r['file_mb']:>8.1f} "
            f"{r['status']:>6} {r['wall_s']:>7.2f} {r['peak_mib']:>8.0f} {r['error_px']:>7.3f}"
            + (f"  {r['message']}" if r["message"] else "")
        )
