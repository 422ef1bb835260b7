"""Alignment QC per pair, from align/qc.csv or, before collect, from the cached answers."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from emprocess.records.tables import QcRow
from emprocess.report.model import FEW_INLIERS, LARGE_RESIDUAL, NO_MODEL, PairQC


def pair_qc(row: Mapping[str, Any], min_inliers: int, max_residual_px: float) -> PairQC:
    """Judge one pair from qc.csv's columns (:class:`QcRow`'s fields): the inliers and residual of the model used.

    Args:
        row: ``pre``, ``post``, ``model`` and the optional inlier and residual columns.
        min_inliers: fewer inliers of the model used flags ``few_inliers``.
        max_residual_px: a larger mean residual of the model used flags ``large_residual``.
    """
    model = str(row["model"])
    a_in, t_in = row.get("affine_inliers"), row.get("translation_inliers")
    if model == "affine":
        inliers, residual = a_in, row.get("affine_residual_px")
    elif model == "translation":
        inliers, residual = t_in, row.get("translation_residual_px")
    else:  # no model found: judge by the best try
        counts = [c for c in (a_in, t_in) if c is not None]
        inliers, residual = (max(counts) if counts else None), None
    flags = []
    if inliers is not None and inliers < min_inliers:
        flags.append(FEW_INLIERS)
    if residual is not None and residual > max_residual_px:
        flags.append(LARGE_RESIDUAL)
    if model == "identity":
        flags.append(NO_MODEL)
    return PairQC(
        pre=int(row["pre"]),
        post=int(row["post"]),
        model=model,
        inliers=inliers,
        residual_px=residual,
        m01=row.get("m01"),
        affine_inliers=a_in,
        translation_inliers=t_in,
        affine_residual_px=row.get("affine_residual_px"),
        translation_residual_px=row.get("translation_residual_px"),
        flags=tuple(flags),
    )


def qc_from_rows(rows: Iterable[QcRow], min_inliers: int, max_residual_px: float) -> list[PairQC]:
    """QC rows from align/qc.csv's rows (``RunRecords.read_qc``), ascending z."""
    judged = [pair_qc(row.model_dump(), min_inliers, max_residual_px) for row in rows]
    return sorted(judged, key=lambda p: p.pre)


def qc_from_answers(
    answers: Mapping[int, Mapping[str, Any]], min_inliers: int, max_residual_px: float
) -> list[PairQC]:
    """QC rows from the alignment service's answers (pre z -> answer), ascending z.

    The model is chosen by collect's own rule
    (:func:`emprocess.workflow.compose.choose_pair_transform`), so the rows equal what
    qc.csv will say.
    """
    from emprocess.workflow.compose import choose_pair_transform

    return [
        pair_qc(
            dataclasses.asdict(choose_pair_transform(answers[z], z)), min_inliers, max_residual_px
        )
        for z in sorted(answers)
    ]
