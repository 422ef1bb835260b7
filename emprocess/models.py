"""Request models shared by the DAG (which sends them) and the services (which receive them).

Fields are plain JSON with strict types: numbers as numbers, booleans as booleans,
nothing coerced (``true`` is not 1, ``"1"`` is not 1, ``1.0`` is not an integer).
The original DAG sent some fields as strings (``"transform": "[1, 0, ...]"``,
``"bbox": "[w, h]"``, ``"slice": "12"``, ``"shard-size": "1024"``,
``"clip-limit": "0.02"``, ``"writeRaw": "true"``, ``"start": "[x, y, z]"``, and on
/ngmeta and /ngshard ``"minz": "0"``, ``"maxz": "63"``, ``"bbox": "[2048, 2048]"``,
``"writeRaw": "True"``, ``"resolution": "8"``); exactly
those legacy forms are accepted, here at the edge, and nowhere else. Keys keep
CONTRACTS.md's spelling (``dest-tmp``, ``shard-size``, ``clip-limit``, ``writeRaw``)
through aliases.

Every field is bounded, so a request's cost is bounded before any work: storage
URLs are ``gs://`` objects of the run's storage only, buckets and run ids follow
the naming rules, and sizes, slice numbers and resolutions have ranges that keep
every volume one that tensorstore and neuroglancer open.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from emprocess.errors import InvalidInput
from emprocess.geometry import TILE_PX
from emprocess.layout import process_bucket
from emprocess.storage.names import (
    check_bucket_name,
    check_key,
    check_run_id,
    check_service_url,
)

MAX_CANVAS_PX = 65536
"""Largest canvas side (width or height) in pixels."""
MAX_Z = 99_999_999
"""Largest slice number."""
MAX_SLICES = 1_000_000
"""Most slices in one volume (maxz - minz + 1)."""
MAX_RESOLUTION_NM = 1_000_000.0
"""Largest voxel size in nm (1 mm)."""
# A transform maps slice pixels to canvas pixels: near-rigid for a real stack. Beyond
# these its inverse (the warp samples through it) is degenerate or meaningless.
MAX_TRANSFORM_ABS = 1e7
MIN_TRANSFORM_DET, MAX_TRANSFORM_DET = 1e-3, 1e3

MAX_PROBLEMS = 10
"""Problems of one request named in its error message."""

M = TypeVar("M", bound=BaseModel)


def describe_validation_error(err: ValidationError) -> str:
    """One phrase per problem, each naming the key and the value it got (the first
    ``MAX_PROBLEMS``: a body with thousands of bad keys gets a short answer)."""
    parts = []
    errors = err.errors()
    for e in errors[:MAX_PROBLEMS]:
        loc = ".".join(str(p) for p in e["loc"]) or "request"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        elif e["type"] == "missing":
            parts.append(f"missing key {loc!r}")
        elif not e["loc"]:
            parts.append(msg)
        else:
            parts.append(f"{loc}: {msg} (got {e.get('input')!r})"[:300])
    if len(errors) > MAX_PROBLEMS:
        parts.append(f"and {len(errors) - MAX_PROBLEMS} more problems")
    return "; ".join(parts)


def parse(model: type[M], body: Any) -> M:
    """Validate a JSON body against a model; errors become InvalidInput naming the keys."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise InvalidInput(describe_validation_error(e)) from None


def _json_list(value: Any) -> Any:
    """Accept a list, or the legacy JSON string of one."""
    if isinstance(value, str):
        try:
            return json.loads(value[:1000])
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(f"expected a JSON list, got the string {value[:100]!r}") from None
    return value


def _legacy_int(value: Any) -> Any:
    """Accept an integer, or the legacy string of one (digits only)."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,12}", value):
        return int(value)
    return value


def _legacy_float(value: Any) -> Any:
    """Accept a number, or the legacy decimal string of one."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,12}(\.[0-9]{0,12})?", value):
        return float(value)
    return value


