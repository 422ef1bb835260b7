"""The models of the records in a run's process bucket (see :mod:`emprocess.records`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError, field_validator

from emprocess.records.base import (
    MalformedRecord,
    Record,
    check_bbox,
    check_iso_time,
    check_number,
    parse_json,
    problem_of,
)

# -- the records ------------------------------------------------------------------------


class IntensitySample(Record):
    """What an ``auto`` intensity window was measured on."""

    slices: list[int]
    channels: int | None = None
    """Channels counted per sampled slice."""
    of: str = ""


class InitRecord(Record):
    """RUN_ID/init.json, written by create_env: the conf, width, slice size, window, versions."""

    INDENT = 2

    id: str | None = None
    dag_id: str | None = None
    version: str | None = None
    airflow_run_id: str | None = None
    conf: dict[str, Any] = Field(default_factory=dict)
    """The run conf as :meth:`RunConf.to_json` gives it."""
    width: int | None = None
    slice_size_xy: list[int] | None = None
    slice_bits: int | None = None
    intensity_window: list[float] | None = None
    intensity_measured: IntensitySample | None = None
    buckets: dict[str, str] = Field(default_factory=dict)
    location: str | None = None
    started: str | None = None
    first_started: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)

    check_times = field_validator("started", "first_started", mode="before")(check_iso_time)

    @property
    def first_start(self) -> str | None:
        """When the run was first started (``first_started``, else ``started``)."""
        return self.first_started or self.started


class PairResidual(Record):
    median: float | None = None
    worst: float | None = None


class FlaggedSlice(Record):
    z: int
    status: str
    reason: str = ""


class AlignmentSummary(Record):
    """The global solve's quality figures (``alignment`` of canvas.json and complete.json)."""

    pairs: int = 0
    pairs_used: int = 0
    pair_residual_px: PairResidual = Field(default_factory=PairResidual)
    slices: dict[str, int] = Field(default_factory=dict)
    """Slices per status: good, bridged, bad."""
    flagged: list[FlaggedSlice] = Field(default_factory=list)
    gaps: list[int] = Field(default_factory=list)
    gap_pairs: int = 0
    gaps_too_long: list[list[int]] = Field(default_factory=list)
    doubtful: bool = False
    why: str = ""


class CanvasRecord(Record):
    """align/canvas.json, what collect hands on: the canvas, the models used, the transforms."""

    OMIT_NONE = ("aligned_from", "alignment")

    bbox: list[int]
    """[width, height] of the canvas, pixels."""
    models: dict[str, int] = Field(default_factory=dict)
    """Pairs per model used (affine, translation, ...)."""
    transforms: str = ""
    """URL of the run's transforms.json."""
    aligned_from: str | None = None
    """The earlier run whose alignment was taken (conf ``align_from``)."""
    alignment: AlignmentSummary | None = None

    check_bbox = field_validator("bbox", mode="before")(check_bbox)

    @property
    def bbox_xy(self) -> tuple[int, int]:
        return self.bbox[0], self.bbox[1]


class StageTiming(Record):
    """One stage of complete.json's ``stages``: its tasks' span and, for batch stages, counts."""

    OMIT_NONE = ("planned", "cached", "sent", "attempts")

    tasks: int = 0
    started: str = ""
    finished: str = ""
    planned: int | None = None
    cached: int | None = None
    sent: int | None = None
    attempts: int | None = None
    elapsed_s: float = 0.0


