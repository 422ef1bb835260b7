"""Viewing a run's volume in neuroglancer: links for gs:// outputs, local serving for local runs.

A run's JPEG pyramid is ``gs://SOURCE_ng_RUN_ID/neuroglancer/jpeg`` and its lossless one
``gs://SOURCE_chunk_RUN_ID/neuroglancer/raw`` (precomputed) and/or
``gs://SOURCE_chunk_RUN_ID/raw.ome.zarr`` (OME-Zarr 0.5, conf ``raw_format``, shown as a
``zarr3://`` layer). On Google Cloud Storage the viewer reads
the bucket itself, so a link to the public neuroglancer app is all a user needs, as long
as the bucket is publicly readable and answers CORS. With ``EMPROCESS_STORAGE_ROOT`` the
buckets are folders: :func:`serve_run` serves them over HTTP on 127.0.0.1 (with the byte
ranges that sharded volumes need) and opens the viewer of the ``neuroglancer`` package.

Viewer state: dimensions are always set explicitly (x, y, z in nm at the volume's scale-0
resolution); without them neuroglancer scales the view in metres and shows nothing.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import mimetypes
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from werkzeug.exceptions import HTTPException
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler
from werkzeug.utils import send_file
from werkzeug.wrappers import Request, Response

from emprocess import storage
from emprocess.errors import EmprocessError, InvalidInput, NotFound
from emprocess.kernels.omezarr import ZARR_JSON, dataset_path
from emprocess.layout import (
    COMPLETE,
    JPEG_PATH,
    RAW_OME_ZARR_PATH,
    RAW_PATH,
    RunLayout,
    jpeg_channel_path,
)
from emprocess.models import MAX_CHANNELS
from emprocess.volume import INFO, info_key

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger(__name__)

NEUROGLANCER_APP = "https://neuroglancer-demo.appspot.com/"
GCS_PUBLIC_URL = "https://storage.googleapis.com"
DEFAULT_RESOLUTION_NM = 8.0
PUBLIC_CHECK_TIMEOUT_S = 5.0
OVERVIEW_PX = 512  # screen pixels a section should fit in when a view opens
PROJECTION_MARGIN = 1.5  # 3D view height / the volume's largest extent
_MAX_RECORDS = 10_000


def ng_bucket(source: str, run_id: str) -> str:
    """SOURCE_ng_RUN_ID: the bucket of the JPEG pyramid."""
    return RunLayout(source, run_id).ng


def chunk_bucket(source: str, run_id: str) -> str:
    """SOURCE_chunk_RUN_ID: the bucket of the lossless pyramid."""
    return RunLayout(source, run_id).chunk


def neuroglancer_source(source: str, run_id: str, raw: bool = False) -> str:
    """The neuroglancer layer source of a run's JPEG volume (or of its lossless one)."""
    layout = RunLayout(source, run_id)
    return f"precomputed://{layout.raw_url}" if raw else layout.neuroglancer_source()


def _volumes(
    source: str, run_id: str, raw: bool, jpeg_channels: int = 1, ome_zarr: bool = False
) -> list[tuple[str, str, str]]:
    """(layer name, bucket, key prefix) of each volume to show, JPEG first.

    Args:
        raw: show the precomputed lossless volume (layer RUN_ID-raw).
        ome_zarr: show the OME-Zarr lossless volume (layer RUN_ID-ome-zarr).
        jpeg_channels: how many JPEG volumes the run has: 1, or one per channel
            (``jpeg_channels`` "each": neuroglancer/jpeg and neuroglancer/jpeg_cC,
            shown as layers RUN_ID-cC).
    """
    ng = ng_bucket(source, run_id)
    if jpeg_channels == 1:
        out = [(run_id, ng, JPEG_PATH)]
    else:
        out = [(f"{run_id}-c{c}", ng, jpeg_channel_path(c)) for c in range(jpeg_channels)]
    if raw:
        out.append((f"{run_id}-raw", chunk_bucket(source, run_id), RAW_PATH))
    if ome_zarr:
        out.append((f"{run_id}-ome-zarr", chunk_bucket(source, run_id), RAW_OME_ZARR_PATH))
    return out


