"""``emprocess bench run`` and ``bench scale`` at tiny sizes: the real code paths, sane figures."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks import scale as bench_scale
from emprocess import storage
from emprocess.cli import app

NUMBER = r"([0-9.]+)"


@pytest.fixture
def restored_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks set the storage root and HTTP settings in os.environ: undone after."""
    for key in (storage.ROOT_ENV, *bench_scale.ENV):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


@pytest.mark.slow
def test_bench_run_prints_each_stage_and_the_whole_run(tmp_path: Path, restored_env: None) -> None:
    """A real local run (services under gunicorn, `airflow dags test`) of 3 slices."""
    argv = ["bench", "run", "--workdir", str(tmp_path), "--slices", "3", "--size", "256"]
    out = CliRunner().invoke(app, [*argv, "--width", "1", "--workers", "1"])
    assert out.exit_code == 0, out.output
    text = out.output
    assert "local run of 3 slices of 256^2 px (8-bit), width 1" in text
    assert "align 1 workers, emwrite 1 workers" in text
    stage_cpu = 0.0
    for stage in ("align", "write", "shards"):
        row = re.search(rf"^  {stage} +{NUMBER} +{NUMBER} +{NUMBER}% +{NUMBER}%$", text, re.M)
        assert row, (stage, text)
        wall, cpu, ours, busy = map(float, row.groups())
        # A stage of 3 tiny slices can round to 0.0 s (shards: one thin cube); align cannot.
        assert wall >= 0 and cpu >= 0 and (stage != "align" or wall > 0), text
        # Our processes are part of the machine's busy time; the two are sampled apart
        # (per process and system-wide), which on a sub-second stage differs by a few points.
        assert ours <= busy + 10, text
        stage_cpu += cpu
    assert stage_cpu > 0, text
    whole = re.search(rf"whole run .*: {NUMBER} s wall, {NUMBER} s CPU", text)
    assert whole and float(whole[2]) > 0 and float(whole[1]) > 0
    assert re.search(rf"end to end: 0 MB in, {NUMBER} MB/s per core", text)  # 0.2 MB


@pytest.mark.slow
def test_bench_scale_measures_every_stage(tmp_path: Path, restored_env: None) -> None:
    """Every stage in its own process at 12 slices (iswritten raises unless the stand-ins
    answered every request); one count extrapolates as a constant."""
    argv = ["bench", "scale", "--workdir", str(tmp_path), "--slices", "12"]
    out = CliRunner().invoke(app, [*argv, "--width", "2", "--no-notebook"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("stage wall s"))) :]
    labels = ["validate", "create_env", "plan", "affine, the others", "affine, one task",
              "collect", "write, the others", "write, one task", "finish_align",
              "ngmeta + shards", "iswritten", "write_status", "report"]  # fmt: skip
    for label in labels:
        row = next((x for x in table if x.startswith(label + " ")), None)
        assert row, (label, out.output)
        cell = rf"{NUMBER} \( *{NUMBER}\) / *(\d+) +{NUMBER} +{NUMBER}, +(\d+)$"
        found = re.search(cell, row)
        assert found, row
        wall, cpu, mib, k, t50, m50 = map(float, found.groups())
        assert wall > 0 and cpu > 0 and 30 < mib < 2048, row
        assert k == 1.0 and abs(t50 - wall) <= 0.06 and m50 == mib, row  # one count: constant
    assert re.search(r"largest at 50,000 slices: \d+ s, \d+ MiB per task", out.output)
