"""``emprocess bench neighbors`` at the smallest size: its rows, and identical answers."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from emprocess.cli import app


def test_bench_neighbors_prints_a_row_per_neighbour_count() -> None:
    argv = ["bench", "neighbors", "--slices", "4", "--size", "256"]
    out = CliRunner().invoke(app, [*argv, "--neighbors", "1", "--neighbors", "3"])
    assert out.exit_code == 0, out.output
    assert "4 slices of 256^2 px" in out.output
    rows = {
        int(m[1]): m
        for m in re.finditer(
            r"^ +(\d) +(\d+) \| +([\d.]+) \( *([\d.]+)x\) +[\d.]+ \| +([\d.]+) \( *([\d.]+)\) "
            r"\( *([\d.]+)x\) +[\d.]+ \| (\d+)/(\d+)",
            out.output,
            re.M,
        )
    }
    assert sorted(rows) == [1, 3], out.output
    assert (int(rows[1][2]), int(rows[3][2])) == (3, 6)  # pairs
    for m in rows.values():
        assert m[8] == m[9]  # every answer from stored features equals the image path's
        assert float(m[3]) > 0 and float(m[5]) >= float(m[6]) > 0  # features within "after"
