"""The decode step's ring write: the GPU kernel (interpret mode) against its
reference, and decode steps through it against steps through the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kivi_jax.cache import append_flushing
from kivi_jax.pallas_kernels import ring_update
from test_cache import B, CONFIGS, _fill, _kv


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
  for x, y in zip(out, ref):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The row that writes nothing keeps its ring.
  np.testing.assert_array_equal(np.asarray(out[0][1]), np.asarray(rk[1]))
  # A flushing row's window is the ring's old one (the new token at new_at);
  # a row that does not flush returns zeros but that token.
  first = np.asarray(slot) // group * group
  for b in range(B):
    old = np.asarray(rk[b][:, first[b]:first[b] + group])
    at = np.arange(group) == int(new_at[b])
    want = old if int(flushes[b]) else np.zeros_like(old)
    want = np.where(at[None, :, None], np.asarray(kn[b]), want)
    np.testing.assert_array_equal(np.asarray(out[2][b]), want)


_append = jax.jit(append_flushing, static_argnames=("config", "impl"))


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
      idx = jnp.minimum(ln + i, 79)
      kn = jnp.stack([k[b, :, idx[b]][:, None] for b in range(B)])
      vn = jnp.stack([v[b, :, idx[b]][:, None] for b in range(B)])
      lay, fl = _append(lay, kn, vn, ln, n_new, config, impl)
      flushed.append(fl)
      ln = ln + n_new
    out[impl] = (lay, flushed)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               out["gpu"], out["reference"])