def _legacy_bool(value: Any) -> Any:
    """Accept a boolean, or the legacy string "true"/"false" (Python's "True"/"False" too)."""
    return (
        {"true": True, "false": False}.get(value.lower(), value)
        if isinstance(value, str)
        else value
    )


def _pydantic_check(check: Any) -> Any:
    """A naming check as a pydantic validator: its InvalidInput becomes a ValueError."""

    def run(value: Any) -> Any:
        try:
            return check(value)
        except InvalidInput as e:
            raise ValueError(str(e)) from None

    return AfterValidator(run)


StorageURL = Annotated[str, Field(max_length=2048), _pydantic_check(check_service_url)]
Bucket = Annotated[str, Field(max_length=222), _pydantic_check(check_bucket_name)]
ObjectKey = Annotated[str, Field(max_length=1024), _pydantic_check(check_key)]
RunId = Annotated[str, Field(max_length=63), _pydantic_check(check_run_id)]
SliceZ = Annotated[int, BeforeValidator(_legacy_int), Field(ge=0, le=MAX_Z)]
Affine6 = Annotated[
    list[Annotated[float, Field(allow_inf_nan=False, ge=-MAX_TRANSFORM_ABS, le=MAX_TRANSFORM_ABS)]],
    BeforeValidator(_json_list),
    Field(min_length=6, max_length=6),
]
CanvasSize2 = Annotated[
    list[Annotated[int, Field(gt=0, le=MAX_CANVAS_PX)]],
    BeforeValidator(_json_list),
    Field(min_length=2, max_length=2),
]


def _window(value: Any) -> Any:
    """An intensity window [low, high]: 0 <= low < high <= 65535 (the legacy string too)."""
    if value is None:
        return None
    from emprocess.kernels.intensity import check_window

    value = _json_list(value)
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"intensity window must be [low, high] numbers, got {value!r}")
    try:
        return list(check_window(value))
    except InvalidInput as e:
        raise ValueError(str(e)) from None


def _resolution(value: Any) -> Any:
    """One number or [x, y, z], each a voxel side in (0, MAX_RESOLUTION_NM] nm.

    The original DAG's decimal string of one number (``"8"``) is accepted too.
    """
    value = _legacy_float(value)
    values = value if isinstance(value, list) else [value]
    if (isinstance(value, list) and len(value) != 3) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"resolution must be one number or [x, y, z] in nm (got {value!r})")
    floats = [float(v) for v in values]
    for v in floats:
        if not 0 < v <= MAX_RESOLUTION_NM:  # also refuses NaN and infinities
            raise ValueError(
                f"resolution {v!r} nm is not in (0, {MAX_RESOLUTION_NM:g}]; every voxel "
                "side must be a positive number of nm"
            )
    return floats if isinstance(value, list) else floats[0]


Resolution = Annotated[float | list[float], BeforeValidator(_resolution)]
"""A voxel size in nm: one number (isotropic) or [x, y, z]."""


def _destreak(value: Any) -> Any:
    """The stripe angle in degrees from vertical, a number in [-90, 90]; None: no destreak."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"destreak must be a stripe angle in degrees, got {value!r}")
    if not -90.0 <= float(value) <= 90.0:  # also refuses NaN
        raise ValueError(f"destreak angle {value!r} must be within [-90, 90] degrees")
    return float(value)


MAX_CORRECTION_GAIN = 64.0


def _gain_offset(value: Any) -> Any:
    """[gain, offset] with 0 < gain <= MAX_CORRECTION_GAIN, |offset| <= 65535; None: none."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"intensity_gain_offset must be [gain, offset] numbers, got {value!r}")
    gain, offset = float(value[0]), float(value[1])
    if not 0.0 < gain <= MAX_CORRECTION_GAIN or not -65535.0 <= offset <= 65535.0:
        raise ValueError(
            f"intensity_gain_offset [{gain:g}, {offset:g}]: gain must be in "
            f"(0, {MAX_CORRECTION_GAIN:g}] and offset in [-65535, 65535]"
        )
    return [gain, offset]


