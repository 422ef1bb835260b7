"""Whether a run's volumes on GCS are publicly readable (with CORS), and their link."""

from __future__ import annotations

import enum
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.kernels.omezarr import ZARR_JSON, dataset_path
from emprocess.layout import (
    JPEG_PATH,
    RAW_OME_ZARR_PATH,
)
from emprocess.view.state import (
    DEFAULT_RESOLUTION_NM,
    NEUROGLANCER_APP,
    VolumeGeometry,
    _jpeg_channel_count,
    _layer_options,
    _volumes,
    chunk_bucket,
    geometry_from_info,
    layer_source,
    metadata_key,
    neuroglancer_link,
    ome_zarr_layer,
    raw_formats,
    viewer_state,
)
from emprocess.volume import info_key

log = logging.getLogger(__name__)

GCS_PUBLIC_URL = "https://storage.googleapis.com"
PUBLIC_CHECK_TIMEOUT_S = 5.0


class Access(enum.StrEnum):
    PUBLIC = "public"
    PRIVATE = "private"
    MISSING = "missing"
    UNKNOWN = "could not check"


@dataclass(frozen=True)
class PublicCheck:
    """Result of an anonymous read of one object of a bucket."""

    url: str
    access: Access
    detail: str
    cors: bool | None = None  # answered Access-Control-Allow-Origin (only known when public)
    body: bytes | None = field(default=None, repr=False)


def check_public_read(
    bucket: str,
    key: str = info_key(JPEG_PATH),
    timeout_s: float = PUBLIC_CHECK_TIMEOUT_S,
    base_url: str = GCS_PUBLIC_URL,
    origin: str = NEUROGLANCER_APP.rstrip("/"),
) -> PublicCheck:
    """Whether anyone (the viewer, without credentials) can read ``bucket/key``.

    An unauthenticated GET of ``base_url/bucket/key`` with an ``Origin`` header: 200 is
    public (and ``cors`` says whether the bucket answered CORS for ``origin``), 401/403
    private, 404 missing; network errors, timeouts and other answers are "could not check".
    Never raises for network trouble.
    """
    url = f"{base_url.rstrip('/')}/{bucket}/{urllib.parse.quote(key)}"
    request = urllib.request.Request(url, headers={"Origin": origin})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            body = resp.read()
            cors = resp.headers.get("Access-Control-Allow-Origin") in ("*", origin)
            return PublicCheck(url, Access.PUBLIC, f"HTTP {resp.status}", cors, body)
    except urllib.error.HTTPError as e:
        access = {401: Access.PRIVATE, 403: Access.PRIVATE, 404: Access.MISSING}.get(
            e.code, Access.UNKNOWN
        )
        return PublicCheck(url, access, f"HTTP {e.code} {e.reason}")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return PublicCheck(url, Access.UNKNOWN, f"{type(e).__name__}: {reason}")


@dataclass(frozen=True)
class GcsView:
    """A link for a run on GCS and what the anonymous checks found."""

    link: str
    checks: list[PublicCheck]
    geometry: VolumeGeometry | None

    def warnings(self) -> list[str]:
        """Human-readable problems that would keep the link from showing data."""
        out = []
        for c in self.checks:
            if c.access is Access.PRIVATE:
                out.append(
                    f"{c.url} is not publicly readable ({c.detail}): the viewer will not "
                    "load it; make the bucket public-read (and set CORS) or open the volume "
                    "in a neuroglancer that has your credentials"
                )
            elif c.access is Access.MISSING:
                out.append(f"{c.url} does not exist ({c.detail}): is the run finished?")
            elif c.access is Access.UNKNOWN:
                out.append(f"could not check whether {c.url} is public ({c.detail})")
            elif c.cors is False:
                out.append(f"{c.url} is public but answered no CORS header: the viewer needs it")
        if self.geometry is None:
            out.append(
                f"could not read the volume's info: the link assumes {DEFAULT_RESOLUTION_NM} nm "
                "voxels and does not centre the view"
            )
        return out


def _read_info(bucket: str, key_prefix: str) -> dict[str, Any]:
    return dict(json.loads(storage.read_bytes(storage.bucket_url(bucket, info_key(key_prefix)))))


