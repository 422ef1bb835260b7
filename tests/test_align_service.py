"""The alignment service through real gunicorn, on both storage backends and both payload shapes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from conftest import ALIGN_MAX_PIXELS, point_storage, unique_bucket

from emprocess import affine, storage

# A known transform: 1.3 degrees, 0.6% scale, -0.4% shear, (37, -21) px.
KNOWN = affine.from_matrix(
    np.array(
        [[np.cos(0.0227) * 1.006, -np.sin(0.0227) - 0.004, 37.0],
         [np.sin(0.0227), np.cos(0.0227) * 1.006, -21.0]]
    )
)  # fmt: skip


def put_png(url: str, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    storage.write_bytes(url, buf.tobytes())


@pytest.fixture
def pair(bucket: str, real_slices: tuple[Path, Path]) -> tuple[str, str, list[float]]:
    """pre = a real slice; post = pre warped by KNOWN. Returns URLs and the true post->pre map."""
    pre = cv2.imread(str(real_slices[0]), cv2.IMREAD_GRAYSCALE)
    post = cv2.warpAffine(pre, affine.to_matrix(KNOWN), pre.shape[::-1], flags=cv2.INTER_CUBIC)
    put_png(f"gs://{bucket}/img.00012.png", pre)
    put_png(f"gs://{bucket}/img.00013.png", post)
    return f"gs://{bucket}/img.00012.png", f"gs://{bucket}/img.00013.png", affine.invert(KNOWN)


def post(url: str, body: object) -> requests.Response:
    return requests.post(url + "/", json=body, timeout=120)


def test_health(align_service: str) -> None:
    r = requests.get(align_service + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["service"] == "align"


def test_new_shape_recovers_known_transform(align_service: str, pair: tuple) -> None:
    pre_url, post_url, truth = pair
    r = post(align_service, {"pre": pre_url, "post": post_url, "downsample": 1})
    assert r.status_code == 200, r.text
    res = r.json()
    assert (res["width"], res["height"], res["width0"], res["height0"]) == (520, 520, 520, 520)
    assert res["affine_found"] and res["translation_found"]
    assert affine.mean_corner_error(res["affine"], truth, 520, 520) < 0.3
    assert res["affine_inliers"] >= 20 and res["affine_mean_residual_px"] < 1.0
    assert len(res["translation"]) == 6 and res["translation"][:4] == [1, 0, 0, 1]


def test_legacy_fiji_shape_with_downsample(align_service: str, pair: tuple, tmp_path: Path) -> None:
    pre_url, post_url, truth = pair
    canary = tmp_path / "executed"
    body = {
        "command": f'/fiji/ImageJ -Dpre="img1.png" -Dpost="img2.png" -- --headless "fiji_align.bsh"; touch {canary}',
        "input-map": {
            "img1.png": pre_url + "?downsample=2",
            "img2.png": post_url + "?downsample=2",
        },
        "input-str": {"fiji_align.bsh": f"exec('touch {canary}')"},
    }
    r = post(align_service, body)
    assert r.status_code == 200, r.text
    res = r.json()
    assert (res["width"], res["height"]) == (260, 260)
    full = affine.rescale(res["affine"], 2)
    assert affine.mean_corner_error(full, truth, 520, 520) < 1.5
    assert not canary.exists(), "the legacy command or script was executed"


def test_blank_image_gives_identity_not_found(align_service: str, bucket: str) -> None:
    blank = np.full((300, 300), 128, np.uint8)
    put_png(f"gs://{bucket}/a.png", blank)
    put_png(f"gs://{bucket}/b.png", blank)
    r = post(align_service, {"pre": f"gs://{bucket}/a.png", "post": f"gs://{bucket}/b.png"})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["affine_found"] is False and res["translation_found"] is False
    assert res["affine"] == [1, 0, 0, 1, 0, 0] and res["translation"] == [1, 0, 0, 1, 0, 0]


def test_sixteen_bit_tiff(align_service: str, bucket: str, real_slices: tuple[Path, Path]) -> None:
    pre8 = cv2.imread(str(real_slices[0]), cv2.IMREAD_GRAYSCALE)
    post8 = cv2.warpAffine(pre8, affine.to_matrix(KNOWN), pre8.shape[::-1], flags=cv2.INTER_CUBIC)
    for name, img in (("a.tif", pre8), ("b.tif", post8)):
        _, buf = cv2.imencode(".tif", img.astype(np.uint16) * 200 + 1000)
        storage.write_bytes(f"gs://{bucket}/{name}", buf.tobytes())
    r = post(align_service, {"pre": f"gs://{bucket}/a.tif", "post": f"gs://{bucket}/b.tif"})
    assert r.status_code == 200, r.text
    assert affine.mean_corner_error(r.json()["affine"], affine.invert(KNOWN), 520, 520) < 0.3


def _bad(align_service: str, body: object, *expected: str) -> None:
    r = requests.post(align_service + "/", json=body, timeout=60)
    assert r.status_code == 400, (r.status_code, r.text)
    message = r.json()["error"]
    for part in expected:
        assert part in message, (part, message)
    assert "Traceback" not in r.text


def test_bad_requests_get_400_naming_the_problem(
    align_service: str, pair: tuple, bucket: str
) -> None:
    pre_url, post_url, _ = pair
    storage.write_bytes(f"gs://{bucket}/junk.png", b"this is not a png at all")
    missing_bucket = unique_bucket("missing")
    _bad(align_service, {"pre": pre_url, "post": f"gs://{bucket}/nope.png"}, "nope.png", bucket)
    _bad(align_service, {"pre": pre_url, "post": f"gs://{missing_bucket}/x.png"}, missing_bucket)
    _bad(
        align_service, {"pre": pre_url, "post": f"gs://{bucket}/junk.png"}, "junk.png", "not a PNG"
    )
    _bad(align_service, {"pre": pre_url, "post": post_url, "downsample": 0}, "downsample", "0")
    _bad(align_service, {"pre": pre_url, "post": post_url, "downsample": 2.5}, "downsample", "2.5")
    _bad(align_service, {"pre": pre_url, "post": post_url, "downsample": "x"}, "downsample")
    _bad(align_service, {"pre": pre_url, "post": post_url, "colour": 1}, "unknown key 'colour'")
    _bad(align_service, {"pre": pre_url, "post": post_url, "params": {"ratio": 7}}, "ratio")
    _bad(
        align_service,
        {"pre": pre_url, "post": post_url, "params": {"sift": 1}},
        "unknown key 'sift'",
    )
    _bad(align_service, {"pre": pre_url}, "missing key 'post'")
    _bad(align_service, {"pre": pre_url, "post": "s3://b/x.png"}, "s3")
    _bad(align_service, [1, 2], "JSON object")
    legacy = {"command": '-Dpre="a.png" -Dpost="b.png"', "input-map": {"a.png": pre_url}}
    _bad(align_service, legacy, "'b.png'")
    legacy = {
        "command": '-Dpre="a" -Dpost="b"',
        "input-map": {"a": pre_url + "?downsample=0", "b": post_url},
    }
    _bad(align_service, legacy, "downsample must be >= 1")
    legacy = {
        "command": '-Dpre="a" -Dpost="b"',
        "input-map": {"a": pre_url + "?downsample=2", "b": post_url + "?downsample=4"},
    }
    _bad(align_service, legacy, "different downsample")
    json_type = {"Content-Type": "application/json"}
    r = requests.post(align_service + "/", data=b"{not json", headers=json_type, timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]


def test_very_different_sizes_and_pixel_limit(align_service: str, bucket: str) -> None:
    put_png(f"gs://{bucket}/small.png", np.zeros((200, 200), np.uint8))
    put_png(f"gs://{bucket}/wide.png", np.zeros((200, 600), np.uint8))
    put_png(f"gs://{bucket}/huge.png", np.zeros((2001, 2000), np.uint8))
    small, wide, huge = (f"gs://{bucket}/{n}.png" for n in ("small", "wide", "huge"))
    _bad(align_service, {"pre": small, "post": wide}, "200x200", "600x200")
    _bad(align_service, {"pre": small, "post": huge}, "huge.png", str(ALIGN_MAX_PIXELS))


def test_internal_failure_is_a_short_500(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Injected fault: the kernel crashes. The answer is 500 with a short message, no traceback."""
    from emprocess.services import align as align_service_module

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(align_service_module, "align_pair", boom)
    point_storage(monkeypatch, str(tmp_path))
    storage.create_bucket("src")
    img = np.random.default_rng(0).integers(0, 255, (100, 100), dtype=np.uint8)
    for name in ("a.png", "b.png"):
        put_png(f"gs://src/{name}", img)
    client = align_service_module.create_app().test_client()
    r = client.post("/", json={"pre": "gs://src/a.png", "post": "gs://src/b.png"})
    assert r.status_code == 500
    assert r.json == {"error": "internal error in align: RuntimeError"}
