"""Monitor a run from its process bucket alone: progress per stage, ETA, state, alignment QC.

``load_run`` reads ``gs://SOURCE_process/RUN_ID/`` (CONTRACTS.md: the creation times of
the cache objects say how many mini-tasks of each stage are done and when);
``plot_progress``, ``plot_qc`` and ``write_html`` draw it; ``run_report`` does all of it
(the ``emprocess report`` command and the clio_report.ipynb notebook).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from emprocess.report.load import (
    DEFAULT_MAX_RESIDUAL_PX,
    DEFAULT_MIN_INLIERS,
    DEFAULT_STALL_AFTER_S,
    RunNotFound,
    canvas_from_transforms,
    load_run,
)
from emprocess.report.model import (
    FAILED,
    FEW_INLIERS,
    FINISHED,
    LARGE_RESIDUAL,
    NO_MODEL,
    RUNNING,
    STALLED,
    PairQC,
    RunReport,
    StageProgress,
)
from emprocess.report.page import write_html
from emprocess.report.plots import plot_progress, plot_qc, progress_figure, qc_figure

__all__ = [
    "DEFAULT_MAX_RESIDUAL_PX",
    "DEFAULT_MIN_INLIERS",
    "DEFAULT_STALL_AFTER_S",
    "FAILED",
    "FEW_INLIERS",
    "FINISHED",
    "LARGE_RESIDUAL",
    "NO_MODEL",
    "RUNNING",
    "STALLED",
    "PairQC",
    "RunNotFound",
    "RunReport",
    "StageProgress",
    "canvas_from_transforms",
    "load_run",
    "plot_progress",
    "plot_qc",
    "progress_figure",
    "qc_figure",
    "run_report",
    "write_html",
]

log = logging.getLogger(__name__)


def run_report(source: str, run_id: str, out_dir: str | Path, **options: Any) -> RunReport:
    """Load the run and write ``out_dir``/progress.png, qc.png, report.html and report.json.

    Args:
        source: the run's source bucket.
        run_id: the run's id.
        out_dir: a local folder (created if needed).
        **options: keyword arguments of :func:`load_run` (thresholds, ``now``, ...).
    """
    report = load_run(source, run_id, **options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = plot_progress(report, out / "progress.png")
    qc = plot_qc(report, out / "qc.png")
    write_html(report, out, progress, qc)
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    log.info("report of %s (%s) in %s", run_id, report.state, out)
    return report
