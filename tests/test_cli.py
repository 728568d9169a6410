"""The `kivi-jax` command line, run as a user runs it."""

import json
import os
import subprocess
import sys

import pytest


def _run(*args, env=None):
  return subprocess.run([sys.executable, "-m", "kivi_jax.cli", *args], capture_output=True,
                        text=True, timeout=600, env=env)


@pytest.mark.slow
def test_generate_streams_the_answer_and_keeps_its_compiled_programs(smollm2_path, tmp_path):
  # Without the suite's compilation cache, as a user runs it: the CLI keeps the
  # prefill and the streamed decode loop (no host callback in it) in its own
  # cache directory, for the next run to read back.
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["KIVI_JAX_CACHE"] = str(tmp_path)
  done = _run("generate", "What is the capital of France?", "--model", str(smollm2_path),
              "--max-new-tokens", "24", env=env)
  assert done.returncode == 0, done.stderr
  assert "Paris" in done.stdout
  assert "<|im_end|>" not in done.stdout
  kept = {p.name.split("-")[0] for p in (tmp_path / "xla").iterdir()}
  assert {"jit__prefill_chunks", "jit__decode"} <= kept


@pytest.mark.slow
def test_save_a_documents_cache_then_ask_about_it(smollm2_path, tmp_path):
  saved = tmp_path / "curie"
  doc = ("Marie Curie was born in Warsaw in 1867. She moved to Paris in 1891, studied "
         "physics at the Sorbonne, and won Nobel Prizes in Physics (1903) and Chemistry "
         "(1911).")
  done = _run("generate", doc, "--model", str(smollm2_path), "--save-cache", str(saved))
  assert done.returncode == 0, done.stderr
  assert f"to {saved}" in done.stdout
  info = json.loads((saved / "kivi_jax.json").read_text())
  assert info["metadata"] == {"chat": True} and info["kv_config"]["k_bits"] == 2
  done = _run("generate", "Where was Marie Curie born?", "--model", str(smollm2_path),
              "--resume-cache", str(saved), "--max-new-tokens", "16")
  assert done.returncode == 0, done.stderr
  assert "Warsaw" in done.stdout
  # The saved cache was kivi2's: asking for another config is refused.
  done = _run("generate", "When?", "--model", str(smollm2_path), "--resume-cache",
              str(saved), "--method", "kivi4")
  assert done.returncode == 2 and "k_bits=2, not k_bits=4" in done.stderr


@pytest.mark.slow
def test_eval_passkey_writes_a_table_and_json(smollm2_path, tmp_path):
  # One method: a second is one more pass of the command's loop over methods (the
  # ppl test below runs two through its own), and another 30-layer compile.
  out = tmp_path / "passkey.json"
  done = _run("eval", "passkey", "--model", str(smollm2_path), "--methods", "fp16",
              "--lengths", "512", "--depths", "1", "--trials", "2", "--out", str(out))
  assert done.returncode == 0, done.stderr
  assert "| method | 512 |" in done.stdout
  result = json.loads(out.read_text())
  assert {"device", "jax", "date", "commit"} <= set(result)
  rows = {r["method"]: r for r in result["rows"]}
  # SmolLM2 retrieves a passkey from 512 tokens with a full-precision cache.
  assert rows["fp16"]["accuracy"] == 1.0 and rows["fp16"]["trials"] == 2
  assert len(result["records"]["fp16"]) == 2


@pytest.mark.slow
def test_eval_ppl_writes_a_table_and_json(smollm2_path, tmp_path):
  # The quick setting cut down to one short window, for the command's plumbing.
  out = tmp_path / "ppl.json"
  done = _run("eval", "ppl", "--model", str(smollm2_path), "--methods", "fp16,kivi2",
              "--setting", "quick", "--out", str(out), "--windows", "1", "--prefill", "256",
              "--decode", "16")
  assert done.returncode == 0, done.stderr
  rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
  assert rows["kivi2"]["bits_per_element"] == 3.0
  # 256 - 128 tokens quantized: the methods differ.
  assert rows["fp16"]["kv_ppl"] != rows["kivi2"]["kv_ppl"]
  assert json.loads(out.read_text())["prefill"] == 256


@pytest.mark.slow
def test_calibrate_then_generate_with_it(smollm2_path, tmp_path):
  calib = tmp_path / "skvq.json"
  # On 2048 tokens, not the default 8192: the command's plumbing (the calibration
  # itself has tests of its own), in a quarter of the time.
  done = _run("calibrate", "--model", str(smollm2_path), "--method", "skvq-k2v1.5-g32",
              "--tokens", "2048", "--out", str(calib))
  assert done.returncode == 0, done.stderr
  saved = json.loads(calib.read_text())
  assert saved["config"]["v_bits"] == 1.5
  assert saved["source"].startswith("last 2048 tokens of wiki.test.raw")
  assert len(saved["perm_k"]) == 30  # one channel order per layer
  done = _run("generate", "What is the capital of France?", "--model", str(smollm2_path),
              "--method", "skvq-k2v1.5-g32", "--calibration", str(calib),
              "--max-new-tokens", "24")
  assert done.returncode == 0, done.stderr
  assert "Paris" in done.stdout
  # A calibration made for one config is refused by another.
  done = _run("generate", "hi", "--model", str(smollm2_path), "--method", "skvq-k2v2-g32",
              "--calibration", str(calib))
  assert done.returncode == 2
  assert "calibration was made for v_bits=1.5" in done.stderr


