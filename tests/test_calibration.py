"""SKVQ's calibration and channel order: invariance, determinism, persistence."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax
from kivi_jax import calibration as calib_lib
from kivi_jax.calibration import Calibration, calibrate
from kivi_jax.models import load_model
from conftest import tiny_hf_model, tiny_llama_config
import spec_reference
from test_cache import random_calibration

SKVQ = kivi_jax.KIVIConfig(2, 2, 16, 32, key_axis="token", value_axis="token",
                           channel_group=24, reorder=True, clip="calibrated", sinks=3,
                           pre_rope=True)


@pytest.fixture(scope="module")
def model():
  return load_model(tiny_hf_model(tiny_llama_config()))


def _batches(n=2, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (2, 48)) for _ in range(n)]


def _logits(model, kv_config, ids, calibration=None):
  cache = kivi_jax.init_cache(model.config, kv_config, ids.shape[0], ids.shape[1],
                              calibration=calibration)
  logits, _ = model.forward(model.params, jnp.asarray(ids), cache)
  return np.asarray(logits)


def test_channel_order_is_invisible_to_a_full_precision_cache(model):
  # A permutation and regrouping of the hidden dim, with 16-bit storage, gives
  # the plain model's logits: prefill and decode steps read keys and values
  # back in the model's own order.
  fp = kivi_jax.KIVIConfig(16, 16, 16, 16)
  fp_reordered = kivi_jax.KIVIConfig(16, 16, 16, 16, key_axis="token", value_axis="token",
                                     channel_group=24, reorder=True)
  hidden = model.config.num_kv_heads * model.config.head_dim
  calib = random_calibration(fp_reordered, model.config.num_layers, hidden, seed=1)
  assert not (calib.perm_k == np.arange(hidden)).all()
  ids = np.random.default_rng(2).integers(0, 256, (2, 40))
  want = _logits(model, fp, ids)
  np.testing.assert_allclose(_logits(model, fp_reordered, ids, calib), want, rtol=1e-5,
                             atol=1e-5)
  # Decode steps over the stored (permuted) ring and block.
  caches = [kivi_jax.init_cache(model.config, c, 2, 40, calibration=cal)
            for c, cal in ((fp, None), (fp_reordered, calib))]
  for t in range(40):
    outs = []
    for i, c in enumerate(caches):
      logits, caches[i] = model.forward(model.params, jnp.asarray(ids[:, t:t + 1]), c)
      outs.append(np.asarray(logits))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_pre_rope_cache_is_invisible_in_full_precision(model):
  ids = np.random.default_rng(3).integers(0, 256, (2, 40))
  fp = kivi_jax.KIVIConfig(16, 16, 16, 16)
  for config in (dataclasses.replace(fp, pre_rope=True),
                 dataclasses.replace(fp, pre_rope=True, sinks=4)):
    np.testing.assert_allclose(_logits(model, config, ids), _logits(model, fp, ids),
                               rtol=1e-5, atol=1e-5)


def test_calibration_is_deterministic_for_a_seed(model):
  a = calibrate(model, _batches(), SKVQ, seed=3, progress=False)
  b = calibrate(model, _batches(), SKVQ, seed=3, progress=False)
  for f in ("perm_k", "groups_k", "clip_k", "perm_v", "groups_v", "clip_v"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
  hidden = model.config.num_kv_heads * model.config.head_dim
  for layer in range(model.config.num_layers):
    for perm, groups in ((a.perm_k[layer], a.groups_k[layer]),
                         (a.perm_v[layer], a.groups_v[layer])):
      assert sorted(perm) == list(range(hidden))
      # Groups are contiguous runs 0, 1, ..., n - 1, none empty.
      assert (np.diff(groups) >= 0).all()
      np.testing.assert_array_equal(np.unique(groups), np.arange(SKVQ.hidden_groups(hidden)))
  assert ((a.clip_k > 0) & (a.clip_k <= 1)).all()


def test_reorder_groups_channels_of_similar_range():
  # Three families of channels with ranges 1, 10 and 100, interleaved: the
  # clusters recover them, laid out by increasing range.
  rng = np.random.default_rng(0)
  scale = np.tile([1.0, 10.0, 100.0], 8)
  x = rng.standard_normal((500, 24)) * scale
  perm, groups = calib_lib.channel_order(x, 3, seed=0)
  np.testing.assert_array_equal(scale[perm], np.repeat([1.0, 10.0, 100.0], 8))
  np.testing.assert_array_equal(groups, np.repeat([0, 1, 2], 8))


def test_best_clip_minimizes_the_spec_error():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((300, 32)).astype(np.float32)
  x[rng.random(x.shape) < 0.01] *= 8  # rare outliers favour clipping
  groups = np.repeat([0, 1], [20, 12]).astype(np.int32)
  grid = (0.6, 0.7, 0.8, 0.9, 1.0)
  errors = [np.sum((spec_reference.quantize(x, 2, 0, "token", a, groups)[3] - x) ** 2)
            for a in grid]
  assert calib_lib.best_clip(x, groups, 2, None, grid) == grid[int(np.argmin(errors))]
  assert grid[int(np.argmin(errors))] < 1.0


def test_saved_calibration_round_trips_and_is_keyed(model, tmp_path):
  calib = calibrate(model, _batches(1), SKVQ, progress=False, source="random ids")
  path = tmp_path / "calib.json"
  calib.save(path)
  again = Calibration.load(path, model)
  for f in ("perm_k", "groups_k", "clip_k", "perm_v", "groups_v", "clip_v"):
    np.testing.assert_array_equal(getattr(again, f), getattr(calib, f), err_msg=f)
  assert again.source == "random ids"
  ids = np.random.default_rng(4).integers(0, 256, (1, 30))
  np.testing.assert_array_equal(_logits(model, SKVQ, ids, again),
                                _logits(model, SKVQ, ids, calib))
  other = load_model(tiny_hf_model(tiny_llama_config(), seed=1))
  with pytest.raises(ValueError, match="calibrated for model"):
    Calibration.load(path, other)
  with pytest.raises(ValueError, match=r"made for k_bits=2, the cache config has k_bits=4"):
    kivi_jax.init_cache(model.config, dataclasses.replace(SKVQ, k_bits=4), 1, 30,
                        calibration=calib)


def test_calibrated_configs_need_a_calibration(model):
  with pytest.raises(ValueError, match="pass calibration="):
    kivi_jax.init_cache(model.config, SKVQ, 1, 30)
  with pytest.raises(ValueError, match="needs a kv_config with channel_group"):
    calibrate(model, _batches(1), kivi_jax.get_preset("kivi2"), progress=False)
  with pytest.raises(ValueError, match="seed must be a non-negative integer"):
    calibrate(model, _batches(1), SKVQ, seed=-1, progress=False)
  with pytest.raises(ValueError, match="clip_grid must be"):
    calibrate(model, _batches(1), SKVQ, clip_grid=(0.5, 1.5), progress=False)
  with pytest.raises(ValueError, match=r"must be \[batch, tokens\]"):
    calibrate(model, [np.zeros(5, np.int32)], SKVQ, progress=False)


def test_kmeans_leaves_no_cluster_empty():
  # Five distinct points, four of them identical: more clusters than distinct
  # positions must still give every cluster a member.
  points = np.array([[0.0, 0.0]] * 4 + [[5.0, 5.0]])
  for seed in range(5):
    labels = calib_lib._kmeans(points, 3, np.random.default_rng(seed))
    np.testing.assert_array_equal(np.sort(np.unique(labels)), [0, 1, 2])
