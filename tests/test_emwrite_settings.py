"""emwrite reads its settings once, when the app is made, and hands them to every request."""

from __future__ import annotations

import importlib

import pytest

from emprocess.errors import InvalidInput
from emprocess.layout import RunLayout
from emprocess.services import emwrite
from emprocess.settings import ServiceEnv, load


def _slice_body(bbox: list[int]) -> dict[str, object]:
    run = RunLayout("settings-src", "r1")
    return {
        "img": "img.00000.png",
        "transform": "[1, 0, 0, 1, 0, 0]",
        "bbox": bbox,
        "dest": run.source,
        "dest-tmp": run.tmp,
        "slice": 0,
        "run_id": run.run_id,
    }


def test_the_app_uses_the_settings_it_was_made_with(monkeypatch: pytest.MonkeyPatch) -> None:
    small = load(ServiceEnv, emwrite_max_pixels=10_000)
    client = emwrite.create_app(small).test_client()
    # The environment changed after the app was made does not reach its requests.
    monkeypatch.setenv("EMPROCESS_EMWRITE_MAX_PIXELS", str(1 << 30))
    r = client.post("/alignedslice", json=_slice_body([101, 100]))
    assert r.status_code == 400
    assert r.get_json()["error"].endswith("bbox [101, 100] has more than 10000 pixels")
    assert client.get("/health").status_code == 200


def test_a_bad_setting_stops_the_app_not_the_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMPROCESS_WINDOW_PX", "1000")  # not a multiple of 1024
    importlib.reload(emwrite)  # the module reads nothing when imported
    with pytest.raises(InvalidInput, match=r"EMPROCESS_WINDOW_PX=.1000.: "):
        emwrite.create_app()
    monkeypatch.delenv("EMPROCESS_WINDOW_PX")
    assert emwrite.create_app() is not None
