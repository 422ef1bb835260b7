"""Shard files that a killed writer cannot corrupt: no reused lock file, every shard read back.

tensorstore's file driver (0.1.86, its default ``file_io_locking`` mode) writes a file
``KEY`` through ``KEY.__lock``: it creates or opens that file, writes the new value into
it and renames it into place. A writer killed mid-write (an emwrite worker killed,
Cloud Run stopping an instance) leaves ``KEY.__lock`` behind, and the next write opens
the stale file *without truncating it*: a shorter new value keeps the old tail, and the
rename publishes it. A precomputed shard then still reads (with junk after its last
minishard index), a zarr3 shard fails its digest (DATA_LOSS), an unsharded chunk fails
its length check.

So, under a local storage root:

- :data:`FILE_IO_LOCKING` sets ``file_io_locking.mode`` to ``"none"``: each write goes to
  a new uniquely named ``KEY_<random>.__lock`` file and is renamed into place, so nothing
  stale is ever reused (the ``"lockfile"`` mode instead waits for ever on a stale lock).
  Two requests writing the same shard at once (a retried task while the first still
  runs) each publish a whole file of the same bytes.
- :meth:`ShardFiles.remove_stale_locks` deletes what killed writers left beside a shard
  (``KEY.__lock``, ``KEY_<random>.__lock``) before it is written again, so a retry
  leaves the volume's folders as a clean run does.

And on every backend, :meth:`ShardFiles.check` reads each shard back after it is
written, before the request is answered (and its answer cached): the shard index
(``16 * 2**minishard_bits`` bytes) must be whole, its ranges ordered, and the file must
end where its last minishard index ends. A damaged shard fails the request (HTTP 500,
naming ``gs://BUCKET/KEY``), so the client retries and rewrites it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from emprocess import storage
from emprocess.errors import StorageError
from emprocess.kernels.ngmeta import compressed_morton_code, shard_filename, shard_number
from emprocess.volume import info_url

log = logging.getLogger(__name__)

FILE_IO_LOCKING: dict[str, Any] = {"file_io_locking": {"mode": "none"}}
"""tensorstore context entries for writes under a local root (see the module doc)."""
LOCK_SUFFIX = ".__lock"


class ShardFiles:
    """The shard files of one precomputed volume: their names, stale locks and checks.

    Args:
        url: the volume (``gs://B/neuroglancer/jpeg``), its ``info`` written already.
        scales: the ``scales`` of that ``info`` (sharded ones; others are skipped).
    """

    def __init__(self, url: str, scales: Sequence[Mapping[str, Any]]) -> None:
        self.url = url.rstrip("/")
        self.scales = list(scales)
        self.local = storage.local_root() is not None and url.startswith("gs://")

    @classmethod
    def of(cls, url: str) -> ShardFiles:
        """The volume at ``url``, from its ``info``."""
        import json

        info = json.loads(storage.read_bytes(info_url(url)))
        return cls(url, info["scales"])

    def key(self, scale: int, lo_xyz: Sequence[int]) -> str | None:
        """Key (under the volume) of the shard holding the chunk at voxel ``lo_xyz``."""
        meta = self.scales[scale]
        sharding = meta.get("sharding")
        if not sharding:
            return None
        chunk = meta["chunk_sizes"][0]
        offset = meta.get("voxel_offset", [0, 0, 0])
        grid = [(int(lo_xyz[d]) - int(offset[d])) // int(chunk[d]) for d in range(3)]
        grid_size = [math.ceil(int(meta["size"][d]) / int(chunk[d])) for d in range(3)]
        chunk_id = compressed_morton_code(grid, grid_size)
        return f"{meta['key']}/{shard_filename(shard_number(chunk_id, sharding), sharding['shard_bits'])}"

    def remove_stale_locks(self, key: str) -> int:
        """Delete the lock files killed writers left beside shard ``key``; returns how many.

        Only under a local root (GCS has no lock files). A lock file of a writer still
        running (a duplicate request of the same cube) may go too: that writer's rename
        then fails and its request is retried; no shard is ever published damaged.
        """
        if not self.local:
            return 0
        removed = 0
        for found in storage.list_keys(f"{self.url}/{key}"):
            if found.endswith(LOCK_SUFFIX):
                storage.delete(storage.bucket_url(storage.parse_url(self.url).bucket, found))
                removed += 1
        if removed:
            log.warning("removed %d stale lock file(s) of %s/%s", removed, self.url, key)
        return removed

    def check(self, scale: int, key: str) -> None:
        """Read shard ``key`` back: a whole index, ordered ranges, the file's exact length.

        Raises:
            StorageError: naming the shard's URL and what is wrong with it.
        """
        url = f"{self.url}/{key}"
        minishard_bits = int(self.scales[scale]["sharding"]["minishard_bits"])
        index_bytes = 16 << minishard_bits
        head = storage.read_bytes(url, 0, index_bytes)
        bucket = storage.parse_url(url).bucket
        sizes = [
            o.size for o in storage.list_objects(url) if storage.bucket_url(bucket, o.key) == url
        ]
        size = sizes[0] if sizes else len(head)
        if len(head) < index_bytes:
            raise StorageError(
                f"shard {url} is damaged: {len(head)} bytes, shorter than its index "
                f"({index_bytes} bytes)"
            )
        ranges = np.frombuffer(head, "<u8").reshape(-1, 2)
        if np.any(ranges[:, 0] > ranges[:, 1]):
            raise StorageError(
                f"shard {url} is damaged: its index has a range ending before it starts"
            )
        end = index_bytes + int(ranges[:, 1].max())
        if end != size:
            raise StorageError(
                f"shard {url} is damaged: {size} bytes, but its index ends the data at {end}"
            )
