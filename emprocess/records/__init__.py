"""The records a run writes in its process bucket, as models, read and written through one object.

Every JSON record under ``gs://SOURCE_process/RUN_ID/`` is a pydantic model here
(:mod:`.models`): :class:`InitRecord` (init.json, create_env), :class:`CanvasRecord`
(align/canvas.json, collect), :class:`AlignmentSummary` (the global solve's quality figures
in canvas.json and complete.json), :class:`CompleteRecord` (complete.json, write_status),
:class:`AnswerRecord` (a mini-task's cached answer, ``NAME.DIGEST.json``: keys are
:class:`emprocess.answers.AnswerCache`'s), :class:`FailureRecord` (``failures/STAGE/NAME.json``,
written by :class:`FailureRecords`), :class:`NotifiedRecord` (``notified/``),
:class:`GapsRecord` (align/gaps.json), and the slice maps transforms.json and fill.json.
Every CSV record's row is a model too (:mod:`.tables`, base :class:`CsvRow`):
:class:`QcRow` and :class:`PairRow` (align/qc.csv without and with the global solve),
:class:`TransformRow` (align/transforms.csv), :class:`SliceRow` (align/slices.csv),
:class:`IntensityRow` (align/intensity.csv) and :class:`QualityRow` (align/quality.csv).
:class:`RunRecords` (``RunLayout.records``) reads and writes each of them at the key
:mod:`emprocess.layout` names; the workflow, the report and the CLI go through it.

The bytes written are those the workflow always wrote (key order, separators, indent, no
trailing newline), so runs made before and after read the same (``scripts/compare_records.py``
compares two runs' records). Reading is lenient where older runs wrote less (every field but
the ones a reader needs has a default) and checks every value against its type: a damaged
record raises :class:`MalformedRecord` naming the record, the field and the value.
"""

from emprocess.records.base import (
    MAX_RECORD_BYTES,
    MalformedRecord,
    Record,
    now_iso,
    parse_json,
    parse_record,
)
from emprocess.records.failures import FailureRecords, failure_key, failure_name
from emprocess.records.models import (
    AlignmentSummary,
    AnswerRecord,
    CanvasRecord,
    CompleteRecord,
    FailureRecord,
    FlaggedSlice,
    GapsRecord,
    InitRecord,
    IntensitySample,
    NotifiedRecord,
    PairResidual,
    StageTiming,
    fill_bytes,
    parse_fill,
    parse_transforms,
    transforms_bytes,
)
from emprocess.records.run import RunRecords
from emprocess.records.tables import (
    CsvRow,
    IntensityRow,
    PairRow,
    QcRow,
    QualityRow,
    SliceRow,
    TransformRow,
    parse_slices_csv,
)

__all__ = [
    "MAX_RECORD_BYTES",
    "AlignmentSummary",
    "AnswerRecord",
    "CanvasRecord",
    "CompleteRecord",
    "CsvRow",
    "FailureRecord",
    "FailureRecords",
    "FlaggedSlice",
    "GapsRecord",
    "InitRecord",
    "IntensityRow",
    "IntensitySample",
    "MalformedRecord",
    "NotifiedRecord",
    "PairResidual",
    "PairRow",
    "QcRow",
    "QualityRow",
    "Record",
    "RunRecords",
    "SliceRow",
    "StageTiming",
    "TransformRow",
    "failure_key",
    "failure_name",
    "fill_bytes",
    "now_iso",
    "parse_fill",
    "parse_json",
    "parse_record",
    "parse_slices_csv",
    "parse_transforms",
    "transforms_bytes",
]
