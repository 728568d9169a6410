"""The `kivi-jax` command line, run as a user runs it."""

import subprocess
import sys

import pytest


def _run(*args):
  return subprocess.run([sys.executable, "-m", "kivi_jax.cli", *args], capture_output=True,
                        text=True, timeout=600)


@pytest.mark.slow
def test_generate_streams_the_answer(smollm2_path):
  done = _run("generate", "What is the capital of France?", "--model", str(smollm2_path),
              "--max-new-tokens", "24")
  assert done.returncode == 0, done.stderr
  assert "Paris" in done.stdout
  assert "<|im_end|>" not in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--k-bits", "3"], "k_bits must be one of (2, 4, 8, 16), got 3"),
    (["--group-size", "32", "--residual-length", "100"],
     "residual_length must be 0 or a positive multiple of group_size (32)"),
    (["--model", "/nonexistent/model.gguf"], "does not exist"),
])
def test_bad_arguments_exit_with_a_clear_error(args, message):
  done = _run("generate", "hi", *args)
  assert done.returncode == 2
  assert message in done.stderr
  assert "Traceback" not in done.stderr
