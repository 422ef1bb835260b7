"""What a run's process bucket says about it: progress per stage, alignment QC and run state."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from emprocess.layout import RunLayout

RUNNING = "running"
FINISHED = "finished"
STALLED = "stalled"
FAILED = "failed"
STATES = (RUNNING, FINISHED, STALLED, FAILED)
"""Run states: finished = complete.json written; stalled = no new record for a long time
(the run failed or hangs; Airflow knows which); failed = stalled with failure records."""

FEW_INLIERS = "few_inliers"
LARGE_RESIDUAL = "large_residual"
NO_MODEL = "no_model"
"""QC flags of an alignment pair."""


def iso(t: datetime | None) -> str | None:
    """``2024-05-01T12:00:00.000+00:00``, or None."""
    return None if t is None else t.isoformat(timespec="milliseconds")


def short_time(t: datetime | None) -> str:
    """``05-01 12:00:00`` (UTC), or ``-``."""
    return "-" if t is None else t.strftime("%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    """``1h02m``, ``3m20s`` or ``45s``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


@dataclass(frozen=True)
class StageProgress:
    """Progress of one batch stage, from the creation times of its cache objects.

    Attributes:
        name: the stage as the batch helper calls it: affine, write, ngmeta or ngshard.
        label: what its mini-tasks are, for people, e.g. "align pairs".
        cache_url: the cache prefix that was listed.
        done: planned mini-tasks with a cached answer.
        total: planned mini-tasks; None while the plan is unknown (cubes before the canvas).
        finish_times: creation time (UTC) of each counted cache object, ascending.
        rate_per_min: mini-tasks per minute between the first and the last finish; None
            with fewer than two finishes.
        eta: when the stage should be done at that rate, counted from the report's time;
            only for a running run with work left.
        retried: counted mini-tasks that took more than one attempt; None when the cache
            records were not read.
        attempts: requests sent for the counted mini-tasks, retries included (records read).
        mean_request_s: mean seconds per mini-task, retries included (records read).
        failures: mini-tasks that failed and have no answer yet: 0 for a complete stage,
            from failure records otherwise, None when nothing says.
        stale: cache objects under the prefix that answer no planned request of this run
            (e.g. left by an earlier trigger with another conf).
        matched_by: "key" when counted by this code's exact cache keys, "name" when only
            the mini-task names matched (the run was made by code sending other requests).
        skipped: the stage has nothing to do (affine with skip_align).
    """

    name: str
    label: str
    cache_url: str
    done: int
    total: int | None
    finish_times: tuple[datetime, ...] = ()
    rate_per_min: float | None = None
    eta: datetime | None = None
    retried: int | None = None
    attempts: int | None = None
    mean_request_s: float | None = None
    failures: int | None = None
    stale: int = 0
    matched_by: str = "name"
    skipped: bool = False

    @property
    def first_finished(self) -> datetime | None:
        return self.finish_times[0] if self.finish_times else None

    @property
    def last_finished(self) -> datetime | None:
        return self.finish_times[-1] if self.finish_times else None

    @property
    def complete(self) -> bool:
        """Every planned mini-task is answered (a skipped stage is complete)."""
        return self.total is not None and self.done >= self.total

    @property
    def percent(self) -> float | None:
        if self.total is None:
            return None
        return 100.0 if self.total == 0 else 100.0 * self.done / self.total

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "cache_url": self.cache_url,
            "done": self.done,
            "total": self.total,
            "percent": None if self.percent is None else round(self.percent, 2),
            "first_finished": iso(self.first_finished),
            "last_finished": iso(self.last_finished),
            "rate_per_min": self.rate_per_min,
            "eta": iso(self.eta),
            "retried": self.retried,
            "attempts": self.attempts,
            "mean_request_s": self.mean_request_s,
            "failures": self.failures,
            "stale": self.stale,
            "matched_by": self.matched_by,
            "skipped": self.skipped,
        }


