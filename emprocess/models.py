"""Request models shared by the DAG (which sends them) and the services (which receive them).

Fields are plain JSON: numbers as numbers, booleans as booleans. The original
DAG sent some of them as strings (``"transform": "[1, 0, ...]"``,
``"slice": "12"``, ``"writeRaw": "true"``); those legacy forms are accepted
here, at the edge, and nowhere else. Keys keep CONTRACTS.md's spelling
(``dest-tmp``, ``shard-size``, ``clip-limit``, ``writeRaw``) through aliases.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import parse_qs

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from emprocess.errors import InvalidInput

M = TypeVar("M", bound=BaseModel)


def describe_validation_error(err: ValidationError) -> str:
    """One phrase per problem, each naming the key and the value it got."""
    parts = []
    for e in err.errors():
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
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"expected a JSON list, got the string {value!r}") from None
    return value


Affine6 = Annotated[list[float], BeforeValidator(_json_list), Field(min_length=6, max_length=6)]
PositiveSize2 = Annotated[
    list[Annotated[int, Field(gt=0)]],
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


PositiveNm = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Resolution = PositiveNm | Annotated[list[PositiveNm], Field(min_length=3, max_length=3)]
"""A voxel size in nm: one number (isotropic) or [x, y, z]."""

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
    list[Annotated[int, Field(ge=0)]],
    BeforeValidator(_json_list),
    Field(min_length=3, max_length=3),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    def payload(self) -> dict[str, Any]:
        """The JSON body to send, with CONTRACTS.md's key spelling."""
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)


# -- alignment ---------------------------------------------------------------


class AlignRequest(_Request):
    """POST / of the alignment service: align ``post`` (slice z+1) onto ``pre`` (slice z)."""

    pre: str = Field(description="URL of slice z (gs://, file:// or a path).")
    post: str = Field(description="URL of slice z+1.")
    downsample: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Shrink both images by this integer factor before matching.",
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the matching recipe (AlignParams fields)."
    )
    intensity_window: IntensityWindow = Field(default=None, description=_WINDOW_DESCRIPTION)

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
            raise InvalidInput(f"unknown keys in legacy alignment request: {unknown}")
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
                    f"-D{role}={name!r} is not a key of 'input-map' {sorted(input_map)}"
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
    """``gs://b/x.png?downsample=4`` -> (``gs://b/x.png``, 4); no query -> factor 1."""
    base, sep, query = url.partition("?")
    if not sep:
        return url, 1
    values = parse_qs(query).get("downsample")
    if not values or set(parse_qs(query)) != {"downsample"}:
        raise InvalidInput(f"input URL {url!r}: only '?downsample=N' is understood")
    try:
        factor = int(values[0])
    except ValueError:
        raise InvalidInput(
            f"input URL {url!r}: downsample {values[0]!r} is not an integer"
        ) from None
    if factor < 1:
        raise InvalidInput(f"input URL {url!r}: downsample must be >= 1, got {factor}")
    return base, factor


# -- emwrite -----------------------------------------------------------------

ClipLimit = Annotated[float, Field(ge=0.0, le=1.0)]


class AlignedSliceRequest(_Request):
    """POST /alignedslice: warp one slice into the global canvas, CLAHE, tile it."""

    img: str = Field(description="Slice image name in the source bucket, e.g. img.00012.png.")
    transform: Affine6 = Field(
        description="6 numbers (mpicbg order) mapping slice pixels into the canvas."
    )
    bbox: PositiveSize2 = Field(description="Canvas size [width, height] in pixels.")
    dest: str = Field(
        description="Source bucket holding the slices; the thumbnail goes to DEST_process."
    )
    dest_tmp: str = Field(alias="dest-tmp", description="Bucket for the tiled aligned slices.")
    slice: int = Field(ge=0, description="Slice number z.")
    shard_size: int = Field(
        default=1024, alias="shard-size", description="Tile edge in pixels; must be 1024."
    )
    run_id: str = Field(
        min_length=1, description="Run id; the thumbnail goes to DEST_process/RUN_ID/align/IMG."
    )
    clip_limit: ClipLimit = Field(
        default=0.02, alias="clip-limit", description="CLAHE clip limit (normalised, 0 disables)."
    )
    intensity_window: IntensityWindow = Field(default=None, description=_WINDOW_DESCRIPTION)
    raw_dtype: RawDtype = Field(default=None, description=_RAW_DTYPE_DESCRIPTION)


class _VolumeRequest(_Request):
    dest: str = Field(description="Bucket of the JPEG volume (written under neuroglancer/jpeg).")
    dest_raw: str | None = Field(
        default=None,
        description="Bucket of the lossless volume (neuroglancer/raw); needed when writeRaw.",
    )
    minz: int = Field(ge=0, description="First slice number.")
    maxz: int = Field(ge=0, description="Last slice number, inclusive.")
    bbox: PositiveSize2 = Field(description="Canvas size [width, height] in pixels.")
    shard_size: int = Field(
        default=1024, alias="shard-size", description="Cube edge in voxels; must be 1024."
    )
    write_raw: bool = Field(
        default=True, alias="writeRaw", description="Also write the lossless pyramid."
    )
    resolution: Resolution = Field(
        default=8.0, description="Voxel size in nm: one number (isotropic) or [x, y, z]."
    )
    raw_dtype: RawDtype = Field(default=None, description=_RAW_DTYPE_DESCRIPTION)

    @model_validator(mode="after")
    def _check(self) -> _VolumeRequest:
        if self.minz > self.maxz:
            raise ValueError(f"minz ({self.minz}) must be <= maxz ({self.maxz})")
        if self.write_raw and not self.dest_raw:
            raise ValueError("writeRaw is true but dest_raw names no bucket")
        if self.shard_size != 1024:
            raise ValueError(f"shard-size must be 1024, got {self.shard_size}")
        return self


class NgMetaRequest(_VolumeRequest):
    """POST /ngmeta: write the ``info`` of neuroglancer/jpeg (and neuroglancer/raw)."""


class NgShardRequest(_VolumeRequest):
    """POST /ngshard: build one 1024^3 cube from the tiles and write its pyramid shards."""

    source: str = Field(description="Bucket of the tiled aligned slices (the run's tmp bucket).")
    start: Start3 = Field(
        description="Cube position [x, y, z] in units of 1024; z counts from minz."
    )
