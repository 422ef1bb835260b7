"""Storage URLs and the naming rules that hold on every backend.

Bucket names follow Google Cloud Storage's rules on the local backend too, so a
name that works on a laptop works in the cloud. Keys may not leave their bucket.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from emprocess.errors import InvalidBucketName, InvalidInput, InvalidKey, InvalidURL

_BUCKET_CHARS = re.compile(r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")
# "google" and close misspellings may not appear in a bucket name.
_GOOGLE_LIKE = re.compile(r"g[o0][o0]g[l1]e")
MAX_KEY_BYTES = 1024
MAX_PART_BYTES = 255
"""Longest part between slashes: a file name on local disk (GCS would take more)."""
# A run id becomes part of bucket names and object keys, and is passed on command lines:
# lowercase letters, digits, '-' and '_', starting and ending with a letter or digit.
RUN_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?$")


def check_run_id(run_id: object) -> str:
    """Return ``run_id`` if it matches :data:`RUN_ID_RE` (at most 63 characters), else raise."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id):
        shown = run_id[:80] if isinstance(run_id, str) else run_id
        raise InvalidInput(
            f"run id {shown!r} must be 1 to 63 lowercase letters, digits, '-' or '_', "
            "starting and ending with a letter or digit"
        )
    return run_id


def check_bucket_name(name: str) -> str:
    """Return ``name`` if it is a valid GCS bucket name, else raise InvalidBucketName.

    Rules (cloud.google.com/storage/docs/buckets#naming): 3-63 characters (up to
    222 with dots, each dot-separated part at most 63); lowercase letters,
    digits, ``-``, ``_`` and ``.``; starts and ends with a letter or digit; not
    an IP address; does not start with "goog" or contain "google"-like words.
    """
    if not isinstance(name, str) or not name:
        raise InvalidBucketName(f"bucket name must be a non-empty string, got {name!r}")
    return _checked_bucket_name(name)


@functools.lru_cache(maxsize=1024)
def _checked_bucket_name(name: str) -> str:
    # Remembered: a stage's plan names the same few buckets in each of its N requests.
    limit = 222 if "." in name else 63
    if not 3 <= len(name) <= limit:
        raise InvalidBucketName(
            f"bucket name {name!r} has {len(name)} characters; allowed 3 to {limit}"
        )
    if not _BUCKET_CHARS.fullmatch(name):
        raise InvalidBucketName(
            f"bucket name {name!r} may only hold lowercase letters, digits, '-', '_' and "
            "'.', and must start and end with a letter or digit"
        )
    parts = name.split(".")
    if any(not p or len(p) > 63 or p[0] in "-_" or p[-1] in "-_" for p in parts):
        raise InvalidBucketName(
            f"bucket name {name!r}: each dot-separated part must be 1 to 63 characters "
            "and start and end with a letter or digit"
        )
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        pass
    else:
        raise InvalidBucketName(f"bucket name {name!r} may not be an IP address")
    if name.startswith("goog") or _GOOGLE_LIKE.search(name):
        raise InvalidBucketName(
            f"bucket name {name!r} may not start with 'goog' or contain 'google'"
        )
    return name


def check_key(key: str, *, allow_empty: bool = False) -> str:
    """Return ``key`` if it stays inside its bucket, else raise InvalidKey.

    Refused: NUL and line breaks, a leading ``/``, ``.`` or ``..`` path parts,
    more than 1024 bytes of UTF-8, a part of more than 255. ``allow_empty`` admits "" (a whole-bucket prefix).
    """
    if not isinstance(key, str):
        raise InvalidKey(f"object key must be a string, got {key!r}")
    if not key:
        if allow_empty:
            return key
        raise InvalidKey("object key is empty")
    if any(c in key for c in "\x00\r\n"):
        raise InvalidKey(f"object key {key!r} contains NUL or a line break")
    if key.startswith("/"):
        raise InvalidKey(f"object key {key!r} is absolute; keys are relative to their bucket")
    if any(part in (".", "..") for part in key.split("/")):
        raise InvalidKey(f"object key {key!r} has a '.' or '..' part that would leave its bucket")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKey(f"object key {key[:60]!r}... is longer than {MAX_KEY_BYTES} bytes")
    if any(len(part.encode("utf-8")) > MAX_PART_BYTES for part in key.split("/")):
        raise InvalidKey(
            f"object key {key[:60]!r}... has a part longer than {MAX_PART_BYTES} bytes "
            "(a file name under a local storage root)"
        )
    return key


@dataclass(frozen=True)
class Location:
    """Where one object (or prefix) lives.

    ``scheme`` "gs" names a bucket and key (on GCS, or under the local storage
    root); "file" names an absolute local path, kept in ``key`` without its
    leading slash and with ``bucket`` empty.
    """

    scheme: Literal["gs", "file"]
    bucket: str
    key: str

    @property
    def url(self) -> str:
        if self.scheme == "file":
            return f"file:///{self.key}"
        return f"gs://{self.bucket}/{self.key}"


def parse_url(url: str, *, allow_empty_key: bool = True) -> Location:
    """Parse ``gs://bucket/key``, ``file:///abs/path`` or a plain local path.

    A plain path (no scheme) means the local file system, relative to the
    current directory, like ``file://``.
    """
    if not isinstance(url, str) or not url:
        raise InvalidURL(f"storage URL must be a non-empty string, got {url!r}")
    if url.startswith("gs://"):
        rest = url[len("gs://") :]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise InvalidURL(f"URL {url!r} names no bucket")
        check_bucket_name(bucket)
        check_key(key, allow_empty=allow_empty_key)
        return Location("gs", bucket, key)
    if "://" in url:
        parts = urlsplit(url)
        if parts.scheme != "file":
            raise InvalidURL(
                f"URL {url!r} has scheme {parts.scheme!r}; use gs://, file:// or a path"
            )
        if parts.netloc not in ("", "localhost"):
            raise InvalidURL(f"file URL {url!r} names host {parts.netloc!r}; use file:///abs/path")
        path = unquote(parts.path)
    else:
        path = url
    # A local path is not inside a bucket: normalise it rather than refuse "..".
    trailing = "/" if path.endswith("/") else ""
    key = os.path.abspath(path).lstrip("/")
    key = key + trailing if key else ""
    check_key(key, allow_empty=True)
    return Location("file", "", key)


def check_service_url(url: object) -> str:
    """Return ``url`` if it is ``gs://BUCKET/KEY`` with a valid bucket and key, else raise.

    What the services accept: an object of the run's storage (GCS, or a bucket
    folder under the local storage root). ``file://``, plain, relative and ``~``
    paths, other schemes and folder URLs (a key ending in ``/``) are refused.
    """
    if not isinstance(url, str) or not url.startswith("gs://"):
        shown = url[:200] if isinstance(url, str) else url
        raise InvalidURL(f"{shown!r} is not a gs://BUCKET/KEY URL (the only form accepted here)")
    loc = parse_url(url, allow_empty_key=False)
    if loc.key.endswith("/"):
        raise InvalidURL(f"{url[:200]!r} names a folder, not an object")
    return url


def join(url: str, *parts: str) -> str:
    """Join key parts onto a storage URL with ``/``."""
    base = url.rstrip("/")
    tail = "/".join(p.strip("/") for p in parts if p)
    return f"{base}/{tail}" if tail else base


def bucket_url(bucket: str, key: str = "") -> str:
    """The ``gs://`` URL of a key in a bucket (local root or GCS, by the environment)."""
    check_bucket_name(bucket)
    check_key(key, allow_empty=True)
    return f"gs://{bucket}/{key}"
