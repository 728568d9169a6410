"""save_cache / restore_cache: a prefilled cache goes on decoding in another
process exactly as it would have; a wrong or damaged checkpoint is refused and
nothing on disk is lost."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax
from conftest import tiny_hf_model, tiny_llama_config
from kivi_jax import checkpoint

METHODS = {
    "fp16": kivi_jax.get_preset("fp16"),
    # Small groups and ring: the prompts fill the block, decoding flushes more.
    "kivi2": kivi_jax.KIVIConfig(2, 2, 16, 32),
    # Calibrated channel order and clips, sinks, pre-RoPE keys, ternary values.
    "skvq": kivi_jax.KIVIConfig(k_bits=2, v_bits=1.5, group_size=16, residual_length=32,
                                key_axis="token", value_axis="token", channel_group=8,
                                clip="calibrated", reorder=True, sinks=4, pre_rope=True),
}
STEPS = 24

# Runs in a fresh process: restores each saved cache and decodes from it.
_RESUME = """
import json, sys
import numpy as np
import kivi_jax
from kivi_jax.checkpoint import restore_cache
sys.path.insert(0, sys.argv[1])
from test_checkpoint import decode
model = kivi_jax.load_model(sys.argv[2])
out = {}
for name, path, first in json.loads(sys.argv[3]):
  out[name] = decode(model, restore_cache(path, model), np.asarray(first)).tolist()
print(json.dumps(out))
"""


def decode(model, cache, first, steps=STEPS):
  """Greedy tokens `[B, steps]` from `cache`, fed `first` `[B]` first."""
  tok, out = jnp.asarray(first)[:, None], []
  for _ in range(steps):
    logits, cache = model.forward(model.params, tok, cache)
    tok = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
    out.append(tok)
  return np.asarray(jnp.concatenate(out, 1))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A tiny Llama saved as an HF checkpoint directory, which both processes load."""
  path = tmp_path_factory.mktemp("model")
  tiny_hf_model(tiny_llama_config(vocab_size=256)).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def model(model_dir):
  return kivi_jax.load_model(model_dir)


def _calibration(model, kv):
  if not kv.needs_calibration:
    return None
  batches = [np.random.default_rng(i).integers(0, 256, (2, 64)) for i in range(2)]
  return kivi_jax.calibrate(model, batches, kv, progress=False)


def _prefilled(model, kv):
  """Three left-padded prompts of 70, 41 and 9 tokens prefilled into a cache of 128."""
  rng = np.random.default_rng(3)
  ids, mask = np.zeros((3, 70), np.int32), np.zeros((3, 70), np.int32)
  for row, n in enumerate((70, 41, 9)):
    ids[row, 70 - n:], mask[row, 70 - n:] = rng.integers(0, 256, n), 1
  cache = kivi_jax.init_cache(model.config, kv, 3, 128, calibration=_calibration(model, kv))
  logits, cache = model.prefill(model.params, ids, cache, mask)
  return cache, np.asarray(jnp.argmax(logits, -1))


def test_a_restored_cache_decodes_in_another_process_as_the_original(model, model_dir,
                                                                     tmp_path):
  jobs, expected = [], {}
  for name, kv in METHODS.items():
    cache, first = _prefilled(model, kv)
    path = checkpoint.save_cache(tmp_path / name, cache, model)
    expected[name] = decode(model, cache, first)
    jobs.append((name, str(path), first.tolist()))
  done = subprocess.run([sys.executable, "-c", _RESUME, str(Path(__file__).parent), str(model_dir),
                         json.dumps(jobs)], capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  got = json.loads(done.stdout.splitlines()[-1])
  for name in METHODS:
    np.testing.assert_array_equal(np.asarray(got[name]), expected[name], err_msg=name)
  # The quantized methods really differ from full precision on these steps.
  assert got["kivi2"] != got["fp16"] and got["skvq"] != got["fp16"]


def test_restore_gives_back_every_array_and_the_config(model, tmp_path):
  cache, _ = _prefilled(model, METHODS["skvq"])
  restored = checkpoint.restore_cache(checkpoint.save_cache(tmp_path / "c", cache, model),
                                      model, impl="reference")
  assert restored.config == cache.config and restored.impl == "reference"
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(cache)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _tokens_first(cache):
  """`cache` with SKVQ's scales and zeros `[B, 1, C, n]`, as formats 1 and 2 held them."""
  turn = lambda x: None if x is None else jnp.swapaxes(x, -1, -2)  # noqa: E731
  block = lambda b: b.replace(scale=turn(b.scale), zero=turn(b.zero))  # noqa: E731
  return cache.replace(layers=tuple(layer.replace(k=block(layer.k), v=block(layer.v))
                                    for layer in cache.layers))


@pytest.mark.parametrize("version, method", [(1, "kivi2"), (1, "skvq"), (2, "skvq")])
def test_an_older_format_restores_as_it_was_saved(model, tmp_path, version, method):
  """Format 1 (before 2026-12-05) recorded a row's capacity as the block's and the
  sinks' tokens; the same arrays restore, the ring's tokens now counted too. Formats
  1 and 2 (before 2026-12-07) held SKVQ's scales and zeros tokens first: they
  restore tokens last, as the cache holds them now."""
  cache, _ = _prefilled(model, METHODS[method])
  kv = cache.config
  old = _tokens_first(cache) if kv.channel_group is not None else cache
  if kv.channel_group is not None:
    assert old.layers[0].k.scale.shape != cache.layers[0].k.scale.shape
  path = checkpoint.save_cache(tmp_path / "c", old, model)
  meta = json.loads((path / checkpoint.META).read_text())
  meta.update(format=version, capacity=(cache.block_capacity + kv.sinks if version == 1
                                        else cache.capacity))
  (path / checkpoint.META).write_text(json.dumps(meta))
  assert kivi_jax.cache_info(path)["capacity"] == cache.capacity
  restored = checkpoint.restore_cache(path, model)
  assert restored.capacity == cache.capacity == (
      cache.block_capacity + kv.residual_length + kv.sinks)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(cache)):
    assert a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _listing(path):
  return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
  cache, _ = _prefilled(model, METHODS["kivi2"])
  return checkpoint.save_cache(tmp_path_factory.mktemp("saved") / "kivi2", cache, model)


