"""What each DAG task does, as plain functions of the run (no Airflow imports), by stage.

:mod:`emprocess.workflow.tasks` wraps these in Airflow tasks; the CLI and tests call
them directly. Small JSON moves between them: :class:`RunInfo` from ``validate`` and
the canvas from ``collect``; everything large lives in the process bucket.

One module per stage: :mod:`.validate`, :mod:`.env` (``create_env``), :mod:`.align`
(features, pairs, ``collect``), :mod:`.alignfrom` (an earlier run's alignment),
:mod:`.write` (tiles, then the neuroglancer volume) and :mod:`.finish` (lifecycle,
public read, complete.json); :mod:`.common` holds what they share. Import the names
from here.
"""

from __future__ import annotations

from emprocess.workflow.stages.align import (
    align_pairs,
    check_features,
    collect_alignment,
    extract_slice_features,
    read_fill,
    read_transforms,
)
from emprocess.workflow.stages.alignfrom import check_align_from, take_alignment
from emprocess.workflow.stages.common import SHOWN, RunInfo
from emprocess.workflow.stages.env import (
    PACKAGES,
    RUN_STORAGE_CLASS,
    create_env,
    intensity_sample,
    package_versions,
    run_location,
)
from emprocess.workflow.stages.finish import (
    TMP_LIFECYCLE_DAYS,
    cleanup_images,
    set_public_read,
    stage_timings,
    status_email,
    write_status,
)
from emprocess.workflow.stages.validate import (
    SliceProblems,
    check_slice_format,
    check_slices,
    validate_run,
)
from emprocess.workflow.stages.write import (
    check_slices_written,
    check_written,
    shard_plan,
    tiles_to_rewrite,
    write_ng_shards,
    write_ngmeta,
    write_plan,
    write_slices,
)

__all__ = [
    "PACKAGES",
    "RUN_STORAGE_CLASS",
    "SHOWN",
    "TMP_LIFECYCLE_DAYS",
    "RunInfo",
    "SliceProblems",
    "align_pairs",
    "check_align_from",
    "check_features",
    "check_slice_format",
    "check_slices",
    "check_slices_written",
    "check_written",
    "cleanup_images",
    "collect_alignment",
    "create_env",
    "extract_slice_features",
    "intensity_sample",
    "package_versions",
    "read_fill",
    "read_transforms",
    "run_location",
    "set_public_read",
    "shard_plan",
    "stage_timings",
    "status_email",
    "take_alignment",
    "tiles_to_rewrite",
    "validate_run",
    "write_ng_shards",
    "write_ngmeta",
    "write_plan",
    "write_slices",
    "write_status",
]
