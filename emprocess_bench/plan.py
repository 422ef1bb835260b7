"""``emprocess bench plan``: requests, objects, GCS rates, Cloud Run time and cost of a large run.

Arithmetic only: every input is a constant below with where it comes from (docs/figures.md's
measured throughput, a benchmark of this repository, or a price page), so the figures of
docs/scale.md can be re-derived and re-run when a measurement or a price changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# -- the dataset ------------------------------------------------------------------------
DATASET_BYTES = 10e12
"""10 TB of 8-bit slices (issue 14)."""
SLICE_SIDE_PX = 20_000
"""Square slices of 20,000 px: 400 MB each, so 25,000 slices (issue 14: up to 20,000^2)."""
CANVAS_GROWTH = 1.03
"""Canvas side / slice side: drift and rotation widen the canvas (the bench run's synthetic
stack: 2173 / 2048 = 1.06; a real stack of 20,000 px drifts less in proportion)."""
ALIGN_NEIGHBORS = 3
"""Pairs per slice: each slice is aligned to its next 3 (conf ``neighbors``, default 3 on
main since issue 11's global solve); 1 is the chain of the original."""
CUBE = 1024
"""Tile and cube edge (CONTRACTS.md's shard-size)."""

# -- measured throughput (this 2-core machine; docs/scale.md, "The whole workflow on big
#    slices"): the service worker's CPU seconds per request, read by the gunicorn hooks of
#    ``emprocess bench run --slices 8 --size 20000 --downsample 4 --width 1 --workers 1``,
#    8-bit slices (medians of 8 slices and of 18 pairs), DAG 0.3. --
FEATURES_CPU_S_PER_MPX = 3.36 / 400.0
"""A features request (the slice read at downsample 4 by libvips, SIFT once, the
features stored): 3.36 CPU s per 20,000^2 slice, 8-bit (3.46 s wall: one core)."""
PAIR_WALL_S = 0.2
"""Assumed, not measured: a pair's wall time on Cloud Run is its GCS round trips (two
features objects read, the answer cached: ~50 ms each) and the HTTP exchange."""
PAIR_CPU_S = 0.02
"""A pair request matching two slices' stored features (two small reads, matching,
RANSAC): 0.02 CPU s, whatever the slice size (the features are capped per slice). Before
features were stored (DAG 0.2) a pair decoded and extracted both slices: 9.37 CPU s at
20,000^2."""
ALIGNEDSLICE_MB_PER_CPU_S = 20328 * 20290 / 1e6 / 11.27
"""/alignedslice: 11.27 CPU s per 20,000^2 slice on a 20,328 x 20,290 canvas, PNG decode
included: 37 MB per CPU s of canvas, 8-bit."""
NGSHARD_MB_PER_CPU_S = 80.0
"""/ngshard with the lossless pyramid: 77-86 MB/s per core (full 1024^3 cube: 78)."""

# -- measured object counts (``emprocess bench run``: 64 slices of 2048^2, 9 cubes) -------
TMP_OBJECTS_PER_SLICE = 1
"""/alignedslice writes one tiles object per slice to the tmp bucket (65 objects: 64 + marker)."""
NG_OBJECTS_PER_CUBE = 8
"""/ngshard writes about 8 objects per cube to each volume bucket (72 for 9 cubes, JPEG and raw)."""
JPEG_BYTES_PER_VOXEL = 0.28
"""JPEG pyramid bytes per canvas voxel (82 MB for 297 MB of canvas)."""
RAW_BYTES_PER_VOXEL = 1.14
"""Lossless pyramid bytes per canvas voxel (340 MB for 297 MB: all scales, uncompressed)."""
TASK_RSS_GIB = 0.3
"""Memory of one Airflow task process (``emprocess bench scale``: largest process of the
real DAG 276 MiB at 100 slices; a batch task at 20,000 slices under 100 MiB more)."""

# -- Cloud Run as deployed (scripts/deploy_cloudrun.sh) ---------------------------------
INSTANCE_VCPU, INSTANCE_GIB = 2, 4.0
"""--cpu=2 --memory=4Gi --concurrency=1: one request per instance."""
ALIGN_CORES_USED = 1.0
"""Measured: 9.37 CPU s in 10.92 s per 20,000^2 pair (0.86 cores, the machine shared), so
about one core: the decodes and the kernel run one after the other."""
EMWRITE_CORES_USED = 1.4
"""Measured: /alignedslice 11.67 CPU s in 8.81 s (1.32 cores), /ngshard 0.18 in 0.12 s
(1.5) at 20,000^2 (tensorstore and the codecs are threaded)."""
COLD_START_S = 10.0
"""Assumed: one cold start per instance and stage (the batch tasks start staggered)."""
TASK_OVERHEAD_S = 8.0
"""A batch task's own work before its first request at 20,000 slices: plan, one listing of
the cache, transforms.json (``emprocess bench scale``: 5-8 s, "write, one task")."""
SERIAL_S_PER_SLICE = 30.0 / 20_000
"""The one-at-a-time tasks (validate, collect, finish_align, iswritten, write_status):
about 30 s together at 20,000 slices (``emprocess bench scale``), linear in the slices."""

# -- prices (USD, Tier 1 region, request-based billing; Cloud Run and Cloud Storage pricing
#    pages as stored in 2025: cloud.google.com/run/pricing, cloud.google.com/storage/pricing)
VCPU_S_USD = 0.000024
GIB_S_USD = 0.0000025
CLOUD_RUN_REQUEST_USD = 0.40 / 1e6
CLASS_A_USD = 0.005 / 1000
"""Object writes and listings."""
CLASS_B_USD = 0.0004 / 1000
"""Object reads."""
STANDARD_GB_MONTH_USD = 0.020
COLDLINE_GB_MONTH_USD = 0.004
TMP_DAYS = 3
"""The tmp bucket's lifecycle rule deletes its tiles after 3 days (TMP_LIFECYCLE_DAYS)."""

# -- Cloud Composer 3 (cloud.google.com/composer/pricing and
#    cloud.google.com/composer/docs/composer-3/scale-environments, as stored in 2025) ----
COMPOSER_DCU_HOUR_USD = 0.06
"""Composer 3 "standard milli DCU-hours": $0.06 per 1,000 milli DCU-hours (default price)."""
COMPOSER_PRESETS = {"small": 18, "medium": 100, "large": 400, "extra large": 2250}
"""Environment presets by the concurrent tasks Google recommends each for."""
COMPOSER_BASE_DCU = {"small": 4.0, "medium": 8.0, "large": 16.0, "extra large": 32.0}
"""Assumed: DCUs of a preset's scheduler, DAG processor, triggerer, web server and
database (not on the pricing page; about 1 DCU per vCPU, memory included)."""
COMPOSER_WORKER_DCU = 2.0
"""Assumed: one Airflow worker of 2 vCPU / 8 GiB (docs/scale.md's sizing) = 2 DCU."""
COMPOSER_WORKER_GIB, COMPOSER_WORKER_SLOTS = 8.0, 32
"""A worker's memory and its ``celery.worker_concurrency`` (create_composer_env.sh)."""

# -- GCS request-rate guidelines (cloud.google.com/storage/docs/request-rate) ------------
BUCKET_WRITES_PER_S = 1000
BUCKET_READS_PER_S = 5000
"""Initial capacity of a bucket; it doubles at most every 20 minutes when ramped."""

ORIGINAL = {"hours_per_tb": 1.0, "compute_usd_per_tb": 100.0}
"""The original system's published figures: about 1 hour and about $100 of compute per TB."""
WIDTHS = (32, 64, 128)


@dataclass
class Stage:
    name: str
    requests: int
    cpu_s: float
    """CPU seconds per request."""
    cores_used: float
    reads: float
    """GCS reads per request."""
    writes: float
    """GCS writes per request (objects and cache records)."""
    write_bucket: str
    min_wall_s: float = 0.0
    """A floor on a request's wall time (its storage round trips), where CPU is tiny."""

    @property
    def wall_s(self) -> float:
        return max(self.cpu_s / self.cores_used, self.min_wall_s)


@dataclass
class Plan:
    dataset_bytes: float
    side: int
    slices: int
    canvas_side: int
    cubes: int
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        """The stage called ``name``."""
        return next(s for s in self.stages if s.name == name)

    def stage_wall_s(self, stage: Stage, width: int) -> float:
        return math.ceil(stage.requests / width) * stage.wall_s + COLD_START_S + TASK_OVERHEAD_S

    def wall_s(self, width: int) -> float:
        serial = self.slices * SERIAL_S_PER_SLICE
        return serial + sum(self.stage_wall_s(s, width) for s in self.stages)

    def compute_usd(self) -> float:
        per_s = INSTANCE_VCPU * VCPU_S_USD + INSTANCE_GIB * GIB_S_USD
        return sum(s.requests * (s.wall_s * per_s + CLOUD_RUN_REQUEST_USD) for s in self.stages)

    def composer(self, width: int) -> tuple[str, int, float]:
        """(preset, workers, USD per hour) of a Composer 3 environment for ``width``.

        A run keeps at most width + 1 tasks running (a stage's batch tasks and one
        more); each needs a task slot of TASK_RSS_GIB on an autoscaled worker.
        """
        tasks = width + 1
        preset = next(name for name, most in COMPOSER_PRESETS.items() if most >= tasks)
        workers = max(
            math.ceil(width * TASK_RSS_GIB / COMPOSER_WORKER_GIB),
            math.ceil(width / COMPOSER_WORKER_SLOTS),
        )
        dcu = COMPOSER_BASE_DCU[preset] + workers * COMPOSER_WORKER_DCU
        return preset, workers, dcu * COMPOSER_DCU_HOUR_USD

    def composer_usd(self, width: int) -> float:
        """Composer's price for the run's wall time at ``width`` (workers scaled up)."""
        return self.composer(width)[2] * self.wall_s(width) / 3600

    def request_usd(self) -> float:
        a = sum(s.requests * s.writes for s in self.stages)
        b = sum(s.requests * s.reads for s in self.stages)
        return a * CLASS_A_USD + b * CLASS_B_USD

    def stored_bytes(self) -> tuple[float, float, float]:
        voxels = float(self.canvas_side) ** 2 * self.slices
        return voxels * JPEG_BYTES_PER_VOXEL, voxels * RAW_BYTES_PER_VOXEL, voxels


def make_plan(
    dataset_bytes: float = DATASET_BYTES,
    side: int = SLICE_SIDE_PX,
    neighbors: int = ALIGN_NEIGHBORS,
) -> Plan:
    """The stages of a run over ``dataset_bytes`` of square 8-bit slices of ``side`` px."""
    slices = round(dataset_bytes / side**2)
    canvas = math.ceil(side * CANVAS_GROWTH)
    mpx, canvas_mpx = side**2 / 1e6, canvas**2 / 1e6
    tiles = math.ceil(canvas / CUBE)
    cubes = tiles * tiles * math.ceil(slices / CUBE)
    cube_mb = canvas_mpx * slices / cubes  # average voxels per cube (edge cubes are partial)
    stages = [
        Stage("features", slices, mpx * FEATURES_CPU_S_PER_MPX, ALIGN_CORES_USED,
              reads=1, writes=2, write_bucket="process"),
        Stage("align", sum(slices - k for k in range(1, neighbors + 1)), PAIR_CPU_S,
              ALIGN_CORES_USED, reads=2, writes=1, write_bucket="process",
              min_wall_s=PAIR_WALL_S),
        Stage("write", slices, canvas_mpx / ALIGNEDSLICE_MB_PER_CPU_S,
              EMWRITE_CORES_USED, reads=1, writes=TMP_OBJECTS_PER_SLICE + 1, write_bucket="tmp"),
        Stage("shards", cubes, cube_mb / NGSHARD_MB_PER_CPU_S, EMWRITE_CORES_USED,
              reads=CUBE, writes=2 * NG_OBJECTS_PER_CUBE + 1, write_bucket="ng + chunk"),
    ]  # fmt: skip
    return Plan(dataset_bytes, side, slices, canvas, cubes, stages)


def report(plan: Plan) -> str:
    tb = plan.dataset_bytes / 1e12
    lines = [
        f"{tb:g} TB of 8-bit slices: {plan.slices:,} slices of {plan.side:,}^2 px, "
        f"canvas {plan.canvas_side:,}^2, {plan.cubes:,} cubes of {CUBE}^3, "
        f"{plan.stage('align').requests / plan.slices:.0f} alignment pairs per slice",
        "",
        "stage     requests  CPU s/req  wall s/req  GCS reads  objects written  CPU hours",
    ]
    for s in plan.stages:
        lines.append(
            f"{s.name:<9}{s.requests:>9,}{s.cpu_s:>11.1f}{s.wall_s:>12.1f}"
            f"{s.requests * s.reads:>11,.0f}{s.requests * s.writes:>17,.0f}"
            f"{s.requests * s.cpu_s / 3600:>11,.0f}"
        )
    lines += ["", "width  instances  GCS peak (writes/s into, reads/s)            wall h   h/TB"]
    for w in WIDTHS:
        rates = []
        for s in plan.stages:
            per_s = w / s.wall_s
            wr, rd = per_s * s.writes, per_s * s.reads
            flag = "!" if (wr > BUCKET_WRITES_PER_S or rd > BUCKET_READS_PER_S) else ""
            rates.append(f"{s.name} {wr:,.0f}/{rd:,.0f}{flag}")
        hours = plan.wall_s(w) / 3600
        lines.append(f"{w:>5}{w:>11}  {', '.join(rates):<42}{hours:>7.1f}{hours / tb:>7.2f}")
    lines.append(
        f"  ! = above a new bucket's initial {BUCKET_WRITES_PER_S:,} writes/s or "
        f"{BUCKET_READS_PER_S:,} reads/s (GCS doubles it at most every 20 min)"
    )
    jpeg, raw, canvas = plan.stored_bytes()
    compute, requests = plan.compute_usd(), plan.request_usd()
    std = (jpeg + raw) / 1e9 * STANDARD_GB_MONTH_USD
    tmp = canvas / 1e9 * STANDARD_GB_MONTH_USD * TMP_DAYS / 30
    lines += [
        "",
        f"cost per TB: compute ${compute / tb:,.0f} (Cloud Run, {INSTANCE_VCPU} vCPU + "
        f"{INSTANCE_GIB:.0f} GiB per request), GCS requests ${requests / tb:,.0f}, "
        f"tmp tiles for {TMP_DAYS} days ${tmp / tb:,.0f}",
        f"storage per month per TB: JPEG {jpeg / 1e12 / tb:.2f} TB + raw {raw / 1e12 / tb:.2f} TB"
        f" = ${std / tb:,.0f} Standard (${std / tb * COLDLINE_GB_MONTH_USD / STANDARD_GB_MONTH_USD:,.0f}"
        " Coldline)",
        f"original: about {ORIGINAL['hours_per_tb']:.0f} h and "
        f"${ORIGINAL['compute_usd_per_tb']:.0f} of compute per TB",
        f"Composer: width W needs W task slots of ~{TASK_RSS_GIB} GiB: "
        + ", ".join(f"{w}: {w * TASK_RSS_GIB:.0f} GiB" for w in WIDTHS),
    ]
    for w in WIDTHS:
        preset, workers, per_h = plan.composer(w)
        run_usd = plan.composer_usd(w)
        lines.append(
            f"  width {w}: Composer 3 {preset} + {workers} workers of 2 vCPU / "
            f"{COMPOSER_WORKER_GIB:.0f} GiB, ${per_h:.2f}/h: ${run_usd / tb:.2f} per TB over the "
            f"run ({run_usd / (compute + requests + run_usd):.0%} of compute + requests + "
            f"Composer), ${per_h * 730:,.0f} a month if left running"
        )
    return "\n".join(lines)
