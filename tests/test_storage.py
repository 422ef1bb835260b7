"""The storage layer, with the same assertions on the local root and the GCS emulator."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
from conftest import point_storage, unique_bucket
from faultproxy import FaultProxy, fail_first

from emprocess import storage
from emprocess.errors import (
    BucketNotFound,
    InvalidBucketName,
    InvalidInput,
    InvalidKey,
    InvalidURL,
    ObjectNotFound,
    StorageError,
)
from emprocess.settings import StorageEnv, env_name, environ, load
from emprocess.storage import gcs as gcs_backend


def test_write_read_whole_and_ranges(bucket: str) -> None:
    url = f"gs://{bucket}/run/align/x.bin"
    data = bytes(range(256)) * 40
    storage.write_bytes(url, data)
    assert storage.read_bytes(url) == data
    assert storage.read_bytes(url, 10, 20) == data[10:20]
    assert storage.read_bytes(url, 10_000) == data[10_000:]
    assert storage.read_bytes(url, 0, 1) == data[:1]
    assert storage.read_bytes(url, 5, 5) == b""
    assert storage.read_bytes(url, 10_000, 20_000) == data[10_000:]
    storage.write_bytes(url, b"second")  # overwrite
    assert storage.read_bytes(url) == b"second"


def test_missing_object_and_bucket_are_named(bucket: str) -> None:
    with pytest.raises(ObjectNotFound, match=rf"'nope/x.png'.*'{bucket}'"):
        storage.read_bytes(f"gs://{bucket}/nope/x.png")
    missing = unique_bucket("missing")
    with pytest.raises(BucketNotFound, match=missing):
        storage.read_bytes(f"gs://{missing}/x.png")
    with pytest.raises(BucketNotFound, match=missing):
        storage.write_bytes(f"gs://{missing}/x.png", b"1")
    with pytest.raises(BucketNotFound, match=missing):
        storage.list_keys(f"gs://{missing}/")
    assert storage.exists(f"gs://{missing}/x.png") is False


def test_exists_and_delete(bucket: str) -> None:
    url = f"gs://{bucket}/a/b.txt"
    assert not storage.exists(url)
    storage.write_bytes(url, b"x")
    assert storage.exists(url)
    storage.delete(url)
    assert not storage.exists(url)
    storage.delete(url)  # missing is fine by default
    with pytest.raises(ObjectNotFound, match=r"a/b\.txt"):
        storage.delete(url, missing_ok=False)


def test_list_by_string_prefix(bucket: str) -> None:
    keys = ["r1/align/a.png", "r1/align/b.png", "r1/alignx/c", "r1/z", "r2/a", "top"]
    for k in keys:
        storage.write_bytes(f"gs://{bucket}/{k}", k.encode())
    assert storage.list_keys(f"gs://{bucket}/") == sorted(keys)
    assert storage.list_keys(f"gs://{bucket}/r1/align/") == ["r1/align/a.png", "r1/align/b.png"]
    assert storage.list_keys(f"gs://{bucket}/r1/align") == [
        "r1/align/a.png",
        "r1/align/b.png",
        "r1/alignx/c",
    ]
    assert storage.list_keys(f"gs://{bucket}/r9") == []
    infos = storage.list_objects(f"gs://{bucket}/r1/z")
    assert [(i.key, i.size) for i in infos] == [("r1/z", 4)]
    assert abs(infos[0].updated.timestamp() - time.time()) < 120


def test_writes_are_atomic_for_readers(bucket: str) -> None:
    url = f"gs://{bucket}/big.bin"
    payloads = [bytes([i]) * 3_000_000 for i in (1, 2)]
    storage.write_bytes(url, payloads[0])
    stop = threading.Event()
    seen: list[bytes] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            storage.write_bytes(url, payloads[i % 2])
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(15):
            seen.append(storage.read_bytes(url))
    finally:
        stop.set()
        t.join()
    assert all(s in payloads for s in seen), "a reader saw a partly written object"


def test_create_bucket_is_idempotent_and_delete_needs_force(backend: str) -> None:
    name = unique_bucket()
    assert not storage.bucket_exists(name)
    assert storage.create_bucket(name) is True
    assert storage.create_bucket(name) is False
    assert storage.bucket_exists(name)
    storage.write_bytes(f"gs://{name}/k", b"1")
    with pytest.raises(StorageError, match="not empty"):
        storage.delete_bucket(name)
    storage.delete_bucket(name, force=True)
    assert not storage.bucket_exists(name)
    storage.create_bucket(name)
    storage.delete_bucket(name)
    assert not storage.bucket_exists(name)


@pytest.mark.parametrize(
    "name",
    [
        "ab",
        "a" * 64,
        "Upper",
        "has space",
        "-dash-first",
        "dash-last-",
        "under_",
        "192.168.5.4",
        "goog-bucket",
        "my-google-data",
        "my-g00gle-data",
        "a..b",
        "a.-b",
        "x/y",
        "",
    ],
)
def test_bad_bucket_names_are_refused_on_both_backends(backend: str, name: str) -> None:
    with pytest.raises(InvalidBucketName) as err:
        storage.create_bucket(name)
    assert repr(name) in str(err.value)
    if name and "/" not in name:
        with pytest.raises(InvalidBucketName):
            storage.read_bytes(f"gs://{name}/k")


@pytest.mark.parametrize("name", ["abc", "a-b_c.d", "run_tmp_foo-1234abcd", "a" * 63, "0ab"])
def test_good_bucket_names_pass(name: str) -> None:
    assert storage.check_bucket_name(name) == name


@pytest.mark.parametrize(
    "key", ["../x", "a/../../b", "a/./b", "/abs", "a\x00b", "a\nb", "x" * 1025]
)
def test_keys_that_leave_their_bucket_are_refused(bucket: str, key: str) -> None:
    with pytest.raises(InvalidKey):
        storage.write_bytes(f"gs://{bucket}/{key}", b"1")
    with pytest.raises(InvalidKey):
        storage.read_bytes(f"gs://{bucket}/{key}")
    # Nothing escaped: the bucket is still empty.
    assert storage.list_keys(f"gs://{bucket}/") == []


def test_folder_keys_and_bad_urls_are_refused(bucket: str) -> None:
    with pytest.raises(InvalidKey, match="folder"):
        storage.write_bytes(f"gs://{bucket}/a/", b"1")
    with pytest.raises(InvalidKey, match="empty"):
        storage.read_bytes(f"gs://{bucket}")
    with pytest.raises(InvalidURL, match="s3"):
        storage.read_bytes("s3://bucket/key")
    with pytest.raises(InvalidURL, match="no bucket"):
        storage.read_bytes("gs:///key")
    with pytest.raises(InvalidURL, match="host"):
        storage.read_bytes("file://otherhost/x")


def test_storage_class_and_lifecycle_are_recorded(bucket: str, backend: str) -> None:
    with pytest.raises(ValueError, match="'COLD'"):
        storage.set_storage_class(bucket, "COLD")
    with pytest.raises(ValueError, match="-1"):
        storage.set_lifecycle_delete(bucket, -1)
    with pytest.raises(BucketNotFound):
        storage.set_lifecycle_delete(unique_bucket("missing"), 3)
    storage.set_storage_class(bucket, "COLDLINE")
    storage.set_lifecycle_delete(bucket, 3)
    if backend == "local":  # the emulator accepts but does not keep these settings
        assert storage.bucket_settings(bucket) == {
            "storage_class": "COLDLINE",
            "lifecycle_delete_age_days": 3,
        }


def test_local_lifecycle_is_applied_by_cleanup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    point_storage(monkeypatch, str(root))
    storage.create_bucket("src_tmp_run1")
    storage.create_bucket("src_process")
    for b in ("src_tmp_run1", "src_process"):
        storage.write_bytes(f"gs://{b}/old/tile.bin", b"old")
        storage.write_bytes(f"gs://{b}/new/tile.bin", b"new")
        old = root / b / "old" / "tile.bin"
        os.utime(old, (time.time() - 5 * 86400, time.time() - 5 * 86400))
    storage.set_lifecycle_delete("src_tmp_run1", 3)
    assert storage.apply_lifecycle() == 1
    assert storage.list_keys("gs://src_tmp_run1/") == ["new/tile.bin"]
    assert storage.list_keys("gs://src_process/") == ["new/tile.bin", "old/tile.bin"]
    # The bucket metadata lives outside the buckets and never shows in listings.
    assert not any(p.name.endswith(".json") for p in (root / "src_tmp_run1").rglob("*"))


def test_apply_lifecycle_needs_a_local_root(monkeypatch: pytest.MonkeyPatch) -> None:
    point_storage(monkeypatch, None)
    with pytest.raises(ValueError, match="EMPROCESS_STORAGE_ROOT"):
        storage.apply_lifecycle()


def test_the_storage_choice_is_explicit_and_refused_when_bad(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``storage.use`` steers this process without touching os.environ; ``environ`` hands
    the same settings to a child; a root that is a file is refused, naming the variable."""
    assert env_name(StorageEnv, "storage_root") == storage.ROOT_ENV
    point_storage(monkeypatch, None)
    chosen = load(StorageEnv, storage_root=tmp_path / "sub" / ".." / "root")
    assert chosen.storage_root == tmp_path / "root"  # absolute, for children elsewhere
    before = dict(os.environ)
    with storage.use(chosen):
        assert storage.local_root() == tmp_path / "root"
        storage.create_bucket("chosen-bucket")
        assert (tmp_path / "root" / "chosen-bucket").is_dir()
    assert dict(os.environ) == before
    assert storage.local_root() is None  # the environment's choice again: GCS
    child = environ(chosen)
    assert child == {
        "EMPROCESS_STORAGE_ROOT": str(tmp_path / "root"),
        "EMPROCESS_STORAGE_RETRY_S": "120.0",
    }
    monkeypatch.setenv("EMPROCESS_STORAGE_ROOT", child["EMPROCESS_STORAGE_ROOT"])
    storage.configure(None)  # as a new process does: the environment at its first call
    assert storage.settings() == chosen
    # Written for GCS, the root is empty: the child does not inherit its parent's root.
    assert environ(load(StorageEnv, storage_root=None))["EMPROCESS_STORAGE_ROOT"] == ""
    monkeypatch.setenv("EMPROCESS_STORAGE_ROOT", "")
    storage.configure(None)
    assert storage.local_root() is None
    (tmp_path / "a-file").write_bytes(b"")
    monkeypatch.setenv("EMPROCESS_STORAGE_ROOT", str(tmp_path / "a-file"))
    storage.configure(None)
    with pytest.raises(InvalidInput, match=r"EMPROCESS_STORAGE_ROOT='.*a-file'.* is not a folder"):
        storage.local_root()
    from emprocess.services.align import create_app

    with pytest.raises(InvalidInput, match="EMPROCESS_STORAGE_ROOT"):
        create_app()  # a service refuses it at start-up
    monkeypatch.setenv("EMPROCESS_STORAGE_ROOT", str(tmp_path))
    monkeypatch.setenv("EMPROCESS_STORAGE_RETRY_S", "soon")
    storage.configure(None)
    with pytest.raises(InvalidInput, match="EMPROCESS_STORAGE_RETRY_S='soon'"):
        storage.settings()


