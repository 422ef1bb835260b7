"""``emprocess bench plan``: the arithmetic of docs/scale.md from its stated constants."""

from __future__ import annotations

import math

from typer.testing import CliRunner

from emprocess.cli import app
from emprocess_bench import plan as bp


def test_plan_counts_follow_from_the_dataset() -> None:
    plan = bp.make_plan(10e12, 20_000, neighbors=3)
    assert plan.slices == 25_000 and plan.canvas_side == 20_600
    assert plan.cubes == 21 * 21 * 25  # 20,600 px = 21 tiles a side; 25,000 slices = 25 deep
    features, align, write, shards = plan.stages
    assert (features.requests, align.requests) == (25_000, 74_994)  # each slice's features once
    assert (write.requests, shards.requests) == (25_000, 11_025)
    assert bp.make_plan(10e12, 20_000, neighbors=1).stage("align").requests == 24_999
    # Matching stored features costs far less than extracting them: neighbours are cheap.
    assert align.requests * align.cpu_s < 0.1 * features.requests * features.cpu_s
    assert shards.reads == 1024  # one range read of a slice's tiles object per slice of the cube
    # Twice the width, about half the wall time; cost does not depend on the width.
    assert math.isclose(plan.wall_s(32) / plan.wall_s(64), 2.0, rel_tol=0.05)
    small = bp.make_plan(1e12, 20_000, neighbors=3)
    assert small.slices == 2_500
    assert math.isclose(plan.compute_usd() / small.compute_usd(), 10.0, rel_tol=0.05)


def test_bench_plan_prints_the_headline_numbers() -> None:
    out = CliRunner().invoke(app, ["bench", "plan", "--terabytes", "1"])
    assert out.exit_code == 0, out.output
    assert "1 TB of 8-bit slices: 2,500 slices of 20,000^2 px" in out.output
    assert "original: about 1 h and $100 of compute per TB" in out.output
    for width in bp.WIDTHS:
        assert any(line.split()[:2] == [str(width)] * 2 for line in out.output.splitlines())


def test_composer_is_sized_by_the_width_and_priced_for_the_run() -> None:
    plan = bp.make_plan(10e12, 20_000, neighbors=3)
    # A run keeps width + 1 tasks running: the presets' recommended concurrent tasks.
    assert [plan.composer(w)[0] for w in (16, 32, 99, 128)] == [
        "small",
        "medium",
        "medium",
        "large",
    ]
    _, workers, per_h = plan.composer(128)
    assert workers == 5  # 38 GiB of task slots on workers of 8 GiB
    dcu = bp.COMPOSER_BASE_DCU["large"] + 5 * bp.COMPOSER_WORKER_DCU
    assert math.isclose(per_h, dcu * bp.COMPOSER_DCU_HOUR_USD)
    assert math.isclose(plan.composer_usd(128), per_h * plan.wall_s(128) / 3600)
    out = CliRunner().invoke(app, ["bench", "plan"])
    assert "width 128: Composer 3 large + 5 workers" in out.output
