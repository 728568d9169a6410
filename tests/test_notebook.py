"""The quickstart notebook runs top to bottom with the current API (on the CPU,
with the real SmolLM2 model and WikiText-2 beside the repository)."""

import pathlib

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(smollm2_path):
  del smollm2_path  # fetched first, as the notebook's `default_model_path()` reads it
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=1200, kernel_name="python3",
                 resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  printed = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                    for o in cell.outputs if o.get("output_type") == "stream")
  # The pass key comes back through the full-precision cache, and the memory
  # table shows KIVI-2's 5.2x.
  assert "  fp16: ' 48213" in printed
  assert "kivi2:  1102.5 MiB, 5.2x less than fp16" in printed
