"""The CSV records as models: collect, plan_intensity and finish_align write, through the
row models, the bytes the hand-made writers wrote; every table reads back to the same
bytes; a damaged row is refused naming the file, the line and the field.

The ``old_*`` functions are the writers as they were before the models (the independent
reference of the bytes), applied to the same inputs the workflow computed from.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from dags_conftest_helpers import Answer, Request, ScriptedServer, write_slices

from emprocess import affine, layout, storage
from emprocess.kernels.normalise import SliceStats, plan_gain_offset
from emprocess.kernels.quality import doubtful_slices, ncc_threshold
from emprocess.kernels.render import thumbnail_factor
from emprocess.records import (
    CsvRow,
    IntensityRow,
    MalformedRecord,
    PairRow,
    QcRow,
    QualityRow,
    SliceRow,
    TransformRow,
)
from emprocess.settings import HttpEnv
from emprocess.workflow import gaps as gaps_stage
from emprocess.workflow import stages
from emprocess.workflow.batch import read_cached
from emprocess.workflow.compose import (
    PairChoice,
    compose_alignment,
    identity_alignment,
    qc_csv,
    qc_row,
    transforms_csv,
)
from emprocess.workflow.conf import RunConf, parse_conf
from emprocess.workflow.corrections import (
    measure_intensity,
    plan_slice_stats,
    read_gain_offset,
    run_common_area,
)
from emprocess.workflow.globalalign import (
    GlobalAlignment,
    SliceQC,
    global_alignment,
    pair_rows,
    pairs_csv,
    slice_rows,
)
from emprocess.workflow.globalalign import slices_csv as slices_csv_of
from emprocess.workflow.payloads import plan_align_pairs
from emprocess.workflow.quality import record_quality, slice_ncc
from emprocess.workflow.stages import RunInfo

FAST = HttpEnv(http_threads=2, http_attempts=1, http_backoff_s=0.01, http_max_backoff_s=0.02)


# The writers before the models, verbatim (the reference of the bytes).
def old_transforms_csv(transforms: Mapping[int, Sequence[float]]) -> str:
    lines = ["slice,m00,m10,m01,m11,m02,m12"]
    for z in sorted(transforms):
        lines.append(",".join([str(z), *(repr(float(v)) for v in transforms[z])]))
    return "\n".join(lines) + "\n"


def old_qc_csv(pairs: Sequence[PairChoice]) -> str:
    def cell(v: object) -> str:
        return "" if v is None else str(v)

    lines = [
        "pre,post,model,m01,affine_inliers,translation_inliers,"
        "affine_residual_px,translation_residual_px"
    ]
    for p in pairs:
        row = [
            p.pre,
            p.post,
            p.model,
            p.m01,
            p.affine_inliers,
            p.translation_inliers,
            p.affine_residual_px,
            p.translation_residual_px,
        ]
        lines.append(",".join(cell(v) for v in row))
    return "\n".join(lines) + "\n"


def old_pairs_csv(pairs: Sequence[PairChoice], align: GlobalAlignment) -> str:
    lines = old_qc_csv(pairs).splitlines()
    out = [lines[0] + ",solve_residual_px,used"]
    for line, r, u in zip(lines[1:], align.pair_residual_px, align.pair_used, strict=True):
        out.append(f"{line},{'' if r is None else round(r, 4)},{int(u)}")
    return "\n".join(out) + "\n"


def old_slices_csv(slices: Sequence[SliceQC]) -> str:
    lines = ["z,status,residual_px,features,reason"]
    for s in slices:
        feats = "" if s.features is None else str(s.features)
        reason = s.reason.replace('"', "'")
        lines.append(f'{s.z},{s.status},{s.residual_px:.4f},{feats},"{reason}"')
    return "\n".join(lines) + "\n"


def old_intensity_csv(
    stats: Mapping[int, SliceStats], table: Mapping[int, tuple[float, float]]
) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["z", "mean", "std", "pixels", "gain", "offset"])
    for z in sorted(stats):
        s, (gain, offset) = stats[z], table[z]
        writer.writerow(
            [z, f"{s.mean:.4f}", f"{s.std:.4f}", s.pixels, f"{gain:.6f}", f"{offset:.4f}"]
        )
    return out.getvalue()


def old_quality_csv(values: Mapping[int, float | None], doubtful: set[int]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["z", "ncc_next", "doubtful"])
    for z in sorted(values):
        v = values[z]
        writer.writerow([z, "" if v is None else f"{v:.5f}", int(z in doubtful)])
    return text.getvalue()


def _stored(conf: RunConf, key: str) -> bytes:
    return storage.read_bytes(conf.layout.process_url(key))


def _reads_back(cls: type[CsvRow], data: bytes) -> list[Any]:
    """Table ``data`` parsed as ``cls`` rows, which write the same bytes again."""
    rows = cls.parse_csv(data.decode(), "t.csv")
    assert cls.rows_to_csv(rows).encode() == data
    return rows


# collect: qc.csv, transforms.csv and slices.csv -------------------------------------------

MINZ, MAXZ = 3, 8


def scripted_align(req: Request) -> Answer:
    """Pairs with varied answers: shifts with long decimals, a translation not found, a
    pair with no model at all (slice 6 is then bad), an affine with shear."""
    pre, post = (int(v) for v in re.findall(r"img\.(\d+)\.png", req.body["pre"] + req.body["post"]))
    dx, dy = 1.0 / 3 * (pre - 5), -0.1 * pre + 1e-7
    found = (pre, post) not in {(5, 6), (6, 7), (5, 7), (6, 8)}
    shear = 0.00123456789 if pre == 3 else 0.0
    return Answer(
        200,
        {
            "width": 20,
            "height": 15,
            "width0": 20,
            "height0": 15,
            "affine": [1.0, 0.0, shear, 1.0, dx, dy] if found else None,
            "translation": affine.translation(dx, dy) if found and pre != 4 else None,
            "affine_found": found,
            "translation_found": found and pre != 4,
            "affine_inliers": 40 + pre if found else 3,
            "translation_inliers": 44 if found and pre != 4 else None,
            "affine_mean_residual_px": 0.123456789 * pre if found else None,
            "translation_mean_residual_px": 0.4 if found and pre != 4 else None,
        },
    )


def _collect(root: Path, **conf: Any) -> RunInfo:
    storage.create_bucket("src")
    write_slices("src", "img.%05d.png", range(MINZ, MAXZ + 1), size_xy=(40, 30))
    data = {"id": "r1", "image": "img.%05d.png", "minz": MINZ, "maxz": MAXZ, "source": "src"}
    info = stages.validate_run({**data, **conf}, dag_width=2, dag_id="emprocess_width2_test")
    stages.create_env(info, "manual__1")
    with ScriptedServer(scripted_align) as server:
        for worker in (0, 1):
            stages.align_pairs(info, worker, server.url, FAST)
        gaps_stage.plan_gaps(info)
        for worker in (0, 1):
            gaps_stage.align_gap_pairs(info, worker, server.url, FAST)
        stages.collect_alignment(info)
    return info


def _answers(info: RunInfo) -> dict[tuple[int, int], Any]:
    tasks = plan_align_pairs(info.conf, info.intensity_window)
    answers = read_cached(tasks, info.conf.layout.process_url(layout.AFFINE_CACHE))
    return {layout.parse_pair_name(t.name): answers[t.name] for t in tasks}


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EMPROCESS_STORAGE_ROOT", str(tmp_path / "root"))
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


def test_collect_with_the_global_solve_writes_the_old_bytes(root: Path) -> None:
    info = _collect(root, downsample_factor=2, neighbors=2, skip_slices=[4])
    conf = info.conf
    results = _answers(info)
    gap_plan, more = gaps_stage.read_gap_answers(info)
    results.update(more)
    solved = global_alignment(
        results,
        conf.minz,
        conf.maxz,
        info.slice_size_xy,
        conf.downsample_factor,
        conf.regularization,
        conf.skip_slices,
        gap_plan,
    )
    comp = solved.composition
    qc = _stored(conf, layout.QC)
    assert qc == old_pairs_csv(comp.pairs, solved).encode()
    assert _stored(conf, layout.TRANSFORMS_CSV) == old_transforms_csv(comp.transforms).encode()
    assert _stored(conf, layout.SLICES) == old_slices_csv(solved.slices).encode()
    # What the inputs covered: empty cells, solve residuals, unused pairs, bad slices.
    text = qc.decode()
    assert "identity,,3,,,,,0\n" in text and ",44,,0.4" in text and ",1\n" in text
    assert {s.status for s in solved.slices} >= {"good", "bad"}
    assert any(s.reason == "named in skip_slices" for s in solved.slices)

    records = conf.layout.records
    pairs = records.read_pairs()
    assert pairs is not None and _reads_back(PairRow, qc) == pairs
    assert [(p.pre, p.post) for p in pairs] == [(p.pre, p.post) for p in comp.pairs]
    assert [p.used for p in pairs] == solved.pair_used
    assert records.read_qc() == [QcRow(**p.model_dump()) for p in pairs]
    slices = records.read_slices()
    assert slices is not None and _reads_back(SliceRow, _stored(conf, layout.SLICES)) == slices
    assert [(s.z, s.status, s.reason) for s in slices] == [
        (s.z, s.status, s.reason) for s in solved.slices
    ]
    transforms = records.read_transforms_csv()
    assert transforms is not None
    assert {t.slice: [t.m00, t.m10, t.m01, t.m11, t.m02, t.m12] for t in transforms} == {
        z: [float(v) for v in t] for z, t in comp.transforms.items()
    }
    assert _reads_back(TransformRow, _stored(conf, layout.TRANSFORMS_CSV)) == transforms

    # RunRecords' writers, given the solve's rows, write the same bytes again.
    before = {k: _stored(conf, k) for k in (layout.QC, layout.SLICES, layout.TRANSFORMS_CSV)}
    records.write_pairs(pair_rows(comp.pairs, solved))
    records.write_slices(slice_rows(solved.slices))
    records.write_transforms_csv(comp.transforms)
    assert {k: _stored(conf, k) for k in before} == before


def test_collect_chaining_pairs_and_skip_align_write_the_old_bytes(root: Path) -> None:
    info = _collect(root, downsample_factor=2, global_solve=False)
    conf = info.conf
    chain = {pre: r for (pre, post), r in _answers(info).items() if post == pre + 1}
    comp = compose_alignment(chain, MINZ, MAXZ, info.slice_size_xy, conf.downsample_factor)
    assert {p.model for p in comp.pairs} == {"affine", "translation", "identity"}
    qc = _stored(conf, layout.QC)
    assert qc == old_qc_csv(comp.pairs).encode()
    assert _stored(conf, layout.TRANSFORMS_CSV) == old_transforms_csv(comp.transforms).encode()
    assert _reads_back(QcRow, qc) == conf.layout.records.read_qc()
    conf.layout.records.write_qc([qc_row(p) for p in comp.pairs])
    assert _stored(conf, layout.QC) == qc

    skip = parse_conf({**conf.model_dump(by_alias=True), "id": "r2", "skip_align": True})
    info = stages.validate_run(
        skip.model_dump(by_alias=True), dag_width=2, dag_id="emprocess_width2_test"
    )
    stages.create_env(info, "manual__2")
    stages.collect_alignment(info)
    comp = identity_alignment(MINZ, MAXZ, info.slice_size_xy)
    assert _stored(skip, layout.QC) == old_qc_csv([]).encode() == QcRow.rows_to_csv([]).encode()
    assert _stored(skip, layout.TRANSFORMS_CSV) == old_transforms_csv(comp.transforms).encode()
    assert skip.layout.records.read_qc() == []


def test_the_writers_format_odd_values_as_before() -> None:
    """Values the runs rarely see: numpy floats, -0.0, tiny and huge numbers, infinities,
    a reason with quotes, commas and a line break, an unknown feature count."""
    odd = [np.float64(0.1) + np.float64(0.2), -0.0, 1e-20, 1.5e300, math.inf, 7.0]
    pairs = [
        PairChoice(0, 1, "affine", [], odd[0], 12, None, odd[2], odd[3]),
        PairChoice(1, 2, "translation", [], odd[1], None, 9, None, odd[4]),
        PairChoice(2, 3, "identity", [], None, None, None, None, None),
    ]
    assert qc_csv(pairs) == old_qc_csv(pairs)
    transforms = {
        2: [np.float32(1.1), 0, -0.0, 1, 1e-20, 3],
        0: list(affine.IDENTITY),
        1: [1.0, 2.5e-7, odd[0], 0.9999999999, -12345.678901234, math.inf],
    }
    assert transforms_csv(transforms) == old_transforms_csv(transforms)
    slices = [
        SliceQC(0, "good", "", 0.0, 1200),
        SliceQC(1, "bad", 'said "no", then\nleft', 12.345678, None),
        SliceQC(2, "bridged", "every pair around it disagrees", np.float64(1e-9), 0),
    ]
    assert slices_csv_of(slices) == old_slices_csv(slices)
    align = GlobalAlignment(
        composition=None,  # type: ignore[arg-type]
        slices=slices,
        pair_residual_px=[np.float64(0.123456789), None, 2.0],
        pair_used=[True, False, True],
        gaps=[],
    )
    assert pairs_csv(pairs, align) == old_pairs_csv(pairs, align)
    for cls, text in (
        (QcRow, qc_csv(pairs)),
        (PairRow, pairs_csv(pairs, align)),
        (TransformRow, transforms_csv(transforms)),
        (SliceRow, slices_csv_of(slices)),
    ):
        _reads_back(cls, text.encode())
    assert SliceRow.parse_csv(slices_csv_of(slices), "s.csv")[1].reason == "said 'no', then\nleft"


# plan_intensity: intensity.csv --------------------------------------------------------------


def test_plan_intensity_writes_the_old_bytes(
    backend: str, emwrite_service: str, tmp_path: Path
) -> None:
    """Four slices of different brightness measured by the real /slicestats."""
    from conftest import unique_bucket

    source = unique_bucket("csvrec")
    conf = parse_conf(
        {
            "id": "csv1",
            "image": "img.%05d.png",
            "minz": 0,
            "maxz": 3,
            "source": source,
            "intensity_correction": "slice",
        }
    )
    for b in (source, conf.layout.process):
        storage.create_bucket(b)
    rng = np.random.default_rng(7)
    for z in range(4):
        image = np.clip(rng.normal(90 + 17 * z, 20 + 3 * z, (60, 80)), 0, 255).astype(np.uint8)
        storage.write_bytes(
            f"gs://{source}/img.{z:05d}.png", cv2.imencode(".png", image)[1].tobytes()
        )
    transforms = {z: [1.0, 0.0, 0.0, 1.0, float(z), 0.0] for z in range(4)}
    measure_intensity(conf, transforms, (80, 60), emwrite_service, FAST)

    area = run_common_area(transforms, (80, 60))
    answers = read_cached(
        plan_slice_stats(conf, transforms, area), conf.layout.process_url(layout.STATS_CACHE)
    )
    stats = {
        z: SliceStats(float(a["mean"]), float(a["std"]), int(a["pixels"]))
        for z, a in ((z, answers[layout.slice_task_name(z)]) for z in range(4))
    }
    table = plan_gain_offset(stats)
    data = _stored(conf, layout.INTENSITY)
    assert data == old_intensity_csv(stats, table).encode()
    rows = _reads_back(IntensityRow, data)
    assert rows == conf.layout.records.read_intensity()
    assert [r.pixels for r in rows] == [s.pixels for s in stats.values()]
    gain_offset = read_gain_offset(conf)
    assert gain_offset == {r.z: (r.gain, r.offset) for r in rows}
    assert gain_offset is not None and len({g for g, _ in gain_offset.values()}) == 4


# finish_align: quality.csv --------------------------------------------------------------


def test_record_quality_writes_the_old_bytes(root: Path) -> None:
    """Thumbnails as the write stage leaves them: neighbours alike, slice 5 unlike the rest,
    slice 7's missing (its NCC and slice 6's are empty cells)."""
    conf = parse_conf({"id": "q1", "image": "img.%05d.png", "minz": 2, "maxz": 9, "source": "qsrc"})
    storage.create_bucket(conf.layout.process)
    size, bbox = (160, 120), (160, 120)
    factor = thumbnail_factor(*bbox)
    rng = np.random.default_rng(3)
    base = rng.integers(1, 255, (size[1] // factor, size[0] // factor)).astype(np.float64)
    for z in range(2, 10):
        if z == 7:
            continue
        noise = rng.normal(0, 60 if z == 5 else 8, base.shape)
        thumb = np.clip(base + noise, 1, 255).astype(np.uint8)
        key = layout.thumbnail_key(conf.id, conf.slice_name(z))
        storage.write_bytes(
            storage.bucket_url(conf.layout.process, key), cv2.imencode(".png", thumb)[1].tobytes()
        )
    transforms = {z: list(affine.IDENTITY) for z in range(2, 10)}
    summary = record_quality(conf, transforms, size, bbox)

    values = slice_ncc(conf, transforms, size, bbox)
    assert values[6] is None and values[7] is None and values[9] is None
    doubtful = set(doubtful_slices(values))
    assert summary["doubtful"] == sorted(doubtful) and summary["threshold"] == round(
        ncc_threshold(values), 5
    )
    assert doubtful, values  # slice 5 against its neighbours
    data = _stored(conf, layout.QUALITY)
    assert data == old_quality_csv(values, doubtful).encode()
    rows = _reads_back(QualityRow, data)
    assert rows == conf.layout.records.read_quality()
    assert [(r.z, r.doubtful) for r in rows] == [(z, z in doubtful) for z in sorted(values)]


# damaged tables -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "text", "message"),
    [
        (QcRow, "pre,post,m01\n1,2,0.1\n", "no column model"),
        (QcRow, "pre,post,model,m01\n1,2,affine,0.1\n2,3,affine,steep\n", "line 3: m01: "),
        (PairRow, "pre,post,model,used\n1,2,affine,maybe\n", "line 2: used: "),
        (PairRow, "pre,post,model\n1,2,affine\n", "no column used"),
        (TransformRow, "slice,m00,m10,m01,m11,m02,m12\n0,1,0,0,1,0\n", "line 2: m12 is missing"),
        (IntensityRow, "z,mean,std,pixels,gain,offset\n0,1,2,3.5,1,0\n", "line 2: pixels: "),
        (QualityRow, "z,ncc_next,doubtful\n0,0.9,0\n1,0.8,0,9\n", "line 3: more cells than"),
        (
            SliceRow,
            'z,status,residual_px,features,reason\n1,good,0.1,many,""\n',
            "line 2: features",
        ),
    ],
)
def test_a_damaged_table_names_the_file_line_and_field(
    cls: type[CsvRow], text: str, message: str
) -> None:
    with pytest.raises(MalformedRecord, match=re.escape(f"t.csv is damaged: {message}")):
        cls.parse_csv(text, "t.csv")


def test_a_damaged_record_of_a_run_names_its_url(root: Path) -> None:
    conf = parse_conf({"id": "d1", "image": "img.%05d.png", "minz": 0, "maxz": 1, "source": "dsrc"})
    storage.create_bucket(conf.layout.process)
    url = conf.layout.process_url(layout.QUALITY)
    storage.write_bytes(url, b"z,ncc_next,doubtful\n0,0.5,0\n1,high,0\n")
    with pytest.raises(MalformedRecord, match=re.escape(f"{url} is damaged: line 3: ncc_next")):
        conf.layout.records.read_quality()
    assert conf.layout.records.read_intensity() is None  # absent: None, not an error
    with pytest.raises(TypeError, match="QcRow is not a QualityRow"):
        QualityRow.rows_to_csv([QcRow(pre=1, post=2, model="affine")])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="PairRow is not a QcRow"):  # a row of the other form
        QcRow.rows_to_csv([PairRow(pre=1, post=2, model="affine", used=True)])
