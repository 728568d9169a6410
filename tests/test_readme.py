"""The README's Python examples run as written, with the current API (on the CPU, with
the real SmolLM2 model and WikiText-2 beside the repository). The mesh example is a
template for eight devices and a model whose kv heads split four ways: its calls are
tested in `test_sharding.py`."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
SHARED = ROOT.parent / "shared"

# What the README leaves to the reader in its second example: a document and a
# question, as token ids of the model's tokenizer.
_DOCUMENT = """
doc_ids = np.array([tok.encode("The quick brown fox jumps over the lazy dog. " * 20)])
question_ids = np.array([tok.encode(" What did the fox jump over?")])
"""


def python_examples() -> list[str]:
  return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_the_examples_this_test_runs():
  blocks = python_examples()
  assert len(blocks) == 4
  assert "kivi_jax.generate(model, np.array([ids])" in blocks[0]
  assert "kivi_jax.save_cache(" in blocks[1] and "doc_ids" in blocks[1]
  assert "kivi_jax.calibrate(" in blocks[2] and "../shared/" in blocks[2]
  assert "make_mesh(data=2, model=4)" in blocks[3]


@pytest.mark.slow
def test_the_readme_examples_run(smollm2_path, tmp_path):
  """The first three examples in one fresh process, in their order, from an empty
  directory (the checkpoint and the calibration they write land there)."""
  del smollm2_path  # fetched first, as the example's `default_model_path()` reads it
  first, cache, calibration, _ = python_examples()
  script = "\n".join([first, _DOCUMENT, cache, "print('continued', out.shape)",
                      calibration.replace("../shared/", f"{SHARED}/"),
                      "print('skvq tokens', out.shape)"])
  done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                        text=True, timeout=1200)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Paris" in done.stdout
  assert "continued (1, 64)" in done.stdout
  assert "skvq tokens (1, 32)" in done.stdout
  assert (tmp_path / "doc.ckpt").is_dir() and (tmp_path / "skvq.json").is_file()