@dataclass(frozen=True)
class PairQC:
    """Alignment quality of one pair: slice ``post`` = z + 1 aligned onto ``pre`` = z.

    Inlier counts and residuals are the alignment service's, measured on the images it
    matched, i.e. in pixels shrunk by the run's downsample_factor.

    Attributes:
        model: the model collect used: affine, translation or identity (none found).
        inliers: inlier matches of that model (of the best try when none was found).
        residual_px: mean inlier residual of that model in pixels; None for identity.
        flags: ``few_inliers``, ``large_residual``, ``no_model``.
    """

    pre: int
    post: int
    model: str
    inliers: int | None
    residual_px: float | None
    m01: float | None = None
    affine_inliers: int | None = None
    translation_inliers: int | None = None
    affine_residual_px: float | None = None
    translation_residual_px: float | None = None
    flags: tuple[str, ...] = ()

    def describe(self) -> str:
        inl = "-" if self.inliers is None else str(self.inliers)
        res = "-" if self.residual_px is None else f"{self.residual_px:.2f} px"
        return (
            f"pair {self.pre}->{self.post}: {self.model}, {inl} inliers, residual {res}: "
            + ", ".join(self.flags)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "pre": self.pre,
            "post": self.post,
            "model": self.model,
            "inliers": self.inliers,
            "residual_px": self.residual_px,
            "m01": self.m01,
            "affine_inliers": self.affine_inliers,
            "translation_inliers": self.translation_inliers,
            "affine_residual_px": self.affine_residual_px,
            "translation_residual_px": self.translation_residual_px,
            "flags": list(self.flags),
        }


@dataclass(frozen=True)
class FailureNote:
    """One failure record of a mini-task that has no answer yet."""

    stage: str
    name: str
    error: str
    when: datetime


