"""Which buckets a request may touch: its run's, by role, marked as ours (issue 20).

Nothing but the request names a run's buckets, so emwrite derives them: a run is its
source bucket and run id, and :mod:`emprocess.layout` names its buckets by role
(``SOURCE_process``, ``SOURCE_tmp_RUN_ID``, ``SOURCE_ng_RUN_ID``,
``SOURCE_chunk_RUN_ID``). Every bucket a request writes must be the one of its role for
one and the same run, must exist and must hold the marker object that
:func:`emprocess.storage.create_bucket` writes into every bucket a run creates; so a
request cannot write into another run's buckets, into a source bucket (never marked,
never named by a role) or into a bucket made by hand or by another tool. Reads stay
within the same run: the slices of its source bucket, the tiles of its tmp bucket.

The original payloads are unchanged: ``/alignedslice`` names the source (``dest``),
``dest-tmp`` and ``run_id``; ``/ngmeta`` and ``/ngshard`` name only their volume buckets
(``dest``, ``dest_raw``, ``source``), from which the run is read back, and all of them
must name one run.
"""

from __future__ import annotations

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.layout import process_bucket, run_bucket
from emprocess.models import AlignedSliceRequest, NgMetaRequest, NgShardRequest
from emprocess.storage.names import RUN_ID_RE, check_bucket_name

__all__ = ["check_slice_buckets", "check_volume_buckets", "runs_of"]

Run = tuple[str, str]
"""(source bucket, run id)."""


def runs_of(bucket: str, role: str) -> set[Run]:
    """Every (source, run id) whose ``role`` bucket (tmp, ng or chunk) is ``bucket``.

    Usually one; a source or run id holding ``_ROLE_`` itself gives more than one split.
    """
    token = f"_{role}_"
    runs = set()
    at = bucket.find(token)
    while at != -1:
        source, run_id = bucket[:at], bucket[at + len(token) :]
        if RUN_ID_RE.fullmatch(run_id) and _valid_bucket(source):
            runs.add((source, run_id))
        at = bucket.find(token, at + 1)
    return runs


def _valid_bucket(name: str) -> bool:
    try:
        check_bucket_name(name)
    except InvalidInput:
        return False
    return True


def _require_ours(bucket: str, field: str) -> None:
    """The bucket exists and holds the marker of a bucket a run created."""
    if not storage.bucket_exists(bucket):
        raise InvalidInput(f"{field} bucket {bucket!r} does not exist")
    if not storage.exists(storage.bucket_url(bucket, storage.MARKER_KEY)):
        raise InvalidInput(
            f"{field} bucket {bucket!r} was not created by a run (no {storage.MARKER_KEY} "
            "object); emwrite writes only into its run's own buckets "
            f"(`emprocess adopt-bucket {bucket}` marks one you mean to use)"
        )


def check_slice_buckets(req: AlignedSliceRequest) -> None:
    """/alignedslice: ``dest-tmp`` is the tmp bucket of run (``dest``, ``run_id``), and it
    and ``dest``'s process bucket (the thumbnails) are ours; ``dest`` is only read."""
    want = run_bucket(req.dest, "tmp", req.run_id)
    if req.dest_tmp != want:
        raise InvalidInput(
            f"dest-tmp {req.dest_tmp!r} is not the tmp bucket of run {req.run_id!r} of source "
            f"{req.dest!r}, which is {want!r}"
        )
    if not storage.bucket_exists(req.dest):
        raise InvalidInput(f"dest bucket {req.dest!r} (the slices) does not exist")
    _require_ours(req.dest_tmp, "dest-tmp")
    _require_ours(process_bucket(req.dest), "process")


def check_volume_buckets(req: NgMetaRequest | NgShardRequest) -> Run:
    """/ngmeta, /ngshard: ``dest`` is an ng bucket, ``dest_raw`` (when written) the chunk
    bucket and ``source`` (/ngshard) the tmp bucket of one run; each is ours. Returns the run.
    """
    fields: list[tuple[str, str, str]] = [("dest", req.dest, "ng")]
    if req.write_raw:
        assert req.dest_raw is not None  # checked by the model
        fields.append(("dest_raw", req.dest_raw, "chunk"))
    if isinstance(req, NgShardRequest):
        fields.append(("source", req.source, "tmp"))
    common: set[Run] | None = None
    for field, bucket, role in fields:
        runs = runs_of(bucket, role)
        if not runs:
            raise InvalidInput(
                f"{field} {bucket!r} is not the {role} bucket of a run (SOURCE_{role}_RUN_ID)"
            )
        common = runs if common is None else common & runs
        if not common:
            named = ", ".join(f"{f} {b!r}" for f, b, _ in fields)
            raise InvalidInput(f"{named} are not the buckets of one run (SOURCE_ROLE_RUN_ID)")
    assert common is not None
    for field, bucket, _ in fields:
        _require_ours(bucket, field)
    return min(common)
