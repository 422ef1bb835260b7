"""The second align round: pairs across runs of bad slices (plan, solve and collect)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import point_storage
from dags_conftest_helpers import Answer, Request, ScriptedServer, write_slices
from test_solve_kernel import SIZE, _answer, truth_walk

from emprocess import affine, storage
from emprocess.report import load_run
from emprocess.settings import HttpEnv
from emprocess.workflow import gaps as gaps_stage
from emprocess.workflow import stages
from emprocess.workflow.globalalign import global_alignment, plan_gap_pairs

FAST = HttpEnv(http_threads=2, http_attempts=2, http_backoff_s=0.01, http_max_backoff_s=0.02)


def _results(truth: list[list[float]], k: int, minz: int, bad: set[int]) -> dict:
    """k-neighbour answers of slices minz.. with the true models; bad slices match nothing."""
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for z in range(len(truth)):
        for d in range(1, k + 1):
            if z + d < len(truth):
                out[(minz + z, minz + z + d)] = _pair(truth, z, z + d, bad)
    return out


def _pair(truth: list[list[float]], a: int, b: int, bad: set[int]) -> dict[str, Any]:
    answer = _answer(affine.compose(affine.invert(truth[a]), truth[b]))
    if a in bad or b in bad:  # a noise slice: features, no model
        answer.update(affine_found=False, translation_found=False, affine_inliers=4)
    return answer


def test_pairs_asked_across_each_run_of_bad_slices() -> None:
    """Slices 100..119, 2 neighbours. Bad: 100 (first slice: nothing before it), 104, 108-109,
    113-115 (longer than the limit of 2 given here), 119 (last slice). (103, 105) was asked
    in the first round but found nothing, so two new pairs cross 104."""
    truth = truth_walk(20, 2)
    bad = {0, 4, 8, 9, 13, 14, 15, 19}
    results = _results(truth, 2, 100, bad)
    results[(103, 105)].update(affine_found=False, translation_found=False)
    plan = plan_gap_pairs(results, 100, 119, max_gap=2)
    # Nearest first; of equal span the later pre; never a pair asked before.
    assert plan.pairs == [(102, 105), (103, 106), (107, 110), (107, 111)]
    assert plan.gaps == [(104, 104), (108, 109)]
    assert plan.too_long == [(113, 115)]
    assert json.loads(json.dumps(plan.to_json()))["too_long"] == [[113, 115]]
    # With 3 neighbours 108-109 already has (107, 110): one more; 104 has two.
    three = plan_gap_pairs(_results(truth, 3, 100, bad), 100, 119, max_gap=2)
    assert three.pairs == [(107, 111)]
    assert plan_gap_pairs(_results(truth, 2, 100, set()), 100, 119).pairs == []


def test_pairs_across_the_gap_place_the_stack_exactly() -> None:
    """Two bad slices in a row with 2 neighbours: without the second round an identity link
    joins the two halves (wrong by the drift across the gap); with it, the truth."""
    truth = truth_walk(14, 7)
    bad = {6, 7}
    results = _results(truth, 2, 0, bad)
    alone = global_alignment(results, 0, 13, SIZE)
    assert alone.gaps == [8] and alone.summary()["doubtful"]
    plan = plan_gap_pairs(results, 0, 13)
    assert plan.pairs == [(5, 8), (5, 9)]
    more = {p: _pair(truth, *p, bad) for p in plan.pairs}
    g = global_alignment({**results, **more}, 0, 13, SIZE, gap_plan=plan)
    assert g.gaps == []
    summary = g.summary()
    assert summary["gap_pairs"] == 2 and summary["gaps_too_long"] == []
    assert summary["slices"] == {"good": 12, "bridged": 0, "bad": 2}
    found = g.composition.transforms
    canvas = affine.compose(found[0], affine.invert(truth[0]))
    for z in (5, 8, 13):
        assert affine.mean_corner_error(found[z], affine.compose(canvas, truth[z]), *SIZE) < 1e-6
    # The bad slices are interpolated between their good neighbours.
    assert affine.mean_corner_error(found[6], affine.compose(canvas, truth[6]), *SIZE) < 6.0


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    point_storage(monkeypatch, str(tmp_path / "root"))
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


def test_gap_round_aligns_across_gaps_once_and_the_report_counts_it(root: Path) -> None:
    """Slices 3..10 with 2 neighbours; 6 and 7 are noise. plan_gaps plans (5, 8) and (5, 9),
    the two gap_pairs workers send one each, retrying the one that fails first, and cache
    both (a second round sends nothing); collect sends nothing and the report counts them
    among the align pairs."""
    truth = truth_walk(8, 11)  # slice 3 + i
    bad = {3, 4}  # indices of slices 6 and 7
    failed_once: set[str] = set()

    def align(req: Request) -> Answer:
        pre, post = (int(re.search(r"(\d+)\.png$", req.body[k]).group(1)) for k in ("pre", "post"))
        if (pre, post) == (5, 9) and "once" not in failed_once:
            failed_once.add("once")
            return Answer(503, {"error": "busy"})
        return Answer(200, {"width": 40, "height": 30, "width0": 40, "height0": 30,
                            **_pair(truth, pre - 3, post - 3, bad)})  # fmt: skip

    storage.create_bucket("src")
    write_slices("src", "img.%05d.png", range(3, 11), size_xy=(40, 30))
    conf = {"id": "r1", "image": "img.%05d.png", "minz": 3, "maxz": 10, "source": "src"}
    info = stages.validate_run({**conf, "neighbors": 2}, 2, "emprocess_width2_test")
    stages.create_env(info, "manual__1")
    with ScriptedServer(align) as server:
        for w in (0, 1):
            stages.align_pairs(info, w, server.url, FAST)
        assert len(server.requests) == 7 + 6
        assert gaps_stage.plan_gaps(info) == {"pairs": 2, "gaps": [[6, 7]], "too_long": []}
        summaries = [gaps_stage.align_gap_pairs(info, w, server.url, FAST) for w in (0, 1)]
        assert [(s["planned"], s["sent"], s["attempts"]) for s in summaries] == [
            (1, 1, 1),
            (1, 1, 2),
        ]
        sent = [(r.body["pre"][-9:-4], r.body["post"][-9:-4]) for r in server.requests[13:]]
        assert sent == [("00005", "00008"), ("00005", "00009"), ("00005", "00009")]
        canvas = stages.collect_alignment(info)
        assert len(server.requests) == 16  # collect sends nothing
        gaps_stage.plan_gaps(info)
        again = [gaps_stage.align_gap_pairs(info, w, server.url, FAST) for w in (0, 1)]
        assert [(s["cached"], s["sent"]) for s in again] == [(1, 0), (1, 0)]
        assert len(server.requests) == 16 and stages.collect_alignment(info) == canvas
    gaps = json.loads(storage.read_bytes("gs://src_process/r1/align/gaps.json"))
    assert gaps["pairs"] == [[5, 8], [5, 9]] and gaps["gaps"] == [[6, 7]]
    quality = canvas["alignment"]
    assert quality["gap_pairs"] == 2 and quality["gaps"] == []
    assert quality["why"] == "2 of 8 slices bad or bridged"  # no identity link
    assert quality["pairs"] == 15 and quality["slices"] == {"good": 6, "bridged": 0, "bad": 2}
    report = load_run("src", "r1")
    assert (report.stage("affine").done, report.stage("affine").total) == (15, 15)
    assert "second align round: 2 pairs across bad slices" in report.summary_text()
    found = stages.read_transforms(info.conf)
    frame = affine.compose(found[3], affine.invert(truth[0]))
    for z in (5, 8, 10):
        error = affine.mean_corner_error(found[z], affine.compose(frame, truth[z - 3]), 40, 30)
        assert error < 1e-6
