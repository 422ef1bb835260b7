"""One run's records, read and written as their models at the keys the layout names."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from emprocess import storage
from emprocess.layout import (
    CANVAS,
    COMPLETE,
    FAILURES,
    FILL,
    GAPS,
    INIT,
    INTENSITY,
    NOTIFIED,
    QC,
    QUALITY,
    SLICES,
    TRANSFORMS,
    TRANSFORMS_CSV,
    RunLayout,
)
from emprocess.records.base import JSON, MAX_RECORD_BYTES, R, parse_record
from emprocess.records.models import (
    CanvasRecord,
    CompleteRecord,
    GapsRecord,
    InitRecord,
    NotifiedRecord,
    fill_bytes,
    parse_fill,
    parse_transforms,
    transforms_bytes,
)
from emprocess.records.tables import (
    CsvRow,
    IntensityRow,
    PairRow,
    QcRow,
    QualityRow,
    Row,
    SliceRow,
    TransformRow,
)

CSV = "text/csv"


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

    def _write(self, key: str, data: bytes, content_type: str = JSON) -> str:
        url = self.url(key)
        storage.write_bytes(url, data, content_type=content_type)
        return url

    def _read_table(self, cls: type[Row], key: str) -> list[Row] | None:
        data = self._read(key)
        return None if data is None else cls.parse_csv(data.decode(), self.url(key))

    def _write_table(self, cls: type[CsvRow], key: str, rows: Iterable[CsvRow]) -> str:
        return self._write(key, cls.rows_to_csv(rows).encode(), content_type=CSV)

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

    def read_slices(self) -> list[SliceRow] | None:
        """align/slices.csv (the global solve's status of each slice); None when absent."""
        return self._read_table(SliceRow, SLICES)

    def write_slices(self, rows: Iterable[SliceRow]) -> str:
        return self._write_table(SliceRow, SLICES, rows)

    def read_qc(self) -> list[QcRow] | None:
        """align/qc.csv's QC columns (either form; the solve's columns are in read_pairs)."""
        return self._read_table(QcRow, QC)

    def read_pairs(self) -> list[PairRow] | None:
        """align/qc.csv as the global solve writes it (with ``solve_residual_px``, ``used``)."""
        return self._read_table(PairRow, QC)

    def write_qc(self, rows: Iterable[QcRow]) -> str:
        """align/qc.csv without the global solve."""
        return self._write_table(QcRow, QC, rows)

    def write_pairs(self, rows: Iterable[PairRow]) -> str:
        """align/qc.csv with the global solve's columns."""
        return self._write_table(PairRow, QC, rows)

    def read_transforms_csv(self) -> list[TransformRow] | None:
        return self._read_table(TransformRow, TRANSFORMS_CSV)

    def write_transforms_csv(self, transforms: Mapping[int, Iterable[float]]) -> str:
        """align/transforms.csv, ascending slice."""
        rows = [TransformRow.of(z, transforms[z]) for z in sorted(transforms)]
        return self._write_table(TransformRow, TRANSFORMS_CSV, rows)

    def read_intensity(self) -> list[IntensityRow] | None:
        return self._read_table(IntensityRow, INTENSITY)

    def write_intensity(self, rows: Iterable[IntensityRow]) -> str:
        return self._write_table(IntensityRow, INTENSITY, rows)

    def read_quality(self) -> list[QualityRow] | None:
        return self._read_table(QualityRow, QUALITY)

    def write_quality(self, rows: Iterable[QualityRow]) -> str:
        return self._write_table(QualityRow, QUALITY, rows)

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
