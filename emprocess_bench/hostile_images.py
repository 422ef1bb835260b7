"""Time and peak memory of decoding each hostile image of issue 20 at the issue's size.

``python -m emprocess_bench.hostile_images [--code DIR] [--skip-gib]`` builds, in a temporary
folder, the files the issue describes (a TIFF listing its size twice, a progressive
8,192^2 JPEG whose last scan is repeated 1,000 times, a 16 x 16 PNG followed by 1 GiB
of zlib data, 1,000 zTXt chunks, a JPEG with damaged scan data, 1 MiB after IEND) and
decodes each with :func:`emprocess.images.decode_image` under emwrite's default limits
(32,768^2 px, 1 GiB), each in a fresh subprocess, printing the outcome, the seconds
and the subprocess's peak RSS over its RSS before the call (VmHWM). ``--code DIR``
runs the package found in DIR instead (e.g. an export of an older commit), for the
figures before a change. The 1 GiB file takes ~2 GiB to build: run under
``flock /work/bigmem.lock`` on a shared machine, or pass ``--skip-gib``.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np

_CHILD = """
import json, sys, time
from pathlib import Path
def hwm(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
data = Path(sys.argv[1]).read_bytes()
from emprocess.images import decode_image
before = hwm("VmRSS")
t0 = time.perf_counter()
try:
    image = decode_image(data, sys.argv[1].rsplit("/", 1)[1], 32768 * 32768, 1 << 30)
    outcome = f"decoded {image.shape}"
except Exception as e:
    outcome = f"{type(e).__name__}: {str(e)[:90]}"
print(json.dumps({"outcome": outcome, "s": time.perf_counter() - t0,
                  "peak_mib": hwm("VmHWM") - before}))
"""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _texture(side: int, cell: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (side // cell, side // cell), np.uint8)
    return cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC)


def build(folder: Path, skip_gib: bool) -> list[Path]:
    """Write the hostile files into ``folder``; returns their paths."""
    files: dict[str, bytes] = {}
    entries = [(256, 32768), (256, 4), (257, 32768), (257, 4), (258, 8), (262, 1)]
    body = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHIHH", tag, 3, 1, value, 0) for tag, value in entries
    )
    files["dup-size.tif"] = b"II*\x00" + struct.pack("<I", 8) + body + bytes(4) + bytes(6000)
    progressive = cv2.imencode(".jpg", _texture(8192, 4096), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1]
    data = progressive.tobytes()
    last = data.rindex(b"\xff\xda")
    files["scans-1000.jpg"] = data[:last] + data[last:-2] * 1000 + b"\xff\xd9"
    files["scans-10.jpg"] = data
    png = cv2.imencode(".png", _texture(512)[:16, :16])[1].tobytes()
    text = _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"a" * 1_000_000))
    files["ztxt-1000.png"] = png[:33] + text * 1000 + png[33:]
    files["tail-1mib.png"] = png + bytes(1 << 20)
    jpeg = cv2.imencode(".jpg", _texture(2048))[1].tobytes()
    middle = (jpeg.index(b"\xff\xda") + len(jpeg)) // 2
    files["damaged.jpg"] = jpeg[:middle] + jpeg[middle + 2000 :]
    for name, content in files.items():
        (folder / name).write_bytes(content)
    if not skip_gib:
        raw = b"".join(b"\x00" + bytes(range(16)) for _ in range(16))
        stream = zlib.compressobj(1)
        with open(folder / "zlib-1gib.png", "wb") as out:
            out.write(png[:33])
            rng = np.random.default_rng(1)
            out.write(_chunk(b"IDAT", stream.compress(raw)))
            for _ in range(1024):  # 1 GiB of incompressible data, 1 MiB a chunk
                out.write(_chunk(b"IDAT", stream.compress(rng.bytes(1 << 20))))
            out.write(_chunk(b"IDAT", stream.flush()) + _chunk(b"IEND", b""))
    return sorted(folder.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", help="folder whose emprocess package to measure")
    parser.add_argument("--skip-gib", action="store_true", help="leave out the 1 GiB PNG")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per file")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.code:
        env["PYTHONPATH"] = args.code
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        paths = build(Path(tmp), args.skip_gib)
        print(f"{'file':<16} {'MB':>8} {'s':>7} {'peak MiB':>9}  outcome")
        for path in paths:
            try:
                out = subprocess.run(
                    [sys.executable, "-c", _CHILD, str(path)],
                    capture_output=True, text=True, env=env, timeout=args.timeout,
                )  # fmt: skip
                row = json.loads(out.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                row = {"s": args.timeout, "peak_mib": float("nan"), "outcome": "still decoding"}
            size = path.stat().st_size / 1e6
            print(
                f"{path.name:<16} {size:>8.2f} {row['s']:>7.2f} {row['peak_mib']:>9.0f}  "
                f"{row['outcome']}"
            )


if __name__ == "__main__":
    main()
