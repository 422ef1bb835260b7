"""Parse-time benchmark of the DAG file, as Airflow's DAG processor would load it.

Measures, in this process: the import of ``airflow.sdk`` (paid once by the DAG
processor, not per parse), the first parse of ``emprocess.py`` (imports this package),
then repeated parses through Airflow's own ``DagBag``; and lists any heavy module the
DAG file pulled in. Run it in a fresh process::

    python -m emprocess_bench.parse [--repeats N] [--json] [DAG_FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HEAVY_MODULES = ("numpy", "cv2", "tensorstore", "google.cloud.storage", "requests", "flask")
"""Modules the DAG file must not import at parse time."""


@dataclass
class ParseBenchmark:
    """Parse timings (seconds) of one DAG file."""

    dag_file: str
    airflow_import_s: float
    first_parse_s: float
    parse_s: list[float]
    dag_ids: list[str]
    tasks: int
    heavy_modules: list[str]
    import_errors: dict[str, str]

    @property
    def median_parse_s(self) -> float:
        return statistics.median(self.parse_s)

    def report(self) -> str:
        """Human-readable summary."""
        lines = [
            f"DAG file {self.dag_file}: {len(self.dag_ids)} DAGs, {self.tasks} tasks",
            f"  import airflow.sdk (once per process): {self.airflow_import_s:.3f} s",
            f"  first parse (imports emprocess.workflow): {self.first_parse_s:.3f} s",
            f"  DagBag parse, median of {len(self.parse_s)}: {self.median_parse_s:.3f} s "
            f"(min {min(self.parse_s):.3f} s, max {max(self.parse_s):.3f} s)",
            f"  heavy modules imported at parse time: {self.heavy_modules or 'none'}",
        ]
        if self.import_errors:
            lines.append(f"  IMPORT ERRORS: {self.import_errors}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {**asdict(self), "median_parse_s": self.median_parse_s}


def default_dag_file() -> Path:
    """``emprocess.py`` next to the package (a source checkout)."""
    import emprocess

    return Path(emprocess.__file__).resolve().parents[1] / "emprocess.py"


def _heavy(before: set[str]) -> list[str]:
    new = set(sys.modules) - before
    return sorted(m for m in new if any(m == h or m.startswith(h + ".") for h in HEAVY_MODULES))


def bench_parse(dag_file: str | Path | None = None, repeats: int = 5) -> ParseBenchmark:
    """Time parsing ``dag_file`` (default: :func:`default_dag_file`) ``repeats`` times.

    Needs Airflow configured (``AIRFLOW_HOME``); touches no database.
    """
    import runpy

    path = Path(dag_file) if dag_file else default_dag_file()
    if not path.is_file():
        raise FileNotFoundError(f"DAG file {path} does not exist")
    t0 = time.perf_counter()
    import airflow.sdk  # noqa: F401  (timed: the DAG processor pays this once)
    from airflow.dag_processing.dagbag import DagBag

    airflow_s = time.perf_counter() - t0
    before = set(sys.modules)
    t0 = time.perf_counter()
    runpy.run_path(str(path), run_name="emprocess_dag_bench")
    first_s = time.perf_counter() - t0
    heavy = _heavy(before)
    times = []
    bag = None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        bag = DagBag(dag_folder=str(path), safe_mode=False)
        times.append(time.perf_counter() - t0)
    assert bag is not None
    return ParseBenchmark(
        dag_file=str(path),
        airflow_import_s=round(airflow_s, 4),
        first_parse_s=round(first_s, 4),
        parse_s=[round(t, 4) for t in times],
        dag_ids=sorted(bag.dag_ids),
        tasks=sum(len(d.tasks) for d in bag.dags.values()),
        heavy_modules=heavy,
        import_errors={str(k): str(v) for k, v in bag.import_errors.items()},
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: print the benchmark (``--json`` for machines); 1 on import errors."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dag_file", nargs="?", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = bench_parse(args.dag_file, args.repeats)
    out = json.dumps(result.to_json()) if args.json else result.report()
    sys.stdout.write(out + "\n")
    return 1 if result.import_errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
