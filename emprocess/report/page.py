"""report.html: one self-contained page (figures embedded as base64 PNG) for a run."""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

from emprocess.report.model import FINISHED, RUNNING, RunReport, iso, short_time
from emprocess.report.plots import plot_progress, plot_qc
from emprocess.report.quality import plot_quality

log = logging.getLogger(__name__)

STATE_COLOURS = {FINISHED: "#2e7d32", RUNNING: "#1565c0"}
"""Badge colour per state; any other state (stalled, failed) is red."""

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.badge { color: white; padding: 0.15em 0.6em; border-radius: 0.3em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
img { max-width: 100%; }
"""


def _e(value: object) -> str:
    return html.escape("-" if value is None else str(value))


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _stage_table(report: RunReport) -> str:
    head = (
        "<tr><th class=l>stage</th><th>done</th><th>total</th><th>%</th><th>rate/min</th>"
        "<th>first finish</th><th>last finish</th><th>ETA</th><th>retried</th>"
        "<th>failed</th><th>mean request s</th><th>stale</th></tr>"
    )
    rows = []
    for s in report.stages:
        pct = None if s.percent is None else f"{s.percent:.1f}"
        rate = None if s.rate_per_min is None else f"{s.rate_per_min:.2f}"
        label = s.label + (" (skipped)" if s.skipped else "")
        cells = [
            s.done, s.total, pct, rate, short_time(s.first_finished), short_time(s.last_finished),
            short_time(s.eta), s.retried, s.failures, s.mean_request_s, s.stale,
        ]  # fmt: skip
        rows.append(
            f"<tr><td class=l>{_e(label)}</td>"
            + "".join(f"<td>{_e(c)}</td>" for c in cells)
            + "</tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _flag_table(report: RunReport) -> str:
    if not report.qc:
        return "<p>No alignment results yet.</p>"
    intro = (
        f"<p>{len(report.qc)} pairs from {_e(report.qc_source)}; flagged when the model used "
        f"has fewer than {report.min_inliers} inliers, a mean residual above "
        f"{report.max_residual_px:g} px, or no model was found: "
        f"<b>{len(report.flagged)} flagged</b>.</p>"
    )
    if not report.flagged:
        return intro
    head = (
        "<tr><th>pre</th><th>post</th><th class=l>model</th><th>inliers</th>"
        "<th>residual px</th><th class=l>flags</th></tr>"
    )
    rows = "".join(
        f"<tr><td>{p.pre}</td><td>{p.post}</td><td class=l>{_e(p.model)}</td>"
        f"<td>{_e(p.inliers)}</td><td>{_e(p.residual_px)}</td>"
        f"<td class=l>{_e(', '.join(p.flags))}</td></tr>"
        for p in report.flagged
    )
    return f"{intro}<table class=flags>{head}{rows}</table>"


def write_html(
    report: RunReport,
    dest_dir: str | Path,
    progress_png: str | Path | None = None,
    qc_png: str | Path | None = None,
    quality_png: str | Path | None = None,
) -> Path:
    """Write ``dest_dir/report.html``: state, stage table, QC flags and both figures.

    Args:
        report: what :func:`emprocess.report.load_run` returned.
        dest_dir: a local folder (created if needed).
        progress_png: the progress figure, if already drawn; else drawn into dest_dir.
        qc_png: the QC figure, likewise.
        quality_png: the quality-along-z figure, likewise.

    Returns:
        The path of report.html; the figures are embedded, so it can be sent alone.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    progress = Path(progress_png) if progress_png else plot_progress(report, dest / "progress.png")
    qc = Path(qc_png) if qc_png else plot_qc(report, dest / "qc.png")
    quality = Path(quality_png) if quality_png else plot_quality(report, dest / "quality.png")
    q = report.quality
    doubtful = (
        ""
        if q is None
        else (
            f"<p>Median NCC {q['median']:.3f}, lowest {q['min']:.3f}; doubtful (below "
            f"{q['threshold']:.3f}): {_e(', '.join(map(str, q['doubtful'])) or 'none')}</p>"
        )
    )
    colour = STATE_COLOURS.get(report.state, "#c62828")
    conf_rows = "".join(
        f"<tr><td class=l>{_e(k)}</td><td class=l>{_e(v)}</td></tr>" for k, v in report.conf.items()
    )
    view = (report.complete or {}).get("neuroglancer")
    raw = "".join(f" Lossless: <code>{_e(src)}</code>" for src in report.raw_volumes())
    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>emprocess run {_e(report.run_id)}</title><style>{CSS}</style></head><body>
<h1>Run {_e(report.run_id)} <span class="badge" style="background:{colour}">{_e(report.state)}</span></h1>
<p>{_e(report.state_reason)}</p>
<p>Records: <code>{_e(report.process_url)}</code> ({_e(report.backend)}); report at
{_e(iso(report.generated))}; started {_e(iso(report.started))}; canvas
{_e(report.bbox_xy)} px.{f" View: <code>{_e(view)}</code>" if view else ""}{raw}</p>
<h2>Progress</h2>
{_stage_table(report)}
{_img(progress, "mini-tasks done over time")}
<h2>Alignment QC</h2>
{_flag_table(report)}
{_img(qc, "inliers and residual along z")}
<h2>Quality along z</h2>
{doubtful}
{_img(quality, "NCC of each slice with the next along z")}
<h2>Summary</h2>
<pre>{_e(report.summary_text())}</pre>
<h2>Conf</h2>
<table>{conf_rows}</table>
</body></html>
"""
    path = dest / "report.html"
    path.write_text(body, encoding="utf-8")
    log.info("wrote %s", path)
    return path
