"""The decode step's ring write: the GPU kernel (interpret mode) against its
reference, and decode steps through it against steps through the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kivi_jax.attention import cache_attention
from kivi_jax.cache import append_flushing
from kivi_jax.pallas_kernels import ring_update
from test_cache import B, CONFIGS, HKV, D, _fill, _kv


@pytest.mark.parametrize("group, ring", [(16, 64), (1, 1), (32, 32)])
def test_kernel_matches_reference(group, ring):
  rng = np.random.default_rng(group)
  shape = (B, 2, ring, 32)
  rk, rv = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in "kv")
  kn, vn = (jnp.asarray(rng.standard_normal((B, 2, 1, 32)), jnp.float32) for _ in "kv")
  slot = jnp.asarray(rng.integers(0, ring, B))
  writes = jnp.array([1, 0, 1])
  flushes = jnp.array([1, 1, 0])
  new_at = jnp.asarray(rng.integers(0, group + 1, B))
  out = ring_update.ring_update(rk, rv, kn, vn, slot, writes, flushes, new_at,
                                group_size=group, interpret=True)
  ref = ring_update.ring_update_reference(rk, rv, kn, vn, slot, writes, flushes, new_at,
                                          group_size=group)
  for x, y in zip(out[:2], ref[:2]):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The row that writes nothing keeps its ring.
  np.testing.assert_array_equal(np.asarray(out[0][1]), np.asarray(rk[1]))
  # A flushing row's window is the ring's old one (the new token at new_at),
  # the reference's too; a row that does not flush gets no window from the
  # kernel (interpret mode's unwritten outputs are NaN) and zeros but the
  # new token from the reference.
  first = np.asarray(slot) // group * group
  for b in range(B):
    for win, win_ref, ring, new in ((out[2], ref[2], rk, kn), (out[3], ref[3], rv, vn)):
      old = np.asarray(ring[b][:, first[b]:first[b] + group])
      at = np.arange(group) == int(new_at[b])
      want = np.where(at[None, :, None], np.asarray(new[b]), old)
      if int(flushes[b]):
        np.testing.assert_array_equal(np.asarray(win[b]), want)
        np.testing.assert_array_equal(np.asarray(win_ref[b]), want)
      else:
        assert np.isnan(np.asarray(win[b])).all()
        np.testing.assert_array_equal(np.asarray(win_ref[b]),
                                      np.where(at[None, :, None], np.asarray(new[b]), 0))


_append = jax.jit(append_flushing, static_argnames=("config", "impl"))


def _new_tokens(k, v, at):
  """Row b's token `at[b]` (at most the last of the 80) of `k`, `v` as a
  decode step's `[B, Hkv, 1, D]`."""
  idx = jnp.minimum(at, 79)
  return tuple(jnp.stack([x[b, :, idx[b]][:, None] for b in range(B)]) for x in (k, v))


@pytest.mark.parametrize("name", ["kivi2-g16-r32", "kivi2-g16-r0", "kivi2-sinks", "fp16"])
def test_decode_steps_through_the_kernel_equal_the_reference(name):
  config = CONFIGS[name]
  k, v = _kv(80, seed=2)
  lengths = np.array([30, 47, 63])
  layer, lens = _fill(config, k, v, lengths, chunk=80)
  out = {}
  for impl in ("gpu", "reference"):
    lay, ln = layer, lens
    flushed = []
    for i in range(17):  # crosses a flush of every row
      n_new = jnp.array([1, 1, i % 2])  # row 2 is done every other step
      kn, vn = _new_tokens(k, v, ln + i)
      lay, (fk, fv, pos, live) = _append(lay, kn, vn, ln, n_new, config, impl)
      # The flushed tokens are defined where live (the kernel writes no
      # window for a row that does not flush).
      keep = live[:, None, :, None]
      flushed.append((jnp.where(keep, fk, 0), jnp.where(keep, fv, 0), pos, live))
      ln = ln + n_new
    out[impl] = (lay, flushed)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               out["gpu"], out["reference"])


_step = jax.jit(cache_attention, static_argnames=("config", "impl"))


def test_a_decode_step_reads_no_undefined_window():
  """Where jnp reads the flushed group (sinks: no ring kernel) after the ring
  update's kernel left a row's window unwritten (a row that does not flush:
  NaN in interpret mode), the step's attention equals the reference's."""
  config = CONFIGS["kivi2-sinks"]
  k, v = _kv(80, seed=4)
  lengths = np.array([30, 47, 63])
  layer, lens = _fill(config, k, v, lengths, chunk=80)
  q = jnp.asarray(np.random.default_rng(4).standard_normal((B, 1, HKV, D)), jnp.float32)
  n_new = jnp.array([1, 1, 1])
  for i in range(17):  # every row flushes once, the others not at that step
    kn, vn = _new_tokens(k, v, lens + i)
    out = {impl: np.asarray(_step(q, layer, kn, vn, lens + i, n_new, config, impl=impl))
           for impl in ("gpu", "reference")}
    assert np.isfinite(out["gpu"]).all(), i
    np.testing.assert_allclose(out["gpu"], out["reference"], rtol=1e-5, atol=1e-5)
    layer = append_flushing(layer, kn, vn, lens + i, n_new, config, "reference")[0]