class CompleteRecord(Record):
    """RUN_ID/complete.json, written last by write_status: the run is finished."""

    INDENT = 2

    id: str | None = None
    dag_id: str | None = None
    version: str | None = None
    airflow_run_id: str | None = None
    conf: dict[str, Any] = Field(default_factory=dict)
    slices: int | None = None
    slice_size_xy: list[int] | None = None
    bbox: list[int] | None = None
    models: dict[str, int] = Field(default_factory=dict)
    alignment: AlignmentSummary | None = None
    neuroglancer: str | None = None
    public: bool = False
    started: str | None = None
    finished: str | None = None
    elapsed_s: float | None = None
    stages: dict[str, StageTiming] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)

    check_times = field_validator("started", "finished", mode="before")(check_iso_time)
    check_elapsed = field_validator("elapsed_s", mode="before")(check_number)
    check_bbox = field_validator("bbox", mode="before")(check_bbox)

    def to_json(self) -> dict[str, Any]:
        doc = super().to_json()
        doc["stages"] = {name: st.to_json() for name, st in self.stages.items()}
        return doc


class AnswerRecord(Record):
    """A mini-task's cached answer, ``NAME.DIGEST.json`` under its stage's cache prefix.

    ``by`` says who wrote it: the client (its attempts, and the time from its first
    request to the answer) or the service (1, and the time the request took).
    """

    SORT_KEYS = True

    name: str = ""
    path: str = ""
    request: dict[str, Any] = Field(default_factory=dict)
    response: Any = None
    """The service's JSON answer (or its text): what the batch tasks read back."""
    attempts: int = 1
    elapsed_s: float | None = None
    finished: str | None = None
    by: str = "client"


class FailureRecord(Record):
    """``failures/STAGE/NAME.json``: a mini-task that finally failed (deleted on success)."""

    SORT_KEYS = True

    name: str = ""
    stage: str = ""
    path: str = ""
    request: dict[str, Any] = Field(default_factory=dict)
    error: str = "(no message)"
    status: int | None = None
    attempts: int = 1
    finished: str | None = None


class NotifiedRecord(Record):
    """``notified/AIRFLOW_RUN_ID.json``: the failure of this Airflow run that was mailed."""

    airflow_run_id: str
    task: str
    """The failed task (``task_id`` or ``task_id[map_index]``)."""


class GapsRecord(Record):
    """align/gaps.json: the second align round's pairs across runs of bad slices."""

    pairs: list[tuple[int, int]] = Field(default_factory=list)
    gaps: list[list[int]] = Field(default_factory=list)
    too_long: list[list[int]] = Field(default_factory=list)
    max_gap_slices: int | None = None


Transform = Annotated[list[float], Field(min_length=6, max_length=6)]
"""6 numbers, mpicbg order (:mod:`emprocess.affine`)."""
_TRANSFORMS = TypeAdapter(dict[int, Transform])
_FILL = TypeAdapter(dict[int, int | None])


def transforms_bytes(transforms: Mapping[int, Iterable[float]]) -> bytes:
    """transforms.json: ``{"z": [6 numbers]}`` in the order given."""
    return json.dumps({str(z): list(t) for z, t in transforms.items()}).encode()


def parse_transforms(data: bytes, url: str) -> dict[int, list[float]]:
    """transforms.json by slice number; MalformedRecord when it is not {slice: [6 numbers]}."""
    doc = parse_json(data, url)
    try:
        return {z: [float(v) for v in t] for z, t in _TRANSFORMS.validate_python(doc).items()}
    except ValidationError as e:
        first = problem_of(e.errors()[0])
        raise MalformedRecord(f"{url} is damaged: not {{slice: [6 numbers]}} ({first})") from None


def fill_bytes(fill: Mapping[int, int | None]) -> bytes:
    """fill.json: ``{"bad z": stand-in z or null}`` in the order given."""
    return json.dumps({str(z): s for z, s in fill.items()}).encode()


def parse_fill(data: bytes, url: str) -> dict[int, int | None]:
    """fill.json by slice number; MalformedRecord when it is not {slice: slice or null}."""
    try:
        return _FILL.validate_python(parse_json(data, url))
    except ValidationError as e:
        raise MalformedRecord(
            f"{url} is damaged: not {{slice: slice or null}} ({problem_of(e.errors()[0])})"
        ) from None
