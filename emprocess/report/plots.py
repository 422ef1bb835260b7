"""Figures of a :class:`RunReport`: mini-tasks done over time, and alignment QC along z.

Figures are built on matplotlib's Agg canvas directly (no pyplot), so they neither need
a display nor change the backend of a notebook that imports this module.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from emprocess.report.model import FEW_INLIERS, LARGE_RESIDUAL, NO_MODEL, RUNNING, RunReport

log = logging.getLogger(__name__)

DPI = 100
FLAG_COLOURS = {FEW_INLIERS: "tab:orange", LARGE_RESIDUAL: "tab:red", NO_MODEL: "black"}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=DPI)
    log.info("wrote %s", path)
    return path


def progress_figure(report: RunReport) -> Figure:
    """One panel per stage: mini-tasks done against finish time, the total as a dashed
    line and, while running, the line to the ETA."""
    stages = [s for s in report.stages if not s.skipped]
    # A one-request stage (ngmeta) gets a low panel.
    ratios = [0.45 if s.total == 1 else 1.0 for s in stages]
    height_in = 1.9 * sum(ratios) + 0.9
    fig = Figure(figsize=(9, height_in))
    # Fixed margins: a layout engine would cost more time than the drawing itself.
    fig.subplots_adjust(
        left=0.08, right=0.98, top=1 - 0.55 / height_in, bottom=0.55 / height_in, hspace=0.6
    )
    axes = fig.subplots(
        len(stages), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": ratios}
    )[:, 0]
    fig.suptitle(f"{report.run_id}: mini-tasks done ({report.state})")
    for ax, st in zip(axes, stages, strict=True):
        total = "?" if st.total is None else str(st.total)
        ax.set_title(f"{st.label}: {st.done}/{total}", loc="left", fontsize=10)
        ax.set_ylabel("done")
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        if st.finish_times:
            start = min(report.started or st.finish_times[0], st.finish_times[0])
            xs = [start, *st.finish_times]
            ys = [0, *range(1, len(st.finish_times) + 1)]
            if report.state == RUNNING and report.generated > st.finish_times[-1]:
                xs.append(report.generated)  # nothing more finished until now
                ys.append(st.done)
            ax.step(xs, ys, where="post", color="tab:blue")
        if st.total is not None:
            ax.axhline(st.total, color="grey", linestyle="--", linewidth=1)
            ax.set_ylim(0, max(1, st.total) * 1.08)
        if st.eta is not None and st.last_finished is not None and st.total is not None:
            ax.plot(
                [report.generated, st.eta],
                [st.done, st.total],
                color="tab:blue",
                linestyle=":",
                label=f"ETA {st.eta:%m-%d %H:%M} UTC",
            )
            ax.legend(loc="lower right", fontsize=8)
        if not st.finish_times:
            ax.text(0.5, 0.5, "nothing done yet", transform=ax.transAxes, ha="center", va="center")
    if report.state == RUNNING:
        for ax in axes:
            ax.axvline(report.generated, color="tab:green", linewidth=1)
        axes[0].annotate(
            "now", (report.generated, 1.0), xycoords=("data", "axes fraction"), color="tab:green",
            xytext=(3, -12), textcoords="offset points",
        )  # fmt: skip
    if any(s.finish_times for s in stages):
        locator = AutoDateLocator()
        axes[-1].xaxis.set_major_locator(locator)
        axes[-1].xaxis.set_major_formatter(ConciseDateFormatter(locator))
    axes[-1].set_xlabel("finish time (UTC)")
    return fig


def qc_figure(report: RunReport) -> Figure:
    """Inliers and mean residual of the model used, per pair along z, flagged pairs marked."""
    fig = Figure(figsize=(9, 5.5))
    fig.subplots_adjust(left=0.08, right=0.98, top=0.92, bottom=0.09, hspace=0.12)
    ax_in, ax_res = fig.subplots(2, 1, sharex=True)
    fig.suptitle(f"{report.run_id}: alignment QC ({report.qc_source or 'no results yet'})")
    if not report.qc:
        ax_in.text(0.5, 0.5, "no pair results yet", transform=ax_in.transAxes, ha="center")
        return fig
    # With several neighbours per slice, the lines follow the (z - 1, z) pairs.
    adjacent = [p for p in report.qc if p.post == p.pre + 1] or list(report.qc)
    zs = [p.post for p in adjacent]
    inliers = [float("nan") if p.inliers is None else p.inliers for p in adjacent]
    residuals = [float("nan") if p.residual_px is None else p.residual_px for p in adjacent]
    ax_in.plot(zs, inliers, ".-", color="tab:blue", markersize=3, linewidth=0.8)
    ax_in.axhline(report.min_inliers, color="tab:orange", linestyle="--", linewidth=1)
    ax_in.set_ylabel("inliers")
    ax_in.set_ylim(bottom=0)
    ax_res.plot(zs, residuals, ".-", color="tab:blue", markersize=3, linewidth=0.8)
    ax_res.axhline(report.max_residual_px, color="tab:red", linestyle="--", linewidth=1)
    ds = int(report.conf.get("downsample_factor", 1) or 1)
    ax_res.set_ylabel("mean residual (px)" if ds == 1 else f"mean residual (px at 1/{ds})")
    ax_res.set_ylim(bottom=0)
    ax_res.set_xlabel("slice z (aligned onto z - 1)")
    for flag, colour in FLAG_COLOURS.items():
        hits = [p for p in report.qc if flag in p.flags]
        if not hits:
            continue
        for ax in (ax_in, ax_res):
            for p in hits:
                ax.axvline(p.post, color=colour, alpha=0.35, linewidth=2)
        ax_in.scatter(
            [p.post for p in hits],
            [p.inliers or 0 for p in hits],
            color=colour,
            zorder=3,
            label=f"{flag} ({len(hits)})",
        )
    if report.flagged:
        ax_in.legend(loc="best", fontsize=8)
    if report.slice_qc:
        _slice_panel(fig, report)
    return fig


STATUS_COLOURS = {"good": "tab:green", "bridged": "tab:orange", "bad": "tab:red"}


def _slice_panel(fig: Figure, report: RunReport) -> None:
    """A third panel: per slice residual after the global solve, bridged and bad slices marked."""
    fig.set_size_inches(9, 8)
    axes = fig.axes
    for i, ax in enumerate(axes):
        ax.set_position((0.08, 0.69 - 0.29 * i, 0.9, 0.23))
    ax = fig.add_axes((0.08, 0.07, 0.9, 0.2), sharex=axes[0])
    zs = [r["z"] for r in report.slice_qc]
    residual = [r["residual_px"] if r["status"] == "good" else np.nan for r in report.slice_qc]
    ax.plot(zs, residual, ".-", color="tab:blue", markersize=3)
    for status, colour in STATUS_COLOURS.items():
        hits = [r for r in report.slice_qc if r["status"] == status]
        if hits and status != "good":
            for r in hits:
                for a in [*axes, ax]:
                    a.axvline(r["z"], color=colour, alpha=0.35, linewidth=2)
            ax.scatter(
                [r["z"] for r in hits], [0] * len(hits), color=colour, zorder=3,
                label=f"{status} ({len(hits)})",
            )  # fmt: skip
    ax.set_ylabel("slice residual\nafter solve (px)")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("slice z")
    if any(r["status"] != "good" for r in report.slice_qc):
        ax.legend(loc="best", fontsize=8)


def plot_progress(report: RunReport, path: str | Path) -> Path:
    """Write the progress figure (:func:`progress_figure`) as a PNG; returns its path."""
    return _save(progress_figure(report), path)


def plot_qc(report: RunReport, path: str | Path) -> Path:
    """Write the QC figure (:func:`qc_figure`) as a PNG; returns its path."""
    return _save(qc_figure(report), path)
