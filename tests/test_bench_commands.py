"""Every ``emprocess bench`` command at its smallest, with no environment: the printed rows.

Each test runs the command as a user would (``bench run`` and ``bench scale`` are in
test_bench_run_scale.py, ``bench plan`` in test_bench_plan.py) and checks the rows' shape
and values that a broken benchmark would get wrong: counts equal to the input, times and
memory inside sane bounds, accuracy where the command measures it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA, airflow_environ, point_storage
from typer.testing import CliRunner

from emprocess.cli import app
from emprocess.workflow import WIDTHS

NUMBER = r"(-?\d+(?:\.\d+)?)"
"""A printed number, sign included, so a negative figure fails its bound instead of
leaving the row unmatched or matching only its digits."""

NO_CLOUD = {
    # Where a benchmark reached for Google Cloud Storage it would fail at once: no
    # emulator, no credentials, no metadata server.
    "STORAGE_EMULATOR_HOST": None,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": None,
    "TENSORSTORE_GCS_HTTP_URL": None,
    "GOOGLE_APPLICATION_CREDENTIALS": None,
    "EMPROCESS_STORAGE_ROOT": None,
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
}


@pytest.fixture
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment of a fresh clone: no storage root, no GCS emulator, no credentials."""
    for key, value in NO_CLOUD.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)


def invoke(*argv: str) -> str:
    out = CliRunner().invoke(app, list(argv))
    assert out.exit_code == 0, (out.output, out.exception)
    return out.output


EMWRITE_PHASES = (
    "alignedslice", "ngshard_jpeg", "ngshard_raw", "end_to_end_jpeg",
    "end_to_end_jpeg_per_input", "end_to_end_raw", "end_to_end_raw_per_input",
)  # fmt: skip


def emwrite_rows(text: str) -> dict[str, list[float]]:
    """phase -> [MB, CPU s, wall s, MB/s/core, MB/s wall, peak RSS MiB] of the table."""
    rows = {}
    for line in text.splitlines():
        found = re.match(rf"^(\S+) +(input|canvas)((?: +{NUMBER}){{6}})$", line)
        if found:
            rows[found[1]] = [float(v) for v in found[3].split()]
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("where", ["temporary", "--storage-root", "EMPROCESS_STORAGE_ROOT"])
def test_bench_emwrite_runs_with_no_environment(
    where: str, tmp_path: Path, no_environment: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19: it failed in all three ways (GCS credentials; a bucket missing in the
    phase processes, which read another root than the parent wrote)."""
    root = tmp_path / "root"
    argv = ["bench", "emwrite", "--slices", "2", "--size", "384", "--repeats", "1"]
    if where == "--storage-root":
        argv = ["--storage-root", str(root), *argv]
    elif where == "EMPROCESS_STORAGE_ROOT":
        point_storage(monkeypatch, str(root))
    text = invoke(*argv)
    assert "stack: 2 slices of 384^2, 8-bit, 1 channel(s)" in text
    canvas = re.search(r"canvas (\d+)x(\d+)", text)
    assert canvas and all(384 < int(v) < 450 for v in canvas.groups()), text  # the drift
    rows = emwrite_rows(text)
    assert list(rows) == list(EMWRITE_PHASES), text
    for phase, (_mb, cpu, wall, per_core, _per_wall, peak) in rows.items():
        assert cpu > 0 and wall > 0 and per_core > 0, (phase, text)
        assert 50 < peak < 1024, (phase, text)  # MiB of one phase process
    raw, jpeg = rows["ngshard_raw"][1], rows["ngshard_jpeg"][1]
    assert abs(rows["end_to_end_raw"][1] - (rows["alignedslice"][1] + raw)) <= 0.011, text
    assert abs(rows["end_to_end_jpeg"][1] - (rows["alignedslice"][1] + jpeg)) <= 0.011, text
    if where == "temporary":
        assert not root.exists()
    else:  # the chosen root keeps what the benchmark wrote: both slices' tiles
        tiles = sorted(p.name for p in (root / "bench-src_tmp_bench" / "aligned").iterdir())
        assert tiles == ["000000.tiles", "000001.tiles"]


def test_bench_align_prints_each_case(no_environment: None) -> None:
    text = invoke("bench", "align", "--size", "320", "--downsample", "1", "--downsample", "2",
                  "--repeats", "1")  # fmt: skip
    cell = rf" +{NUMBER}"
    rows = re.findall(
        rf"^ +(\d+) +(\d+){cell}{cell}{cell} +(True|False) +(\d+) +(\d+)$", text, re.M
    )
    assert [(r[0], r[1]) for r in rows] == [("320", "1"), ("320", "2")], text
    for _size, _down, wall, cpu, err, found, inliers, features in rows:
        assert float(wall) > 0 and float(cpu) > 0, text
        # A known shift and rotation is recovered within half a pixel, by many inliers.
        assert found == "True" and 0 <= float(err) < 0.5, text
        assert 20 <= int(inliers) <= int(features), text


def test_bench_solve_prints_each_size(no_environment: None) -> None:
    text = invoke("bench", "solve", "--slices", "300", "--slices", "600", "--neighbors", "2")
    rows = re.findall(
        rf"(\d+) slices x 2 neighbours \((\d+) pairs\): {NUMBER} s \({NUMBER} s CPU\), "
        rf"peak memory {NUMBER} GiB \(process RSS\), worst corner vs truth {NUMBER} px",
        text,
    )
    assert [(r[0], r[1]) for r in rows] == [("300", "597"), ("600", "1197")], text  # 2n - 3
    for *_, seconds, cpu, gib, worst in rows:
        assert float(seconds) > 0 and float(cpu) > 0 and 0 < float(gib) < 2, text
        assert 0 <= float(worst) < 2.0, text  # the solve recovers the synthetic truth


def test_bench_drift_prints_the_chain_and_the_solve(no_environment: None) -> None:
    folder = SHARED_DATA / "fibsem"
    text = invoke("bench", "drift", "--folder", str(folder), "--slices", "10", "--crop", "128",
                  "--neighbors", "2", "--no-faults")  # fmt: skip
    # 9 + 8 pairs of the drifted stack and as many of the undrifted one.
    assert re.search(r"^10 slices, align downsample 1: 34 pairs aligned in [0-9.]+ s$", text, re.M)
    assert "injected {}" in text
    for mode in (r"chain \(today\)", "solve, 2 neighbours"):
        row = re.search(rf"^  {mode}((?: +{NUMBER}| +-){{8}}) +none$", text, re.M)
        assert row, (mode, text)
        anywhere = float(row[1].split()[0])
        assert 0 < anywhere < 6.0, text  # 10 slices of up to 6 px of drift, corrected
    noise = re.search(rf"d=1: rotation {NUMBER} mrad, centre {NUMBER} px over 9 pairs", text)
    assert noise and 0 < float(noise[1]) < 10 and 0 < float(noise[2]) < 3, text


@pytest.mark.slow
def test_bench_parse_in_a_fresh_process(tmp_path: Path) -> None:
    """`emprocess bench parse` as a user runs it: every DAG, no heavy module, under 5 s."""
    env = {**os.environ, **airflow_environ(tmp_path / "airflow")}
    done = subprocess.run(
        [sys.executable, "-m", "emprocess.cli", "bench", "parse", "--repeats", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert f": {len(WIDTHS) + 1} DAGs," in text, text
    parse = re.search(rf"DagBag parse, median of 1: {NUMBER} s", text)
    assert parse and 0 < float(parse[1]) < 5, text
    assert "heavy modules imported at parse time: none" in text, text
    assert "IMPORT ERRORS" not in text