def metadata_key(prefix: str) -> str:
    """The object that says a volume exists: ``PREFIX/info``, or the OME-Zarr group's
    ``PREFIX/zarr.json``."""
    return f"{prefix}/{ZARR_JSON}" if prefix == RAW_OME_ZARR_PATH else info_key(prefix)


def layer_source(base_url: str, prefix: str) -> str:
    """The neuroglancer source of volume ``prefix`` under ``base_url`` (``gs://BUCKET`` or
    the data server's URL): ``precomputed://...``, or ``zarr3://.../`` for OME-Zarr."""
    if prefix == RAW_OME_ZARR_PATH:
        return f"zarr3://{base_url}/{prefix}/"
    return f"precomputed://{base_url}/{prefix}"


def ome_zarr_layer(
    run_id: str, source: str, array_json: bytes | None, resolution_nm: Sequence[float]
) -> dict[str, dict[str, Any]]:
    """Layer options of a colour OME-Zarr volume (scale 0's ``zarr.json`` is
    ``array_json``; None or grey: none).

    Neuroglancer makes an OME-Zarr ``c`` axis a local dimension (``c'``: one channel at
    a time, grey); the source's transform renames it ``c^``, a channel dimension, so the
    shader's ``getDataValue(i)`` reads channel i and draws the colour image.
    """
    try:
        array = json.loads(array_json) if array_json else {}
        names, shape = array.get("dimension_names") or [], array.get("shape") or []
        channels = int(shape[0]) if names[:1] == ["c"] else 1
    except (ValueError, TypeError, AttributeError, IndexError):
        channels = 1
    shader = channel_shader(channels) if 1 < channels <= MAX_CHANNELS else None
    if shader is None:
        return {}
    rx, ry, rz = (float(r) for r in resolution_nm)
    dims = {"c^": [1, ""], "z": [rz / 1e9, "m"], "y": [ry / 1e9, "m"], "x": [rx / 1e9, "m"]}
    layer_source = {"url": source, "transform": {"outputDimensions": dims}}
    return {f"{run_id}-ome-zarr": {"source": layer_source, "shader": shader}}


def raw_formats(has_volume: Callable[[str], bool]) -> tuple[bool, bool]:
    """(precomputed, OME-Zarr): the lossless volumes ``--raw`` shows, those that
    ``has_volume(prefix)`` finds; the precomputed one when neither is found (its absence
    is then reported)."""
    zarr = has_volume(RAW_OME_ZARR_PATH)
    return (not zarr) or has_volume(RAW_PATH), zarr


def _jpeg_channel_count(has_volume: Callable[[str], bool | None]) -> int:
    """How many JPEG volumes a run has: 1 + the channel volumes neuroglancer/jpeg_c1, ...
    that ``has_volume(path)`` finds (None: could not tell; counted as absent)."""
    count = 1
    while count < MAX_CHANNELS and has_volume(jpeg_channel_path(count)):
        count += 1
    return count


def _layer_options(run_id: str, jpeg_channels: int) -> dict[str, dict[str, Any]]:
    """With a JPEG volume per channel: each channel's layer in its colour, added up, and
    the lossless layer (all channels) in colour too."""
    if jpeg_channels == 1:
        return {}
    options = {f"{run_id}-c{c}": channel_layer(c) for c in range(jpeg_channels)}
    options[f"{run_id}-raw"] = {"shader": channel_shader(jpeg_channels)}
    options[f"{run_id}-ome-zarr"] = options[f"{run_id}-raw"]
    return options


# -- viewer state and links ----------------------------------------------------------


