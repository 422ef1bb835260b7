"""The run configuration (``dag_run.conf``) as one schema.

:class:`RunConf` is the source of truth: the DAGs build their trigger form from its
JSON schema (:mod:`emprocess.workflow.params`), the ``validate`` task parses the run's conf with
it, and the CLI reuses it. Keys are CONTRACTS.md's; the legacy names ``project_id``
(for ``project``), ``rawPyramid`` (for ``createRawPyramid``) and ``mail`` (for
``email``, the original DAG's spelling) are accepted too.
Types are strict: the one legacy form accepted is a number or boolean written as a
string (``"12"``, ``"0.5"``, ``"true"``); nothing else is coerced (``true`` is not 1,
``1.5`` is not an integer, ``"yes"`` is not a boolean).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from emprocess import models
from emprocess.errors import InvalidBucketName, InvalidInput, InvalidKey
from emprocess.layout import RunLayout
from emprocess.models import MAX_RESOLUTION_NM, MAX_SLICES, MAX_Z
from emprocess.storage import check_bucket_name, check_key, check_run_id
from emprocess.workflow import dag_id
from emprocess.workflow.slicenames import check_template

MAX_WIDTH = 1024
MAX_DOWNSAMPLE = 64
MAX_GREY = 65535
MAX_NEIGHBORS = 6
"""Janelia's FIB-SEM alignments match 6 neighbours per slice; with features extracted once
per slice (issue 19) each neighbour costs one match, not two extractions."""

# One flat JSON schema per union-typed key: Airflow's trigger form validates a param
# against ``type``, and pydantic's ``anyOf`` of the union does not flatten into one.
_RESOLUTION_SCHEMA = {
    "type": ["number", "array"],
    "items": {"type": "number"},
    "minItems": 3,
    "maxItems": 3,
}
_INTENSITY_SCHEMA = {
    "type": ["string", "array"],
    "items": {"type": "number"},
    "minItems": 2,
    "maxItems": 2,
}
Resolution = Annotated[models.Resolution, WithJsonSchema(_RESOLUTION_SCHEMA)]
Destreak = Annotated[bool | float, WithJsonSchema({"type": ["boolean", "number"]})]
Intensity = Annotated[Literal["auto", "full"] | list[float], WithJsonSchema(_INTENSITY_SCHEMA)]
AlignChannel = Annotated[
    int | Literal["mean"],
    WithJsonSchema({"type": ["integer", "string"], "minimum": 0, "pattern": "^mean$"}),
]

LEGACY_KEYS: dict[str, str] = {
    "project_id": "project",
    "rawPyramid": "createRawPyramid",
    "mail": "email",
}
"""Legacy conf key -> the key it stands for."""

# One address: local part, "@", a domain of dot-separated labels. No spaces, commas,
# angle brackets or line breaks, so nothing can be added to a mail header.
_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_LEGACY_NUMBER = {
    int: re.compile(r"[0-9]{1,12}"),
    float: re.compile(r"[0-9]{1,12}(\.[0-9]{0,12})?"),
}


class InvalidRunConf(InvalidInput):
    """The run's conf breaks the schema; ``problems`` holds one line per bad key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid run conf: " + "; ".join(problems))
        self.problems = problems