DestreakAngle = Annotated[float | None, BeforeValidator(_destreak)]
GainOffset = Annotated[list[float] | None, BeforeValidator(_gain_offset)]

IntensityWindow = Annotated[list[float] | None, BeforeValidator(_window)]
"""Optional [low, high] grey levels mapped to 0 and 255; absent: uint8 as is, uint16 / 257."""
_WINDOW_DESCRIPTION = (
    "Intensity window [low, high] (grey levels that become 0 and 255), the run's; "
    "absent keeps uint8 slices as they are and divides uint16 ones by 257."
)
RawDtype = Literal["uint16"] | None
_RAW_DTYPE_DESCRIPTION = (
    '"uint16": the lossless volume keeps a 16-bit source\'s values (warped, no window, '
    "no CLAHE; /alignedslice also writes 16-bit tiles under aligned16/); absent: the "
    "lossless volume holds the 8-bit voxels of the JPEG volume."
)
Start3 = Annotated[
    list[Annotated[int, Field(ge=0, le=MAX_SLICES)]],
    BeforeValidator(_json_list),
    Field(min_length=3, max_length=3),
]
ShardSize = Annotated[int, BeforeValidator(_legacy_int)]

# -- channels (issue 12): absent = one grey channel, as before ----------------------
MAX_CHANNELS = 4
"""Most channels a slice may keep (RGBA)."""
Channels = Annotated[int, Field(ge=2, le=MAX_CHANNELS)] | None
_CHANNELS_DESCRIPTION = (
    "Channels every slice has and the volume keeps (2 to 4, RGB(A) order); absent: colour "
    "slices are made grey, one channel, as before."
)
AlignChannel = Annotated[int, Field(ge=0, lt=MAX_CHANNELS)] | Literal["mean"] | None
JpegChannels = Literal["each"] | None
_JPEG_CHANNELS_DESCRIPTION = (
    '"each": with channels, one grey JPEG volume per channel (neuroglancer/jpeg holds '
    "channel 0, neuroglancer/jpeg_cC channel C); absent: one JPEG volume, the first three "
    "channels as RGB (the first alone with 2)."
)


ChannelURLs = Annotated[list[StorageURL], Field(min_length=1, max_length=MAX_CHANNELS - 1)] | None
_CHANNEL_URLS_DESCRIPTION = (
    "Slices stored as one grey file per channel: gs:// URLs of the files of channels 1, 2, "
    "... (the URL above is channel 0's); absent: one file holds the slice."
)
ChannelKeys = Annotated[list[ObjectKey], Field(min_length=1, max_length=MAX_CHANNELS - 1)] | None


RawFormat = Literal["ome-zarr", "both"] | None
_RAW_FORMAT_DESCRIPTION = (
    '"ome-zarr": the lossless volume is an OME-Zarr 0.5 multiscale (dest_raw\'s '
    'raw.ome.zarr) instead of neuroglancer/raw; "both": both; absent: neuroglancer/raw only.'
)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, strict=True)

    def payload(self) -> dict[str, Any]:
        """The JSON body to send, with CONTRACTS.md's key spelling."""
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)


# -- alignment ---------------------------------------------------------------


