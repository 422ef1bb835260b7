"""The README's "Self-managed Airflow 3" section, run as written, in bash, in a fresh folder.

Every shell block of the section from the environment file on is taken from README.md
and run in a new folder standing in for the checkout (``emprocess.py`` and the package
linked in), in order: environment, DAG folder, database, pool, services and Airflow in
their own process groups, waiting for them, token, a sample stack triggered with
``--wait``, the whole run cleared and redone with ``--wait``, and the stop command.
Only what cannot run here is changed: the install and PostgreSQL blocks (sudo, Debian's
own cluster) are replaced by this venv and a throw-away cluster (its URL replaces the
README's), the ports are free ones instead of 8080-8082, and parallelism is 12 instead of
48 (a shared 2-core machine). It checks that the run finished, that ``clear`` sent it
again, and that the stop command leaves no process of any group behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emprocess.localrun import free_port

pytestmark = [pytest.mark.slow, pytest.mark.airflow_server]

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("align", "emwrite", "api-server", "scheduler", "dag-processor")


def section_blocks() -> list[str]:
    """The indented shell blocks of the README's self-managed section, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Self-managed Airflow 3", 1)[1].split("\n## ", 1)[0]
    blocks, current = [], []
    for line in section.splitlines():
        if line.startswith("    "):
            current.append(line[4:])
        elif current and line.strip():
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


def block(blocks: list[str], first: str) -> str:
    (found,) = [b for b in blocks if b.startswith(first)]
    return found


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies of a group leader count as gone (their parent, bash, has exited).
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_the_readme_section_runs_as_written(tmp_path: Path) -> None:
    from pgcluster import pg_cluster

    checkout = tmp_path / "clio"
    checkout.mkdir()
    for name in ("emprocess.py", "emprocess"):
        (checkout / name).symlink_to(REPO / name)
    ports = {"8080": free_port(), "8081": free_port(), "8082": free_port()}
    blocks = [
        re.sub(r"\b(8080|8081|8082)\b", lambda m: str(ports[m.group(1)]), b)
        for b in section_blocks()
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "EMPROCESS"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the activated venv

    def run(name: str, script: str, timeout_s: float) -> str:
        log = tmp_path / f"{name}.log"
        with open(log, "w") as out:
            done = subprocess.run(
                ["bash", "-c", script], cwd=checkout, env=env, stdout=out,
                stderr=subprocess.STDOUT, timeout=timeout_s,
            )  # fmt: skip
        said = log.read_text()
        assert done.returncode == 0, f"{name} failed ({done.returncode}):\n{said[-3000:]}"
        return said

    with pg_cluster(tmp_path / "pg") as pg:
        setup = block(blocks, "mkdir -p work/logs")
        setup = re.sub(r"postgresql\+psycopg2://\S+", pg.url, setup)
        setup = setup.replace("PARALLELISM=48", "PARALLELISM=12")
        source = ". work/airflow.env\n"
        try:
            run("setup", "set -e\n" + setup, 60)
            run("dags", "set -e\n" + source + block(blocks, "mkdir -p $AIRFLOW_HOME/dags"), 60)
            start = block(blocks, "airflow db migrate")
            run("start", "set -e\n" + source + start, 600)
            token = block(blocks, "export AIRFLOW_PASSWORD")
            t0 = time.monotonic()
            said = run("trigger", source + token + "\n" + block(blocks, "emprocess sample"), 600)
            seconds = time.monotonic() - t0
            assert "run run1 of emprocess_width4_v" in said and ": success after" in said, said
            said = run("clear", source + token + "\n" + block(blocks, "emprocess clear"), 600)
            assert "cleared " in said and ": success after" in said, said[-3000:]
            pgids = {g: int((checkout / "work" / f"{g}.pid").read_text()) for g in GROUPS}
            run("stop", block(blocks, "for p in "), 60)
            deadline = time.monotonic() + 90
            while any(group_alive(p) for p in pgids.values()) and time.monotonic() < deadline:
                time.sleep(0.5)
            left = [g for g, p in pgids.items() if group_alive(p)]
            assert left == [], f"still running after the README's stop: {left}"
            print(f"README section as written: trigger to success {seconds:.0f} s, clear "
                  "redid it, stop left no process")  # fmt: skip
        finally:
            for pid_file in (checkout / "work").glob("*.pid"):
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.killpg(int(pid_file.read_text()), signal.SIGKILL)