@dataclass(frozen=True)
class VolumeGeometry:
    """Scale 0 of a precomputed volume: voxel size (nm), size and offset (voxels), x, y, z."""

    resolution_nm: tuple[float, float, float]
    size_xyz: tuple[int, int, int]
    offset_xyz: tuple[int, int, int]
    num_channels: int = 1

    @property
    def centre_xyz(self) -> tuple[float, float, float]:
        """The volume's centre in scale-0 voxel coordinates (what neuroglancer's position is)."""
        c = [o + s / 2 for o, s in zip(self.offset_xyz, self.size_xyz, strict=True)]
        return c[0], c[1], c[2]


def geometry_from_info(info: Mapping[str, Any]) -> VolumeGeometry:
    """Read scale 0 of a precomputed ``info``.

    Raises:
        InvalidInput: the info has no usable scale 0 (naming what is wrong).
    """
    try:
        s0 = info["scales"][0]
        res = tuple(float(r) for r in s0["resolution"])
        size = tuple(int(v) for v in s0["size"])
        offset = tuple(int(v) for v in s0.get("voxel_offset", (0, 0, 0)))
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise InvalidInput(f"info has no usable scale 0 ({type(e).__name__}: {e})") from None
    if len(res) != 3 or len(size) != 3 or len(offset) != 3:
        raise InvalidInput(
            f"info scale 0 must have 3 resolution/size/offset values, got {res}, {size}, {offset}"
        )
    if not all(math.isfinite(r) and r > 0 for r in res):
        raise InvalidInput(f"info scale 0 resolution must be > 0 nm, got {list(res)}")
    channels = info.get("num_channels", 1)
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise InvalidInput(f"info num_channels must be an integer >= 1, got {channels!r}")
    return VolumeGeometry(
        (res[0], res[1], res[2]),
        (size[0], size[1], size[2]),
        (offset[0], offset[1], offset[2]),
        channels,
    )


RGB_SHADER = """\
#uicontrol float brightness slider(min=-1, max=1, default=0)
#uicontrol float contrast slider(min=-3, max=3, default=0)
void main() {
  vec3 rgb = vec3(toNormalized(getDataValue(0)),
                  toNormalized(getDataValue(1)),
                  toNormalized(getDataValue(2)));
  emitRGB((rgb - 0.5) * exp(contrast) + 0.5 + brightness);
}
"""
"""Shows channels 0, 1, 2 as red, green, blue; a fourth (alpha) channel is kept but not drawn."""


CHANNEL_COLOURS = ("#ff0000", "#00ff00", "#0000ff", "#ffffff")
"""The colour of each channel's own layer (``jpeg_channels`` "each"): red, green, blue
(the RGB(A) order of the channels), and white for a fourth."""

CHANNEL_SHADER = """\
#uicontrol vec3 color color(default="{colour}")
#uicontrol float brightness slider(min=-1, max=1, default=0)
#uicontrol float contrast slider(min=-3, max=3, default=0)
void main() {{
  float v = (toNormalized(getDataValue()) - 0.5) * exp(contrast) + 0.5 + brightness;
  emitRGB(color * v);
}}
"""
"""One channel of a colour run in its colour; its layer is blended additively so the
channel layers add up to the colour image."""


def channel_layer(channel: int) -> dict[str, Any]:
    """Shader, blending and opacity of the layer of channel ``channel``'s own JPEG volume."""
    colour = CHANNEL_COLOURS[channel % len(CHANNEL_COLOURS)]
    return {"shader": CHANNEL_SHADER.format(colour=colour), "blend": "additive", "opacity": 1.0}


def channel_shader(num_channels: int) -> str | None:
    """The layer shader of a volume with ``num_channels`` channels; None: neuroglancer's
    default (grey) for one channel."""
    if num_channels == 1:
        return None
    if num_channels == 2:  # channel 0 grey-magenta, channel 1 green
        return RGB_SHADER.replace("getDataValue(2)", "getDataValue(0)")
    return RGB_SHADER


