"""The records a run writes in its process bucket, as models, read and written through one object.

Every JSON record under ``gs://SOURCE_process/RUN_ID/`` is a pydantic model here:
:class:`InitRecord` (init.json, create_env), :class:`CanvasRecord` (align/canvas.json,
collect), :class:`AlignmentSummary` (the global solve's quality figures in canvas.json and
complete.json), :class:`CompleteRecord` (complete.json, write_status), :class:`AnswerRecord`
(a mini-task's cached answer, ``NAME.DIGEST.json``), :class:`FailureRecord`
(``failures/STAGE/NAME.json``), :class:`GapsRecord` (align/gaps.json), and the slice maps
transforms.json and fill.json. :class:`RunRecords` reads and writes each of them at the key
:mod:`emprocess.layout` names; the workflow, the report and the CLI go through it.

The bytes written are those the workflow always wrote (key order, separators, indent,
no trailing newline), so runs made before and after read the same. Reading is lenient
where older runs wrote less (every field but the ones a reader needs has a default) and
checks every value against its type: a damaged record raises :class:`MalformedRecord` naming the record,
the field and the value.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Protocol, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from emprocess import storage
from emprocess.errors import EmprocessError, InvalidInput
from emprocess.layout import (
    CANVAS,
    COMPLETE,
    FAILURES,
    FILL,
    GAPS,
    INIT,
    NOTIFIED,
    TRANSFORMS,
    RunLayout,
)

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 256 << 20
"""Largest record read (transforms.json of a million slices is about 100 MB)."""

JSON = "application/json"


class MalformedRecord(InvalidInput):
    """A record of the run (init.json, complete.json, ...) is not what the workflow writes."""


def now_iso() -> str:
    """UTC now, as the records spell it (``2026-01-01T12:00:00.123+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _iso_time(value: Any) -> Any:
    """An ISO 8601 time string (or None), else a ValueError naming the value."""
    if value is None:
        return None
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValueError(f"{str(value)[:100]!r} is not an ISO 8601 time") from None
    return value


def _number(value: Any) -> Any:
    """A JSON number (not a boolean, not a string), or None."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"{value!r} is not a number")
    return value


def _bbox(value: Any) -> Any:
    """[width, height], positive integers."""
    if value is None:
        return None
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{value!r} is not [width, height]")
    return list(value)


class Record(BaseModel):
    """A JSON record: lenient about missing fields, checking the type of every value."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    INDENT: ClassVar[int | None] = None
    """json.dumps' indent of this record (init.json and complete.json are indented)."""
    SORT_KEYS: ClassVar[bool] = False
    OMIT_NONE: ClassVar[tuple[str, ...]] = ()
    """Fields left out when None (keys the workflow writes only when they have a value)."""

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object, keys in the order the workflow writes them."""
        omit = {name for name in self.OMIT_NONE if getattr(self, name) is None}
        return self.model_dump(mode="json", exclude=omit)

    def to_bytes(self) -> bytes:
        """The record's bytes as stored."""
        return json.dumps(self.to_json(), indent=self.INDENT, sort_keys=self.SORT_KEYS).encode()


R = TypeVar("R", bound=Record)


def _problem(err: Mapping[str, Any]) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "record"
    msg = str(err["msg"])
    if err["type"] == "value_error":  # our validators: "VALUE is not ..."
        return f"{field} {msg.removeprefix('Value error, ')}"
    if err["type"] == "missing":
        return f"{field} is missing"
    return f"{field}: {msg} (got {str(err.get('input'))[:100]!r})"


def parse_json(data: bytes, url: str) -> Any:
    """The JSON document of record ``url``, or MalformedRecord."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise MalformedRecord(f"{url} is damaged: not JSON ({str(e)[:200]})") from None


def parse_record(cls: type[R], data: bytes | Mapping[str, Any], url: str) -> R:
    """Record ``cls`` from its bytes (or parsed JSON); MalformedRecord names what is wrong.

    Raises:
        MalformedRecord: not JSON, not a JSON object, or a field of the wrong type,
            naming ``url``, the field and its value.
    """
    doc = parse_json(data, url) if isinstance(data, bytes) else data
    if not isinstance(doc, dict):
        raise MalformedRecord(f"{url} is damaged: a JSON {type(doc).__name__}, not an object")
    try:
        return cls.model_validate(doc)
    except ValidationError as e:
        problems = "; ".join(_problem(err) for err in e.errors())
        raise MalformedRecord(f"{url} is damaged: {problems}") from None


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

    check_times = field_validator("started", "first_started", mode="before")(_iso_time)

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

    check_bbox = field_validator("bbox", mode="before")(_bbox)

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

    check_times = field_validator("started", "finished", mode="before")(_iso_time)
    check_elapsed = field_validator("elapsed_s", mode="before")(_number)
    check_bbox = field_validator("bbox", mode="before")(_bbox)

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


def failure_key(name: str) -> str:
    """Key of mini-task ``name``'s failure record under its stage's failure prefix."""
    return f"{name}.json"


def failure_name(key: str) -> str:
    """The mini-task name of failure record key ``key`` (``NAME.json``)."""
    return key.split(".")[0]


class _Request(Protocol):
    """A mini-task as a failure record names it."""

    @property
    def name(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def payload(self) -> Mapping[str, Any]: ...


class FailureRecords:
    """The failure records of one stage (:class:`FailureRecord`): ``NAME.json`` under the
    stage's failure prefix (:meth:`RunRecords.failure_url`), written by the batch tasks.

    One listing at the start tells which mini-tasks have a record, so a success deletes
    only records that exist. Records are for monitoring: failing to write or delete one
    is logged, never raised, so it cannot hide the mini-task's own outcome.
    """

    def __init__(self, url: str | None, stage: str) -> None:
        self.url = url.rstrip("/") if url else None
        self.stage = stage
        self._lock = threading.Lock()
        self._present: set[str] = set()
        if self.url is not None:
            try:
                start = len(storage.parse_url(self.url + "/").key)
                keys = storage.list_keys(self.url + "/")
                self._present = {failure_name(k[start:]) for k in keys}
            except EmprocessError as e:
                log.warning("cannot list failure records %s: %s", self.url, e)

    def write(self, task: _Request, error: str, status: int | None, attempts: int) -> None:
        """Record that ``task`` finally failed (``attempts`` requests, last ``status``)."""
        if self.url is None:
            return
        record = FailureRecord(
            name=task.name,
            stage=self.stage,
            path=task.path,
            request=dict(task.payload),
            error=error,
            status=status,
            attempts=attempts,
            finished=now_iso(),
        )
        try:
            storage.write_bytes(
                storage.join(self.url, failure_key(task.name)),
                record.to_bytes(),
                content_type="application/json",
            )
        except Exception as e:  # monitoring only: keep the mini-task's own error
            log.warning("cannot write the failure record of %s: %s", task.name, e)
            return
        with self._lock:
            self._present.add(task.name)

    def clear(self, task: _Request) -> None:
        """Delete the failure record of ``task``, which has now been answered, if it has one."""
        with self._lock:
            if self.url is None or task.name not in self._present:
                return
            self._present.discard(task.name)
        try:
            storage.delete(storage.join(self.url, failure_key(task.name)))
        except Exception as e:  # monitoring only
            log.warning("cannot delete the failure record of %s: %s", task.name, e)


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
        first = _problem(e.errors()[0])
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
            f"{url} is damaged: not {{slice: slice or null}} ({_problem(e.errors()[0])})"
        ) from None


# -- one run's records ----------------------------------------------------------------


class RunRecords:
    """Reads and writes the records of one run, each at the key :mod:`emprocess.layout` names.

    ``read_*`` return None when the record does not exist and raise MalformedRecord when
    it is damaged; ``write_*`` write the bytes the workflow always wrote.
    """

    def __init__(self, run: RunLayout) -> None:
        self.run = run

    def url(self, key: str) -> str:
        """``gs://SOURCE_process/RUN_ID/KEY``."""
        return self.run.process_url(key)

    def exists(self, key: str) -> bool:
        return storage.exists(self.url(key))

    def listed(self, key: str) -> storage.ObjectInfo | None:
        """Record ``key`` as listed (its size and update time); None when absent."""
        url = self.url(key)
        want = storage.parse_url(url).key
        return next((info for info in storage.list_objects(url) if info.key == want), None)

    def _read(self, key: str) -> bytes | None:
        url = self.url(key)
        if not storage.exists(url):
            return None
        return storage.read_bytes(url, max_bytes=MAX_RECORD_BYTES)

    def _read_record(self, cls: type[R], key: str) -> R | None:
        data = self._read(key)
        return None if data is None else parse_record(cls, data, self.url(key))

    def _write(self, key: str, data: bytes) -> str:
        url = self.url(key)
        storage.write_bytes(url, data, content_type=JSON)
        return url

    def canvas(self) -> CanvasRecord:
        """align/canvas.json; ObjectNotFound when collect has not written it."""
        url = self.url(CANVAS)
        return parse_record(CanvasRecord, storage.read_bytes(url, max_bytes=MAX_RECORD_BYTES), url)

    def transforms(self) -> dict[int, list[float]]:
        """transforms.json by slice number; ObjectNotFound when collect has not written it."""
        url = self.url(TRANSFORMS)
        return parse_transforms(storage.read_bytes(url, max_bytes=MAX_RECORD_BYTES), url)

    def read_init(self) -> InitRecord | None:
        return self._read_record(InitRecord, INIT)

    def write_init(self, record: InitRecord) -> str:
        return self._write(INIT, record.to_bytes())

    def read_canvas(self) -> CanvasRecord | None:
        return self._read_record(CanvasRecord, CANVAS)

    def write_canvas(self, record: CanvasRecord) -> str:
        return self._write(CANVAS, record.to_bytes())

    def read_complete(self) -> CompleteRecord | None:
        return self._read_record(CompleteRecord, COMPLETE)

    def write_complete(self, record: CompleteRecord) -> str:
        return self._write(COMPLETE, record.to_bytes())

    def read_gaps(self) -> GapsRecord | None:
        return self._read_record(GapsRecord, GAPS)

    def write_gaps(self, record: GapsRecord) -> str:
        return self._write(GAPS, record.to_bytes())

    def read_transforms(self) -> dict[int, list[float]] | None:
        """transforms.json by slice number (None when collect has not written it)."""
        data = self._read(TRANSFORMS)
        return None if data is None else parse_transforms(data, self.url(TRANSFORMS))

    def write_transforms(self, transforms: Mapping[int, Iterable[float]]) -> str:
        return self._write(TRANSFORMS, transforms_bytes(transforms))

    def read_fill(self) -> dict[int, int | None]:
        """fill.json (bad slice -> stand-in or None); {} when absent."""
        data = self._read(FILL)
        return {} if data is None else parse_fill(data, self.url(FILL))

    def write_fill(self, fill: Mapping[int, int | None]) -> str:
        return self._write(FILL, fill_bytes(fill))

    def notified_key(self, airflow_run_id: str) -> str:
        """``notified/AIRFLOW_RUN_ID.json`` (characters other than ``A-Za-z0-9_.-`` as ``_``)."""
        return f"{NOTIFIED}/{re.sub(r'[^A-Za-z0-9_.-]', '_', airflow_run_id)}.json"

    def write_notified(self, record: NotifiedRecord) -> bool:
        """Record the first mailed failure of an Airflow run; False when one is recorded."""
        key = self.notified_key(record.airflow_run_id)
        if self.exists(key):
            return False
        self._write(key, record.to_bytes())
        return True

    def failure_url(self, stage: str) -> str:
        """Folder of ``stage``'s failure records: ``RUN_ID/failures/STAGE``."""
        return self.url(f"{FAILURES}/{stage}")
