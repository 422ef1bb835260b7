"""The container files install what the tests install and start what `emprocess serve` starts."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from emprocess.cli import SERVE_TIMEOUT_S, SERVICES, WORKER_CLASS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("folder", "service"), [("fiji_cloudrun", "align"), ("emwrite_docker", "emwrite")]
)
def test_dockerfile_matches_the_project(folder: str, service: str) -> None:
    dockerfile = (ROOT / folder / "Dockerfile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    installed = re.search(r"uv pip install --system --no-cache '\.\[(\w+)\]'", dockerfile)
    assert installed and installed.group(1) == service and service in extras
    assert "airflow" not in " ".join(extras[service]), "a service must not need Airflow"
    assert f"'{SERVICES[service]}'" in dockerfile
    assert "--workers 1 --threads 1" in dockerfile and '":${PORT}"' in dockerfile
    # The same worker timeout as `emprocess serve`, and not as root.
    timeout = re.search(r"--timeout (\d+)", dockerfile)
    assert timeout and int(timeout.group(1)) == SERVE_TIMEOUT_S > 0
    # A client that sends its request slowly cannot hold the one worker (issue 20.7).
    assert f"--worker-class {WORKER_CLASS} " in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    cloudbuild = (ROOT / folder / "cloudbuild.yaml").read_text()
    assert f"{folder}/Dockerfile" in cloudbuild


BLOCK_IMPORTS = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("not installed in this container: " + name)
sys.meta_path.insert(0, Block())
import {module} as m
m.create_app()
"""


@pytest.mark.parametrize(
    ("module", "blocked"),
    [
        ("emprocess.services.align", {"airflow", "tensorstore"}),
        ("emprocess.services.emwrite", {"airflow"}),
    ],
)
def test_services_start_without_airflow(module: str, blocked: set[str]) -> None:
    import subprocess
    import sys

    code = BLOCK_IMPORTS.format(blocked=sorted(blocked), module=module)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
