"""``emprocess serve``: a master killed with SIGKILL leaves no worker holding the port, and
a missing package names the extra to install instead of a traceback from exec."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from emprocess.cli import app
from emprocess.localrun import free_port, stop_process, wait_http


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def serve(port: int, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "emprocess.cli", "serve", "align", "--port", str(port),
            "--workers", "2"]  # fmt: skip
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_stop_when_their_master_is_killed(tmp_path: Path) -> None:
    port = free_port()
    master = serve(port, tmp_path / "serve.log")
    again = None
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=60, proc=master)
        workers = children(master.pid)
        assert len(workers) == 2, workers
        os.kill(master.pid, signal.SIGKILL)
        master.wait(timeout=10)
        t0 = time.monotonic()
        while any(alive(w) for w in workers) and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        gone_s = time.monotonic() - t0
        assert not any(alive(w) for w in workers), (tmp_path / "serve.log").read_text()[-2000:]
        # The port is free: a restarted service binds it and answers.
        again = serve(port, tmp_path / "serve.log")
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=60, proc=again)
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["status"] == "ok"
        print(f"workers gone {gone_s:.1f} s after SIGKILL of their master; port rebound")
    finally:
        for proc in (master, again):
            if proc is not None and proc.poll() is None:
                stop_process(proc)


def test_serve_names_the_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def without_flask(name: str, *args: object) -> object:
        return None if name == "flask" else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", without_flask)
    result = CliRunner().invoke(app, ["serve", "emwrite", "--port", "1"])
    assert result.exit_code == 1
    assert "emprocess serve emwrite needs flask: pip install -e '.[emwrite]'" in result.output
    assert "Traceback" not in result.output
