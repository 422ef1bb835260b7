"""``emprocess bench run`` and ``bench scale`` at tiny sizes: the real code paths, sane figures."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emprocess.cli import app

NUMBER = r"(-?\d+(?:\.\d+)?)"
"""A printed number with its sign: a negative figure is read as one and fails its bound
(``[0-9.]+`` matched only its digits, so ``>= 0`` could not fail: issue 22 item 8)."""

RUN_STAGES = ("validate", "measure_window", "create_env", "start_align", "align", "plan_gaps",
              "gap_pairs", "collect", "slicestats", "plan_intensity", "write",
              "finish_align", "write_ngmeta", "shards", "finish_ngwrite", "iswritten",
              "cleanup_images", "set_public_read")  # fmt: skip
"""Every task of the DAG, in order; align, write and shards are the batch stages."""


@pytest.mark.slow
def test_bench_run_prints_each_stage_and_each_request(tmp_path: Path) -> None:
    """A real local run (services under gunicorn, `airflow dags test`) of 3 slices, 16-bit."""
    before = dict(os.environ)
    argv = ["bench", "run", "--workdir", str(tmp_path), "--slices", "3", "--size", "256"]
    out = CliRunner().invoke(app, [*argv, "--width", "1", "--workers", "1", "--bits", "16"])
    assert out.exit_code == 0, out.output
    assert dict(os.environ) == before  # settings go to the processes it starts, not here
    text = out.output
    assert "local run of 3 slices of 256^2 px (16-bit), width 1, neighbours 3, downsample 2" in text
    assert "align 1 workers, emwrite 1 workers" in text
    walls = {}
    for stage in RUN_STAGES:
        row = re.search(
            rf"^  {stage} +{NUMBER} +{NUMBER} +{NUMBER}% +{NUMBER}% +({NUMBER}|-) +({NUMBER}|-)"
            rf" +(\d+)$",
            text,
            re.M,
        )
        assert row, (stage, text)
        wall, cpu, ours, busy = map(float, row.groups()[:4])
        rate, per_cpu, airflow_mib = row[5], row[7], int(row[9])
        # Every task runs in the `dags test` process: Airflow and our package imported.
        assert 100 < airflow_mib < 4096, (stage, text)
        assert wall >= 0 and cpu >= 0 and ours >= 0 and busy >= 0, (stage, text)
        # Our processes are part of the machine's busy time; the two are sampled apart
        # (per process and system-wide), which on a sub-second stage differs by a few points.
        assert ours <= busy + 10, text
        if stage in ("align", "write", "shards"):  # the stages that move the pixels
            assert rate != "-" and float(rate) > 0, (stage, text)
            # The stage's MB over its CPU seconds: at least its MB/s over all cores.
            assert per_cpu != "-" and float(per_cpu) >= 0.8 * float(rate), (stage, text)
        else:
            assert rate == per_cpu == "-", (stage, text)
        walls[stage] = wall
    assert walls["align"] > 0 and walls["shards"] > 0, text  # 3 pairs; a cube of 3 slices
    whole = re.search(rf"whole run .*: {NUMBER} s wall, {NUMBER} s CPU", text)
    assert whole and float(whole[2]) > 0 and float(whole[1]) > 0
    # The stages ran one after the other inside the run, after the services started.
    assert sum(walls.values()) < float(whole[1]), text
    assert re.search(rf"end to end: 0 MB in, {NUMBER} MB/s per core", text)  # 0.2 MB
    assert (
        "requests (peak: the gunicorn worker's VmHWM over the request, reset before each)" in text
    )
    # Requests: each slice's histogram (the 16-bit auto window), each slice's features,
    # 3 pairs (neighbours 3 of 3 slices), a slice each, one volume, one cube.
    expected = {("align", "POST /histogram"): 3,
                ("align", "POST /features"): 3, ("align", "POST /"): 3,
                ("emwrite", "POST /alignedslice"): 3,
                ("emwrite", "POST /ngmeta"): 1, ("emwrite", "POST /ngshard"): 1}  # fmt: skip
    found = {}
    for service, method, path, *figures in re.findall(
        rf"^  (align|emwrite) +(POST|GET) +(\S+) +(\d+) +(\d+) +{NUMBER} +{NUMBER} +{NUMBER}"
        rf" +{NUMBER}$",
        text,
        re.M,
    ):
        count, failed, peak, median, seconds, cpu = map(float, figures)
        found[(service, f"{method} {path}")] = int(count)
        assert failed == 0, text
        # A worker's peak is at least what it holds after its imports, and far from 4 GiB.
        assert 50 < median <= peak < 2048 and seconds >= 0 and cpu >= 0, text
    assert found == expected, text


@pytest.mark.slow
def test_bench_run_says_what_failed(tmp_path: Path) -> None:
    """A run the alignment service refuses (its pixel limit below the slices) prints the
    figures it has, the service's answer, and exits 1."""
    argv = ["bench", "run", "--workdir", str(tmp_path), "--slices", "3", "--size", "256"]
    out = CliRunner().invoke(app, [*argv, "--width", "1", "--workers", "1",
                                   "--align-max-pixels", "1000"])  # fmt: skip
    assert out.exit_code == 1, out.output
    text = out.output
    assert "THE RUN FAILED" in text and "answered 400" in text, text
    assert "256x256 = 65536 pixels, over the limit of 1000" in text, text
    assert not re.search(r"^  (validate|align|write|shards) +-?\d", text, re.M), text  # no stage
    # The slices' features come first: every one sent is refused, no pair is sent.
    row = re.search(r"^  align +POST /features +(\d+) +(\d+) ", text, re.M)
    assert row and int(row[1]) >= 1 and row[1] == row[2], text
    assert not re.search(r"^  align +POST / ", text, re.M), text
    assert not re.search(r"^  emwrite ", text, re.M), text  # nothing written


@pytest.mark.slow
def test_bench_scale_measures_every_stage(tmp_path: Path) -> None:
    """Every stage in its own process at 12 slices (iswritten raises unless the stand-ins
    answered every request); one count extrapolates as a constant."""
    before = dict(os.environ)
    argv = ["bench", "scale", "--workdir", str(tmp_path), "--slices", "12"]
    out = CliRunner().invoke(app, [*argv, "--width", "2", "--no-notebook"])
    assert out.exit_code == 0, out.output
    assert dict(os.environ) == before  # the stage processes get their settings as variables
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