def gcs_view(
    source: str,
    run_id: str,
    raw: bool = False,
    timeout_s: float = PUBLIC_CHECK_TIMEOUT_S,
    app_url: str = NEUROGLANCER_APP,
    gcs_url: str = GCS_PUBLIC_URL,
) -> GcsView:
    """The neuroglancer link of a run whose volumes are on GCS, and whether they are public.

    The volume's info (for the resolution and the centre) comes from the anonymous
    check's answer when the bucket is public, else through the storage layer (your
    credentials). When the anonymous check could not reach GCS at all, the storage read
    is skipped too: its retries would only keep the user waiting for minutes.
    """
    chunk = chunk_bucket(source, run_id)

    def has_raw(prefix: str) -> bool:
        """Whether the chunk bucket holds volume ``prefix``: anonymously, else (GCS
        unreachable anonymously: offline) through a local root only; not when neither
        can tell (the storage layer's retries would keep the user waiting)."""
        access = check_public_read(chunk, metadata_key(prefix), timeout_s, gcs_url).access
        if access is not Access.UNKNOWN:
            return access is not Access.MISSING
        if storage.local_root() is None:
            return False
        try:
            return storage.exists(storage.bucket_url(chunk, metadata_key(prefix)))
        except Exception as e:  # no credentials, offline: the link leaves it out
            log.debug("could not look for %s in %s: %s", prefix, chunk, e)
            return False

    pre, zarr = raw_formats(has_raw) if raw else (True, False)
    volumes = _volumes(source, run_id, raw and pre, ome_zarr=zarr)
    checks = [
        check_public_read(bucket, metadata_key(prefix), timeout_s, gcs_url)
        for _, bucket, prefix in volumes
    ]
    geometry = None
    _, bucket, prefix = volumes[0]
    if checks[0].body is not None:
        try:
            geometry = geometry_from_info(json.loads(checks[0].body))
        except (ValueError, InvalidInput) as e:
            log.debug("the anonymous answer of %s is no info: %s", checks[0].url, e)
    offline = checks[0].access is Access.UNKNOWN and storage.local_root() is None
    if geometry is None and not offline:
        try:
            geometry = geometry_from_info(_read_info(bucket, prefix))
        except Exception as e:  # no credentials, no object, bad info: the link still works
            log.debug("could not read %s/%s/info: %s", bucket, prefix, e)
    found: list[PublicCheck] = []

    def has_volume(path: str) -> bool | None:
        """Whether the ng bucket holds volume ``path``: anonymously, else with credentials."""
        check = check_public_read(bucket, info_key(path), timeout_s, gcs_url)
        if check.access is Access.PUBLIC:
            found.append(check)
            return True
        if check.access is Access.MISSING:
            return False
        try:
            exists = storage.exists(storage.bucket_url(bucket, info_key(path)))
        except Exception as e:  # no credentials: the link shows channel 0 only
            log.debug("could not look for %s in %s: %s", path, bucket, e)
            return None
        if exists:
            found.append(check)
        return exists

    # A grey (one channel) JPEG volume may be channel 0 of a run with one per channel;
    # when not even its info could be read, looking further would only make users wait.
    count = 1
    if not offline and geometry is not None and geometry.num_channels == 1:
        count = _jpeg_channel_count(has_volume)
    if count > 1:
        volumes = _volumes(source, run_id, raw and pre, count, zarr)
        checks = [checks[0], *found, *checks[1:]]
    layers = [(name, layer_source(storage.bucket_url(b).rstrip("/"), p)) for name, b, p in volumes]
    options = _layer_options(run_id, count)
    if zarr:
        array_key = f"{RAW_OME_ZARR_PATH}/{dataset_path(0)}/{ZARR_JSON}"
        body = check_public_read(chunk, array_key, timeout_s, gcs_url).body
        if body is None and storage.local_root() is not None:
            body = storage.read_bytes(storage.bucket_url(chunk, array_key), max_bytes=1 << 20)
        res = geometry.resolution_nm if geometry else (DEFAULT_RESOLUTION_NM,) * 3
        options.update(ome_zarr_layer(run_id, layers[-1][1], body, res))
    state = viewer_state(layers, geometry, layer_options=options)
    return GcsView(neuroglancer_link(state, app_url), checks, geometry)