class AlignRequest(_Request):
    """POST / of the alignment service: align ``post`` (slice z+1) onto ``pre`` (slice z)."""

    pre: StorageURL = Field(description="gs:// URL of slice z (the only form accepted).")
    post: StorageURL = Field(description="gs:// URL of slice z+1.")
    downsample: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Shrink both images by this integer factor before matching.",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        max_length=32,
        description="Overrides of the matching recipe (AlignParams fields).",
    )
    intensity_window: IntensityWindow = Field(default=None, description=_WINDOW_DESCRIPTION)
    channel: AlignChannel = Field(
        default=None,
        description="Channel of colour slices to align on (0-based, RGB(A) order) or "
        '"mean" of all; absent: colour slices are made grey (luminance), as before.',
    )
    pre_channels: ChannelURLs = Field(default=None, description=_CHANNEL_URLS_DESCRIPTION)
    post_channels: ChannelURLs = Field(default=None, description=_CHANNEL_URLS_DESCRIPTION)
    run_id: RunId | None = Field(
        default=None,
        description="Match the slices' stored features of this run (SOURCE_process/RUN_ID/"
        "align/features/, computed and stored when missing) instead of decoding both "
        "slices; absent: decode both, as before.",
    )

    @model_validator(mode="after")
    def _check_channel_files(self) -> AlignRequest:
        pre, post = self.pre_channels, self.post_channels
        if pre is None and post is None:
            return self
        if pre is None or post is None or len(pre) != len(post):
            raise ValueError(
                f"pre_channels ({0 if pre is None else len(pre)} files) and post_channels "
                f"({0 if post is None else len(post)} files) must name the same channels"
            )
        if self.channel is None:
            raise ValueError('pre_channels and post_channels need channel (an index or "mean")')
        if isinstance(self.channel, int) and self.channel > len(pre):
            raise ValueError(
                f"channel {self.channel} is not one of the {len(pre) + 1} channel files"
            )
        return self

    @classmethod
    def from_payload(cls, body: Any) -> AlignRequest:
        """Parse either shape: ``{pre, post, downsample, params}`` or the legacy Fiji one.

        The legacy shape is ``{"command": "... -Dpre=\\"a.png\\" -Dpost=\\"b.png\\" ...",
        "input-map": {"a.png": "gs://B/x.png?downsample=4", ...}, "input-str": {...}}``.
        Its ``command`` and ``input-str`` are read for names only and never executed.
        """
        if not isinstance(body, dict):
            raise InvalidInput(f"request body must be a JSON object, got {type(body).__name__}")
        if "input-map" not in body and "command" not in body:
            return parse(cls, body)
        unknown = sorted(set(body) - {"command", "input-map", "input-str"})
        if unknown:
            raise InvalidInput(
                f"unknown keys in legacy alignment request: {_some_keys(dict.fromkeys(unknown))}"
            )
        command, input_map = body.get("command"), body.get("input-map")
        if not isinstance(command, str) or not isinstance(input_map, dict):
            raise InvalidInput(
                "legacy alignment request needs a 'command' string and an 'input-map' object"
            )
        names = _legacy_names(command)
        urls, factors = {}, set()
        for role in ("pre", "post"):
            name = names.get(role)
            if name is None:
                raise InvalidInput(f"legacy 'command' has no -D{role}=NAME: {command[:200]!r}")
            if name not in input_map:
                raise InvalidInput(
                    f"-D{role}={name[:200]!r} is not a key of 'input-map' {_some_keys(input_map)}"
                )
            urls[role], factor = _split_downsample(str(input_map[name]))
            factors.add(factor)
        if len(factors) != 1:
            raise InvalidInput(
                f"pre and post ask for different downsample factors {sorted(factors)}"
            )
        return parse(cls, {"pre": urls["pre"], "post": urls["post"], "downsample": factors.pop()})


def _legacy_names(command: str) -> dict[str, str]:
    """The -Dpre/-Dpost names of a legacy Fiji command line, parsed without a shell."""
    try:
        words = shlex.split(command)
    except ValueError as e:
        raise InvalidInput(f"cannot parse legacy 'command': {e}") from None
    found = {}
    for w in words:
        m = re.fullmatch(r"-D(pre|post)=(.+)", w)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def _split_downsample(url: str) -> tuple[str, int]:
    """``gs://b/x.png?downsample=4`` -> (``gs://b/x.png``, 4); no query -> factor 1.

    The query is parsed strictly: exactly ``downsample=`` and 1 to 3 ASCII digits (no
    ``+2``, ``1_6``, other digits, escapes or a second value); the model bounds it.
    """
    base, sep, query = url.partition("?")
    if not sep:
        return url, 1
    m = re.fullmatch(r"downsample=([0-9]{1,3})", query)
    if m is None:
        raise InvalidInput(
            f"input URL {url[:300]!r}: only '?downsample=N' (N: 1 to 3 digits 0-9) is understood"
        )
    factor = int(m.group(1))
    if factor < 1:
        raise InvalidInput(f"input URL {url[:300]!r}: downsample must be >= 1, got {factor}")
    return base, factor


