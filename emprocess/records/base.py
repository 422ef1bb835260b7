"""The base of every run record: its JSON form, its parser and the errors it names."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from emprocess.errors import InvalidInput

MAX_RECORD_BYTES = 256 << 20
"""Largest record read (transforms.json of a million slices is about 100 MB)."""

JSON = "application/json"


class MalformedRecord(InvalidInput):
    """A record of the run (init.json, complete.json, ...) is not what the workflow writes."""


def now_iso() -> str:
    """UTC now, as the records spell it (``2026-01-01T12:00:00.123+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def check_iso_time(value: Any) -> Any:
    """An ISO 8601 time string (or None), else a ValueError naming the value."""
    if value is None:
        return None
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValueError(f"{str(value)[:100]!r} is not an ISO 8601 time") from None
    return value


def check_number(value: Any) -> Any:
    """A JSON number (not a boolean, not a string), or None."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"{value!r} is not a number")
    return value


def check_bbox(value: Any) -> Any:
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


def problem_of(err: Mapping[str, Any]) -> str:
    """One pydantic error as a reader's sentence: the field, then what is wrong with it."""
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
        problems = "; ".join(problem_of(err) for err in e.errors())
        raise MalformedRecord(f"{url} is damaged: {problems}") from None
