"""Storage failures name their cause and object (gs://BUCKET/KEY), never a server path.

Real failures where this machine can make them (tensorstore and the service meeting an
object where a folder must be; tests run as root, so permissions do not refuse here), and
the errors Python and tensorstore raise for the others, in the exact form they take.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import tensorstore as ts
import test_emwrite_service
from test_emwrite_service import post, post_ok

from emprocess import storage
from emprocess.errors import StorageError
from emprocess.storage.failures import describe_failure, scrub

bad_env = test_emwrite_service.bad_env  # a small run's buckets, ngmeta done (a fixture)


def test_tensorstore_and_os_errors_become_cause_on_url(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bkt").mkdir(parents=True)
    (root / "bkt" / "afile").write_bytes(b"")
    kv = ts.KvStore.open({"driver": "file", "path": f"{root}/bkt/"}).result()
    with pytest.raises(ValueError) as real:
        kv.write("afile/0.shard", b"x").result()
    assert describe_failure(real.value, root) == (
        "a parent is an object, not a folder on gs://bkt/afile"
    )
    path = str(root / "bkt" / "neuroglancer" / "jpeg" / "8_8_8" / "0.shard")
    for code, cause in [
        (errno.EACCES, "permission denied"),
        (errno.ENOSPC, "no space"),
        (errno.ENOENT, "not found"),
    ]:
        e = OSError(code, "os says", path)
        assert describe_failure(e, root) == f"{cause} on gs://bkt/neuroglancer/jpeg/8_8_8/0.shard"
    # The form the issue found in the service's log (tensorstore, a folder made unwritable).
    logged = ValueError(
        f'PERMISSION_DENIED: Error writing local file "{root}/bkt/ng/0.shard.__lock": '
        "Failed to acquire lock on file [os_error_code=13] [source locations='x.cc:12']"
    )
    assert describe_failure(logged, root) == "permission denied on gs://bkt/ng/0.shard.__lock"
    # Outside the root (or on GCS) a local path is only its name.
    assert describe_failure(OSError(errno.ENOSPC, "full", "/srv/x/tmpfile"), None) == (
        "no space on a local file 'tmpfile'"
    )
    gcs = ValueError("PERMISSION_DENIED: Error writing gs://my-ng/neuroglancer/jpeg/info: HTTP 403")
    assert describe_failure(gcs, None) == "permission denied on gs://my-ng/neuroglancer/jpeg/info"
    refused = StorageError("GCS write gs://b-1/k/x failed: 403 denied")
    refused.status = 403
    assert describe_failure(refused, None) == "permission denied on gs://b-1/k/x"
    # What is not a storage failure stays the caller's to describe.
    assert describe_failure(ValueError("bad number"), root) is None
    assert describe_failure(RuntimeError("x"), root) is None
    assert scrub(f"cannot read {root}/bkt/a/b now", root) == "cannot read gs://bkt/a/b now"


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_shard_write_that_fails_in_the_service_names_the_object(
    backend: str, emwrite_service: str, bad_env: dict[str, Any], local_root: Path
) -> None:
    """/ngshard meets an object where its scale's folder must be: a 500 saying so, with
    the object's gs:// URL and no server path; the same request succeeds once it is gone."""
    import json

    for z in range(4):
        post_ok(emwrite_service, "/alignedslice", {**bad_env["slice"], "slice": z})
    jpeg = f"gs://{bad_env['ng']}/neuroglancer/jpeg"
    scale0 = json.loads(storage.read_bytes(f"{jpeg}/info"))["scales"][0]["key"]
    storage.write_bytes(f"{jpeg}/{scale0}", b"in the way")
    r = post(emwrite_service, "/ngshard", bad_env["shard"])
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    said = f"emwrite: storage failed: a parent is an object, not a folder on {jpeg}/{scale0}/"
    assert error.startswith(said), error
    assert str(local_root) not in r.text and "ValueError" not in r.text
    storage.delete(f"{jpeg}/{scale0}")
    post_ok(emwrite_service, "/ngshard", bad_env["shard"])