@pytest.mark.parametrize("tokens", ["1000", "0"])
def test_calibrate_refuses_a_token_count_it_cannot_batch(tokens):
  done = _run("calibrate", "--tokens", tokens, "--out", "unused.json")
  assert done.returncode == 2
  assert "--tokens must be a positive multiple of 2048 " in done.stderr
  assert f"got {tokens}" in done.stderr


@pytest.mark.parametrize("command", [["calibrate", "--out", "unused.json"], ["eval", "ppl"],
                                     ["eval", "passkey", "--methods", "fp16,skvq-k2v2"]])
def test_a_missing_text_file_is_named_before_the_model_loads(command, tmp_path):
  # The model does not exist either: the text is checked first, so no model
  # is loaded for a run that would fail after it.
  missing = str(tmp_path / "wiki.test.raw")
  done = _run(*command, "--data", missing, "--model", "/nonexistent/model.gguf")
  assert done.returncode == 2
  assert f"--data {missing!r} is not a file" in done.stderr
  assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--k-bits", "3"], "k_bits must be one of (1.5, 2, 4, 8, 16), got 3"),
    (["--method", "skvq-k2v2"], "method skvq-k2v2 needs a calibration"),
    (["--group-size", "32", "--residual-length", "100"],
     "residual_length must be 0 or a positive multiple of group_size (32)"),
    (["--model", "/nonexistent/model.gguf"], "--model '/nonexistent/model.gguf' does not exist"),
    (["--method", "skvq-k2v2", "--calibration", "/nonexistent/calib.json"],
     "--calibration '/nonexistent/calib.json' is not a file"),
    (["--impl", "cuda"], "argument --impl: invalid choice: 'cuda'"),
    (["--max-new-tokens", "10000000"],
     "exceeds the model's context window, max_position_embeddings=8192"),
    (["--save-cache", "."], ". exists: pass --overwrite to replace it"),
    (["--resume-cache", "/nonexistent"], "/nonexistent is not a kivi-jax cache checkpoint"),
    (["--save-cache", "a", "--resume-cache", "b"], "exclude each other"),
])
def test_bad_arguments_exit_with_a_clear_error(args, message):
  done = _run("generate", "hi", *args)
  assert done.returncode == 2
  assert message in done.stderr
  assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [["calibrate"], ["eval", "ppl"], ["eval", "passkey"],
                                     ["bench", "attention"], ["bench", "generate"]])
def test_a_directory_as_out_is_refused_before_the_run(command, tmp_path):
  # The results are written at the end of a run: found out at the start.
  done = _run(*command, "--out", str(tmp_path))
  assert done.returncode == 2
  assert f"argument --out: {str(tmp_path)!r} is a directory: name a file in it" in done.stderr


def test_an_empty_raw_prompt_is_refused():
  done = _run("generate", "", "--raw")
  assert done.returncode == 2
  assert "the prompt is empty, and no chat template adds to it" in done.stderr


def test_a_users_models_module_neither_shadows_ours_nor_is_shadowed(tmp_path):
  # A user's own `models.py` and `pallas_kernels/` in the working directory:
  # ours are installed as kivi_jax.models and kivi_jax.pallas_kernels.
  (tmp_path / "models.py").write_text("OWNER = 'user'\n")
  (tmp_path / "pallas_kernels").mkdir()
  (tmp_path / "pallas_kernels" / "__init__.py").write_text("OWNER = 'user'\n")
  code = ("import kivi_jax, models, pallas_kernels\n"
          "from kivi_jax.pallas_kernels import decode_attention\n"
          "print(models.OWNER, pallas_kernels.OWNER, kivi_jax.load_model.__module__)\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ["user", "user", "kivi_jax.models.loading"]
  done = subprocess.run([sys.executable, "-m", "kivi_jax.cli", "generate", "--help"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0 and "--max-new-tokens" in done.stdout, done.stderr


def test_git_commit_says_when_the_code_is_not_the_commits(tmp_path):
  # A figure's commit must be the code that ran: a tracked file changed since
  # the commit marks it "-dirty" (an untracked one does not).
  from kivi_jax.cli import git_commit
  assert git_commit(tmp_path) is None  # not a repository
  def git(*args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          cwd=tmp_path, check=True, capture_output=True, text=True)
  git("init", "-q")
  (tmp_path / "code.py").write_text("x = 1\n")
  git("add", "code.py")
  git("commit", "-qm", "one")
  head = git("rev-parse", "HEAD").stdout.strip()
  (tmp_path / "notes.txt").write_text("untracked\n")
  assert git_commit(tmp_path) == head
  (tmp_path / "code.py").write_text("x = 2\n")
  assert git_commit(tmp_path) == head + "-dirty"
