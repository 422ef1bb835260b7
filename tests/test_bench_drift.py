"""``emprocess bench drift`` on a short real stack: figures, the floor, and kept answers."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import SHARED_DATA

from emprocess_bench.drift import _align_all, _read_answers, load_pingpong, run_drift_benchmark

FIBSEM = SHARED_DATA / "fibsem"


def test_drift_benchmark_keeps_its_answers_and_reports_the_floor(tmp_path: Path) -> None:
    answers = tmp_path / "answers.json"
    first = run_drift_benchmark(FIBSEM, n=12, crop=200, neighbors=(2,), answers_file=answers)
    *rows, info = first
    assert not info["cached"] and info["pairs"] == 2 * (11 + 10) and info["injected"] == {}
    noise = info["pair_noise"]  # 200 px crops: about 1 mrad and 0.5 px per pair
    assert set(noise) == {1, 2} and noise[1]["pairs"] == 11
    assert 0 < noise[1]["rotation_mrad"] < 5 and 0 < noise[1]["centre_px"] < 2
    doc = json.loads(answers.read_text())
    assert doc["stack"] == {"n": 12, "crop": 200, "downsample": 1, "seed": 3, "faults": True}
    assert len(doc["drifted"]) == len(doc["undrifted"]) == 21
    assert [(r["mode"], r["neighbors"]) for r in rows] == [("chain", 1), ("solve", 2)]
    for r in rows:
        assert r["flagged"] == []  # no fault below slice 20
        # The drift is corrected (12 slices of up to 6 px and 0.15 degree each).
        assert r["content"]["anywhere"] < 2.0 and r["raw"]["anywhere"] < 3.0
        assert 0 <= r["floor"]["neighbours"] <= r["floor"]["anywhere"] < 3.0
    # The second run reads the kept answers: same figures, no alignment.
    *again, info2 = run_drift_benchmark(
        FIBSEM, n=12, crop=200, neighbors=(2,), answers_file=answers
    )
    assert info2["cached"] and again == rows
    # Answers of another stack are not reused; a longer run aligns only the pairs missing.
    drifted, undrifted = _read_answers(answers, doc["stack"])
    assert len(drifted) == len(undrifted) == 21 and (0, 3) not in drifted
    assert _read_answers(answers, {**doc["stack"], "seed": 4}) == ({}, {})
    assert _read_answers(tmp_path / "missing.json", doc["stack"]) == ({}, {})


def test_pairs_of_repeated_slices_are_aligned_once() -> None:
    """The undrifted long stack repeats its slices: one alignment per distinct image pair."""
    images = load_pingpong(FIBSEM, 2)
    a, b = (i[:200, :200].copy() for i in images)
    answers = _align_all([a, b, a.copy(), b], [(0, 1), (2, 3), (1, 2)], 1)
    assert answers[(0, 1)] is answers[(2, 3)]  # the same images: one answer
    assert answers[(0, 1)]["affine_found"] and answers[(1, 2)]["affine_found"]
    # b -> a and a -> b are inverse models.
    m01, m12 = answers[(0, 1)]["translation"], answers[(1, 2)]["translation"]
    assert abs(m01[4] + m12[4]) < 0.5 and abs(m01[5] + m12[5]) < 0.5