def test_another_model_is_refused(saved):
  other = kivi_jax.load_model(tiny_hf_model(tiny_llama_config(vocab_size=256), seed=1))
  before = _listing(saved)
  with pytest.raises(ValueError, match=r"holds a cache of model \w+, not of this one"):
    checkpoint.restore_cache(saved, other)
  assert _listing(saved) == before


def test_another_config_is_refused(model, saved):
  with pytest.raises(ValueError, match=r"holds a cache with group_size=16, not group_size=32"):
    checkpoint.restore_cache(saved, model, kv_config=kivi_jax.KIVIConfig(2, 2, 32, 32))


def test_a_directory_without_a_checkpoint_is_refused(model, tmp_path):
  with pytest.raises(ValueError, match="is not a kivi-jax cache checkpoint"):
    checkpoint.restore_cache(tmp_path, model)


def test_damaged_checkpoints_are_refused_and_left_as_they_are(model, saved, tmp_path):
  import shutil
  meta = tmp_path / "meta"
  shutil.copytree(saved, meta)
  (meta / checkpoint.META).write_text("{\"format\": 1, \"kv_config\": {\"k_bits\": 3}}")
  with pytest.raises(ValueError, match="kivi_jax.json is damaged"):
    checkpoint.restore_cache(meta, model)
  arrays = tmp_path / "arrays"
  shutil.copytree(saved, arrays)
  for f in (arrays / "arrays").rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(f.read_bytes()[:100])
  before = _listing(arrays)
  with pytest.raises(ValueError, match="the cache's arrays cannot be read"):
    checkpoint.restore_cache(arrays, model)
  assert _listing(arrays) == before


def test_saving_over_a_checkpoint_needs_overwrite_and_a_failed_save_keeps_it(
    model, saved, tmp_path, monkeypatch):
  import shutil
  path = tmp_path / "c"
  shutil.copytree(saved, path)
  before = _listing(path)
  fp16, _ = _prefilled(model, METHODS["fp16"])
  with pytest.raises(FileExistsError, match="pass overwrite=True"):
    checkpoint.save_cache(path, fp16, model)

  def fail(*args, **kwargs):
    raise OSError("disk full")

  with monkeypatch.context() as m:
    m.setattr(checkpoint.ocp.StandardCheckpointer, "save", fail)
    with pytest.raises(OSError, match="disk full"):
      checkpoint.save_cache(path, fp16, model, overwrite=True)
  assert _listing(path) == before and os.listdir(tmp_path) == ["c"]
  checkpoint.save_cache(path, fp16, model, overwrite=True)
  assert checkpoint.restore_cache(path, model).config == METHODS["fp16"]


def test_cache_info_reads_the_description_and_the_callers_metadata(model, tmp_path):
  cache, _ = _prefilled(model, METHODS["kivi2"])
  path = checkpoint.save_cache(tmp_path / "c", cache, model,
                               metadata={"document": "wiki.test.raw", "tokens": [70, 41, 9]})
  info = kivi_jax.cache_info(path)
  assert info["kv_config"] == METHODS["kivi2"]
  assert info["lengths"] == np.asarray(cache.lengths).tolist() == [70, 41, 9]
  assert (info["batch"], info["capacity"]) == (3, cache.capacity)
  assert info["metadata"] == {"document": "wiki.test.raw", "tokens": [70, 41, 9]}
  with pytest.raises(ValueError, match="metadata must be JSON-serializable"):
    checkpoint.save_cache(tmp_path / "d", cache, model, metadata={"array": np.zeros(2)})
  assert not (tmp_path / "d").exists()
  (path / checkpoint.META).write_text("[1, 2]")
  with pytest.raises(ValueError, match="kivi_jax.json is damaged"):
    kivi_jax.cache_info(path)