def test_storage_settings_are_read_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment is read at the process's first storage call (or where it starts:
    ``configure``), not per call: a later variable changes nothing, bad or good."""
    point_storage(monkeypatch, tmp_path)
    first = storage.settings()
    assert first.storage_root == tmp_path
    chosen = load(StorageEnv, storage_root=tmp_path / "chosen")
    monkeypatch.setenv("EMPROCESS_STORAGE_ROOT", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("EMPROCESS_STORAGE_RETRY_S", "soon")  # bad, but read by nobody
    assert storage.settings() is first and storage.local_root() == tmp_path
    assert storage.configure(chosen) is first  # hands back the settings it replaces
    assert storage.settings() is chosen
    with storage.use(first):  # the explicit override still wins inside its block
        assert storage.local_root() == tmp_path
    assert storage.local_root() == tmp_path / "chosen"


def test_a_service_app_configures_storage_once_at_creation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service reads its storage settings where its app is created: the variables at
    creation hold for every request after it (a later change is not seen)."""
    from emprocess.sample import write_sample
    from emprocess.services.align import create_app

    point_storage(monkeypatch, tmp_path)
    write_sample("gs://app-src", 2, 64, 64, seed=1)
    client = create_app().test_client()
    (tmp_path / "elsewhere").mkdir()  # an empty root: the slices are not there
    monkeypatch.setenv("EMPROCESS_STORAGE_ROOT", str(tmp_path / "elsewhere"))
    answer = client.post(
        "/", json={"pre": "gs://app-src/img.00000.png", "post": "gs://app-src/img.00001.png"}
    )
    assert answer.status_code == 200, answer.get_json()
    assert storage.local_root() == tmp_path


