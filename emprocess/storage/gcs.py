"""Google Cloud Storage backend, through google-cloud-storage.

Transient failures (429, 5xx, connection errors and timeouts) are retried with
exponential backoff and jitter by the library's ``DEFAULT_RETRY`` policy; other
4xx answers are not retried. Uploads are retried too: every write of this
project is idempotent (the same key always gets the same bytes). With
``STORAGE_EMULATOR_HOST`` set the client talks to that emulator anonymously.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import TypeVar

from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.auth.credentials import AnonymousCredentials
from google.cloud.storage import Blob, Bucket, Client
from google.cloud.storage.retry import DEFAULT_RETRY

from emprocess.errors import BucketNotFound, InvalidKey, ObjectNotFound, StorageError
from emprocess.storage.local import ObjectInfo

log = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT_S = (10.0, 120.0)  # (connect, read) seconds for every request
STREAM_CHUNK_BYTES = 16 << 20  # a streamed upload holds this much (a multiple of 256 KiB)
TMP_PART = "emprocess-part-"  # temporary objects of a streamed upload: KEY.emprocess-part-*

# Public-read for neuroglancer: any origin may GET/HEAD, with Range support.
NEUROGLANCER_CORS = [
    {
        "origin": ["*"],
        "method": ["GET", "HEAD"],
        "responseHeader": ["Content-Type", "Range", "Content-Range", "Content-Length"],
        "maxAgeSeconds": 3600,
    }
]

_clients: dict[tuple[str | None, str | None], Client] = {}
_clients_lock = threading.Lock()


def client(project: str | None = None) -> Client:
    """A cached client for this process (one per emulator host and project)."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    cache_key = (emulator, project)
    with _clients_lock:
        if cache_key not in _clients:
            if emulator:
                _clients[cache_key] = Client(
                    project=project or "emulator", credentials=AnonymousCredentials()
                )
            else:
                _clients[cache_key] = Client(project=project)
        return _clients[cache_key]


def retry_policy() -> Retry | None:
    """DEFAULT_RETRY bounded by EMPROCESS_STORAGE_RETRY_S seconds (0 turns retries off)."""
    from emprocess import storage

    deadline = storage.settings().storage_retry_s
    return DEFAULT_RETRY.with_timeout(deadline) if deadline > 0 else None