def viewer_state(
    layers: Sequence[tuple[str, str]],
    geometry: VolumeGeometry | None,
    layout: str = "4panel",
    layer_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Neuroglancer viewer state (JSON) showing image layers in nm at the volume's resolution.

    Args:
        layers: (name, source) of each image layer, bottom first; the last one is selected.
        geometry: scale 0 of the volume, for dimensions and the centre position; None
            uses ``DEFAULT_RESOLUTION_NM`` and leaves the position to neuroglancer.
        layout: neuroglancer layout, e.g. "4panel", "xy", "3d".
        layer_options: layer name -> JSON members (shader, blend, opacity) that replace
            the ones derived from ``geometry``.
    """
    if not layers:
        raise InvalidInput("a viewer state needs at least one layer")
    res = geometry.resolution_nm if geometry else (DEFAULT_RESOLUTION_NM,) * 3
    state: dict[str, Any] = {
        # JSON coordinate spaces are in base units: [scale, "m"]; r / 1e9 keeps 8e-09 exact.
        "dimensions": {name: [r / 1e9, "m"] for name, r in zip("xyz", res, strict=True)},
        "layers": [{"type": "image", "source": src, "name": name} for name, src in layers],
        "selectedLayer": {"layer": layers[-1][0]},
        "layout": layout,
    }
    shader = channel_shader(geometry.num_channels) if geometry else None
    if shader is not None:  # colour: every layer (the lossless one's first channels too)
        for layer in state["layers"]:
            layer["shader"] = shader
    for layer in state["layers"]:
        layer.update((layer_options or {}).get(layer["name"], {}))
    if geometry:
        state["position"] = list(geometry.centre_xyz)
        # Zoom out so a panel of ~OVERVIEW_PX screen pixels shows the whole section (never
        # beyond 1 voxel per pixel), and the 3D view the whole volume: large volumes open
        # on an overview read from the coarse scales instead of a tiny full-res patch.
        extent_xy = max(geometry.size_xyz[0], geometry.size_xyz[1])
        state["crossSectionScale"] = max(1.0, round(extent_xy / OVERVIEW_PX, 3))
        # In neuroglancer's canonical voxels (the smallest voxel side): with anisotropic
        # voxels (4 x 4 x 40 nm) the volume's longest side is the physically longest.
        extent_nm = [n * r for n, r in zip(geometry.size_xyz, res, strict=True)]
        state["projectionScale"] = float(PROJECTION_MARGIN * max(extent_nm) / min(res))
    return state


def neuroglancer_link(state: Mapping[str, Any], app_url: str = NEUROGLANCER_APP) -> str:
    """A neuroglancer link: the app's URL with the viewer state as JSON in the fragment."""
    text = json.dumps(state, separators=(",", ":"))
    # The characters neuroglancer itself leaves unescaped (neuroglancer.url_state).
    fragment = urllib.parse.quote(text, safe="~@#$&()*!+=:;,.?/'")
    return f"{app_url}#!{fragment}"


# -- public-read check on GCS --------------------------------------------------------


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
    layers = [(name, layer_source(f"gs://{b}", p)) for name, b, p in volumes]
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


# -- local data server ---------------------------------------------------------------


@dataclass(frozen=True)
class RequestRecord:
    """One request the data server answered."""

    method: str
    path: str
    range: str | None
    status: int


_CORS = {
    "Access-Control-Expose-Headers": "Content-Range, Content-Length, Accept-Ranges, Content-Type, ETag",
    "Vary": "Origin",
}
DATA_SERVER_THREADS = 8
"""Requests the data server answers at once; more connections wait to be accepted."""
DATA_SERVER_READ_TIMEOUT_S = 10.0
"""A client that sends nothing for this long is dropped (a slow one cannot hold a thread)."""
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
DEFAULT_ORIGINS = frozenset({NEUROGLANCER_APP.rstrip("/")})
"""Origins answered with CORS by default: the public neuroglancer app (``serve_run`` adds
its own viewer's); another web page the user visits gets no CORS, so cannot read data."""
_PREFLIGHT = {
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "Range, Content-Type, If-None-Match",
    "Access-Control-Max-Age": "3600",
}


class _DataApp:
    """The WSGI app of :class:`DataServer`: files under the mounts, CORS on every answer.

    werkzeug's ``send_file(conditional=True)`` answers the byte ranges (206, or 416 for a
    range the file cannot satisfy) and the conditional requests (ETag, 304).
    """

    def __init__(
        self, mounts: Mapping[str, Path], origins: Iterable[str], hosts: frozenset[str]
    ) -> None:
        self.origins = set(origins)
        self.hosts = hosts  # empty: any Host
        # Longest prefix first, so "a/b" wins over "a".
        self.mounts = sorted(
            ((tuple(p for p in k.split("/") if p), Path(v).resolve()) for k, v in mounts.items()),
            key=lambda kv: -len(kv[0]),
        )
        self.records: deque[RequestRecord] = deque(maxlen=_MAX_RECORDS)
        self.records_lock = threading.Lock()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        try:
            response = self._answer(request)
        except HTTPException as e:  # 416 from send_file, with its Content-Range
            response = e.get_response(environ)
        response.headers.update(_CORS)
        origin = request.headers.get("Origin")
        if origin is not None and origin in self.origins:
            response.headers["Access-Control-Allow-Origin"] = origin
        rec = RequestRecord(
            request.method,
            environ.get("REQUEST_URI") or request.full_path,
            request.headers.get("Range"),
            response.status_code,
        )
        with self.records_lock:
            self.records.append(rec)
        return response(environ, start_response)

    def _answer(self, request: Request) -> Response:
        if self.hosts and _host_name(request.host) not in self.hosts:
            return _plain(400, "bad request: Host is not this server's")  # DNS rebinding
        if request.method == "OPTIONS":
            return Response(status=204, headers=_PREFLIGHT)
        if request.method not in ("GET", "HEAD"):
            return _plain(405, "method not allowed")
        target = self._resolve(request.path)
        if isinstance(target, int):
            return _plain(target, {400: "bad request", 403: "forbidden"}.get(target, "not found"))
        ctype = "application/json" if target.name == INFO else None
        ctype = ctype or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        try:
            return send_file(target, request.environ, mimetype=ctype, conditional=True)
        except OSError:  # gone, or unreadable, since _resolve looked
            return _plain(404, "not found")

    def _resolve(self, path: str) -> Path | int:
        """The file a (decoded) request path names, or the HTTP status to refuse it with."""
        if "\x00" in path:  # a NUL (raw or %00) names no file: a bad request
            return 400
        parts = path.split("/")
        if any(p in ("..", ".") or "\\" in p for p in parts):
            return 403
        parts = [p for p in parts if p]
        for prefix, root in self.mounts:
            if tuple(parts[: len(prefix)]) == prefix:
                target = root.joinpath(*parts[len(prefix) :]).resolve()
                if not target.is_relative_to(root):  # e.g. a symlink out of the folder
                    return 403
                if not target.is_file():
                    return 404
                # A hard link may be a file from anywhere (the volumes' writers rename
                # whole files into place: one link each).
                return target if target.stat().st_nlink == 1 else 403
        return 404


def _host_name(host: str) -> str:
    """The host of a Host header without its port, lowercase."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class _BoundedServer(ThreadedWSGIServer):
    """werkzeug's threaded server with at most ``DATA_SERVER_THREADS`` requests at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slots = threading.BoundedSemaphore(DATA_SERVER_THREADS)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.slots.acquire()  # in the accepting thread: beyond the bound, connections wait
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def _plain(status: int, text: str) -> Response:
    return Response(text + "\n", status=status, mimetype="text/plain")


class _QuietHandler(WSGIRequestHandler):
    """werkzeug's request handler, logging each request at DEBUG instead of INFO."""

    timeout = DATA_SERVER_READ_TIMEOUT_S

    def log(self, type: str, message: str, *args: Any) -> None:
        log.debug("data server: " + message, *args)


class DataServer:
    """Serves local folders over HTTP the way GCS serves a public bucket to neuroglancer.

    werkzeug serves the files: byte ranges (206 Partial Content, which sharded volumes
    need; 416 for one the file cannot satisfy, or several), ETags with 304 Not Modified,
    HEAD; we add OPTIONS preflight and CORS for the ``origins`` neuroglancer runs in (not
    ``*``: another page the user visits cannot read the data). Paths outside the folders,
    and hard links, are refused (403), missing files are 404. Bound to a loopback address,
    it answers only requests whose Host is a loopback name (no DNS rebinding). At most
    ``DATA_SERVER_THREADS`` requests at once, each client dropped after
    ``DATA_SERVER_READ_TIMEOUT_S`` of silence. Runs in a background thread.

    Args:
        mounts: URL path prefix (e.g. "neuroglancer/jpeg") -> folder served under it.
        host: address to bind; keep 127.0.0.1 unless you mean to share the data.
        port: port to bind; 0 picks a free one.
        origins: origins answered with CORS (more with :meth:`allow_origin`).
    """

    def __init__(
        self,
        mounts: Mapping[str, Path],
        host: str = "127.0.0.1",
        port: int = 0,
        origins: Iterable[str] = DEFAULT_ORIGINS,
    ) -> None:
        for prefix, folder in mounts.items():
            if not Path(folder).is_dir():
                raise NotFound(f"cannot serve {prefix!r}: {folder} is not a folder")
        self._app = _DataApp(
            mounts, origins, LOOPBACK_HOSTS if host in LOOPBACK_HOSTS else frozenset()
        )
        self._httpd = _BoundedServer(host, port, self._app, handler=_QuietHandler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.1,), name="emprocess-data-server", daemon=True
        )
        self._thread.start()
        self.url = f"http://{host}:{self.port}"
        log.info("serving %s at %s", {k: str(v) for k, v in mounts.items()}, self.url)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def allow_origin(self, origin: str) -> None:
        """Answer CORS for ``origin`` too (e.g. ``http://127.0.0.1:PORT`` of a viewer)."""
        self._app.origins.add(origin.rstrip("/"))

    @property
    def records(self) -> list[RequestRecord]:
        """The requests answered so far (the last 10,000), oldest first."""
        with self._app.records_lock:
            return list(self._app.records)

    def stop(self) -> None:
        """Stop serving and close the socket; repeating it is harmless."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()

    def __enter__(self) -> DataServer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# -- local viewer --------------------------------------------------------------------


@dataclass
class ViewSession:
    """A running local viewer: the neuroglancer URL to open and the data server behind it."""

    url: str
    data_url: str
    data_server: DataServer
    viewer: Any

    def stop(self) -> None:
        """Stop the data server and neuroglancer's server (its viewer URLs stop working)."""
        self.data_server.stop()
        import neuroglancer

        neuroglancer.stop()

    def __enter__(self) -> ViewSession:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _import_neuroglancer() -> Any:
    try:
        import neuroglancer
    except ImportError:
        raise EmprocessError(
            "local viewing needs the neuroglancer package: pip install 'clio-ingest[view]'"
        ) from None
    return neuroglancer


