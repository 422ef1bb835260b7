"""Issue 11's plans: pairs to k neighbours (names, order, legacy plan) and bad-slice fills."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from emprocess import affine
from emprocess.kernels.warp import warp_window
from emprocess.layout import pair_name, parse_pair_name
from emprocess.workflow.conf import parse_conf
from emprocess.workflow.payloads import plan_align_pairs, plan_aligned_slices

BASE = {"id": "r1", "image": "img.%05d.png", "minz": 3, "maxz": 8, "source": "src"}


def test_pairs_to_k_neighbours_are_unique_and_parse_back() -> None:
    tasks = plan_align_pairs(parse_conf({**BASE, "neighbors": 3}))
    pairs = [parse_pair_name(t.name) for t in tasks]
    assert pairs == [(z, z + d) for z in range(3, 8) for d in (1, 2, 3) if z + d <= 8]
    assert len({t.name for t in tasks}) == len(tasks) == 12
    assert [t.index for t in tasks] == list(range(12))
    assert tasks[1].name == "z000003-000005"
    assert tasks[1].payload["post"] == "gs://src/img.00005.png"
    with pytest.raises(ValueError, match="not an alignment pair name"):
        parse_pair_name("cube_0_0_0")


def test_one_neighbour_is_the_legacy_plan() -> None:
    tasks = plan_align_pairs(parse_conf({**BASE, "neighbors": 1}))
    assert [(t.index, t.name) for t in tasks] == [(z - 3, f"z{z:06d}") for z in range(3, 8)]
    assert [pair_name(z, z + 1) for z in range(3, 8)] == [t.name for t in tasks]
    # The legacy pair request, with the run whose stored features the pair matches
    # (features once per slice; without run_id the service decodes both slices as before).
    assert tasks[0].payload == {
        "pre": "gs://src/img.00003.png",
        "post": "gs://src/img.00004.png",
        "downsample": 1,
        "params": {},
        "run_id": BASE["id"],
    }


def test_fills_of_bad_slices() -> None:
    conf = parse_conf(BASE)
    transforms = {z: affine.translation(z, 0) for z in range(3, 9)}
    plain = plan_aligned_slices(conf, transforms, (50, 40))
    filled = plan_aligned_slices(conf, transforms, (50, 40), fill={5: 4, 6: None})
    by_z = {t.payload["slice"]: t.payload for t in filled}
    assert by_z[5]["img"] == "img.00004.png" and by_z[5]["transform"] == transforms[4]
    assert by_z[6]["img"] == "img.00006.png"
    # 'zeros': the slice lands right of the canvas, so the warp leaves the canvas black.
    canvas = warp_window(np.full((40, 50), 200, np.uint8), by_z[6]["transform"], (0, 0, 50, 40))
    assert canvas.max() == 0
    assert [t.payload for t in plain if t.payload["slice"] not in (5, 6)] == [
        p for z, p in by_z.items() if z not in (5, 6)
    ]


def test_reslice_drift_and_faults_follow_the_truth() -> None:
    from emprocess_bench.reslice import BLANK, DUPLICATE, reslice

    rng = np.random.default_rng(0)
    smooth = cv2.GaussianBlur(rng.uniform(0, 255, (200, 200)), (0, 0), 6)
    images = [(smooth * 3 - 200).clip(0, 255).astype(np.uint8)] * 6
    slices, truth = reslice(images, 150, seed=1, faults={3: BLANK, 5: DUPLICATE})
    world = truth["world"]
    # Output pixel (x, y) of slice z shows the registered image at world[z](x, y).
    for z in (1, 2, 4):
        x, y = 60, 90
        wx, wy = affine.apply(world[str(z)], np.array([[x, y]]))[0]
        expected = cv2.getRectSubPix(images[z].astype(np.float32), (1, 1), (wx, wy))[0, 0]
        assert abs(float(slices[z][y, x]) - expected) <= 1.0
    assert world["1"] != world["2"]
    assert slices[3].std() == 0
    assert (slices[5] == slices[4]).all() and world["5"] == world["4"]
    assert truth["faults"] == {"3": "blank", "5": "duplicate"}
