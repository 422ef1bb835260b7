"""Airflow DAG file of clio-ingest: copy it into the Airflow dags folder (with the package).

Builds ``emprocess_width{W}_v{VERSION}`` for each fixed width W in
``emprocess.workflow.WIDTHS`` (1, 4, 32, 64, 128) and the dynamic DAG
``emprocess_v{VERSION}``, whose width comes from the run's conf. Parsing is cheap:
no network, no Airflow Variables, no numpy/cv2/tensorstore/google-cloud-storage;
tasks import those when they run. See ``emprocess/workflow/dag.py``.
"""

from __future__ import annotations

if __name__ == "emprocess":
    # Imported by the package's name: this file shadows the package on sys.path.
    raise ImportError(
        f"{__file__} was imported as the 'emprocess' package; install clio-ingest, or put "
        "the emprocess/ package folder beside this file (and 'emprocess/' in .airflowignore)"
    )

from emprocess.workflow import WIDTHS
from emprocess.workflow.dag import build_dag

for _width in sorted(WIDTHS):
    globals()[f"emprocess_width{_width}"] = build_dag(_width)

emprocess_dynamic = build_dag(None)