@dataclass(frozen=True)
class RunReport:
    """Everything :func:`emprocess.report.load_run` learned about one run.

    Attributes:
        process_url: ``gs://SOURCE_process/RUN_ID``, the only place read.
        backend: where ``gs://`` URLs pointed (local root or Google Cloud Storage).
        generated: the time the report describes ("now"), UTC.
        state: running, finished, stalled or failed (see :data:`STATES`).
        state_reason: one line on why.
        last_activity: creation time of the newest record of the run.
        init: RUN_ID/init.json as written by create_env.
        complete: RUN_ID/complete.json, or None before write_status.
        bbox_xy: canvas (width, height) in pixels, from align/canvas.json, complete.json or transforms.json.
        stages: affine, write, ngmeta, ngshard, in run order.
        qc: one row per pair, ascending z; empty before any alignment answer.
        qc_source: "qc.csv", "affine_cache" (collect has not run yet) or None.
        min_inliers: pairs with fewer inliers are flagged.
        max_residual_px: pairs with a larger mean residual are flagged.
        failures: failure records of mini-tasks still unanswered (up to a few per stage).
    """

    source: str
    run_id: str
    process_url: str
    backend: str
    generated: datetime
    state: str
    state_reason: str
    last_activity: datetime | None
    init: dict[str, Any]
    complete: dict[str, Any] | None
    bbox_xy: tuple[int, int] | None
    stages: tuple[StageProgress, ...]
    qc: tuple[PairQC, ...] = ()
    qc_source: str | None = None
    min_inliers: int = 50
    max_residual_px: float = 2.0
    failures: tuple[FailureNote, ...] = field(default=())
    slice_qc: tuple[dict[str, Any], ...] = ()
    """Rows of align/slices.csv (global solve): z, status, residual_px, features, reason."""
    alignment: dict[str, Any] | None = None
    """Quality figures of the global solve (canvas.json / complete.json ``alignment``)."""
    slice_ncc: tuple[dict[str, Any], ...] = ()
    """Rows of align/quality.csv: z, ncc_next (NCC with z + 1), doubtful."""

    @property
    def quality(self) -> dict[str, Any] | None:
        """Quality along z: threshold, median and doubtful slices; None before it is recorded."""
        values = [r["ncc_next"] for r in self.slice_ncc if r["ncc_next"] is not None]
        if not values:
            return None
        from emprocess.kernels.quality import ncc_threshold

        return {
            "threshold": ncc_threshold(dict(enumerate(values))),
            "median": sorted(values)[len(values) // 2],
            "min": min(values),
            "doubtful": [r["z"] for r in self.slice_ncc if r["doubtful"]],
        }

    # -- derived ---------------------------------------------------------------

    @property
    def conf(self) -> dict[str, Any]:
        return dict(self.init.get("conf", {}))

    @property
    def started(self) -> datetime | None:
        raw = self.init.get("first_started") or self.init.get("started")
        return datetime.fromisoformat(raw) if raw else None

    @property
    def finished(self) -> datetime | None:
        raw = (self.complete or {}).get("finished")
        return datetime.fromisoformat(raw) if raw else None

    @property
    def flagged(self) -> tuple[PairQC, ...]:
        return tuple(p for p in self.qc if p.flags)

    def stage(self, name: str) -> StageProgress:
        """The stage called ``name`` (affine, write, ngmeta, ngshard)."""
        for st in self.stages:
            if st.name == name:
                return st
        raise KeyError(f"no stage {name!r}; stages are {[s.name for s in self.stages]}")

    def current_stage(self) -> StageProgress | None:
        """The first stage with work left, None when all are complete."""
        return next((s for s in self.stages if not s.complete), None)

    def models_used(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.qc:
            out[p.model] = out.get(p.model, 0) + 1
        return out

    # -- output ----------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (times ISO 8601 UTC)."""
        conf = self.conf
        return {
            "source": self.source,
            "run_id": self.run_id,
            "process_url": self.process_url,
            "backend": self.backend,
            "generated": iso(self.generated),
            "state": self.state,
            "state_reason": self.state_reason,
            "last_activity": iso(self.last_activity),
            "dag_id": self.init.get("dag_id"),
            "version": self.init.get("version"),
            "width": self.init.get("width"),
            "conf": conf,
            "slices": int(conf["maxz"]) - int(conf["minz"]) + 1 if "minz" in conf else None,
            "slice_size_xy": self.init.get("slice_size_xy"),
            "bbox_xy": list(self.bbox_xy) if self.bbox_xy else None,
            "started": iso(self.started),
            "finished": iso(self.finished),
            "elapsed_s": (self.complete or {}).get("elapsed_s"),
            "neuroglancer": (self.complete or {}).get("neuroglancer"),
            "raw_volumes": self.raw_volumes(),
            "stages": [s.to_json() for s in self.stages],
            "qc": {
                "source": self.qc_source,
                "min_inliers": self.min_inliers,
                "max_residual_px": self.max_residual_px,
                "pairs": len(self.qc),
                "models": self.models_used(),
                "flagged": [p.to_json() for p in self.flagged],
            },
            "alignment": self.alignment,
            "slices_not_good": [r for r in self.slice_qc if r.get("status") != "good"],
            "quality_along_z": self.quality,
            "failures": [
                {"stage": f.stage, "name": f.name, "error": f.error, "when": iso(f.when)}
                for f in self.failures
            ],
        }

    def raw_volumes(self) -> list[str]:
        """Neuroglancer sources of the run's lossless volume(s), from its conf
        (``createRawPyramid``, ``raw_format``): precomputed and/or OME-Zarr."""
        conf = self.conf
        raw = conf.get("createRawPyramid", conf.get("rawPyramid", True)) is not False
        return RunLayout(self.source, self.run_id, raw).raw_sources(
            str(conf.get("raw_format") or "precomputed")
        )

    def summary_text(self) -> str:
        """A plain-text summary: run, state, one line per stage, QC flags."""
        conf = self.conf
        lines = [f"Run {self.run_id}: {self.process_url} ({self.backend})"]
        size = self.init.get("slice_size_xy")
        canvas = f"canvas {self.bbox_xy[0]}x{self.bbox_xy[1]} px" if self.bbox_xy else "canvas ?"
        lines.append(
            f"DAG {self.init.get('dag_id')}, width {self.init.get('width')}; slices "
            f"{conf.get('minz')}..{conf.get('maxz')} of {conf.get('image')}"
            + (f", {size[0]}x{size[1]} px" if size else "")
            + f"; {canvas}"
        )
        lines.append(f"State: {self.state.upper()}: {self.state_reason}")
        current = self.current_stage()
        if self.state == RUNNING and current is not None:
            total = "?" if current.total is None else current.total
            lines.append(
                f"Now in {current.label}: {current.done}/{total} done, ETA {iso(current.eta) or '-'}"
            )
        lines.append(f"Started {iso(self.started)}; report at {iso(self.generated)} (UTC)")
        if self.complete:
            lines.append(f"View: {self.complete.get('neuroglancer')}")
        if self.raw_volumes():
            lines.append(f"Lossless volume: {', '.join(self.raw_volumes())}")
        lines.append("")
        header = (
            f"{'stage':<22}{'done/total':>10}{'%':>7}{'rate/min':>10}  "
            f"{'last finish':<15}{'ETA':<15}{'retried':>8}{'failed':>7}"
        )
        lines.append(header)
        for s in self.stages:
            total = "?" if s.total is None else str(s.total)
            pct = "-" if s.percent is None else f"{s.percent:.1f}"
            rate = "-" if s.rate_per_min is None else f"{s.rate_per_min:.2f}"
            label = s.label + (" (skipped)" if s.skipped else "")
            lines.append(
                f"{label:<22}{f'{s.done}/{total}':>10}{pct:>7}{rate:>10}  "
                f"{short_time(s.last_finished):<15}{short_time(s.eta):<15}"
                f"{_dash(s.retried):>8}{_dash(s.failures):>7}"
            )
        lines.append("")
        lines.extend(self._qc_lines())
        for f in self.failures:
            lines.append(f"Failed {f.stage} {f.name} at {iso(f.when)}: {f.error}")
        return "\n".join(lines)

    def _qc_lines(self) -> list[str]:
        if not self.qc:
            return ["Alignment QC: no pair results yet"]
        models = ", ".join(f"{k} {v}" for k, v in sorted(self.models_used().items()))
        ds = int(self.conf.get("downsample_factor", 1) or 1)
        unit = "px" if ds == 1 else f"px at 1/{ds} scale"
        lines = [
            f"Alignment QC ({self.qc_source}, {len(self.qc)} pairs; models {models}); flags: "
            f"inliers < {self.min_inliers}, mean residual > {self.max_residual_px:g} {unit}, "
            "no model",
            f"  {len(self.flagged)} pairs flagged" + (":" if self.flagged else ""),
        ]
        lines.extend("  " + p.describe() for p in self.flagged)
        return lines + self._slice_lines() + self._quality_lines()

    def _quality_lines(self) -> list[str]:
        q = self.quality
        if q is None:
            return []
        doubtful = ", ".join(map(str, q["doubtful"])) or "none"
        return [
            f"Quality along z (NCC of slice z with z + 1): median {q['median']:.3f}, lowest "
            f"{q['min']:.3f}; doubtful below {q['threshold']:.3f}: {doubtful}"
        ]

    def _slice_lines(self) -> list[str]:
        """The global solve's figures and every slice not placed by its own pairs."""
        a = self.alignment
        if not a and not self.slice_qc:
            return []
        lines = []
        if a:
            res, counts = a.get("pair_residual_px", {}), a.get("slices", {})
            lines.append(
                f"Global solve: {a.get('pairs_used')} of {a.get('pairs')} pairs used; residual "
                f"after the solve median {res.get('median')} px, worst {res.get('worst')} px; "
                f"slices good {counts.get('good')}, bridged {counts.get('bridged')}, "
                f"bad {counts.get('bad')}"
            )
            if a.get("gap_pairs"):
                lines.append(f"  second align round: {a['gap_pairs']} pairs across bad slices")
            if a.get("gaps_too_long"):
                runs = ", ".join(f"{g[0]}..{g[1]}" for g in a["gaps_too_long"])
                lines.append(f"  bad slices too many in a row to match across: {runs}")
            if a.get("doubtful"):
                lines.append(f"  ALIGNMENT DOUBTFUL: {a.get('why')}")
        lines.extend(
            f"  slice {r['z']} {r['status']}: {r['reason']}"
            for r in self.slice_qc
            if r.get("status") != "good"
        )
        return lines


def _dash(v: int | None) -> str:
    return "-" if v is None else str(v)
