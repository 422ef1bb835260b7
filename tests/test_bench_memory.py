"""``emprocess bench memory`` on the smallest inputs: every request answers 200 and its
row says the worker's peak memory (smoke test; the figures are the benchmark's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from emprocess_bench.memory import em_slice


def test_em_slices_are_em_like_and_not_periodic() -> None:
    eight, wide = em_slice(1500, 8, seed=3), em_slice(1500, 16, seed=3)
    assert eight.dtype == np.uint8 and wide.dtype == np.uint16
    assert 20 < eight.std() < 60 and (eight < 60).mean() > 0.005  # membranes are dark
    # No period: a band does not repeat further down, and bands join without seams.
    band = eight[:200].astype(float)
    for dy in (256, 512, 1024, 1200):
        assert np.corrcoef(band.ravel(), eight[dy : dy + 200].astype(float).ravel())[0, 1] < 0.5
    seam = np.abs(np.diff(eight[1020:1028].astype(float), axis=0)).mean(axis=1)
    assert seam.max() < 2 * np.median(seam)
    assert wide.max() > 255 and len(np.unique(wide[:100, :100] & 0xF)) == 16  # noisy low bits


def test_bench_memory_prints_a_row_per_request(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "emprocess.cli", "bench", "memory", "--slice", "700:8",
         "--slice", "600:16", "--cube-channels", "4", "--cube-depth", "4",
         "--data-dir", str(tmp_path / "kept")],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.startswith("/")]
    assert [(r[0], r[1]) for r in rows] == [
        ("/alignedslice", "700^2"),
        ("/alignedslice", "600^2"),
        ("/ngmeta", "cube"),
        ("/ngshard", "cube"),
    ]
    header = out.splitlines()[0].split()
    assert header[:3] == ["endpoint", "case", "status"]
    for row in rows:
        status, wall_s, cpu_s, peak, base = row[-7:-2] if row[0] == "/alignedslice" else row[-5:]
        assert status == "200" and float(wall_s) >= 0 and float(cpu_s) >= 0, row
        assert float(peak) >= float(base) > 30, row
    assert sorted(p.name for p in (tmp_path / "kept").glob("*.png")) == [
        "mem.600.16.1.png",
        "mem.700.8.0.png",
    ]