class GCSBackend:
    """Objects in Google Cloud Storage (or its emulator)."""

    name = "gcs"

    def _call(self, what: str, bucket: str, key: str | None, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except gexc.NotFound as e:
            if not self.bucket_exists(bucket):
                raise BucketNotFound(bucket, "gcs") from None
            if key is not None:
                raise ObjectNotFound(bucket, key, "gcs") from None
            raise StorageError(f"GCS {what} bucket {bucket!r} failed: 404 {e.message}") from e
        except gexc.GoogleAPICallError as e:
            target = f"gs://{bucket}/{key}" if key is not None else f"bucket {bucket!r}"
            error = StorageError(f"GCS {what} {target} failed: {e.code} {e.message}")
            error.status = e.code
            raise error from e

    def _blob(self, bucket: str, key: str) -> Blob:
        if not key or key.endswith("/"):
            raise InvalidKey(f"object key {key!r} names a folder, not an object")
        return client().bucket(bucket).blob(key)

    def read(
        self, bucket: str, key: str, start: int | None = None, end: int | None = None
    ) -> bytes:
        blob = self._blob(bucket, key)
        if end is not None and end <= (start or 0):
            return b""
        # google-cloud-storage's `end` is inclusive; ours is exclusive.
        last = None if end is None else end - 1

        def download() -> bytes:
            try:
                return blob.download_as_bytes(
                    start=start, end=last, timeout=TIMEOUT_S, retry=retry_policy(), checksum=None
                )
            except gexc.RequestRangeNotSatisfiable:
                return b""  # the range starts at or past the end (an empty object too)

        return self._call("read", bucket, key, download)

    def write(self, bucket: str, key: str, data: bytes, content_type: str | None = None) -> None:
        blob = self._blob(bucket, key)
        self._call(
            "write",
            bucket,
            key,
            lambda: blob.upload_from_string(
                data,
                content_type=content_type or "application/octet-stream",
                timeout=TIMEOUT_S,
                retry=retry_policy(),
            ),
        )

    def write_stream(
        self,
        bucket: str,
        key: str,
        parts: Iterable[bytes],
        head: Callable[[], bytes],
        head_nbytes: int,
        content_type: str | None = None,
    ) -> None:
        blob = self._blob(bucket, key)
        stamp = uuid.uuid4().hex
        body, top = (self._blob(bucket, f"{key}.{TMP_PART}{stamp}.{n}") for n in ("body", "head"))
        kind = content_type or "application/octet-stream"

        def upload() -> None:
            with body.open(
                "wb", chunk_size=STREAM_CHUNK_BYTES, content_type=kind, retry=retry_policy()
            ) as f:
                for part in parts:
                    f.write(part)
            data = head()
            if len(data) != head_nbytes:
                raise StorageError(
                    f"the head of {key!r} is {len(data)} bytes, {head_nbytes} were reserved"
                )
            top.upload_from_string(data, content_type=kind, timeout=TIMEOUT_S, retry=retry_policy())
            blob.content_type = kind
            blob.compose([top, body], timeout=TIMEOUT_S, retry=retry_policy())

        try:
            self._call("write", bucket, key, upload)
        finally:
            for temporary in (top, body):  # a leftover is harmless: tmp buckets expire
                with contextlib.suppress(gexc.GoogleAPICallError):
                    temporary.delete(timeout=TIMEOUT_S)

    def exists(self, bucket: str, key: str) -> bool:
        blob = self._blob(bucket, key)
        return self._call(
            "exists", bucket, key, lambda: blob.exists(timeout=TIMEOUT_S, retry=retry_policy())
        )

    def delete(self, bucket: str, key: str, missing_ok: bool = True) -> None:
        blob = self._blob(bucket, key)
        try:
            self._call(
                "delete", bucket, key, lambda: blob.delete(timeout=TIMEOUT_S, retry=retry_policy())
            )
        except ObjectNotFound:
            if not missing_ok:
                raise

    def list(self, bucket: str, prefix: str = "", limit: int | None = None) -> list[ObjectInfo]:
        def run() -> list[ObjectInfo]:
            blobs = client().list_blobs(
                bucket,
                prefix=prefix or None,
                max_results=limit,
                timeout=TIMEOUT_S,
                retry=retry_policy(),
            )
            return [ObjectInfo(key=b.name, size=b.size or 0, updated=b.updated) for b in blobs]

        return sorted(self._call("list", bucket, None, run), key=lambda i: i.key)

    # -- buckets ---------------------------------------------------------------

    def bucket_exists(self, bucket: str) -> bool:
        try:
            client().get_bucket(bucket, timeout=TIMEOUT_S, retry=retry_policy())
        except gexc.NotFound:
            return False
        return True

    def create_bucket(
        self,
        bucket: str,
        project: str | None = None,
        location: str | None = None,
        storage_class: str | None = None,
    ) -> bool:
        c = client(project)
        new = c.bucket(bucket)
        if storage_class:
            new.storage_class = storage_class
        try:
            c.create_bucket(
                new, project=project, location=location, timeout=TIMEOUT_S, retry=retry_policy()
            )
        except gexc.Conflict:
            # 409: it exists. Fine if it is ours; GCS answers 403 on get when it is not.
            if not self.bucket_exists(bucket):
                raise StorageError(
                    f"bucket {bucket!r} exists but belongs to someone else"
                ) from None
            return False
        except gexc.GoogleAPICallError as e:
            raise StorageError(f"GCS create bucket {bucket!r} failed: {e.code} {e.message}") from e
        return True

    def delete_bucket(self, bucket: str, force: bool = False) -> None:
        b = client().bucket(bucket)
        try:
            self._call("delete", bucket, None, lambda: b.delete(force=force, timeout=TIMEOUT_S))
        except StorageError as e:
            # GCS answers 409 (the emulator 412) for a bucket that still holds objects.
            if isinstance(e.__cause__, gexc.Conflict | gexc.PreconditionFailed):
                raise StorageError(
                    f"bucket {bucket!r} is not empty; pass force=True to delete it"
                ) from None
            raise

    def _patch(self, bucket: str, what: str, change: Callable[[Bucket], None]) -> None:
        def run() -> None:
            b = client().get_bucket(bucket, timeout=TIMEOUT_S, retry=retry_policy())
            change(b)
            b.patch(timeout=TIMEOUT_S, retry=retry_policy())

        self._call(what, bucket, None, run)

    def set_lifecycle_delete(self, bucket: str, age_days: int) -> None:
        def change(b: Bucket) -> None:
            b.clear_lifecycle_rules()
            b.add_lifecycle_delete_rule(age=age_days)

        self._patch(bucket, "set lifecycle of", change)

    def set_storage_class(self, bucket: str, storage_class: str) -> None:
        def change(b: Bucket) -> None:
            b.storage_class = storage_class

        self._patch(bucket, "set storage class of", change)

    def bucket_location(self, bucket: str) -> str | None:
        def run() -> str | None:
            b = client().get_bucket(bucket, timeout=TIMEOUT_S, retry=retry_policy())
            return str(b.location) if b.location else None

        return self._call("read the location of", bucket, None, run)

    def bucket_settings(self, bucket: str) -> dict:
        def run() -> dict:
            b = client().get_bucket(bucket, timeout=TIMEOUT_S, retry=retry_policy())
            ages = [
                r.get("condition", {}).get("age")
                for r in b.lifecycle_rules
                if r.get("action", {}).get("type") == "Delete"
            ]
            out: dict = {"storage_class": b.storage_class, "cors": b.cors, "location": b.location}
            if ages:
                out["lifecycle_delete_age_days"] = ages[0]
            return out

        return self._call("read settings of", bucket, None, run)

    def make_public(self, bucket: str) -> None:
        def run() -> None:
            b = client().get_bucket(bucket, timeout=TIMEOUT_S, retry=retry_policy())
            b.cors = NEUROGLANCER_CORS
            b.patch(timeout=TIMEOUT_S, retry=retry_policy())
            policy = b.get_iam_policy(requested_policy_version=3, timeout=TIMEOUT_S)
            policy.bindings.append({"role": "roles/storage.objectViewer", "members": {"allUsers"}})
            b.set_iam_policy(policy, timeout=TIMEOUT_S)

        self._call("make public", bucket, None, run)
        log.info("bucket %s is now public-read with CORS for neuroglancer", bucket)
