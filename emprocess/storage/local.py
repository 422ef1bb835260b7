"""The embedded default backend: buckets are directories under a storage root.

Writes go to a hidden temporary file in the target directory and are renamed
into place, so a reader never sees half an object. Bucket settings that GCS
keeps as metadata (lifecycle, storage class) are recorded in
``ROOT/.emprocess/buckets/BUCKET.json``; :func:`apply_lifecycle` enforces them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from emprocess.errors import (
    BucketNotFound,
    InvalidInput,
    InvalidKey,
    ObjectNotFound,
    StorageError,
)

log = logging.getLogger(__name__)

TMP_PREFIX = ".emprocess-tmp-"
META_DIR = ".emprocess"
# The object that marks a bucket as made by emprocess (see storage.create_bucket); not
# listed, so local lifecycle rules and listings never see it.
MARKER_KEY = ".emprocess-bucket"
# How errors name this backend: never the root's path, which is the server's business.
WHERE = "local storage"


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: key within its bucket, size in bytes, last write time (UTC)."""

    key: str
    size: int
    updated: datetime


class LocalBackend:
    """Objects as files. ``root`` holds one directory per bucket.

    With ``bucket == ""`` a key is an absolute path below ``root`` (the file://
    case, ``root`` being "/", for the CLI's own files); parents are then created on
    write. A named bucket must exist before objects are written to it, as on GCS.

    Objects of a named bucket are regular files whose real path lies inside the
    bucket's folder: a symlink leading out of its bucket (or a bucket folder that
    is a link) is refused for reading and writing, and so are devices, FIFOs and
    sockets, which are opened without blocking and never read.
    """

    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _bucket_dir(self, bucket: str) -> Path:
        return self.root / bucket if bucket else self.root

    def _path(self, bucket: str, key: str) -> Path:
        if not key or key.endswith("/"):
            raise InvalidKey(f"object key {key!r} names a folder, not an object")
        return self._bucket_dir(bucket) / key

    def _require_bucket(self, bucket: str) -> None:
        if bucket and not (self.root / bucket).is_dir():
            raise BucketNotFound(bucket, WHERE)

    def resolve_inside(self, bucket: str, key: str, path: Path) -> Path:
        """``path`` with every link resolved, refused when that leaves the bucket's folder.

        The nearest existing ancestor is resolved when ``path`` does not exist yet
        (a write), so no folder is created through a link either.
        """
        if not bucket:
            return path
        real_root = os.path.realpath(self.root)
        base = os.path.realpath(self.root / bucket)
        if not os.path.isdir(base):
            raise BucketNotFound(bucket, WHERE)
        if base != os.path.join(real_root, bucket):
            raise InvalidKey(f"bucket {bucket!r} is a link leading out of the {WHERE} root")
        probe = path
        while not os.path.lexists(probe) and probe != probe.parent:
            probe = probe.parent
        real = os.path.realpath(probe)
        if real != base and not real.startswith(base + os.sep):
            raise InvalidKey(f"object {key!r} of bucket {bucket!r} is a link leading out of it")
        return Path(real) / path.relative_to(probe) if probe != path else Path(real)

    def check_regular(self, bucket: str, key: str, real: Path) -> None:
        """Refuse ``real`` (a resolved path) when it exists and is not a regular file."""
        try:
            mode = os.stat(real).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return
        if not stat.S_ISREG(mode):
            raise InvalidInput(f"object {key!r} of bucket {bucket or '/'!r} is not a regular file")

    def read(
        self, bucket: str, key: str, start: int | None = None, end: int | None = None
    ) -> bytes:
        path = self.resolve_inside(bucket, key, self._path(bucket, key))
        try:
            # O_NONBLOCK: a FIFO must not block the open; it is refused just below.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            self._require_bucket(bucket)
            raise ObjectNotFound(bucket or "/", key, WHERE) from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    raise ObjectNotFound(bucket or "/", key, WHERE)
                raise InvalidInput(
                    f"object {key!r} of bucket {bucket or '/'!r} is not a regular file"
                )
            if start:
                f.seek(start)
            if end is None:
                return f.read()
            return f.read(max(0, end - (start or 0)))

    def write(self, bucket: str, key: str, data: bytes, content_type: str | None = None) -> None:
        self.write_stream(bucket, key, [data], lambda: b"", 0, content_type)

    def write_stream(
        self,
        bucket: str,
        key: str,
        parts: Iterable[bytes],
        head: Callable[[], bytes],
        head_nbytes: int,
        content_type: str | None = None,
    ) -> None:
        del content_type  # files carry no content type
        self._require_bucket(bucket)
        path = self.resolve_inside(bucket, key, self._path(bucket, key))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
        except (NotADirectoryError, FileExistsError) as e:
            raise StorageError(
                f"cannot write {key!r} in bucket {bucket or '/'!r}: a parent is an object, "
                "not a folder"
            ) from e
        try:
            with os.fdopen(fd, "wb") as f:
                f.seek(head_nbytes)
                for part in parts:
                    f.write(part)
                if head_nbytes:
                    f.seek(0)
                    f.write(_exact(head(), head_nbytes, key))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, bucket: str, key: str) -> bool:
        return self.resolve_inside(bucket, key, self._path(bucket, key)).is_file()

    def delete(self, bucket: str, key: str, missing_ok: bool = True) -> None:
        try:
            self._path(bucket, key).unlink()
        except FileNotFoundError:
            self._require_bucket(bucket)
            if not missing_ok:
                raise ObjectNotFound(bucket or "/", key, WHERE) from None

    def list(self, bucket: str, prefix: str = "", limit: int | None = None) -> list[ObjectInfo]:
        self._require_bucket(bucket)
        base = self._bucket_dir(bucket)
        # Walk only below the deepest folder the prefix names, and in that folder only the
        # entries its last part starts with: listing RUN/align/transforms.json must not
        # stat the tens of thousands of cache objects beside it. Filter the rest by string.
        folder, _, stem = prefix.rpartition("/")
        out = [
            info for info in self._walk(base, base / folder, stem) if info.key.startswith(prefix)
        ]
        return sorted(out, key=lambda i: i.key)[:limit]

    def _walk(self, base: Path, top: Path, stem: str = "") -> Iterator[ObjectInfo]:
        if not top.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(top):
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if d != META_DIR]
            if stem and dirpath == str(top):
                dirnames[:] = [d for d in dirnames if d.startswith(stem)]
                filenames = [f for f in filenames if f.startswith(stem)]
            for fn in filenames:
                if fn.startswith(TMP_PREFIX) or (fn == MARKER_KEY and Path(dirpath) == base):
                    continue
                p = Path(dirpath) / fn
                try:
                    st = p.stat()
                except FileNotFoundError:  # deleted while we walked
                    continue
                yield ObjectInfo(
                    key=p.relative_to(base).as_posix(),
                    size=st.st_size,
                    updated=datetime.fromtimestamp(st.st_mtime, tz=UTC),
                )

    # -- buckets ---------------------------------------------------------------

    def _meta_path(self, bucket: str) -> Path:
        return self.root / META_DIR / "buckets" / f"{bucket}.json"

    def _read_meta(self, bucket: str) -> dict:
        try:
            return json.loads(self._meta_path(bucket).read_text())
        except FileNotFoundError:
            return {}

    def _write_meta(self, bucket: str, meta: dict) -> None:
        self._require_bucket(bucket)
        p = self._meta_path(bucket)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, p)

    def bucket_exists(self, bucket: str) -> bool:
        return (self.root / bucket).is_dir()

    def create_bucket(self, bucket: str) -> bool:
        path = self.root / bucket
        if path.is_dir():
            return False
        path.mkdir(parents=True, exist_ok=True)
        return True

    def delete_bucket(self, bucket: str, force: bool = False) -> None:
        self._require_bucket(bucket)
        path = self.root / bucket
        if force:
            shutil.rmtree(path)
        elif any(path.iterdir()):
            raise StorageError(f"bucket {bucket!r} is not empty; pass force=True to delete it")
        else:
            path.rmdir()
        self._meta_path(bucket).unlink(missing_ok=True)

    def set_lifecycle_delete(self, bucket: str, age_days: int) -> None:
        meta = self._read_meta(bucket)
        meta["lifecycle_delete_age_days"] = age_days
        self._write_meta(bucket, meta)

    def set_storage_class(self, bucket: str, storage_class: str) -> None:
        meta = self._read_meta(bucket)
        meta["storage_class"] = storage_class
        self._write_meta(bucket, meta)

    def bucket_settings(self, bucket: str) -> dict:
        self._require_bucket(bucket)
        return self._read_meta(bucket)

    def apply_lifecycle(self, now: float | None = None) -> int:
        """Delete every object older than its bucket's lifecycle age; return how many."""
        now = time.time() if now is None else now
        meta_dir = self.root / META_DIR / "buckets"
        deleted = 0
        for meta_file in sorted(meta_dir.glob("*.json")) if meta_dir.is_dir() else []:
            bucket = meta_file.stem
            age = json.loads(meta_file.read_text()).get("lifecycle_delete_age_days")
            if age is None or not self.bucket_exists(bucket):
                continue
            cutoff = now - age * 86400
            for info in self.list(bucket):
                if info.updated.timestamp() <= cutoff:
                    self.delete(bucket, info.key)
                    deleted += 1
            log.info("lifecycle: bucket %s, rule delete after %s days applied", bucket, age)
        return deleted


def _exact(head: bytes, nbytes: int, key: str) -> bytes:
    """``head`` if it is ``nbytes`` long (what the writer reserved for it)."""
    if len(head) != nbytes:
        raise StorageError(f"the head of {key!r} is {len(head)} bytes, {nbytes} were reserved")
    return head
