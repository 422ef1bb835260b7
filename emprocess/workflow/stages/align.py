"""The align stages: the features and pair requests, their check, and ``collect``
(global transforms, canvas) with the records it writes and others read."""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

from emprocess import storage
from emprocess.errors import EmprocessError
from emprocess.layout import (
    AFFINE_CACHE,
    FEATURES_CACHE,
    QC,
    STAGE_AFFINE,
    STAGE_FEATURES,
    parse_pair_name,
)
from emprocess.records import AlignmentSummary, CanvasRecord
from emprocess.settings import HttpEnv
from emprocess.workflow.batch import BatchSummary, cached_keys, read_cached
from emprocess.workflow.conf import RunConf
from emprocess.workflow.payloads import plan_align_pairs, plan_features
from emprocess.workflow.stages.alignfrom import take_alignment
from emprocess.workflow.stages.common import RunInfo, _names, _send

log = logging.getLogger(__name__)


def align_pairs(
    info: RunInfo, worker_id: int, base_url: str, settings: HttpEnv | None = None
) -> dict[str, Any]:
    """Batch task ``affine_{i}``: align this worker's pairs (nothing when skip_align)."""
    conf = info.conf
    if conf.skip_align or conf.align_from is not None:
        log.info("skip_align or align_from: no alignment requests")
        return BatchSummary(STAGE_AFFINE, worker_id, info.width, 0).to_json()
    tasks = plan_align_pairs(conf, info.intensity_window, (worker_id, info.width))
    return _send(info, tasks, STAGE_AFFINE, AFFINE_CACHE, base_url, settings, worker_id, info.width)


def extract_slice_features(
    info: RunInfo, worker_id: int, base_url: str, settings: HttpEnv | None = None
) -> dict[str, Any]:
    """Batch task ``features_{i}``: each of this worker's slices' features, extracted once
    and stored by the alignment service (nothing when skip_align or align_from)."""
    conf = info.conf
    if conf.skip_align or conf.align_from is not None:
        log.info("skip_align or align_from: no features requests")
        return BatchSummary(STAGE_FEATURES, worker_id, info.width, 0).to_json()
    tasks = plan_features(conf, info.intensity_window, (worker_id, info.width))
    return _send(
        info, tasks, STAGE_FEATURES, FEATURES_CACHE, base_url, settings, worker_id, info.width
    )


def check_features(info: RunInfo) -> dict[str, Any]:
    """``check_features``: every slice's features request was answered (one listing).

    A pair whose slice has no stored features would still align (the service extracts
    them), but each of its ``2 x neighbors`` pairs would extract them again.

    Raises:
        EmprocessError: naming the slices without an answer.
    """
    conf = info.conf
    if conf.skip_align or conf.align_from is not None:
        return {"slices": 0}
    tasks = plan_features(conf, info.intensity_window)
    done = cached_keys(conf.layout.process_url(FEATURES_CACHE))
    missing = [t.name for t in tasks if t.cache_key() not in done]
    if missing:
        raise EmprocessError(
            f"{len(missing)} of {len(tasks)} slices have no features: {_names(missing)}"
        )
    return {"slices": len(tasks)}


def collect_alignment(info: RunInfo) -> dict[str, Any]:
    """``collect``: global transforms, transforms.json/.csv, qc.csv, slices.csv, canvas.json.

    Computes only; it sends nothing. With ``global_solve`` (default) all pairs of the
    ``neighbors`` nearest slices, and the pairs across gaps of the second align round
    (planned in align/gaps.json and answered by ``align.gap_pairs``,
    :mod:`emprocess.workflow.gaps`; no gaps.json, no second round), are solved at once
    (:mod:`emprocess.workflow.globalalign`); bad slices are bridged and listed in
    align/slices.csv, their stand-ins in align/fill.json. Without it, the (z, z + 1)
    pairs are chained as before.

    Returns:
        ``{"bbox": [width, height], "models": {model: pairs}, "transforms": URL}``, plus
        ``"alignment"`` (quality figures, :meth:`GlobalAlignment.summary`) with the solve.
    """
    from emprocess.workflow.compose import (
        compose_alignment,
        identity_alignment,
        qc_csv,
    )
    from emprocess.workflow.globalalign import global_alignment, pairs_csv, slice_rows

    conf = info.conf
    if conf.align_from is not None:
        return take_alignment(conf)
    size = info.slice_size_xy
    quality = None
    fill: dict[int, int | None] = {}
    if conf.skip_align:
        comp = identity_alignment(conf.minz, conf.maxz, size)
        qc_text = qc_csv(comp.pairs)
    else:
        tasks = plan_align_pairs(conf, info.intensity_window)
        answers = read_cached(tasks, conf.layout.process_url(AFFINE_CACHE))
        results = {parse_pair_name(t.name): answers[t.name] for t in tasks}
        if conf.global_solve:
            from emprocess.workflow.gaps import read_gap_answers

            gap_plan, more = read_gap_answers(info)
            results.update(more)
            solved = global_alignment(
                results,
                conf.minz,
                conf.maxz,
                size,
                conf.downsample_factor,
                conf.regularization,
                conf.skip_slices,
                gap_plan,
            )
            comp, quality = solved.composition, solved.summary()
            qc_text = pairs_csv(comp.pairs, solved)
            fill = solved.fill(conf.bad_slice_fill)
            conf.layout.records.write_slices(slice_rows(solved.slices))
        else:
            chain = {pre: r for (pre, post), r in results.items() if post == pre + 1}
            comp = compose_alignment(chain, conf.minz, conf.maxz, size, conf.downsample_factor)
            qc_text = qc_csv(comp.pairs)
    records = conf.layout.records
    transforms_url = records.write_transforms(
        {z: comp.transforms[z] for z in sorted(comp.transforms)}
    )
    records.write_transforms_csv(comp.transforms)
    storage.write_bytes(conf.layout.process_url(QC), qc_text.encode(), content_type="text/csv")
    records.write_fill(dict(sorted(fill.items())))
    models = dict(Counter(p.model for p in comp.pairs))
    log.info("canvas %dx%d; models used %s", comp.bbox_xy[0], comp.bbox_xy[1], models)
    canvas = CanvasRecord(
        bbox=list(comp.bbox_xy),
        models=models,
        transforms=transforms_url,
        alignment=None if quality is None else AlignmentSummary.model_validate(quality),
    )
    if quality is not None:
        log.info("alignment: %s", json.dumps(quality)[:2000])
    records.write_canvas(canvas)
    return canvas.to_json()


def read_transforms(conf: RunConf) -> dict[int, list[float]]:
    """transforms.json of the run, by slice number.

    Raises:
        ObjectNotFound: when collect has not written it.
    """
    return conf.layout.records.transforms()


def read_fill(conf: RunConf) -> dict[int, int | None]:
    """align/fill.json of the run (bad slice -> stand-in slice or None); {} when absent."""
    return conf.layout.records.read_fill()
