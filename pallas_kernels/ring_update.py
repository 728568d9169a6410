"""One decode step's write into the full-precision ring, in place: Pallas (Triton)
GPU kernel + reference.

A decode step puts each row's new token in ring slot `slot[b]` and reads the
window of `G` slots holding it (aligned to `G`): when the step flushes, that
window is exactly the group that leaves the ring for the quantized block
(`kivi_jax.cache.append_flushing`); at any other step (31 of 32 at G = 32)
nothing reads it, so a row that does not flush reads no window and writes
none: its window is undefined, and every reader masks a row's window by its
flush (the reference returns zeros there, but the new token at `new_at`).
(Zeros there were 268 MB a layer at 512 rows of Llama-2-7B KIVI-2:
`benchmarks/NOTES.md`, "The decode step at 512 rows".) The kernel reads the
window and writes the one slot in the same program, through
`input_output_aliases`, so the ring is never copied: in jnp, XLA fuses the
window's read into the write and then copies the whole ring to keep the
read's old values (seen on an H200), or scatters slowly.

Shapes (B batch, H heads, R ring slots, G window, D channels):
  ring_k, ring_v  [B, H, R, D]  model dtype
  k_new, v_new    [B, H, 1, D]
  slot            [B] int32: the new token's slot
  writes          [B] int32: 1 where the row has a new token (0: padding)
  flushes         [B] int32: 1 where the row's step flushes a group
  new_at          [B] int32: the window index the new token takes in the
                  returned window (where the flushed group includes it), or G
Returns `(ring_k, ring_v, window_k, window_v)`: the rings with the new tokens
written (aliased to the inputs) and the windows `[B, H, G, D]` as they were
before the step, the new token at `new_at`, where the row flushes (undefined
elsewhere).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def _kernel(slot_ref, writes_ref, flushes_ref, new_at_ref, k_new_ref, v_new_ref, k_in, v_in,
            k_ref, v_ref, k_win_ref, v_win_ref):
  del k_in, v_in  # aliased with k_ref, v_ref
  g = k_win_ref.shape[0]
  slot = slot_ref[0]
  first = pl.multiple_of(slot // g * g, g)
  at = jax.lax.broadcasted_iota(jnp.int32, (g, 1), 0) == new_at_ref[0]
  for new_ref, ring_ref, win_ref in ((k_new_ref, k_ref, k_win_ref),
                                     (v_new_ref, v_ref, v_win_ref)):
    new = new_ref[...]  # [1, D]

    # Read before the write below, in the same program: the old window.
    @pl.when(flushes_ref[0] > 0)
    def _():
      win_ref[...] = jnp.where(at, new, ring_ref[pl.ds(first, g), :])

    @pl.when(writes_ref[0] > 0)
    def _():
      ring_ref[pl.ds(slot, 1), :] = new


@functools.partial(jax.jit, static_argnames=("group_size", "interpret"))
def ring_update(ring_k, ring_v, k_new, v_new, slot, writes, flushes, new_at, *,
                group_size: int, interpret: bool = False):
  """The module docstring's update; inside a jit that donates the rings (as
  `generate` donates the cache) they are written in place."""
  b, h, r, d = ring_k.shape
  g = group_size
  slab = lambda x: pl.BlockSpec((None, None, *x.shape[2:]), lambda i, j: (i, j, 0, 0))
  row = pl.BlockSpec((1,), lambda i, j: (i,))
  window = jax.ShapeDtypeStruct((b, h, g, d), ring_k.dtype)
  out_shape = [jax.ShapeDtypeStruct(ring_k.shape, ring_k.dtype),
               jax.ShapeDtypeStruct(ring_v.shape, ring_v.dtype), window,
               jax.ShapeDtypeStruct(window.shape, ring_v.dtype)]
  win_spec = pl.BlockSpec((None, None, g, d), lambda i, j: (i, j, 0, 0))
  return pl.pallas_call(
      _kernel,
      grid=(b, h),
      in_specs=[row, row, row, row, slab(k_new), slab(v_new), slab(ring_k), slab(ring_v)],
      out_specs=[slab(ring_k), slab(ring_v), win_spec, win_spec],
      out_shape=out_shape,
      input_output_aliases={6: 0, 7: 1},
      compiler_params=pltriton.CompilerParams(num_warps=4),
      interpret=interpret,
      name="kivi_ring_update",
  )(slot.astype(jnp.int32), writes.astype(jnp.int32), flushes.astype(jnp.int32),
    new_at.astype(jnp.int32),
    k_new.astype(ring_k.dtype), v_new.astype(ring_v.dtype), ring_k, ring_v)


def ring_update_reference(ring_k, ring_v, k_new, v_new, slot, writes, flushes, new_at, *,
                          group_size: int):
  """The same update in plain jnp: gather the window, write it back with the
  new token in its slot. The window of a row that does not flush is zeros
  but the new token at `new_at`."""
  g = group_size
  first = slot // g * g
  window = first[:, None] + jnp.arange(g)[None, :]  # [B, G]
  put = ((window == slot[:, None]) & (writes[:, None] > 0))[:, None, :, None]
  at = (jnp.arange(g)[None, :] == new_at[:, None])[:, None, :, None]
  out = []
  for ring, new in ((ring_k, k_new), (ring_v, v_new)):
    old = jax.vmap(lambda x, i: x[:, i])(ring, window)
    new = new.astype(ring.dtype)
    ring = jax.vmap(lambda x, i, u: x.at[:, i].set(u))(ring, window,
                                                       jnp.where(put, new, old))
    out.append((ring, jnp.where(at, new, jnp.where(flushes[:, None, None, None] > 0, old, 0))))
  (ring_k, win_k), (ring_v, win_v) = out
  return ring_k, ring_v, win_k, win_v