def test_make_public_is_a_local_noop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    point_storage(monkeypatch, tmp_path)
    storage.create_bucket("src_ng_run1")
    assert "no-op" in storage.make_public("src_ng_run1")
    with pytest.raises(BucketNotFound):
        storage.make_public(unique_bucket("missing"))


def test_file_urls_and_plain_paths_work_anywhere(tmp_path: Path, backend: str) -> None:
    url = f"file://{tmp_path}/deep/folder/x.bin"
    storage.write_bytes(url, b"abc")
    assert (tmp_path / "deep/folder/x.bin").read_bytes() == b"abc"
    assert storage.read_bytes(str(tmp_path / "deep/folder/x.bin"), 1) == b"bc"
    assert storage.list_keys(f"{tmp_path}/deep/") == [f"{str(tmp_path)[1:]}/deep/folder/x.bin"]
    assert storage.exists(f"file://{tmp_path}/deep/folder/x.bin")
    with pytest.raises(ObjectNotFound, match=r"missing\.bin"):
        storage.read_bytes(f"{tmp_path}/missing.bin")


def test_tensorstore_writes_where_the_url_points(bucket: str) -> None:
    """A sharded precomputed volume written through kvstore_spec is seen by the storage layer."""
    url = f"gs://{bucket}/neuroglancer/jpeg"
    sharding = {
        "@type": "neuroglancer_uint64_sharded_v1",
        "hash": "identity",
        "preshift_bits": 3,
        "minishard_bits": 0,
        "shard_bits": 0,
        "minishard_index_encoding": "gzip",
        "data_encoding": "raw",
    }
    spec = {
        "driver": "neuroglancer_precomputed",
        "kvstore": storage.kvstore_spec(url),
        "multiscale_metadata": {"type": "image", "data_type": "uint8", "num_channels": 1},
        "scale_metadata": {
            "size": [64, 64, 8],
            "resolution": [8, 8, 8],
            "encoding": "raw",
            "chunk_size": [32, 32, 8],
            "sharding": sharding,
        },
        "create": True,
    }
    data = np.random.default_rng(0).integers(0, 255, (64, 64, 8, 1), dtype=np.uint8)
    vol = ts.open(spec).result()
    vol[...] = data
    info = json.loads(storage.read_bytes(f"{url}/info"))
    assert info["scales"][0]["sharding"]["@type"] == "neuroglancer_uint64_sharded_v1"
    keys = storage.list_keys(f"{url}/")
    assert any(k.endswith(".shard") for k in keys), keys
    reread = ts.open(
        {"driver": "neuroglancer_precomputed", "kvstore": storage.kvstore_spec(url)}
    ).result()
    np.testing.assert_array_equal(reread.read().result(), data)


