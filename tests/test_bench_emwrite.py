"""The emwrite benchmark runs its phases for real and repeats them on fresh outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import point_storage

from emprocess import storage
from emprocess_bench.emwrite import RUN_ID, SOURCE, clear_buckets, run_emwrite_benchmark


def test_benchmark_phases_report_rates_and_repeat_on_fresh_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_emwrite_benchmark(slices=2, size=128, repeats=2, root=str(tmp_path))
    phases = result["phases"]
    for name in ("alignedslice", "ngshard_jpeg", "ngshard_raw", "end_to_end_jpeg"):
        row = phases[name]
        assert row["cpu_s"] > 0 and row["mb_per_cpu_s"] > 0 and row["peak_rss_mib"] > 0, name
    assert phases["alignedslice"]["basis"] == "input"
    assert phases["end_to_end_raw"]["cpu_s"] == (
        phases["alignedslice"]["cpu_s"] + phases["ngshard_raw"]["cpu_s"]
    )
    # What the last repeat wrote is there: one tiles object per slice, the volume.
    point_storage(monkeypatch, str(tmp_path))
    tmp = f"{SOURCE}_tmp_{RUN_ID}"
    assert storage.list_keys(storage.bucket_url(tmp, "")) == [
        "aligned/000000.tiles",
        "aligned/000001.tiles",
    ]
    jpeg = f"{SOURCE}_ng_{RUN_ID}"  # the run's own ng bucket (emwrite takes no other)
    assert "neuroglancer/jpeg/info" in storage.list_keys(storage.bucket_url(jpeg, ""))
    # Between repeats every object of the phase's buckets goes, whatever its name.
    storage.write_bytes(storage.bucket_url(tmp, "aligned/stale.tiles"), b"old")
    clear_buckets(tmp, jpeg)
    assert storage.list_keys(storage.bucket_url(tmp, "")) == []
    assert storage.list_keys(storage.bucket_url(jpeg, "")) == []
