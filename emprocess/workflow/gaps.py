"""The second align round as a stage of its own: plan the pairs across bad slices, send them.

``align.plan_gaps`` reads the first round's pair answers, plans the pairs across each
run of bad slices (:func:`~emprocess.workflow.globalalign.plan_gap_pairs`) and records
the plan in align/gaps.json; the batch tasks ``align.gap_pairs_{i}`` send worker i's
share of it (index % width == i) through the pool, cached under the align stage's prefix
like every pair, so a retried or re-run task sends only what is missing; ``collect``
then reads their answers (:func:`read_gap_answers`) and solves, sending nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from emprocess.layout import AFFINE_CACHE, STAGE_AFFINE, parse_pair_name
from emprocess.records import GapsRecord
from emprocess.settings import HttpEnv
from emprocess.workflow.batch import (
    BatchSummary,
    MiniTask,
    read_answered,
    read_cached,
    run_batch,
)
from emprocess.workflow.conf import RunConf
from emprocess.workflow.globalalign import GapPlan, plan_gap_pairs
from emprocess.workflow.payloads import plan_align_pairs, plan_pair_tasks

if TYPE_CHECKING:
    from emprocess.workflow.stages import RunInfo

log = logging.getLogger(__name__)

STAGE = STAGE_AFFINE
"""The gap pairs are align pairs: same cache prefix, same failure records, same report."""

SHOWN = 10


def has_gap_round(conf: RunConf) -> bool:
    """Whether the run has a second align round: it aligns its own pairs and solves globally."""
    return conf.global_solve and not conf.skip_align and conf.align_from is None


def plan_gaps(info: RunInfo) -> dict[str, Any]:
    """``align.plan_gaps``: plan the pairs across bad slices from the first round's answers.

    Writes align/gaps.json (the report counts its pairs among the align pairs); a run
    without the round (:func:`has_gap_round`) writes nothing. Reading the answers and
    planning is all it does; the same answers give the same plan, so a re-run rewrites
    the same bytes.

    Returns:
        ``{"pairs": n, "gaps": [[first, last], ...], "too_long": [...]}`` (lists cut at
        10 runs), or ``{"pairs": 0}`` without the round.
    """
    conf = info.conf
    if not has_gap_round(conf):
        log.info("no second align round (skip_align, align_from or no global_solve)")
        return {"pairs": 0}
    tasks = plan_align_pairs(conf, info.intensity_window)
    answers = read_cached(tasks, conf.layout.process_url(AFFINE_CACHE))
    results = {parse_pair_name(t.name): answers[t.name] for t in tasks}
    plan = plan_gap_pairs(results, conf.minz, conf.maxz, conf.downsample_factor, conf.skip_slices)
    conf.layout.records.write_gaps(GapsRecord.model_validate(plan.to_json()))
    log.info(
        "second align round: %d pairs across %d gaps; %d gaps too long to match across: %s",
        len(plan.pairs), len(plan.gaps), len(plan.too_long), plan.too_long[:SHOWN],
    )  # fmt: skip
    return {
        "pairs": len(plan.pairs),
        "gaps": [list(g) for g in plan.gaps[:SHOWN]],
        "too_long": [list(g) for g in plan.too_long[:SHOWN]],
    }


def read_gap_plan(conf: RunConf) -> GapPlan | None:
    """The run's recorded gap plan (align/gaps.json); None when it has none."""
    if not has_gap_round(conf):
        return None
    record = conf.layout.records.read_gaps()
    return None if record is None else GapPlan.from_json(record.to_json())


def gap_pair_tasks(info: RunInfo, plan: GapPlan) -> list[MiniTask]:
    """The align mini-tasks of the plan's pairs; index = position in the plan."""
    return plan_pair_tasks(info.conf, plan.pairs, info.intensity_window)


def align_gap_pairs(
    info: RunInfo, worker_id: int, base_url: str, settings: HttpEnv | None = None
) -> dict[str, Any]:
    """Batch task ``gap_pairs_{i}``: align this worker's pairs of the recorded gap plan."""
    conf = info.conf
    plan = read_gap_plan(conf)
    tasks = [] if plan is None else gap_pair_tasks(info, plan)
    if not tasks:
        log.info("no pairs across bad slices to align")
        return BatchSummary(STAGE, worker_id, info.width, 0).to_json()
    return run_batch(
        tasks,
        base_url=base_url,
        cache_url=conf.layout.process_url(AFFINE_CACHE),
        worker_id=worker_id,
        width=info.width,
        stage=STAGE,
        settings=settings,
        failure_url=conf.layout.failure_url(STAGE),
        run_id=conf.id,
    ).to_json()


def read_gap_answers(info: RunInfo) -> tuple[GapPlan | None, dict[tuple[int, int], Any]]:
    """The recorded gap plan and its pairs' cached answers, for ``collect``.

    Raises:
        EmprocessError: naming the gap pairs that have no answer (their batch task has
            not run, or failed).
    """
    conf = info.conf
    plan = read_gap_plan(conf)
    if plan is None or not plan.pairs:
        return plan, {}
    tasks = gap_pair_tasks(info, plan)
    cache = conf.layout.process_url(AFFINE_CACHE)
    answers = read_answered(tasks, cache, "pairs across bad slices", "align.gap_pairs")
    return plan, {parse_pair_name(t.name): answers[t.name] for t in tasks}