class RunConf(BaseModel):
    """The configuration of one run: the keys of ``dag_run.conf`` (CONTRACTS.md)."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        frozen=True,
        strict=True,
        title="emprocess run configuration",
    )

    id: str = Field(
        title="Run id",
        description="Name of the run / dataset; part of the bucket names SOURCE_tmp_ID, "
        "SOURCE_ng_ID and SOURCE_chunk_ID, so lowercase letters, digits, '-' and '_', "
        "starting and ending with a letter or digit.",
        min_length=1,
        max_length=63,
    )
    image: str = Field(
        title="Slice name template",
        description="printf template of the slice names in the source bucket, with exactly "
        "one integer field, e.g. img.%05d.png.",
        min_length=1,
        max_length=1024,
    )
    minz: int = Field(
        title="First slice", description="First slice number, inclusive.", ge=0, le=MAX_Z
    )
    maxz: int = Field(
        title="Last slice",
        description=f"Last slice number, inclusive (>= minz; at most {MAX_SLICES} slices).",
        ge=0,
        le=MAX_Z,
    )
    source: str = Field(
        title="Source bucket",
        description="Bucket holding the slices; the run's buckets are named after it.",
        min_length=3,
        max_length=63,
    )
    project: str | None = Field(
        default=None,
        title="Cloud project",
        description="Cloud project for the buckets the run creates (legacy key: project_id); "
        "none uses the environment's default project.",
    )
    location: str | None = Field(
        default=None,
        title="Bucket location",
        description="GCS location of the buckets the run creates (e.g. US-CENTRAL1, EU); "
        "none puts them where the source bucket is, so no data crosses regions.",
        pattern=r"^[A-Za-z0-9-]{2,40}$",
    )
    email: str | None = Field(
        default=None,
        title="Notify email",
        description="Where to send a message when the run is complete (needs an Airflow "
        "SMTP connection; legacy key: mail): one address, or several separated by commas; "
        "none sends nothing.",
        max_length=1000,
    )
    downsample_factor: int = Field(
        default=1,
        title="Alignment downsample factor",
        description="Integer shrink factor applied to the slices before alignment only.",
        ge=1,
        le=MAX_DOWNSAMPLE,
    )
    skip_align: bool = Field(
        default=False,
        title="Skip alignment",
        description="Use identity transforms and do not call the alignment service.",
    )
    clip_limit: float = Field(
        default=0.02,
        alias="clip-limit",
        title="CLAHE clip limit",
        description="CLAHE clip limit (0 to 1); 0 disables contrast adjustment.",
        ge=0.0,
        le=1.0,
    )
    create_raw_pyramid: bool = Field(
        default=True,
        alias="createRawPyramid",
        title="Write the raw volume",
        description="Also write the lossless raw volume to SOURCE_chunk_ID (legacy key: "
        "rawPyramid).",
    )
    resolution: Resolution = Field(
        default=8.0,
        title="Voxel size (nm)",
        description="Voxel size in nanometres: one number (isotropic) or [x, y, z], each > 0 "
        f"and <= {MAX_RESOLUTION_NM:g}. With a z several times x and y, the pyramid halves x "
        "and y only until the voxels are near isotropic, then all three.",
    )
    intensity: Intensity = Field(
        default="auto",
        title="Intensity window",
        description="How slices become 8 bits, the same in alignment and in the volume: "
        '"auto" (16-bit slices: the 0.175% and 99.825% percentiles of a sample of slices '
        "spread over the stack, measured once and recorded in init.json; with channels > 1 "
        "one window for all, measured on the channels' own samples, alpha left out; 8-bit "
        "slices as they are), [low, high] (grey levels that become 0 and 255, low < high), "
        'or "full" (8-bit as they are, 16-bit divided by 257).',
    )
    raw_bits: Literal[8, 16] = Field(
        default=8,
        title="Bits of the raw volume",
        description="8: the lossless volume holds the JPEG volume's voxels. 16 (16-bit "
        "slices only): it keeps the slices' own values, warped, without the window or "
        "CLAHE; the JPEG volume stays 8-bit.",
    )
    raw_format: Literal["precomputed", "ome-zarr", "both"] = Field(
        default="precomputed",
        title="Format of the raw volume",
        description="precomputed: the lossless volume is SOURCE_chunk_ID/neuroglancer/raw. "
        "ome-zarr: it is an OME-Zarr 0.5 multiscale (sharded Zarr v3, the same scales) at "
        "SOURCE_chunk_ID/raw.ome.zarr, which napari, Fiji, webknossos, zarr-python and "
        "neuroglancer open. both: both. The JPEG volume stays precomputed.",
    )
    public: bool = Field(
        default=False,
        title="Public read",
        description="Make the neuroglancer bucket SOURCE_ng_ID public-read when done; "
        "private by default.",
    )
    width: int | None = Field(
        default=None,
        title="Width",
        description=f"Concurrent batch workers per stage; only for the dynamic DAG "
        f"{dag_id(None)}, the fixed DAGs take it from their id.",
        ge=1,
        le=MAX_WIDTH,
    )

    # -- global alignment (issue 11) ---------------------------------------
    neighbors: int = Field(
        default=3,
        title="Alignment neighbours",
        description="Match slice z with z+1 .. z+neighbors (1 is the plain chain); with the "
        "global solve, pairs across runs of up to 8 bad slices are asked in a second round.",
        ge=1,
        le=MAX_NEIGHBORS,
    )
    global_solve: bool = Field(
        default=True,
        title="Global solve",
        description="Fit all slices to all pairs at once (regularized affine, outlier pairs "
        "dropped, bad slices bridged); false chains the z, z+1 pairs as before.",
    )
    regularization: float = Field(
        default=10.0,
        title="Rigid regularization",
        description="Weight pulling each slice's affine toward a rigid one in the global "
        "solve (at 1, a shear or scale counts like the pixels it moves a point at the "
        "slice's edge); keeps long stacks from slowly shearing or scaling; 0: plain affines.",
        ge=0.0,
        le=100.0,
    )
    skip_slices: list[int] = Field(
        default=[],
        title="Bad slices by hand",
        description="Slice numbers to treat as bad: left out of the solve and bridged.",
        max_length=10_000,
    )
    bad_slice_fill: Literal["own", "nearest", "zeros"] = Field(
        default="own",
        title="Bad slice fill",
        description="What a bad slice shows: 'own' its pixels at the bridged transform, "
        "'nearest' the nearest good slice's pixels, 'zeros' black.",
    )
    align_from: str | None = Field(
        default=None,
        title="Alignment of an earlier run",
        description="Id of an earlier run of the same source whose alignment (transforms, "
        "canvas, bad-slice fill) this run takes instead of aligning: re-export with other "
        "contrast, a z sub-range or the other volume. That run must have finished collect "
        "and cover minz..maxz; the alignment keys are then ignored.",
        max_length=63,
    )

    # -- FIB-SEM corrections (issue 24) ------------------------------------
    destreak: Destreak = Field(
        default=False,
        title="Destreak",
        description="Remove curtaining stripes before warping (JPEG and lossless volume): "
        "false, true (vertical stripes) or the stripe angle in degrees from vertical "
        "(-90 to 90; positive tilts their top to the left). Only the stripe profile that "
        "strips along the stripes agree on is removed; the content stays.",
    )
    intensity_correction: Literal["none", "slice"] = Field(
        default="none",
        title="Intensity correction",
        description="'slice': map each slice's mean and spread (measured at reduced "
        "resolution in the canvas's common area) to a reference smoothed along z, before "
        "the window and CLAHE, in the JPEG and the lossless volume (removes beam-current "
        "flicker); grey slices only. 'none': as acquired.",
    )

    @field_validator("destreak", mode="before")
    @classmethod
    def _destreak_angle(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and -90.0 <= float(value) <= 90.0:
            return float(value)
        raise ValueError(
            f"destreak must be false, true or a stripe angle in degrees in [-90, 90], got {value!r}"
        )

    @model_validator(mode="after")
    def _align_from_is_another_run(self) -> RunConf:
        if self.align_from is None:
            return self
        check_run_id(self.align_from)
        if self.align_from == self.id:
            raise ValueError(
                f"align_from {self.align_from!r} is this run's own id; re-trigger the run "
                "instead (its cached alignment is reused)"
            )
        if self.skip_align:
            raise ValueError("align_from and skip_align exclude each other: choose one")
        return self

    # -- channels (issue 12) -----------------------------------------------
    channels: int = Field(
        default=1,
        title="Channels",
        description="1: colour slices are made grey (one channel, as before). 2 to 4: every "
        "slice has this many channels (RGB(A) order), all warped with the same transform, "
        "CLAHE'd each on its own (clip-limit; 0: off) and kept in the lossless volume; the "
        "JPEG volume holds the first three as RGB (the first alone with 2 channels).",
        ge=1,
        le=models.MAX_CHANNELS,
    )
    align_channel: AlignChannel = Field(
        default="mean",
        title="Alignment channel",
        description='With channels > 1: the channel alignment matches (0-based) or "mean" '
        "of all channels.",
    )
    jpeg_channels: Literal["rgb", "each"] = Field(
        default="rgb",
        title="JPEG volume of channels",
        description='With channels > 1: "rgb" one JPEG volume with the first three channels '
        'as colour (the first alone with 2 channels); "each" one grey JPEG volume per '
        "channel (neuroglancer/jpeg holds channel 0, neuroglancer/jpeg_cC channel C).",
    )

    channel_templates: list[str] | None = Field(
        default=None,
        title="One file per channel",
        description="Slices stored as one grey file per channel: one printf template per "
        'channel, in channel order (red, green, blue, alpha), e.g. ["red/img.%05d.png", '
        '"green/img.%05d.png"]. `image` may be left out (it is the first template; given, '
        "it must be) and `channels` is the number of templates. Every channel's file must "
        "exist for every slice, grey, of one size and bit depth. none: each slice is one file.",
        min_length=2,
        max_length=models.MAX_CHANNELS,
    )

    @model_validator(mode="after")
    def _skip_slices_in_range(self) -> RunConf:
        outside = sorted(z for z in set(self.skip_slices) if not self.minz <= z <= self.maxz)
        if outside:
            raise ValueError(
                f"skip_slices {outside[:10]} lie outside minz..maxz ({self.minz}..{self.maxz})"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _accept_legacy_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        for old, new in LEGACY_KEYS.items():
            if old not in data:
                continue
            value = data.pop(old)
            current = data.get(new)
            if current is not None and current != value:
                raise ValueError(
                    f"{old!r} is the legacy name of {new!r}, and both are given with different "
                    f"values ({value!r} and {current!r}); give only {new!r}"
                )
            data[new] = value
        return _accept_legacy_strings(_fill_from_channel_templates(data))

    @field_validator("id")
    @classmethod
    def _id_is_a_name(cls, value: str) -> str:
        try:
            return check_run_id(value)
        except InvalidInput as e:
            raise ValueError(str(e)) from None

    @field_validator("email")
    @classmethod
    def _email_addresses(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for part in value.split(","):
            address = part.strip(" ")
            if not _EMAIL.fullmatch(address):
                raise ValueError(
                    f"{address[:100]!r} is not an email address (name@domain.tld; "
                    "several are separated by commas)"
                )
        return value

    @field_validator("source")
    @classmethod
    def _source_is_a_bucket(cls, value: str) -> str:
        try:
            return check_bucket_name(value)
        except InvalidBucketName as e:
            raise ValueError(str(e)) from None

    @field_validator("intensity", mode="before")
    @classmethod
    def _intensity_shape(cls, value: Any) -> Any:
        if value in ("auto", "full") or (isinstance(value, list) and all(map(_is_number, value))):
            return value
        raise ValueError('intensity must be "auto", "full" or [low, high]')

    @field_validator("intensity")
    @classmethod
    def _intensity_is_a_window(cls, value: str | list[float]) -> str | list[float]:
        if isinstance(value, str):
            return value
        if len(value) != 2:
            raise ValueError(f'intensity must be "auto", "full" or [low, high], got {value!r}')
        low, high = value
        if not low < high:
            raise ValueError(f"intensity window low {low:g} must be < high {high:g}")
        if low < 0 or high > MAX_GREY:
            raise ValueError(
                f"intensity window [{low:g}, {high:g}] must lie within [0, {MAX_GREY}]"
            )
        return value

    @field_validator("image")
    @classmethod
    def _image_is_a_template(cls, value: str) -> str:
        return check_template(value)

    @field_validator("channel_templates")
    @classmethod
    def _channel_templates(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for template in value:
            if not 1 <= len(template) <= 1024:
                raise ValueError(f"channel template {template[:100]!r} must be 1 to 1024 long")
            check_template(template)
        twice = sorted({t for t in value if value.count(t) > 1})
        if twice:
            raise ValueError(f"channel_templates names {twice} more than once")
        return value

    @model_validator(mode="after")
    def _check_cross_fields(self) -> RunConf:
        if isinstance(self.align_channel, int) and not 0 <= self.align_channel < self.channels:
            raise ValueError(
                f"align_channel {self.align_channel} is not a channel of the {self.channels}-"
                f'channel slices (0 to {self.channels - 1}, or "mean")'
            )
        if self.channel_templates is not None:
            if self.image != self.channel_templates[0]:
                raise ValueError(
                    f"image {self.image!r} must be the first of channel_templates "
                    f"{self.channel_templates} (channel 0 names the slice), or be left out"
                )
            if self.channels != len(self.channel_templates):
                raise ValueError(
                    f"channels {self.channels} but channel_templates has "
                    f"{len(self.channel_templates)} templates; leave channels out or match them"
                )
        if self.intensity_correction != "none" and self.channels > 1:
            raise ValueError(
                f"intensity_correction {self.intensity_correction!r} works on grey slices; "
                f"these have {self.channels} channels"
            )
        if self.channels > 1 and self.raw_bits == 16:
            raise ValueError(
                f"channels {self.channels} with raw_bits 16: a 16-bit lossless volume keeps "
                "one grey channel only"
            )
        if self.raw_format != "precomputed" and not self.create_raw_pyramid:
            raise ValueError(
                f"raw_format {self.raw_format!r} asks for a raw volume, but createRawPyramid "
                "is false"
            )
        if self.raw_bits == 16 and not self.create_raw_pyramid:
            raise ValueError(
                "raw_bits 16 asks for a 16-bit raw volume, but createRawPyramid is false"
            )
        if self.minz > self.maxz:
            raise ValueError(
                f"minz {self.minz} is greater than maxz {self.maxz}; minz must be <= maxz"
            )
        if self.maxz - self.minz + 1 > MAX_SLICES:
            raise ValueError(
                f"minz {self.minz} to maxz {self.maxz} is {self.maxz - self.minz + 1} slices; "
                f"at most {MAX_SLICES} are allowed"
            )
        for template in self.templates():
            for z in (self.minz, self.maxz):
                try:
                    check_key(template % z)
                except InvalidKey as e:
                    raise ValueError(f"image template {template!r} gives for z={z}: {e}") from None
        for role, name in self.layout.bucket_names().items():
            if role == "source":
                continue
            try:
                check_bucket_name(name)
            except InvalidBucketName as e:
                raise ValueError(
                    f"source {self.source!r} and id {self.id!r} give the {role} bucket name "
                    f"{name!r}, which is not valid: {e}"
                ) from None
        return self

    # -- derived names -------------------------------------------------------

    @property
    def destreak_deg(self) -> float | None:
        """The stripe angle to remove (degrees from vertical), or None without destreaking."""
        if self.destreak is False:
            return None
        return 0.0 if self.destreak is True else float(self.destreak)

    @property
    def layout(self) -> RunLayout:
        """Where this run keeps its buckets, volumes and records (:mod:`emprocess.layout`)."""
        return RunLayout(self.source, self.id, self.create_raw_pyramid)

    @property
    def resolution_xyz(self) -> tuple[float, float, float]:
        """Voxel size (x, y, z) in nm."""
        r = self.resolution
        return (r[0], r[1], r[2]) if isinstance(r, list) else (r, r, r)

    def slice_name(self, z: int) -> str:
        """The object key of slice ``z`` in the source bucket."""
        return self.image % z

    def slice_names(self) -> list[str]:
        """Object keys of every slice from minz to maxz inclusive."""
        return [self.image % z for z in range(self.minz, self.maxz + 1)]

    def templates(self) -> list[str]:
        """The templates of the slice files: one per channel with ``channel_templates``,
        else ``image`` alone."""
        return list(self.channel_templates or [self.image])

    def channel_files(self, z: int) -> list[str]:
        """Object keys of slice ``z``'s files, one per channel (``channel_templates``), or
        its one file."""
        return [template % z for template in self.templates()]

    def to_json(self) -> dict[str, Any]:
        """The conf with CONTRACTS.md's key names, numbers as numbers and booleans as booleans."""
        return self.model_dump(by_alias=True, mode="json")