def _some_keys(mapping: dict[str, Any], most: int = 8) -> str:
    """A few keys of a mapping for a message, so an error never echoes thousands."""
    keys = [k[:100] for k in list(mapping)[:most]]
    more = f" and {len(mapping) - most} more" if len(mapping) > most else ""
    return f"{keys}{more}"


# -- emwrite -----------------------------------------------------------------

ClipLimit = Annotated[float, BeforeValidator(_legacy_float), Field(ge=0.0, le=1.0)]


class AlignedSliceRequest(_Request):
    """POST /alignedslice: warp one slice into the global canvas, CLAHE, tile it.

    The canvas (``bbox``) is bounded here (each side 1 to ``MAX_CANVAS_PX``) and, once
    the slice's header is read, by the slice (``sourceslice.check_canvas``): each side at
    most 4 x the slice's longer side + 1024 px, and the area at most
    (4 x sqrt(slice width x height) + 1024)^2 px, so a 7,936 x 1 px slice cannot ask for
    a 32,768^2 canvas. ``dest-tmp`` must be the tmp bucket of run (``dest``, ``run_id``)
    (``emprocess.services.guard``).
    """

    img: ObjectKey = Field(description="Slice image name in the source bucket, e.g. img.00012.png.")
    transform: Affine6 = Field(
        description="6 numbers (mpicbg order) mapping slice pixels into the canvas."
    )
    bbox: CanvasSize2 = Field(description="Canvas size [width, height] in pixels.")
    dest: Bucket = Field(
        description="Source bucket holding the slices; the thumbnail goes to DEST_process."
    )
    dest_tmp: Bucket = Field(alias="dest-tmp", description="Bucket for the tiled aligned slices.")
    slice: SliceZ = Field(description="Slice number z.")
    shard_size: ShardSize = Field(
        default=TILE_PX, alias="shard-size", description="Tile edge in pixels; must be 1024."
    )
    run_id: RunId = Field(
        description="Run id; the thumbnail goes to DEST_process/RUN_ID/align/IMG."
    )
    clip_limit: ClipLimit = Field(
        default=0.02, alias="clip-limit", description="CLAHE clip limit (normalised, 0 disables)."
    )
    intensity_window: IntensityWindow = Field(default=None, description=_WINDOW_DESCRIPTION)
    raw_dtype: RawDtype = Field(default=None, description=_RAW_DTYPE_DESCRIPTION)
    channels: Channels = Field(default=None, description=_CHANNELS_DESCRIPTION)
    destreak: DestreakAngle = Field(
        default=None,
        description="Remove curtaining stripes at this angle (degrees from vertical) "
        "before warping, in the lossless volume too; absent: no destreaking.",
    )
    intensity_gain_offset: GainOffset = Field(
        default=None,
        description="[gain, offset]: grey value v becomes gain * v + offset (slice units) "
        "before the window, warping and CLAHE, in the lossless volume too; the run's "
        "per-slice intensity correction. Absent: unchanged.",
    )
    channel_imgs: ChannelKeys = Field(
        default=None,
        description="Slices stored as one grey file per channel: the names (in dest) of "
        "the files of channels 1, 2, ... (img is channel 0's); absent: img holds every "
        "channel.",
    )

    @model_validator(mode="after")
    def _check(self) -> AlignedSliceRequest:
        _check_channels_dtype(self.channels, self.raw_dtype)
        if self.channel_imgs is not None and len(self.channel_imgs) + 1 != self.channels:
            raise ValueError(
                f"channel_imgs names {len(self.channel_imgs)} files, so the slice has "
                f"{len(self.channel_imgs) + 1} channels, but channels is {self.channels}"
            )
        m00, m10, m01, m11 = self.transform[:4]
        det = m00 * m11 - m01 * m10
        if not MIN_TRANSFORM_DET <= abs(det) <= MAX_TRANSFORM_DET:
            raise ValueError(
                f"transform {self.transform} is singular or degenerate: it scales areas by "
                f"{det:.3g}; allowed {MIN_TRANSFORM_DET} to {MAX_TRANSFORM_DET} in magnitude"
            )
        if self.shard_size != TILE_PX:
            raise ValueError(f"shard-size must be {TILE_PX}, got {self.shard_size}")
        check_bucket_name(process_bucket(self.dest))  # where the thumbnail goes
        return self


