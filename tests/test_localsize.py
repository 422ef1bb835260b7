"""Local runs size the services' workers and the request threads from cores and memory."""

from __future__ import annotations

import psutil
import pytest
import requests

from emprocess import storage
from emprocess.localrun import local_services
from emprocess.localsize import GIB, machine_cores, size_local_run


def test_one_worker_per_core_when_memory_allows() -> None:
    s = size_local_run(cores=64, memory_bytes=256 * GIB)
    assert (s.align_workers, s.emwrite_workers, s.threads) == (64, 64, 128)


def test_memory_limits_the_workers() -> None:
    # 16 GiB less 1 GiB reserved: 13 emwrite workers of 1.1 GiB, 30 align workers of 0.5 GiB.
    s = size_local_run(cores=64, memory_bytes=16 * GIB)
    assert (s.align_workers, s.emwrite_workers, s.threads) == (30, 13, 60)
    assert "13 workers" in s.describe()
    # Never fewer than one worker, however short memory is.
    tiny = size_local_run(cores=8, memory_bytes=GIB // 2)
    assert (tiny.align_workers, tiny.emwrite_workers, tiny.threads) == (1, 1, 2)


def test_overrides_and_defaults() -> None:
    s = size_local_run(cores=8, memory_bytes=64 * GIB, workers=3, threads=5)
    assert (s.align_workers, s.emwrite_workers, s.threads) == (3, 3, 5)
    here = size_local_run()
    assert here.cores == machine_cores() and here.memory_bytes > 0
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        size_local_run(workers=0)
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        size_local_run(threads=0)


def test_services_start_with_the_workers_asked(tmp_path) -> None:
    """...and the storage they are given (not this process's environment, which has none)."""
    from emprocess.settings import StorageEnv, load

    chosen = load(StorageEnv, storage_root=tmp_path / "root")
    assert storage.local_root() is None
    with local_services(
        tmp_path, workers={"align": 3, "emwrite": 2}, storage_settings=chosen
    ) as services:
        assert requests.get(services.emwrite + "/health", timeout=10).ok
        counts = {}
        for name, url in (("align", services.align), ("emwrite", services.emwrite)):
            port = int(url.rsplit(":", 1)[1])
            (master,) = [  # the child of ours that listens on the service's port
                p
                for p in psutil.Process().children()
                if any(c.laddr.port == port for c in p.net_connections("tcp"))
            ]
            counts[name] = len(master.children())  # gunicorn's master forks the workers
    assert counts == {"align": 3, "emwrite": 2}
    for name in ("align", "emwrite"):
        said = (tmp_path / f"{name}.log").read_text()
        assert f"{name}: local storage root {tmp_path / 'root'}" in said, said
