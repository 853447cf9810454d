"""notebooks/gpt_from_scratch.ipynb runs top to bottom (its own asserts: the pieces match jaxgpt's, the
model learns, PyTorch gives the same logits), and is kept in git without outputs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "gpt_from_scratch.ipynb"


def test_the_notebook_is_stored_without_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code), "strip the outputs before committing"


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="the notebook test needs the dev extras (nbformat, nbclient)")
    nbclient = pytest.importorskip("nbclient", reason="the notebook test needs the dev extras (nbformat, nbclient)")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel trains 300 steps of the CPU preset's model: at the suite's LLVM -O0 (tests/conftest.py) its
    # steps run at half speed; -O1 compiles nearly as fast and runs them at -O3's speed (this test alone on a
    # 2-core Xeon VM: 54.7 s of CPU at -O0, 42.0 s at -O1). Any other level in XLA_FLAGS is left as it is.
    flags = os.environ.get("XLA_FLAGS", "")
    monkeypatch.setenv("XLA_FLAGS", flags.replace("--xla_backend_optimization_level=0", "--xla_backend_optimization_level=1"))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    streams = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "max |logit difference| jax vs torch" in streams and "step 300:" in streams
