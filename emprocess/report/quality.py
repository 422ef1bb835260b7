"""Quality along z in the report: align/quality.csv read, and its figure (NCC of each slice with the next).

Reading needs only the base install; the figure needs matplotlib (the ``report`` extra),
imported when it is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from emprocess.layout import RunLayout

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from emprocess.report.model import RunReport


def read_quality(run: RunLayout) -> tuple[dict[str, Any], ...]:
    """Rows of the run's align/quality.csv as {z, ncc_next (None for the last), doubtful};
    () before finish_align wrote it."""
    return tuple(row.model_dump() for row in run.records.read_quality() or ())


def quality_figure(report: RunReport) -> Figure:
    """NCC of each aligned slice with the next along z; doubtful slices and the alignment's
    bridged and bad slices marked."""
    from matplotlib.figure import Figure

    from emprocess.report.plots import STATUS_COLOURS

    fig = Figure(figsize=(9, 3.2))
    fig.subplots_adjust(left=0.08, right=0.98, top=0.88, bottom=0.16)
    ax = fig.subplots()
    fig.suptitle(f"{report.run_id}: quality along z (NCC of slice z with z + 1)")
    rows = [r for r in report.slice_ncc if r["ncc_next"] is not None]
    if not rows:
        ax.text(0.5, 0.5, "no quality record yet (written by finish_align)", ha="center",
                transform=ax.transAxes)  # fmt: skip
        return fig
    ax.plot([r["z"] for r in rows], [r["ncc_next"] for r in rows], ".-", color="tab:blue",
            markersize=3, linewidth=0.8)  # fmt: skip
    doubtful = [r for r in rows if r["doubtful"]]
    if doubtful:
        ax.scatter([r["z"] for r in doubtful], [r["ncc_next"] for r in doubtful],
                   color="tab:red", zorder=3, label=f"doubtful ({len(doubtful)})")  # fmt: skip
    for r in report.slice_qc:
        if r.get("status") in ("bridged", "bad"):
            ax.axvline(r["z"], color=STATUS_COLOURS[r["status"]], alpha=0.35, linewidth=2)
    threshold = (report.quality or {}).get("threshold")
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1,
                   label=f"threshold {threshold:.3f}")  # fmt: skip
    ax.set_xlabel("slice z")
    ax.set_ylabel("NCC with z + 1")
    ax.legend(loc="lower left", fontsize=8)
    return fig


def plot_quality(report: RunReport, path: str | Path) -> Path:
    """Write the quality-along-z figure (:func:`quality_figure`) as a PNG; returns its path."""
    from emprocess.report.plots import _save

    return _save(quality_figure(report), path)
