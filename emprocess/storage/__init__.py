"""The one storage layer: objects and buckets on Google Cloud Storage or on local disk.

URLs:
    ``gs://BUCKET/KEY``: Google Cloud Storage, unless the storage settings name a
    local root (``EMPROCESS_STORAGE_ROOT``, or the caller's choice through :func:`use`),
    in which case every bucket is a subdirectory of it (the embedded default; the same
    run and conf work on a laptop and in the cloud).
    ``file:///abs/path`` or a plain path: the local file system, anywhere. Only the
    CLI and scripts use these, for the user's own files; the services' request models
    take ``gs://`` URLs only (:func:`check_service_url`), and under the storage root
    no link may lead out of its bucket.

Byte ranges are half-open: ``start`` inclusive, ``end`` exclusive.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from emprocess.errors import BucketNotFound, InvalidInput, StorageError
from emprocess.storage.local import MARKER_KEY, WHERE, LocalBackend, ObjectInfo
from emprocess.storage.names import (
    Location,
    bucket_url,
    check_bucket_name,
    check_key,
    check_run_id,
    check_service_url,
    join,
    parse_url,
)

if TYPE_CHECKING:
    from emprocess.settings import StorageEnv
    from emprocess.storage.gcs import GCSBackend

__all__ = [
    "MARKER_KEY",
    "ROOT_ENV",
    "ForeignBucket",
    "Location",
    "ObjectInfo",
    "ObjectTooLarge",
    "adopt_bucket",
    "apply_lifecycle",
    "backend_description",
    "bucket_exists",
    "bucket_location",
    "bucket_settings",
    "bucket_url",
    "check_bucket_name",
    "check_inside",
    "check_key",
    "check_run_id",
    "check_service_url",
    "configure",
    "create_bucket",
    "delete",
    "delete_bucket",
    "exists",
    "join",
    "kvstore_spec",
    "list_keys",
    "list_objects",
    "local_root",
    "make_public",
    "parse_url",
    "read_bytes",
    "set_lifecycle_delete",
    "set_storage_class",
    "settings",
    "use",
    "write_bytes",
]

log = logging.getLogger(__name__)

ROOT_ENV = "EMPROCESS_STORAGE_ROOT"
"""The variable of ``StorageEnv.storage_root`` (for messages; the schema reads it)."""


class ObjectTooLarge(InvalidInput):
    """An object is larger than the reader allows (a request's input: HTTP 400)."""


class Backend(Protocol):
    name: str

    def read(
        self, bucket: str, key: str, start: int | None = None, end: int | None = None
    ) -> bytes: ...
    def write(
        self, bucket: str, key: str, data: bytes, content_type: str | None = None
    ) -> None: ...
    def write_stream(
        self,
        bucket: str,
        key: str,
        parts: Iterable[bytes],
        head: Callable[[], bytes],
        head_nbytes: int,
        content_type: str | None = None,
    ) -> None: ...
    def exists(self, bucket: str, key: str) -> bool: ...
    def delete(self, bucket: str, key: str, missing_ok: bool = True) -> None: ...
    def list(self, bucket: str, prefix: str = "", limit: int | None = None) -> list[ObjectInfo]: ...
    def bucket_exists(self, bucket: str) -> bool: ...
    def delete_bucket(self, bucket: str, force: bool = False) -> None: ...
    def set_lifecycle_delete(self, bucket: str, age_days: int) -> None: ...
    def set_storage_class(self, bucket: str, storage_class: str) -> None: ...
    def bucket_settings(self, bucket: str) -> dict: ...


_chosen: StorageEnv | None = None
_process: StorageEnv | None = None


def configure(chosen: StorageEnv | None) -> StorageEnv | None:
    """Fix the storage settings of this process; returns the ones it replaces.

    Called where a process starts (a service's app) with the settings it read once;
    None forgets them, so the next storage call reads the environment again (the test
    suite does so between tests). Without a call, the first storage call of the process
    reads the environment, once: an Airflow task runs in a process of its own, so that
    is at its start. The CLI chooses with :func:`use`, which wins over both.
    """
    global _process
    saved, _process = _process, chosen
    return saved


def settings() -> StorageEnv:
    """The storage settings in force: the caller's choice (:func:`use`), else the process's
    (:func:`configure`, or the environment read at the first call of the process).

    Raises:
        InvalidInput: a bad ``EMPROCESS_STORAGE_*`` variable, named.
    """
    if _chosen is not None:
        return _chosen
    found = _process
    if found is None:
        # Here, not at import: the DAG file imports this package, and pydantic-settings
        # would add a quarter of a second to every parse.
        from emprocess.settings import StorageEnv, load

        found = load(StorageEnv)
        configure(found)
    return found


@contextmanager
def use(chosen: StorageEnv) -> Iterator[StorageEnv]:
    """Storage goes where ``chosen`` says while the block runs, in every thread of the process.

    The CLI's explicit choice (``emprocess run FOLDER``, ``demo``): it replaces the
    process's settings for the block without writing ``os.environ``; processes it
    starts get the same settings through :func:`emprocess.settings.environ`.
    """
    global _chosen
    saved, _chosen = _chosen, chosen
    try:
        yield chosen
    finally:
        _chosen = saved


def local_root() -> Path | None:
    """The local storage root of :func:`settings`, or None for GCS."""
    return settings().storage_root


def _gcs() -> GCSBackend:
    from emprocess.storage.gcs import GCSBackend  # google-cloud-storage only when used

    return GCSBackend()


def _bucket_backend() -> LocalBackend | GCSBackend:
    root = local_root()
    return LocalBackend(root) if root else _gcs()


def _resolve(url: str, *, allow_empty_key: bool = False) -> tuple[Backend, Location]:
    loc = parse_url(url, allow_empty_key=allow_empty_key)
    if loc.scheme == "file":
        return LocalBackend(Path("/")), loc
    return _bucket_backend(), loc


def backend_description() -> str:
    """Where ``gs://`` URLs and bucket names point now, for logs and reports."""
    root = local_root()
    return f"local storage root {root}" if root else "Google Cloud Storage"


# -- objects -----------------------------------------------------------------


def read_bytes(
    url: str, start: int | None = None, end: int | None = None, *, max_bytes: int | None = None
) -> bytes:
    """Read a whole object, or the byte range [start, end).

    Args:
        url: the object.
        start: first byte, inclusive.
        end: last byte, exclusive.
        max_bytes: refuse an object (or range) longer than this; at most
            ``max_bytes + 1`` bytes are ever transferred.

    Raises:
        ObjectNotFound / BucketNotFound: naming the bucket and key.
        ObjectTooLarge: more than ``max_bytes``.
    """
    if (start is not None and start < 0) or (end is not None and end < 0):
        raise ValueError(f"byte range must be non-negative, got start={start} end={end}")
    backend, loc = _resolve(url)
    if max_bytes is None:
        return backend.read(loc.bucket, loc.key, start, end)
    limit = (start or 0) + max_bytes + 1
    data = backend.read(loc.bucket, loc.key, start, limit if end is None else min(end, limit))
    if len(data) > max_bytes:
        raise ObjectTooLarge(f"{url} holds more than {max_bytes} bytes, the limit")
    return data


def check_inside(url: str, *, regular_file: bool = False) -> None:
    """Refuse an object under the local root that is a link leading out of its bucket.

    For readers and writers that do not go through this layer (tensorstore follows
    links, and opens a FIFO or device as if it were a file); ``regular_file`` also
    refuses an existing object that is not a regular file (a folder, FIFO, device or
    socket). On GCS, and for an object that does not exist, there is nothing to check.
    """
    backend, loc = _resolve(url)
    if isinstance(backend, LocalBackend) and loc.bucket:
        real = backend.resolve_inside(loc.bucket, loc.key, backend.root / loc.bucket / loc.key)
        if regular_file:
            backend.check_regular(loc.bucket, loc.key, real)


def write_bytes(url: str, data: bytes, content_type: str | None = None) -> None:
    """Write an object atomically (no reader sees half of it); repeating it is harmless."""
    backend, loc = _resolve(url)
    backend.write(loc.bucket, loc.key, data, content_type)


def write_stream(
    url: str,
    parts: Iterable[bytes],
    head: Callable[[], bytes],
    head_nbytes: int,
    content_type: str | None = None,
) -> None:
    """Write an object made while it is written, whose head is known only at the end.

    The object is ``head()`` (exactly ``head_nbytes`` long, called once ``parts`` is
    exhausted) followed by every part, in order; parts are written as they come, so
    the object is never whole in memory. Atomic as :func:`write_bytes`: a local file is
    written under a temporary name (parts after a gap of ``head_nbytes``, then the
    head) and renamed; on GCS the parts are a resumable upload to a temporary object,
    composed behind the head into the object, and the temporary objects deleted.
    """
    backend, loc = _resolve(url)
    backend.write_stream(loc.bucket, loc.key, parts, head, head_nbytes, content_type)


def exists(url: str) -> bool:
    """Whether the object exists (False also when its bucket does not)."""
    backend, loc = _resolve(url)
    if loc.bucket and not backend.bucket_exists(loc.bucket):
        return False
    return backend.exists(loc.bucket, loc.key)


def delete(url: str, missing_ok: bool = True) -> None:
    """Delete an object; a missing one is fine unless ``missing_ok`` is False."""
    backend, loc = _resolve(url)
    backend.delete(loc.bucket, loc.key, missing_ok)


def list_objects(url_prefix: str, limit: int | None = None) -> list[ObjectInfo]:
    """Every object whose key starts with the URL's key (a string prefix, as on GCS).

    Keys in the result are relative to the bucket (for file:// URLs: the full
    path without its leading slash), sorted; ``limit`` keeps the first ones (on
    GCS only those are fetched).
    """
    backend, loc = _resolve(url_prefix, allow_empty_key=True)
    if not loc.bucket or not MARKER_KEY.startswith(loc.key):
        return backend.list(loc.bucket, loc.key, limit)
    more = None if limit is None else limit + 1
    return [i for i in backend.list(loc.bucket, loc.key, more) if i.key != MARKER_KEY][:limit]


def list_keys(url_prefix: str, limit: int | None = None) -> list[str]:
    """The keys of :func:`list_objects`."""
    return [info.key for info in list_objects(url_prefix, limit)]


# -- buckets -----------------------------------------------------------------


# MARKER_KEY: the object this layer writes into every bucket it creates, the mark of a
# bucket that is ours. Listings leave it out; deleting an otherwise empty bucket removes it.
_MARKER = b'{"created_by": "emprocess"}\n'


class ForeignBucket(StorageError):
    """A bucket exists under a name we would create, holds data, and was not made by us."""


def create_bucket(
    bucket: str,
    project: str | None = None,
    location: str | None = None,
    storage_class: str | None = None,
) -> bool:
    """Create a bucket and mark it as ours; True if created, False if adopted.

    On GCS ``location`` and ``storage_class`` (None: GCS's defaults) apply to a bucket
    created now; an adopted one keeps its own. A local root has neither.

    A bucket that exists already is adopted (not an error, so a retried run goes
    on) only when it holds :data:`MARKER_KEY` (it was made here), or when it is
    empty (nothing in it can be overwritten; e.g. a tmp bucket that its lifecycle
    rule emptied, marker included); it is marked then. A bucket with data and
    without the marker, made by hand or by another tool, raises ForeignBucket: a
    run never writes into a bucket whose data it did not write. The rule is the
    same on GCS and under a local root (GCS labels would do on GCS, but its
    emulator drops them).
    """
    check_bucket_name(bucket)
    backend = _bucket_backend()
    if isinstance(backend, LocalBackend):
        created = backend.create_bucket(bucket)
    else:
        if storage_class is not None and storage_class not in STORAGE_CLASSES:
            raise ValueError(f"storage class {storage_class!r} is not one of {STORAGE_CLASSES}")
        created = backend.create_bucket(
            bucket, project=project, location=location, storage_class=storage_class
        )
    if created or not backend.exists(bucket, MARKER_KEY):
        if not created and list_objects(f"gs://{bucket}/", limit=1):
            raise ForeignBucket(
                f"bucket {bucket!r} exists and holds data, but was not created by emprocess "
                f"(no {MARKER_KEY} object); a run never writes into a bucket whose data it did "
                "not write. Choose another run id or source, or, if the bucket is meant for "
                f"this run, adopt it: emprocess adopt-bucket {bucket}"
            )
        backend.write(bucket, MARKER_KEY, _MARKER, "application/json")
    return created


def adopt_bucket(bucket: str) -> None:
    """Mark an existing bucket as ours, so that runs write into it (``emprocess adopt-bucket``)."""
    check_bucket_name(bucket)
    backend = _bucket_backend()
    if not backend.bucket_exists(bucket):
        raise BucketNotFound(bucket, WHERE if isinstance(backend, LocalBackend) else "gcs")
    backend.write(bucket, MARKER_KEY, _MARKER, "application/json")


def bucket_exists(bucket: str) -> bool:
    check_bucket_name(bucket)
    return _bucket_backend().bucket_exists(bucket)


def delete_bucket(bucket: str, force: bool = False) -> None:
    """Delete a bucket; ``force`` deletes its objects first (the marker goes in any case)."""
    check_bucket_name(bucket)
    backend = _bucket_backend()
    if not force and backend.bucket_exists(bucket) and not list_objects(f"gs://{bucket}/", limit=1):
        backend.delete(bucket, MARKER_KEY)
    backend.delete_bucket(bucket, force)


def set_lifecycle_delete(bucket: str, age_days: int) -> None:
    """Have objects deleted ``age_days`` days after they were written.

    GCS enforces the rule itself; locally it is recorded and
    :func:`apply_lifecycle` enforces it.
    """
    check_bucket_name(bucket)
    if not isinstance(age_days, int) or age_days < 0:
        raise ValueError(f"age_days must be a whole number >= 0, got {age_days!r}")
    _bucket_backend().set_lifecycle_delete(bucket, age_days)


STORAGE_CLASSES = ("STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE")


def set_storage_class(bucket: str, storage_class: str) -> None:
    """Change the bucket's default storage class (recorded only, locally)."""
    check_bucket_name(bucket)
    if storage_class not in STORAGE_CLASSES:
        raise ValueError(f"storage class {storage_class!r} is not one of {STORAGE_CLASSES}")
    _bucket_backend().set_storage_class(bucket, storage_class)


def bucket_location(bucket: str) -> str | None:
    """The bucket's GCS location (e.g. ``US-CENTRAL1``); None under a local root."""
    check_bucket_name(bucket)
    backend = _bucket_backend()
    if isinstance(backend, LocalBackend):
        return None
    return backend.bucket_location(bucket)


def bucket_settings(bucket: str) -> dict:
    """The settings this layer manages: lifecycle age, storage class (and CORS on GCS)."""
    check_bucket_name(bucket)
    return _bucket_backend().bucket_settings(bucket)


def make_public(bucket: str) -> str:
    """Make a bucket public-read with CORS for neuroglancer; returns what was done.

    Locally this is a no-op (local files are served by ``emprocess view``).
    """
    check_bucket_name(bucket)
    backend = _bucket_backend()
    if isinstance(backend, LocalBackend):
        if not backend.bucket_exists(bucket):
            from emprocess.errors import BucketNotFound

            raise BucketNotFound(bucket, WHERE)
        msg = f"bucket {bucket!r} is local; public-read is a no-op (serve it with `emprocess view`)"
        log.info(msg)
        return msg
    backend.make_public(bucket)
    return f"bucket {bucket!r} is public-read with CORS for neuroglancer"


def apply_lifecycle(now: float | None = None) -> int:
    """Enforce the recorded lifecycle rules under the local root; returns objects deleted."""
    root = local_root()
    if root is None:
        raise ValueError(f"{ROOT_ENV} is not set: GCS applies lifecycle rules itself")
    return LocalBackend(root).apply_lifecycle(now)


# -- tensorstore -------------------------------------------------------------


def kvstore_spec(url: str) -> dict:
    """The tensorstore kvstore spec of a storage URL (a folder), so volumes land there.

    With ``STORAGE_EMULATOR_HOST`` set, also points tensorstore at the emulator
    (``TENSORSTORE_GCS_HTTP_URL`` and a test token) unless those are set already;
    tensorstore reads them once, so this must run before the first GCS open.
    """
    backend, loc = _resolve(url, allow_empty_key=True)
    key = loc.key.rstrip("/")
    if isinstance(backend, LocalBackend):
        base = backend.root / loc.bucket if loc.bucket else backend.root
        path = base / key
        if loc.bucket and (backend.root / loc.bucket).is_dir():
            # tensorstore follows links: no folder of the volume may lead out of the bucket.
            path = backend.resolve_inside(loc.bucket, key, path)
        return {"driver": "file", "path": str(path) + "/"}
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator)
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    return {"driver": "gcs", "bucket": loc.bucket, "path": key + "/" if key else ""}
