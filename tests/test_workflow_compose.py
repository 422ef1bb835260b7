"""``collect``'s composition: known pairwise transforms in, known global transforms out."""

from __future__ import annotations

from typing import Any

import pytest

from emprocess import affine
from emprocess.workflow.compose import (
    SHEAR_TRANSLATION_MAX,
    choose_pair_transform,
    compose_alignment,
    compose_global,
    identity_alignment,
    qc_csv,
    transforms_csv,
)


def result(aff: list[float], trans: list[float], **extra: Any) -> dict[str, Any]:
    return {
        "width": 100,
        "height": 50,
        "width0": 100,
        "height0": 50,
        "affine": aff,
        "translation": trans,
        "affine_found": True,
        "translation_found": True,
        **extra,
    }


def test_chain_of_translations() -> None:
    pairs = {
        5: affine.translation(3, -2),
        6: affine.translation(-10, 4),
        7: affine.translation(1, 1),
    }
    transforms, bbox = compose_global(pairs, 5, 8, (100, 50))
    # Global (before the shift): 5 (0, 0), 6 (3, -2), 7 (-7, 2), 8 (-6, 3); x spans -7..103,
    # y spans -2..53, so everything moves by (+7, +2).
    assert bbox == (110, 55)
    assert transforms == {
        5: affine.translation(7, 2),
        6: affine.translation(10, 0),
        7: affine.translation(0, 4),
        8: affine.translation(1, 5),
    }


def test_chain_with_a_quarter_turn() -> None:
    quarter = [0.0, 1.0, -1.0, 0.0, 0.0, 0.0]  # x' = -y, y' = x
    transforms, bbox = compose_global({0: quarter}, 0, 1, (100, 50))
    # Slice 1's corners land on x in [-50, 0], y in [0, 100]; slice 0 covers [0, 100] x [0, 50].
    assert bbox == (150, 100)
    assert transforms[0] == affine.translation(50, 0)
    assert transforms[1] == [0.0, 1.0, -1.0, 0.0, 50.0, 0.0]


def test_chain_composes_in_order() -> None:
    # Pair 0 scales slice 1 by 2 about the origin; pair 1 shifts slice 2 by (10, 0) in slice 1.
    scale2 = [2.0, 0.0, 0.0, 2.0, 0.0, 0.0]
    transforms, bbox = compose_global({0: scale2, 1: affine.translation(10, 0)}, 0, 2, (10, 10))
    # Slice 2 maps through slice 1 first (x + 10), then into slice 0 (x 2): 2x + 20.
    assert transforms[2] == [2.0, 0.0, 0.0, 2.0, 20.0, 0.0]
    assert bbox == (40, 20)


def test_missing_pair_is_named() -> None:
    with pytest.raises(ValueError, match="1 pair transforms missing, for pre slices 6"):
        compose_global({5: affine.translation(1, 1)}, 5, 7, (10, 10))


@pytest.mark.parametrize(
    ("m01", "model"),
    [
        (-0.0005, "translation"),  # the original took this right, by accident of sign
        (0.0005, "translation"),  # the original used the affine here
        (SHEAR_TRANSLATION_MAX, "translation"),
        (-SHEAR_TRANSLATION_MAX, "translation"),
        (0.0009, "affine"),
        (-0.0009, "affine"),  # the original took the translation for any negative m01
        (-0.5, "affine"),
    ],
)
def test_model_choice_by_shear_magnitude(m01: float, model: str) -> None:
    aff = [1.0, -m01, m01, 1.0, 4.0, 5.0]
    choice = choose_pair_transform(result(aff, affine.translation(4, 5)), pre=3)
    assert choice.model == model
    assert choice.transform == (aff if model == "affine" else affine.translation(4, 5))
    assert (choice.pre, choice.post, choice.m01) == (3, 4, m01)


def test_unfound_models() -> None:
    shear = [1.0, 0.01, -0.01, 1.0, 4.0, 5.0]
    only_affine = result(shear, list(affine.IDENTITY), translation_found=False)
    assert choose_pair_transform(only_affine, 0).model == "affine"
    small = [1.0, 0.0, 0.0001, 1.0, 4.0, 5.0]
    small_only = result(small, list(affine.IDENTITY), translation_found=False)
    assert choose_pair_transform(small_only, 0).model == "affine"  # better than nothing
    none = result(
        list(affine.IDENTITY), list(affine.IDENTITY), affine_found=False, translation_found=False
    )
    choice = choose_pair_transform(none, 0)
    assert (choice.model, choice.transform) == ("identity", list(affine.IDENTITY))
    # Legacy answers carry no *_found flags: the identity meant "not found".
    legacy = {"affine": list(affine.IDENTITY), "translation": affine.translation(2, 1)}
    assert choose_pair_transform(legacy, 0).model == "translation"


def test_downsampled_results_are_scaled_to_full_resolution() -> None:
    trans = choose_pair_transform(result([1, 0, 0, 1, 2, 3], affine.translation(2, 3)), 0, 4)
    assert trans.model == "translation" and trans.transform == affine.translation(8, 12)
    rot = [1.0, 0.01, -0.01, 1.0, 5.0, -3.0]
    choice = choose_pair_transform(result(rot, affine.translation(5, -3)), 0, 2)
    # S A S^-1 with S = scale 2 about pixel-centre offset 0.5: the linear part stays, the
    # translation becomes 2 t + 0.5 (I - L) [1, 1] = (10.005, -6.005).
    assert choice.model == "affine"
    assert choice.transform == pytest.approx([1.0, 0.01, -0.01, 1.0, 10.005, -6.005], abs=1e-12)


def test_compose_alignment_end_to_end() -> None:
    results = {
        10: result(
            [1, 0, -0.0002, 1, 2, 1],
            affine.translation(2, 1),
            affine_inliers=50,
            translation_inliers=60,
            affine_mean_residual_px=0.5,
            translation_mean_residual_px=0.7,
        ),
        11: result([1, 0, 0, 1, 0, 0], affine.translation(-4, 0)),
    }
    comp = compose_alignment(results, 10, 12, (64, 32), downsample_factor=2)
    # Full resolution pairs: (4, 2) and (-8, 0); globals 10 (0, 0), 11 (4, 2), 12 (-4, 2).
    assert comp.bbox_xy == (72, 34)  # x spans -4..68, y 0..34
    assert comp.transforms == {
        10: affine.translation(4, 0),
        11: affine.translation(8, 2),
        12: affine.translation(0, 2),
    }
    assert [p.model for p in comp.pairs] == ["translation", "translation"]
    qc = qc_csv(comp.pairs).splitlines()
    assert qc[0].startswith("pre,post,model,m01,affine_inliers")
    assert qc[1] == "10,11,translation,-0.0002,50,60,0.5,0.7"
    assert qc[2] == "11,12,translation,0.0,,,,"


def test_identity_alignment_and_csv() -> None:
    comp = identity_alignment(3, 4, (1000, 800))
    assert comp.bbox_xy == (1000, 800) and comp.pairs == []
    assert transforms_csv(comp.transforms) == (
        "slice,m00,m10,m01,m11,m02,m12\n3,1.0,0.0,0.0,1.0,0.0,0.0\n4,1.0,0.0,0.0,1.0,0.0,0.0\n"
    )
