"""Settings are read once per process, where it starts, and handed down (issue 22 item 4):
importing the services reads and writes no environment; a service's app reads its
settings when it is created, and later variables change nothing it does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import point_storage

from emprocess import storage
from emprocess.errors import InvalidInput

IMPORT_ONLY = """
import json, os
from emprocess.services import align, common, features, slicestats
before = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS")
try:
    align.create_app()
    refused = None
except Exception as e:
    refused = f"{type(e).__name__}: {e}"
print(json.dumps({"before": before, "refused": refused}))
"""


def _png(url: str, side: int) -> None:
    image = np.random.default_rng(side).integers(0, 255, (side, side), dtype=np.uint8)
    storage.write_bytes(url, cv2.imencode(".png", image)[1].tobytes())


def test_importing_the_services_reads_no_setting(tmp_path: Path) -> None:
    """A bad value stops the service when its app is created, not at import; and the
    OpenCV limit is not written into the environment by an import."""
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    env |= {"EMPROCESS_ALIGN_MAX_PIXELS": "lots", "EMPROCESS_STORAGE_ROOT": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ONLY], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["before"] is None
    assert found["refused"].startswith("InvalidInput: bad environment: ")
    assert "EMPROCESS_ALIGN_MAX_PIXELS='lots'" in found["refused"]


def test_the_opencv_limit_is_set_when_an_app_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emprocess.services.align import create_app

    point_storage(monkeypatch, tmp_path)
    monkeypatch.delenv("OPENCV_IO_MAX_IMAGE_PIXELS", raising=False)
    monkeypatch.setenv("EMPROCESS_ALIGN_MAX_PIXELS", "5000")
    monkeypatch.setenv("EMPROCESS_EMWRITE_MAX_PIXELS", "7000")
    create_app()
    assert os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] == "7000"  # the larger of the two
    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", "123")
    create_app()
    assert os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] == "123"  # one already set is kept


@pytest.mark.parametrize("path", ["/", "/features"])
def test_the_align_limit_is_the_one_read_at_creation(
    path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The align service's pixel limit is read once, by create_app, for both of its
    routes: a later variable neither tightens nor loosens it."""
    from emprocess.services.align import create_app

    point_storage(monkeypatch, tmp_path)
    storage.create_bucket("limits")
    storage.create_bucket("limits_process")
    for z in (0, 1):
        _png(f"gs://limits/img.{z}.png", 100)
    pair = {"pre": "gs://limits/img.0.png", "post": "gs://limits/img.1.png"}
    body = {"img": pair["pre"], "run_id": "r1"} if path == "/features" else pair

    monkeypatch.setenv("EMPROCESS_ALIGN_MAX_PIXELS", str(100 * 100 - 1))
    strict = create_app().test_client()
    monkeypatch.setenv("EMPROCESS_ALIGN_MAX_PIXELS", str(100 * 100))
    loose = create_app().test_client()
    monkeypatch.setenv("EMPROCESS_ALIGN_MAX_PIXELS", "1")  # read by neither app

    refused = strict.post(path, json=body)
    assert refused.status_code == 400, refused.get_json()
    assert f"over the limit of {100 * 100 - 1}" in refused.get_json()["error"]
    answered = loose.post(path, json=body)
    assert answered.status_code == 200, answered.get_json()


def test_a_bad_storage_variable_stops_the_app_not_a_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emprocess.services.align import create_app

    point_storage(monkeypatch, tmp_path)
    monkeypatch.setenv("EMPROCESS_STORAGE_RETRY_S", "-1")
    with pytest.raises(InvalidInput, match="EMPROCESS_STORAGE_RETRY_S='-1'"):
        create_app()
