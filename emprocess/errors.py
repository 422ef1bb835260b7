"""The project's exceptions: each message names the bad value and what was allowed."""

from __future__ import annotations


class EmprocessError(Exception):
    """Base class of every error this project raises on purpose."""


class InvalidInput(EmprocessError, ValueError):
    """A value given by the caller is not acceptable (HTTP 400 in the services)."""


class InvalidBucketName(InvalidInput):
    """A bucket name breaks Google Cloud Storage's naming rules."""


class InvalidKey(InvalidInput):
    """An object key that would leave its bucket or cannot be stored."""


class InvalidURL(InvalidInput):
    """A storage URL with an unknown scheme or missing parts."""


class NotFound(EmprocessError, FileNotFoundError):
    """Something that was expected to exist does not."""


class BucketNotFound(NotFound):
    """The bucket does not exist."""

    def __init__(self, bucket: str, backend: str = "") -> None:
        where = f" ({backend})" if backend else ""
        super().__init__(f"bucket {bucket!r} does not exist{where}")
        self.bucket = bucket


class ObjectNotFound(NotFound):
    """The object does not exist in an existing bucket."""

    def __init__(self, bucket: str, key: str, backend: str = "") -> None:
        where = f" ({backend})" if backend else ""
        super().__init__(f"object {key!r} not found in bucket {bucket!r}{where}")
        self.bucket = bucket
        self.key = key


class StorageError(EmprocessError):
    """A storage operation failed for a reason other than bad input or absence."""

    status: int | None = None
    """The HTTP status of Google Cloud Storage's answer, when it answered."""
