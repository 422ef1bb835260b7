"""Smoke test of ``emprocess bench align-service`` on the smallest pair: the real service
answers, the worker's peak RSS is read, and the affine is recovered."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from emprocess.cli import app


@pytest.mark.slow
def test_bench_align_service_prints_its_rows() -> None:
    result = CliRunner().invoke(
        app, ["bench", "align-service", "--size", "512", "--bits", "16", "--downsample", "2"]
    )
    assert result.exit_code == 0, result.output
    header, row = result.output.strip().splitlines()[-2:]
    assert header.split()[:3] == ["size", "bits", "down"]
    size, bits, down, _, status, wall_s, peak_mib, error_px = row.split()[:8]
    assert (size, bits, down, status) == ("512", "16", "2", "200")
    assert float(wall_s) > 0 and 30 < float(peak_mib) < 1024
    assert float(error_px) < 1.0