class SliceStatsRequest(_Request):
    """POST /slicestats: grey statistics of one slice warped into the canvas, inside a box."""

    img: ObjectKey = Field(description="Slice image name in the source bucket.")
    dest: Bucket = Field(description="Source bucket holding the slices.")
    transform: Affine6 = Field(
        description="6 numbers (mpicbg order) mapping slice pixels into the canvas."
    )
    area: Annotated[list[int], Field(min_length=4, max_length=4)] = Field(
        description="Canvas box [x0, y0, x1, y1] measured (the run's common area)."
    )

    @model_validator(mode="after")
    def _check(self) -> SliceStatsRequest:
        x0, y0, x1, y1 = self.area
        if not (0 <= x0 < x1 <= MAX_CANVAS_PX and 0 <= y0 < y1 <= MAX_CANVAS_PX):
            raise ValueError(
                f"area {self.area} must be [x0, y0, x1, y1] with 0 <= x0 < x1 and "
                f"0 <= y0 < y1, sides <= {MAX_CANVAS_PX}"
            )
        return self


def _check_channels_dtype(channels: int | None, raw_dtype: str | None) -> None:
    if channels is not None and raw_dtype is not None:
        raise ValueError(
            f"channels {channels} with raw_dtype {raw_dtype!r}: a 16-bit lossless volume "
            "keeps one grey channel only"
        )


class _VolumeRequest(_Request):
    dest: Bucket = Field(description="Bucket of the JPEG volume (written under neuroglancer/jpeg).")
    dest_raw: Bucket | None = Field(
        default=None,
        description="Bucket of the lossless volume (neuroglancer/raw); needed when writeRaw.",
    )
    minz: SliceZ = Field(description="First slice number.")
    maxz: SliceZ = Field(description="Last slice number, inclusive.")
    bbox: CanvasSize2 = Field(description="Canvas size [width, height] in pixels.")
    shard_size: ShardSize = Field(
        default=TILE_PX, alias="shard-size", description="Cube edge in voxels; must be 1024."
    )
    write_raw: Annotated[bool, BeforeValidator(_legacy_bool)] = Field(
        default=True, alias="writeRaw", description="Also write the lossless pyramid."
    )
    resolution: Resolution = Field(
        default=8.0, description="Voxel size in nm: one number (isotropic) or [x, y, z]."
    )
    raw_dtype: RawDtype = Field(default=None, description=_RAW_DTYPE_DESCRIPTION)
    channels: Channels = Field(default=None, description=_CHANNELS_DESCRIPTION)
    jpeg_channels: JpegChannels = Field(default=None, description=_JPEG_CHANNELS_DESCRIPTION)
    raw_format: RawFormat = Field(default=None, description=_RAW_FORMAT_DESCRIPTION)

    @property
    def writes_precomputed_raw(self) -> bool:
        """Whether the request writes neuroglancer/raw."""
        return self.write_raw and self.raw_format != "ome-zarr"

    @property
    def writes_ome_zarr(self) -> bool:
        """Whether the request writes the OME-Zarr lossless volume."""
        return self.write_raw and self.raw_format is not None

    @model_validator(mode="after")
    def _check(self) -> _VolumeRequest:
        _check_channels_dtype(self.channels, self.raw_dtype)
        if self.raw_format is not None and not self.write_raw:
            raise ValueError(f"raw_format {self.raw_format!r} needs writeRaw true")
        if self.jpeg_channels is not None and self.channels is None:
            raise ValueError('jpeg_channels "each" needs channels (2 to 4)')
        if self.minz > self.maxz:
            raise ValueError(f"minz ({self.minz}) must be <= maxz ({self.maxz})")
        if self.maxz - self.minz + 1 > MAX_SLICES:
            raise ValueError(
                f"minz {self.minz} to maxz {self.maxz} is {self.maxz - self.minz + 1} slices; "
                f"at most {MAX_SLICES} are allowed"
            )
        if self.write_raw and not self.dest_raw:
            raise ValueError("writeRaw is true but dest_raw names no bucket")
        if self.shard_size != TILE_PX:
            raise ValueError(f"shard-size must be {TILE_PX}, got {self.shard_size}")
        return self


