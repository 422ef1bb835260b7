"""POST /features and pair requests that match stored features, through real gunicorn."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from emprocess import layout, storage
from emprocess.kernels.align import SliceFeatures
from emprocess.kernels.features import decode_features

FIBSEM = Path(__file__).resolve().parents[2] / "shared" / "data" / "fibsem"
RUN = "run1"


@pytest.fixture
def stack(bucket: str) -> list[str]:
    """Four real FIB-SEM slices in the bucket; the run's process bucket exists."""
    paths = [FIBSEM / f"img.{z:05d}.png" for z in range(4)]
    if not all(p.exists() for p in paths):
        pytest.fail(
            f"real FIB-SEM stack not found in {FIBSEM}: ../shared/data must sit beside the checkout"
        )
    storage.create_bucket(layout.process_bucket(bucket))
    urls = []
    for p in paths:
        storage.write_bytes(f"gs://{bucket}/{p.name}", p.read_bytes())
        urls.append(f"gs://{bucket}/{p.name}")
    return urls


def post(url: str, body: object) -> requests.Response:
    return requests.post(url, json=body, timeout=120)


def stored(bucket: str) -> dict[str, bytes]:
    prefix = f"gs://{layout.process_bucket(bucket)}/{RUN}/{layout.FEATURES}/"
    keys = storage.list_keys(prefix)
    return {k.rsplit("/", 1)[-1]: storage.read_bytes(f"gs://{layout.process_bucket(bucket)}/{k}")
            for k in keys}  # fmt: skip


def without(answer: dict, *keys: str) -> dict:
    return {k: v for k, v in answer.items() if k not in ("seconds", *keys)}


def test_features_once_then_pairs_match_them_like_images(
    align_service: str, bucket: str, stack: list[str]
) -> None:
    for url in stack:
        r = post(align_service + "/features", {"img": url, "run_id": RUN, "downsample": 2})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["already_stored"] is False and answer["count"] > 100
        assert (answer["width"], answer["source_width"]) == (260, 520)
    objects = stored(bucket)
    assert sorted(k.split(".")[1] for k in objects) == [f"{z:05d}" for z in range(4)]
    assert len(objects) == 4 and all(k.endswith(".feat") for k in objects)
    # A repeated request finds them and rewrites nothing.
    again = post(align_service + "/features", {"img": stack[0], "run_id": RUN, "downsample": 2})
    assert again.json()["already_stored"] is True and stored(bucket) == objects

    for d in (1, 3):
        pair = {"pre": stack[0], "post": stack[d], "downsample": 2}
        plain = post(align_service + "/", pair).json()
        fast = post(align_service + "/", {**pair, "run_id": RUN}).json()
        assert fast["features"] == {"pre": "stored", "post": "stored", "retry_decoded": False}
        assert without(fast, "features") == without(plain)
        assert fast["affine_found"] and fast["width"] == 260
    assert stored(bucket) == objects  # no pair extracted again


def test_pair_computes_missing_features_and_stores_them(
    align_service: str, bucket: str, stack: list[str]
) -> None:
    pair = {"pre": stack[1], "post": stack[2], "run_id": RUN}
    first = post(align_service + "/", pair).json()
    assert first["features"] == {"pre": "computed", "post": "computed", "retry_decoded": False}
    objects = stored(bucket)
    assert len(objects) == 2
    features, header = decode_features(next(iter(objects.values())), 10_000_000)
    assert header["recipe"]["steps"] == 3 and header["slice"] in (stack[1], stack[2])
    assert len(features.xy) == header["count"] > 100
    second = post(align_service + "/", pair).json()
    assert second["features"] == {"pre": "stored", "post": "stored", "retry_decoded": False}
    assert without(second, "features") == without(first, "features")
    # Another recipe is another set of features, beside the first.
    other = post(align_service + "/", {**pair, "params": {"max_features": 500}}).json()
    assert other["features"]["pre"] == "computed" and len(stored(bucket)) == 4