# -- GCS-only: what the client sends, and how it reacts to faults ----------------


@pytest.fixture
def proxied(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch):
    point_storage(monkeypatch, None)
    with FaultProxy(gcs_emulator) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        yield proxy


def test_transient_failures_are_retried(proxied: FaultProxy) -> None:
    name = unique_bucket()
    storage.create_bucket(name)
    storage.write_bytes(f"gs://{name}/k", b"payload")
    proxied.rules.append(fail_first(1, 503, lambda r: r.method == "GET"))
    proxied.rules.append(fail_first(1, 429, lambda r: r.method == "POST"))
    proxied.requests.clear()
    assert storage.read_bytes(f"gs://{name}/k") == b"payload"
    storage.write_bytes(f"gs://{name}/k2", b"again")
    assert storage.read_bytes(f"gs://{name}/k2") == b"again"
    gets = [r for r in proxied.requests if r.method == "GET"]
    assert len(gets) >= 3  # failed read, retried read, read of k2


def test_client_errors_are_not_retried(proxied: FaultProxy) -> None:
    name = unique_bucket()
    storage.create_bucket(name)
    storage.write_bytes(f"gs://{name}/k", b"payload")
    proxied.rules.append(fail_first(5, 403, lambda r: r.method == "GET"))
    proxied.requests.clear()
    with pytest.raises(StorageError, match="403"):
        storage.read_bytes(f"gs://{name}/k")
    assert len(proxied.requests) == 1


def test_retries_can_be_turned_off(proxied: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env_name(StorageEnv, "storage_retry_s"), "0")
    storage.configure(None)  # read again at the next call, as by a process started with it
    name = unique_bucket()
    storage.create_bucket(name)
    storage.write_bytes(f"gs://{name}/k", b"payload")
    proxied.rules.append(fail_first(1, 503, lambda r: r.method == "GET"))
    with pytest.raises(StorageError, match="503"):
        storage.read_bytes(f"gs://{name}/k")


def test_gcs_bucket_settings_requests(proxied: FaultProxy) -> None:
    name = unique_bucket()
    storage.create_bucket(name)
    proxied.requests.clear()
    storage.set_lifecycle_delete(name, 3)
    storage.set_storage_class(name, "COLDLINE")
    patches = [json.loads(r.body) for r in proxied.requests if r.method == "PATCH"]
    assert {"action": {"type": "Delete"}, "condition": {"age": 3}} in patches[0]["lifecycle"][
        "rule"
    ]
    assert patches[1]["storageClass"] == "COLDLINE"


