"""The notebooks run top to bottom with the current API (on the CPU, with the real
SmolLM2 model and WikiText-2 beside the repository)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).parents[1] / "notebooks"


def _run(name: str) -> str:
  """Executes `notebooks/name` afresh; what its cells printed."""
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  NotebookClient(nb, timeout=1200, kernel_name="python3",
                 resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  return "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for o in cell.outputs if o.get("output_type") == "stream")


@pytest.mark.slow
def test_quickstart_notebook_runs(smollm2_path):
  del smollm2_path  # fetched first, as the notebook's `default_model_path()` reads it
  printed = _run("quickstart.ipynb")
  # The pass key comes back through the full-precision cache, and the memory
  # table shows KIVI-2's 5.2x.
  assert "  fp16: ' 48213" in printed
  assert "kivi2:  1102.5 MiB, 5.2x less than fp16" in printed


@pytest.mark.slow
def test_long_context_notebook_runs(smollm2_path):
  del smollm2_path
  printed = _run("long_context.ipynb")
  assert "prefilled 1461 tokens" in printed
  assert "restored: [1461] tokens a row, k_bits 4" in printed
  # Both answers come from the restored cache of the article.
  assert "A: Robert Boulter is an English film, television, and theatre actor" in printed
  assert "A: In 2011, Boulter starred in the film Mercenaries" in printed
  assert " fp16: 16.00 GiB at 131072 tokens" in printed
  assert "kivi2:  3.02 GiB at 131072 tokens" in printed
