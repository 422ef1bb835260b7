"""The service images install only what the services use; the extras name themselves when missing."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Not in the service images: the report's figures, the benchmarks and what only they,
# Airflow, the viewer or the CLI use.
NOT_IN_IMAGES = ("matplotlib", "emprocess_bench", "psutil", "nbclient", "airflow", "neuroglancer")

SERVE_WITHOUT_THEM = f"""
import json, sys
for name in {NOT_IN_IMAGES!r}:
    sys.modules[name] = None  # any import of it fails
from emprocess.sample import write_sample
from emprocess.services import align, emwrite

write_sample("gs://lean-src", 2, 256, 256, seed=1)
answer = align.create_app().test_client().post(
    "/", json={{"pre": "gs://lean-src/img.00000.png", "post": "gs://lean-src/img.00001.png"}}
)
health = emwrite.create_app().test_client().get("/health")
refused = emwrite.create_app().test_client().post("/ngmeta", json={{"dest": 7}})
loaded = sorted(m for m, module in sys.modules.items() if module is not None and (
    m.split(".")[0] in ("emprocess_bench", "typer", "rich")
    or m.startswith(("emprocess.report", "emprocess.workflow", "emprocess.cli"))))
print(json.dumps({{"align": [answer.status_code, answer.get_json()], "health": health.status_code,
                  "refused": [refused.status_code, refused.get_json()], "loaded": loaded}}))
"""


def _extras_closure(extra: str) -> set[str]:
    """Distribution names ``pip install '.[extra]'`` asks for (the base and nested extras)."""
    project = PYPROJECT["project"]
    names, todo = set(), [*project["dependencies"], *project["optional-dependencies"][extra]]
    while todo:
        req = todo.pop()
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()  # type: ignore[union-attr]
        if name == "clio-ingest":
            for nested in re.search(r"\[(.*)\]", req).group(1).split(","):  # type: ignore[union-attr]
                todo += project["optional-dependencies"][nested.strip()]
        else:
            names.add(name)
    return names


@pytest.mark.parametrize(
    ("dockerfile", "extra"), [("fiji_cloudrun", "align"), ("emwrite_docker", "emwrite")]
)
def test_service_images_install_only_their_extra(dockerfile: str, extra: str) -> None:
    text = (REPO / dockerfile / "Dockerfile").read_text()
    assert re.findall(r"pip install [^\n]*'(\.\[[a-z,]*\])'", text) == [f".[{extra}]"]
    assert "COPY emprocess ./emprocess" in text and "COPY emprocess_bench" not in text
    installed = _extras_closure(extra)
    assert "flask" in installed
    assert not installed & {"matplotlib", "psutil", "apache-airflow", "neuroglancer", "nbclient"}


def test_services_answer_with_the_report_bench_and_airflow_modules_blocked(tmp_path: Path) -> None:
    import json
    import os

    env = {**os.environ, "EMPROCESS_STORAGE_ROOT": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_THEM],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    status, answer = out["align"]
    assert status == 200, answer
    assert answer["affine_found"] and answer["affine_inliers"] >= 20, answer
    assert out["health"] == 200
    assert out["refused"][0] == 400 and "error" in out["refused"][1]
    assert out["loaded"] == []  # no report, workflow, CLI or benchmark module in a service


@pytest.mark.parametrize(
    ("blocked", "argv", "message"),
    [
        (
            "matplotlib",
            ["report", "r1", "--source", "lean"],
            "[report] extra: pip install 'clio-ingest[report]'",
        ),
        ("emprocess_bench", ["bench", "plan"], "[bench] extra: pip install -e '.[bench]'"),
        (
            "psutil",
            ["bench", "run", "--slices", "2"],
            "needs psutil, which comes with the benchmarks",
        ),
        (
            "werkzeug",
            ["view", "r1", "--source", "lean"],
            "needs werkzeug: pip install 'clio-ingest[view]'",
        ),
    ],
)
def test_a_missing_extra_is_named(
    tmp_path: Path, blocked: str, argv: list[str], message: str
) -> None:
    import os

    code = f"import sys; sys.modules[{blocked!r}] = None; from emprocess.cli import main; main()"
    env = {**os.environ, "EMPROCESS_STORAGE_ROOT": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