class NgMetaRequest(_VolumeRequest):
    """POST /ngmeta: write the ``info`` of neuroglancer/jpeg (and neuroglancer/raw)."""


class NgShardRequest(_VolumeRequest):
    """POST /ngshard: build one 1024^3 cube from the tiles and write its pyramid shards."""

    source: Bucket = Field(description="Bucket of the tiled aligned slices (the run's tmp bucket).")
    start: Start3 = Field(
        description="Cube position [x, y, z] in units of 1024; z counts from minz."
    )


# -- features once per slice (issue 19) ------------------------------------------------


class FeaturesRequest(_Request):
    """POST /features of the alignment service: extract slice ``img``'s SIFT features once
    (as a pair request with the same fields would) and store them in the run's process
    bucket, ``SOURCE_process/RUN_ID/align/features/`` (SOURCE: ``img``'s bucket)."""

    img: StorageURL = Field(description="gs:// URL of the slice (channel 0's file).")
    run_id: RunId = Field(description="The run whose process folder keeps the features.")
    downsample: int = Field(
        default=1, ge=1, le=64, description="Shrink the slice by this factor before extraction."
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        max_length=32,
        description="Overrides of the matching recipe (AlignParams fields), as the pairs send.",
    )
    intensity_window: IntensityWindow = Field(default=None, description=_WINDOW_DESCRIPTION)
    channel: AlignChannel = Field(
        default=None, description="Channel to extract from, as AlignRequest's channel."
    )
    channel_files: ChannelURLs = Field(default=None, description=_CHANNEL_URLS_DESCRIPTION)

    @model_validator(mode="after")
    def _check_channel_files(self) -> FeaturesRequest:
        files = self.channel_files
        if files is None:
            return self
        if self.channel is None:
            raise ValueError('channel_files needs channel (an index or "mean")')
        if isinstance(self.channel, int) and self.channel > len(files):
            raise ValueError(
                f"channel {self.channel} is not one of the {len(files) + 1} channel files"
            )
        return self

    @classmethod
    def of_pair(cls, req: AlignRequest, role: Literal["pre", "post"]) -> FeaturesRequest:
        """The features request of the ``pre`` or ``post`` slice of a pair request with a
        ``run_id``: same slice, downsample, recipe, window and channel."""
        if req.run_id is None:
            raise InvalidInput("a pair request without run_id has no stored features")
        return cls(
            img=req.pre if role == "pre" else req.post,
            run_id=req.run_id,
            downsample=req.downsample,
            params=req.params,
            intensity_window=req.intensity_window,
            channel=req.channel,
            channel_files=req.pre_channels if role == "pre" else req.post_channels,
        )


class HistogramRequest(_Request):
    """POST /histogram of the alignment service: counts of the grey levels of a subsample of
    slice ``img``, for the run's ``auto`` intensity window (decided once, before the run)."""

    img: StorageURL = Field(description="gs:// URL of the slice (one channel's file, or colour).")
    sample_pixels: int = Field(
        default=4096 * 4096,
        ge=1,
        le=8192 * 8192,
        description="Most pixels counted: a larger slice is subsampled (every n-th pixel of "
        "every n-th row, which keeps the distribution of the values).",
    )
    channels: int = Field(
        default=1,
        ge=1,
        le=4,
        description="Channels of a colour file counted, from the first (its alpha left out "
        "by asking one fewer); 1 counts a colour file made grey.",
    )