def test_replaced_slice_gets_new_features(
    align_service: str, bucket: str, stack: list[str]
) -> None:
    body = {"img": stack[0], "run_id": RUN}
    assert post(align_service + "/features", body).json()["already_stored"] is False
    flipped = cv2.imencode(".png", cv2.imread(str(FIBSEM / "img.00000.png"), 0)[::-1].copy())[1]
    storage.write_bytes(stack[0], flipped.tobytes())
    assert post(align_service + "/features", body).json()["already_stored"] is False
    assert len(stored(bucket)) == 2


def test_no_model_decodes_for_the_retries_and_answers_like_images(
    align_service: str, bucket: str, stack: list[str]
) -> None:
    blank = cv2.imencode(".png", np.zeros((520, 520), np.uint8))[1].tobytes()
    storage.write_bytes(f"gs://{bucket}/blank.png", blank)
    pair = {"pre": stack[0], "post": f"gs://{bucket}/blank.png", "params": {"max_steps": 4}}
    plain = post(align_service + "/", pair).json()
    fast = post(align_service + "/", {**pair, "run_id": RUN}).json()
    assert fast["features"]["retry_decoded"] is True and fast["attempts"] == 3
    assert without(fast, "features") == without(plain)
    assert not fast["affine_found"]


def test_refusals_name_the_problem(align_service: str, bucket: str, stack: list[str]) -> None:
    def bad(path: str, body: object, *expected: str) -> None:
        r = post(align_service + path, body)
        assert r.status_code == 400, r.text
        for text in expected:
            assert text in r.json()["error"]

    bad("/features", {"img": stack[0], "run_id": "../x"}, "run_id")
    bad("/features", {"img": stack[0], "run_id": RUN, "channel_files": [stack[1]]}, "channel")
    bad("/features", {"img": stack[0], "run_id": RUN, "bucket": "other"}, "bucket")
    bad("/features", {"img": f"gs://{bucket}/nope.png", "run_id": RUN}, "nope.png")
    other = f"gs://{bucket}-x/img.png"
    bad("/features", {"img": other, "run_id": RUN}, f"{bucket}-x")
    # The slice's bucket has no process bucket: nothing is written elsewhere.
    lone = stack[0].replace(bucket, bucket + "l")
    storage.create_bucket(bucket + "l")
    storage.write_bytes(lone, storage.read_bytes(stack[0]))
    bad("/", {"pre": lone, "post": lone, "run_id": RUN}, f"{bucket}l_process", "does not exist")
    bad("/features", {"img": stack[0], "run_id": RUN, "downsample": 64}, "fewer than 16")


def test_a_planted_object_is_bounded_checked_and_replaced(
    align_service: str, bucket: str, stack: list[str]
) -> None:
    """What lies at a features key is read with a byte bound and used only when its
    header names the same digest; anything else is extracted again and overwritten."""
    from emprocess.kernels.align import AlignParams
    from emprocess.kernels.features import encode_features, max_encoded_bytes
    from emprocess.models import FeaturesRequest
    from emprocess.services.features import features_url

    body = {"img": stack[2], "run_id": RUN}
    url, described = features_url(FeaturesRequest(**body), AlignParams())
    assert url.startswith(f"gs://{layout.process_bucket(bucket)}/{RUN}/{layout.FEATURES}/")
    too_big = b"\0" * (max_encoded_bytes(1000) + 1)
    foreign = encode_features(
        SliceFeatures(520, 520, np.zeros((1, 2)), np.zeros((1, 128), np.float32)),
        {**described, "digest": "0" * 16, "source_width": 520, "source_height": 520},
    )
    for planted in (too_big, b"\x80\x04not features", foreign):
        storage.write_bytes(url, planted)
        answer = post(align_service + "/features", body).json()
        assert answer["already_stored"] is False and answer["count"] > 100
        _, header = decode_features(storage.read_bytes(url), len(storage.read_bytes(url)))
        assert header["digest"] == described["digest"]
