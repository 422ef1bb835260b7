"""A run's buckets are made in the source bucket's location (or conf ``location``), Standard.

fake-gcs-server gives every bucket the location it was started with and ignores the
location and class a create asks for, so a second emulator started in EUROPE-WEST1
stands for the source's region, and a recording proxy in front of it shows what each
bucket creation asked for.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
from conftest import _emulator_binary, point_storage, unique_bucket
from faultproxy import FaultProxy

from emprocess import storage
from emprocess.layout import INIT
from emprocess.localrun import free_port, stop_process, wait_http
from emprocess.workflow import stages
from emprocess.workflow.conf import InvalidRunConf, parse_conf

REGION = "EUROPE-WEST1"


@pytest.fixture(scope="module")
def regional_emulator() -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(_emulator_binary()), "-backend", "memory", "-scheme", "http", "-host",
         "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "warn",
         "-location", REGION],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_http(f"{url}/storage/v1/b", proc=proc)
        yield url
    finally:
        stop_process(proc)


@pytest.fixture
def proxy(regional_emulator: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    with FaultProxy(regional_emulator) as p:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", p.url)
        point_storage(monkeypatch, None)
        yield p


def _info(source: str, **extra: object) -> stages.RunInfo:
    conf = parse_conf(
        {"id": "r1", "source": source, "image": "img.%05d.png", "minz": 0, "maxz": 1, **extra}
    )
    return stages.RunInfo(conf=conf, width=1, slice_size_xy=(40, 30), dag_id="test")


def _created(proxy: FaultProxy) -> dict[str, tuple[str | None, str | None]]:
    """Bucket name -> (location, storage class) of each bucket-create request sent."""
    out = {}
    for r in proxy.requests:
        if r.method == "POST" and r.path.split("?")[0] == "/storage/v1/b":
            body = json.loads(r.body)
            out[body["name"]] = (body.get("location"), body.get("storageClass"))
    return out


def test_run_buckets_go_where_the_source_is(proxy: FaultProxy) -> None:
    source = unique_bucket("src")
    storage.create_bucket(source)
    assert storage.bucket_location(source) == REGION
    proxy.requests.clear()
    info = _info(source)
    stages.create_env(info, "manual__1")
    names = info.conf.layout.bucket_names()
    assert _created(proxy) == {
        names[role]: (REGION, "STANDARD") for role in ("process", "tmp", "ng", "chunk")
    }
    assert storage.bucket_settings(names["ng"])["location"] == REGION
    init = json.loads(storage.read_bytes(info.conf.layout.process_url(INIT)))
    assert init["location"] == REGION


def test_conf_location_overrides_the_source_location(proxy: FaultProxy) -> None:
    source = unique_bucket("src")
    storage.create_bucket(source)
    proxy.requests.clear()
    info = _info(source, location="ASIA-EAST1", createRawPyramid=False)
    stages.create_env(info, "manual__1")
    assert set(_created(proxy).values()) == {("ASIA-EAST1", "STANDARD")}
    assert len(_created(proxy)) == 3


def test_a_bad_location_or_storage_class_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    point_storage(monkeypatch, None)
    with pytest.raises(InvalidRunConf, match="location"):
        _info("src", location="us central/1")
    with pytest.raises(ValueError, match="storage class 'COLD' is not one of"):
        storage.create_bucket(unique_bucket("src"), storage_class="COLD")


def test_an_unreadable_source_location_falls_back_to_the_default(proxy: FaultProxy) -> None:
    # GCS answers 403 to a bucket get without storage.buckets.get (a reader of another
    # project's slices): the run goes on in GCS's default location.
    source = unique_bucket("src")
    storage.create_bucket(source)
    denied = json.dumps({"error": {"code": 403, "message": "no storage.buckets.get"}}).encode()
    proxy.rules.append(
        lambda r: (
            (403, denied) if r.method == "GET" and r.path.split("?")[0].endswith(source) else None
        )
    )
    proxy.requests.clear()
    info = _info(source, createRawPyramid=False)
    stages.create_env(info, "manual__1")
    assert set(_created(proxy).values()) == {(None, "STANDARD")}
