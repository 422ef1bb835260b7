"""Monitor a run from its process bucket alone: progress per stage, ETA, state, alignment QC.

``load_run`` reads ``gs://SOURCE_process/RUN_ID/`` (CONTRACTS.md: the creation times of
the cache objects say how many mini-tasks of each stage are done and when);
``plot_progress``, ``plot_qc`` and ``write_html`` draw it; ``run_report`` does all of it
(the ``emprocess report`` command and the clio_report.ipynb notebook).

Loading a run needs only the base install; the figures need matplotlib, from the
``report`` extra, and are imported on first use, so ``emprocess run``'s progress and
``trigger --wait`` work without it.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emprocess.errors import EmprocessError
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

if TYPE_CHECKING:
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
    "REPORT_EXTRA",
    "RUNNING",
    "STALLED",
    "PairQC",
    "ReportExtraMissing",
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

REPORT_EXTRA = "pip install 'clio-ingest[report]'"
_DRAWING = {
    "plot_progress": "plots",
    "plot_qc": "plots",
    "progress_figure": "plots",
    "qc_figure": "plots",
    "write_html": "page",
}


class ReportExtraMissing(EmprocessError):
    """The report's figures need matplotlib, which the ``report`` extra installs."""


def __getattr__(name: str) -> Any:
    """The drawing functions, imported on first use (they need matplotlib)."""
    if name not in _DRAWING:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _drawing(name)


def _drawing(name: str) -> Any:
    try:
        module = importlib.import_module(f"{__name__}.{_DRAWING[name]}")
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "matplotlib":
            raise
        raise ReportExtraMissing(
            f"the report's figures need matplotlib, from the [report] extra: {REPORT_EXTRA}"
        ) from None
    return getattr(module, name)


def run_report(source: str, run_id: str, out_dir: str | Path, **options: Any) -> RunReport:
    """Load the run and write ``out_dir``/progress.png, qc.png, quality.png, report.html, report.json.

    Args:
        source: the run's source bucket.
        run_id: the run's id.
        out_dir: a local folder (created if needed).
        **options: keyword arguments of :func:`load_run` (thresholds, ``now``, ...).
    """
    # Before the load, so a missing extra is said at once.
    plot_progress, plot_qc, write_html = map(_drawing, ("plot_progress", "plot_qc", "write_html"))
    report = load_run(source, run_id, **options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = plot_progress(report, out / "progress.png")
    qc = plot_qc(report, out / "qc.png")
    from emprocess.report.quality import plot_quality

    quality = plot_quality(report, out / "quality.png")
    write_html(report, out, progress, qc, quality)
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    log.info("report of %s (%s) in %s", run_id, report.state, out)
    return report
