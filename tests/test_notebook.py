"""notebooks/analyze_study.ipynb runs top to bottom against a study made here on CPU.

The notebook's parameter cell (tagged ``parameters``) is replaced with this study's storage
URL, as papermill would, and the notebook is executed in a real ipykernel with nbclient.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ANALYTIC, ROOT
from fakes import MiB

from autotune.tune.study import RunOptions, run_study

NOTEBOOK = ROOT / "notebooks" / "analyze_study.ipynb"


def test_notebook_draws_a_study(tmp_path: Path, storage_url: str) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    run_study(RunOptions(model="tiny-llama", engine=ANALYTIC, device="cpu", dtype="float32",
                         early_stop=False,
                         trials=8, isl=8, osl=4, max_batch=256, repeats=1, storage=storage_url,
                         gpu_memory_limit=1024 * MiB, study_name="notebook-study"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params.source = (f"storage = {storage_url!r}\nstudy_name = 'notebook-study'\n"
                     f"save_to = {str(tmp_path / 'saved')!r}")
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "notebook-study: 8 finished trials" in text
    assert "best (the recommendation): trial #" in text
    assert "why: " in text  # the recommendation's explanation
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # landscape, bound, Pareto front, progress
    tables = [o for o in outputs if "text/markdown" in o.get("data", {})]
    assert tables and "| trial | status |" in tables[0]["data"]["text/markdown"]
    assert "| bound |" in tables[0]["data"]["text/markdown"]
    assert (tmp_path / "saved" / "report.html").exists()
