"""Storage failures told by their cause and object: "permission denied on gs://B/K".

A write that fails inside a service fails in one of three libraries: Python's own file
calls (an ``OSError`` with an errno and a path), tensorstore (a ``ValueError`` whose text
is ``CODE: ...: "/path": Reason [os_error_code='13']`` or names ``gs://``) and
google-cloud-storage (a :class:`StorageError` of :mod:`emprocess.storage.gcs`).
:func:`describe_failure` turns any of them into one sentence naming the cause and the
object as the run knows it (``gs://BUCKET/KEY``: a local path under the storage root is
said that way), never a server path, so the client, the report and ``trigger --wait``
show what to fix instead of "internal error in emwrite: ValueError".
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

CAUSES = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "permission denied (read-only file system)",
    errno.ENOENT: "not found",
    errno.ENOSPC: "no space",
    errno.EDQUOT: "no space (quota)",
    errno.ENOTDIR: "a parent is an object, not a folder",
}
"""errno -> cause, as said to the client."""
STATUS_CAUSES = {
    "PERMISSION_DENIED": "permission denied",
    "NOT_FOUND": "not found",
    "RESOURCE_EXHAUSTED": "no space",
    "UNAUTHENTICATED": "permission denied (no credentials)",
}
"""tensorstore / absl status code -> cause, when no errno says more."""
HTTP_CAUSES = {
    401: "permission denied (no credentials)",
    403: "permission denied",
    404: "not found",
}

_OS_CODE = re.compile(r"os_error_code='?(\d+)'?")
_STATUS = re.compile(r"^([A-Z_]+): ")
_QUOTED_PATH = re.compile(r'"(/[^"]*)"')
_GS_URL = re.compile(r"gs://[a-z0-9][-a-z0-9_.]*[a-z0-9](?:/[^\s\"'\[\]]*)?")
_ABS_PATH = re.compile(r"(?<![\w:/])/[^\s\"'\[\]]+")


def describe_failure(e: BaseException, root: Path | None) -> str | None:
    """``cause on gs://BUCKET/KEY`` when ``e`` is a storage failure, else None.

    Args:
        e: the exception a request ended with.
        root: the storage root (local buckets are its folders); None on Google Cloud
            Storage, where a local path is never an object of the run.
    """
    from emprocess.errors import StorageError

    if isinstance(e, OSError) and e.errno in CAUSES:
        where = _object_of(str(e.filename), root) if e.filename else "storage"
        return f"{CAUSES[e.errno]} on {where}"
    text = str(e)
    if isinstance(e, ValueError) and (status := _STATUS.match(text)):
        code = _OS_CODE.search(text)
        cause = CAUSES.get(int(code.group(1))) if code else None
        cause = cause or STATUS_CAUSES.get(status.group(1))
        if cause is None:
            return None
        return f"{cause} on {_where(text, root)}"
    if isinstance(e, StorageError):
        status_code = getattr(e, "status", None)
        cause = HTTP_CAUSES.get(status_code) if isinstance(status_code, int) else None
        return f"{cause} on {_where(text, root)}" if cause else scrub(text, root)
    return None


def _where(text: str, root: Path | None) -> str:
    """The object a failure's text names: a gs:// URL, or a path under the root."""
    if url := _GS_URL.search(text):
        return url.group(0).rstrip(".,:;")
    if path := _QUOTED_PATH.search(text):
        return _object_of(path.group(1), root)
    return "storage"


def _object_of(path: str, root: Path | None) -> str:
    """``gs://BUCKET/KEY`` of a local path under ``root``; else only its name."""
    if root is not None:
        try:
            parts = Path(path).resolve().relative_to(Path(root).resolve()).parts
        except ValueError:
            parts = ()
        if parts:
            return "gs://" + "/".join(parts)
    return f"a local file {Path(path).name!r}"


def scrub(text: str, root: Path | None) -> str:
    """``text`` with every local path said as its ``gs://`` URL or its name."""
    return _ABS_PATH.sub(lambda m: _object_of(m.group(0).rstrip(".,:;"), root), text)