def _accept_legacy_strings(data: dict[str, Any]) -> dict[str, Any]:
    """Numbers and booleans given as strings (the one legacy form) become numbers and booleans.

    Only exact forms: digits for an integer, digits with an optional fraction for a
    number, "true"/"false" (any case) for a boolean; anything else is left for the
    strict schema to refuse.
    """
    by_key = {(f.alias or name): f for name, f in RunConf.model_fields.items()}
    by_key.update(RunConf.model_fields)
    out = dict(data)
    for key, value in data.items():
        field = by_key.get(key)
        if field is None or not isinstance(value, str):
            continue
        kinds = {field.annotation, *getattr(field.annotation, "__args__", ())}
        if bool in kinds and value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
        elif float in kinds and _LEGACY_NUMBER[float].fullmatch(value):
            out[key] = float(value)
        elif int in kinds and _LEGACY_NUMBER[int].fullmatch(value):
            out[key] = int(value)
    return out


def _fill_from_channel_templates(data: dict[str, Any]) -> dict[str, Any]:
    """With ``channel_templates``: ``image`` (the first) and ``channels`` (their number) may
    be left out; given, the schema checks they agree."""
    templates = data.get("channel_templates")
    if not isinstance(templates, list) or not templates:
        return data
    out = dict(data)
    out.setdefault("image", templates[0])
    out.setdefault("channels", len(templates))
    return out


def _is_number(value: Any) -> bool:
    """A number, or a string of one (the legacy confs sent some numbers as strings)."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return isinstance(value, int | float) and not isinstance(value, bool)


def _describe(err: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    kind = err.get("type")
    if kind == "missing":
        return f"{loc}: required key is missing"
    if kind == "extra_forbidden":
        known = sorted([*conf_keys(), *LEGACY_KEYS])
        return f"{loc}: unknown key (value {err.get('input')!r}); known keys are {known}"
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    if not loc:
        return msg
    return f"{loc}: {msg} (got {err.get('input')!r})"


def parse_conf(data: Mapping[str, Any] | None) -> RunConf:
    """Validate a run's conf; raise :class:`InvalidRunConf` naming every bad key."""
    try:
        return RunConf.model_validate(dict(data or {}))
    except ValidationError as e:
        raise InvalidRunConf([_describe(err) for err in e.errors()]) from None


def conf_keys() -> list[str]:
    """The conf keys as users write them (aliases), in schema order."""
    return [f.alias or name for name, f in RunConf.model_fields.items()]