def serve_run(
    source: str,
    run_id: str,
    port: int = 0,
    *,
    data_port: int = 0,
    raw: bool = False,
    layout: str = "4panel",
) -> ViewSession:
    """Serve a local run's volume(s) on 127.0.0.1 and open a neuroglancer viewer on them.

    Needs ``EMPROCESS_STORAGE_ROOT``. The data server exposes the JPEG pyramid at
    ``/neuroglancer/jpeg`` (and with ``raw`` the lossless one at ``/neuroglancer/raw``,
    and/or the OME-Zarr one at ``/raw.ome.zarr``, whichever the run has, as layers on top). Neuroglancer's server is process-wide: one session at a
    time, and :meth:`ViewSession.stop` stops it.

    Args:
        source: the run's source bucket name.
        run_id: the run id.
        port: port of neuroglancer's server (the URL to open); 0 picks a free one.
        data_port: port of the data server; 0 picks a free one.
        raw: also show the lossless volume(s): SOURCE_chunk_RUN_ID/neuroglancer/raw and/or
            SOURCE_chunk_RUN_ID/raw.ome.zarr.
        layout: neuroglancer layout ("4panel", "xy", ...).

    Raises:
        InvalidInput: no local storage root; NotFound: the run has no such volume.
    """
    root = storage.local_root()
    if root is None:
        raise InvalidInput(
            f"serving needs local storage ({storage.ROOT_ENV}); for gs:// outputs use gcs_view"
        )
    ng_folder = root / ng_bucket(source, run_id)
    count = _jpeg_channel_count(lambda path: (ng_folder / info_key(path)).is_file())
    chunk_folder = root / chunk_bucket(source, run_id)
    pre, zarr = raw_formats(lambda prefix: (chunk_folder / metadata_key(prefix)).is_file())
    volumes = _volumes(source, run_id, raw and pre, count, raw and zarr)
    mounts: dict[str, Path] = {}
    for _, bucket, prefix in volumes:
        folder = root / bucket / prefix
        if not (root / bucket / metadata_key(prefix)).is_file():
            hint = " (was createRawPyramid false?)" if prefix == RAW_PATH else ""
            raise NotFound(
                f"no volume at {folder}: {root / bucket / metadata_key(prefix)} is missing{hint}"
            )
        mounts[prefix] = folder
    complete = RunLayout(source, run_id).process_url(COMPLETE)
    if not storage.exists(complete):
        log.warning("%s is missing: the run is unfinished or failed, data may be partial", complete)
    geometry = geometry_from_info(json.loads((mounts[JPEG_PATH] / INFO).read_bytes()))

    neuroglancer = _import_neuroglancer()
    data_server = DataServer(mounts, port=data_port)
    try:
        layers = [(name, layer_source(data_server.url, prefix)) for name, _, prefix in volumes]
        options = _layer_options(run_id, count)
        if RAW_OME_ZARR_PATH in mounts:
            array_json = mounts[RAW_OME_ZARR_PATH] / dataset_path(0) / ZARR_JSON
            options.update(
                ome_zarr_layer(
                    run_id, layers[-1][1], array_json.read_bytes(), geometry.resolution_nm
                )
            )
        state = viewer_state(layers, geometry, layout, options)
        neuroglancer.set_server_bind_address("127.0.0.1", bind_port=port)
        viewer = neuroglancer.Viewer()
        with viewer.txn() as s:
            s.dimensions = neuroglancer.CoordinateSpace(json=state["dimensions"])
            for layer in state["layers"]:
                image_layer = neuroglancer.ImageLayer(source=layer["source"])
                for key in ("shader", "blend", "opacity"):
                    if key in layer:
                        setattr(image_layer, key, layer[key])
                s.layers.append(name=layer["name"], layer=image_layer)
            s.selected_layer.layer = state["selectedLayer"]["layer"]
            s.position = state["position"]
            s.cross_section_scale = state["crossSectionScale"]
            s.projection_scale = state["projectionScale"]
            s.layout = layout
        url = str(viewer.get_viewer_url())
        parts = urllib.parse.urlsplit(url)
        data_server.allow_origin(f"{parts.scheme}://{parts.netloc}")
    except BaseException:
        data_server.stop()
        raise
    log.info("viewer for %s at %s (data from %s)", run_id, url, data_server.url)
    return ViewSession(url, f"{data_server.url}/{JPEG_PATH}", data_server, viewer)


__all__ = [
    "RGB_SHADER",
    "Access",
    "DataServer",
    "GcsView",
    "PublicCheck",
    "RequestRecord",
    "ViewSession",
    "VolumeGeometry",
    "channel_layer",
    "channel_shader",
    "check_public_read",
    "chunk_bucket",
    "gcs_view",
    "geometry_from_info",
    "neuroglancer_link",
    "neuroglancer_source",
    "ng_bucket",
    "serve_run",
    "viewer_state",
]
