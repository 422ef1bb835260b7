"""The CSV records of a run (align/qc.csv, transforms.csv, slices.csv, intensity.csv,
quality.csv): one model per row, its columns in field order.

:class:`CsvRow` writes a table (``Row.rows_to_csv(rows)``) and reads one back
(``Row.parse_csv(text, url)``). The bytes are those the workflow always wrote: a header
of the field names, ``,`` between cells, ``\\n`` after every line, an empty cell for None,
and each number as the row's field says (``Annotated[float, fixed(4)]``; a float
without a :class:`Cell` as ``repr``, a boolean as 1/0). A cell is quoted only when it must be
(a ``,``, ``"`` or line break in it) or when its column is in ``QUOTED``.
Reading drops empty cells (the field's default applies), ignores unknown columns and
checks every value: a bad one raises :class:`MalformedRecord` naming the file, the line
and the field.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from emprocess.records.base import MalformedRecord, problem_of

_SPECIAL = frozenset(',"\n\r')


@dataclass(frozen=True)
class Cell:
    """How a column's value is written (``Annotated[float | None, Cell(...)]``); None is
    always an empty cell."""

    text: Callable[[Any], str]


def fixed(decimals: int) -> Cell:
    """A number with ``decimals`` decimals (``f"{v:.4f}"``)."""
    return Cell(lambda v: f"{v:.{decimals}f}")


def _plain(value: Any) -> str:
    """A cell without a :class:`Cell`: booleans as 1/0, floats as ``repr``, the rest ``str``."""
    return str(int(value)) if isinstance(value, bool) else str(value)


Row = TypeVar("Row", bound="CsvRow")


def _quoted(text: str, always: bool) -> str:
    if always or not _SPECIAL.isdisjoint(text):
        return '"' + text.replace('"', '""') + '"'
    return text


class CsvRow(BaseModel):
    """One row of a CSV record; the columns are the fields, in order."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    QUOTED: ClassVar[tuple[str, ...]] = ()
    """Columns whose cells are always quoted (slices.csv's ``reason``)."""
    _WRITERS: ClassVar[tuple[tuple[str, Callable[[Any], str]], ...]]

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        return tuple(cls.model_fields)

    @classmethod
    def _writers(cls) -> tuple[tuple[str, Callable[[Any], str]], ...]:
        """(field, its cell's writer) in column order; worked out once per model."""
        if "_WRITERS" not in cls.__dict__:
            out = []
            for name, field in cls.model_fields.items():
                cells = [m for m in field.metadata if isinstance(m, Cell)]
                out.append((name, cells[0].text if cells else _plain))
            cls._WRITERS = tuple(out)
        return cls._WRITERS

    def cells(self) -> list[str]:
        """The row's cells as written (quoting aside)."""
        return [
            "" if (v := getattr(self, name)) is None else text(v)
            for name, text in type(self)._writers()
        ]

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON object (column -> value)."""
        return self.model_dump(mode="json")

    @classmethod
    def rows_to_csv(cls, rows: Iterable[CsvRow]) -> str:
        """The table: header, then one line per row, each ended by ``\\n``."""
        quoted = [c in cls.QUOTED for c in cls.columns()]
        lines = [",".join(cls.columns())]
        for row in rows:
            if type(row) is not cls:
                raise TypeError(f"{type(row).__name__} is not a {cls.__name__}")
            cells = row.cells()
            lines.append(",".join(_quoted(t, q) for t, q in zip(cells, quoted, strict=True)))
        return "\n".join(lines) + "\n"

    @classmethod
    def parse_csv(cls: type[Row], text: str, url: str) -> list[Row]:
        """The rows of table ``url``; MalformedRecord names a missing column, or the line
        and field of a bad value."""
        reader = csv.DictReader(io.StringIO(text))
        header = reader.fieldnames or []
        required = [n for n, f in cls.model_fields.items() if f.is_required()]
        missing = [c for c in required if c not in header]
        if missing:
            raise MalformedRecord(f"{url} is damaged: no column {', '.join(missing)}")
        rows = []
        for raw in reader:
            line = reader.line_num
            if None in raw:
                raise MalformedRecord(
                    f"{url} is damaged: line {line}: more cells than the {len(header)} columns"
                )
            try:
                rows.append(cls.model_validate({k: v for k, v in raw.items() if v}))
            except ValidationError as e:
                problem = problem_of(e.errors()[0])
                raise MalformedRecord(f"{url} is damaged: line {line}: {problem}") from None
        return rows


def _legacy_none(value: Any) -> Any:
    return None if value == "None" else value


class QcRow(CsvRow):
    """One row of align/qc.csv (collect, without the global solve): a pair's chosen model,
    |m01|, inlier counts and mean residuals (px) as the alignment service answered them."""

    pre: int
    post: int
    model: str
    """affine, translation or identity."""
    m01: float | None = None
    affine_inliers: int | None = None
    translation_inliers: int | None = None
    affine_residual_px: float | None = None
    translation_residual_px: float | None = None

    _none = field_validator(
        "m01",
        "affine_inliers",
        "translation_inliers",
        "affine_residual_px",
        "translation_residual_px",
        mode="before",
    )(_legacy_none)  # older readers took "None" for an empty cell


class PairRow(QcRow):
    """One row of align/qc.csv after the global solve: :class:`QcRow` plus the pair's
    residual in the solve (px, 4 decimals) and whether the solve used it."""

    solve_residual_px: Annotated[float | None, Cell(lambda v: str(round(v, 4)))] = None
    used: bool


class TransformRow(CsvRow):
    """One row of align/transforms.csv: slice z's global affine, mpicbg order
    (:mod:`emprocess.affine`)."""

    slice: int
    m00: float
    m10: float
    m01: float
    m11: float
    m02: float
    m12: float

    @classmethod
    def of(cls, z: int, transform: Iterable[float]) -> TransformRow:
        m00, m10, m01, m11, m02, m12 = (float(v) for v in transform)
        return cls(slice=z, m00=m00, m10=m10, m01=m01, m11=m11, m02=m02, m12=m12)


class SliceRow(CsvRow):
    """One row of align/slices.csv: a slice's status after the global solve."""

    QUOTED: ClassVar[tuple[str, ...]] = ("reason",)

    z: int
    status: str
    """good, bridged or bad."""
    residual_px: Annotated[float, fixed(4)]
    features: int | None = None
    reason: Annotated[str, Cell(lambda s: s.replace('"', "'"))] = ""
    """Quoted, its own ``"`` written as ``'``."""


class IntensityRow(CsvRow):
    """One row of align/intensity.csv: slice z's mean and spread in the common area and the
    gain and offset that correct it."""

    z: int
    mean: Annotated[float, fixed(4)]
    std: Annotated[float, fixed(4)]
    pixels: int
    gain: Annotated[float, fixed(6)]
    offset: Annotated[float, fixed(4)]


class QualityRow(CsvRow):
    """One row of align/quality.csv: slice z's NCC with slice z + 1 (None for the last or
    a missing thumbnail) and whether it is doubtful."""

    z: int
    ncc_next: Annotated[float | None, fixed(5)] = None
    doubtful: bool = False


def parse_slices_csv(text: str, url: str) -> list[SliceRow]:
    """align/slices.csv as rows; MalformedRecord names the line and the field."""
    return SliceRow.parse_csv(text, url)