def test_gcs_make_public_sets_cors_and_all_users_reader(proxied: FaultProxy) -> None:
    name = unique_bucket()
    storage.create_bucket(name)
    # The emulator has no IAM endpoint: answer it here and record what we are sent.
    policy = {"version": 3, "etag": "CAE=", "bindings": []}
    proxied.rules.append(
        lambda r: (
            (200, json.dumps(policy).encode()) if r.path.split("?")[0].endswith("/iam") else None
        )
    )
    proxied.requests.clear()
    assert "public-read" in storage.make_public(name)
    cors = [json.loads(r.body)["cors"] for r in proxied.requests if r.method == "PATCH"]
    assert cors and cors[0][0]["origin"] == ["*"] and "Range" in cors[0][0]["responseHeader"]
    put = [json.loads(r.body) for r in proxied.requests if r.method == "PUT"]
    assert {"role": "roles/storage.objectViewer", "members": ["allUsers"]} in put[0]["bindings"]


def test_an_existing_bucket_is_adopted_only_if_ours(backend: str, local_root: Path) -> None:
    name = unique_bucket()
    assert storage.create_bucket(name) is True
    assert storage.create_bucket(name) is False  # ours: adopted, a retried run goes on
    foreign = unique_bucket("foreign")
    if backend == "local":
        (local_root / foreign).mkdir()
    else:
        gcs_backend.client().create_bucket(foreign)
    assert storage.create_bucket(foreign) is False  # empty: nothing to overwrite, adopted
    storage.delete(f"gs://{foreign}/{storage.MARKER_KEY}")
    storage.write_bytes(f"gs://{foreign}/data.bin", b"theirs")
    with pytest.raises(storage.ForeignBucket, match=rf"'{foreign}' exists and holds data"):
        storage.create_bucket(foreign)
    storage.adopt_bucket(foreign)
    assert storage.create_bucket(foreign) is False
    assert storage.list_keys(f"gs://{foreign}/") == ["data.bin"]  # the marker is not listed


def test_links_out_of_a_bucket_are_refused(
    local_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_storage(monkeypatch, str(local_root))
    name = unique_bucket()
    storage.create_bucket(name)
    outside = local_root.parent / f"outside-{name}"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    (local_root / name / "file-link").symlink_to(outside / "secret.txt")
    (local_root / name / "dir-link").symlink_to(outside)
    (local_root / name / "inner").mkdir()
    (local_root / name / "inner" / "a").write_bytes(b"a")
    (local_root / name / "inner-link").symlink_to(local_root / name / "inner" / "a")
    for key in ("file-link", "dir-link/secret.txt"):
        with pytest.raises(InvalidKey, match="link leading out of it"):
            storage.read_bytes(f"gs://{name}/{key}")
    with pytest.raises(InvalidKey, match="link leading out of it"):
        storage.write_bytes(f"gs://{name}/dir-link/new/x.bin", b"x")
    assert not (outside / "new").exists()
    assert storage.read_bytes(f"gs://{name}/inner-link") == b"a"  # a link inside is harmless
    os.mkfifo(local_root / name / "fifo")
    with pytest.raises(InvalidInput, match="not a regular file"):
        storage.read_bytes(f"gs://{name}/fifo")  # a FIFO would block the open
    linked = unique_bucket("linked")
    (local_root / linked).symlink_to(outside)
    with pytest.raises(InvalidKey, match="is a link leading out"):
        storage.read_bytes(f"gs://{linked}/secret.txt")


def test_reads_are_bounded(bucket: str) -> None:
    url = f"gs://{bucket}/six.bin"
    storage.write_bytes(url, b"123456")
    assert storage.read_bytes(url, max_bytes=6) == b"123456"
    assert storage.read_bytes(url, 2, max_bytes=4) == b"3456"
    with pytest.raises(storage.ObjectTooLarge, match="holds more than 5 bytes"):
        storage.read_bytes(url, max_bytes=5)
    storage.write_bytes(url, b"")
    assert storage.read_bytes(url, max_bytes=5) == b""


@pytest.mark.parametrize(
    "url", ["/etc/passwd", "file:///etc/passwd", "../x", "~/.bashrc", "gs://bucket/", "gs:/b/x"]
)
def test_services_take_gs_objects_only(url: str) -> None:
    with pytest.raises(InvalidInput):
        storage.check_service_url(url)
    assert storage.check_service_url("gs://bucket/a/b.png") == "gs://bucket/a/b.png"
