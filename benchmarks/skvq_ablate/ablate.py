"""On the GPU: where SKVQ's hidden-layout kernels spend their time, by ablation.

`decode_attention_hidden.hidden_decode_attention` at Llama-2-7B's width (Hq = Hkv
= 32, d = 128: 4096 channels), batch 32, 1408 cached tokens a row, on the block of
skvq-k2v2-g16-fp8's layout (random arrays, channels in order: `gpu_skvq_decode`),
under variants of the per-element work, each timed as `kivi_jax.bench` times
(median after warm-up) and traced once for each kernel's device time (the first
round, 3becf65's history, timed no RoPE, contiguous scale tiles and a one-hot dot):
  main         keys before RoPE (precise cos and sin an element), each element's
               scale and zero gathered by its channel's group
  select4      each tile's scales and zeros from the 4 groups from its first on (4
               column loads, 3 selects an element; exact while a tile spans at most
               4 groups: here 2)
  approx       cos and sin by PTX's `.approx.f32` after a reduction to [-pi, pi]
  nozero       the zeros not expanded (what folding them out of the kernels saves)
  norope       the keys taken as cached after RoPE (no q_rot: one dot a tile)
  contiguous   the scale and zero tiles loaded as a contiguous [G, tile] block
               (wrong values: the floor of any expansion)
Wrong values in some variants: speed only. Prints and writes JSON.
"""

import datetime
import functools
import json
import os
import sys
import tempfile
import types

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
from gpu_skvq_decode import SKVQ, random_layer  # noqa: E402

from kivi_jax import bench  # noqa: E402
from kivi_jax.bench_generate import device_kernels  # noqa: E402
from kivi_jax.cache import n_quantized  # noqa: E402
from kivi_jax.pallas_kernels import decode_attention_hidden as hid  # noqa: E402

B, HQ, HKV, D, LENGTH = 32, 32, 32, 128, 1408
SMOKE = bool(os.environ.get("SMOKE"))  # the CPU: interpret mode, 2 rows of 160 tokens
if SMOKE:
  B, LENGTH = 2, 160
_gather = hid._expand


def _contiguous(ref, tok0, g_sz, group_map):
  return ref[pl.ds(tok0, g_sz), pl.ds(0, group_map.shape[1])].astype(jnp.float32)


def _select4(ref, tok0, g_sz, group_map):
  """The tile's scales from the 4 groups from its first on: 4 column loads and
  3 selects an element (wrong where a tile spans more than 4 groups)."""
  n, tile = ref.shape[1], group_map.shape[1]
  lo = jnp.minimum(jnp.min(group_map), n - 4)
  rows = pl.ds(tok0, g_sz)
  d = jnp.broadcast_to(group_map - lo, (g_sz, tile))
  out = jnp.broadcast_to(ref[rows, pl.ds(lo, 1)].astype(jnp.float32), (g_sz, tile))
  for k in range(1, 4):
    col = jnp.broadcast_to(ref[rows, pl.ds(lo + k, 1)].astype(jnp.float32), (g_sz, tile))
    out = jnp.where(d >= k, col, out)
  return out


def _no_zeros(expand):
  """`expand` for the scales, zeros for the zeros (the kernels expand a scale,
  then its zero): what the zero terms' gathers cost."""
  calls = [0]

  def f(ref, tok0, g_sz, group_map):
    calls[0] += 1
    if calls[0] % 2:
      return expand(ref, tok0, g_sz, group_map)
    return jnp.zeros((g_sz, group_map.shape[1]), jnp.float32)
  return f


def _approx(op):
  """`op` (sin or cos) by PTX's `.approx.f32` after a reduction to [-pi, pi]."""
  def f(x):
    x = x - 6.283185307179586 * jnp.floor(x * 0.15915494309189535 + 0.5)
    [y] = plgpu.elementwise_inline_asm(
        f"{op}.approx.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
    return y
  return f


_jnp_approx = types.SimpleNamespace(**{**vars(jnp), "cos": _approx("cos"), "sin": _approx("sin")})

# name: (RoPE, the scales' expansion, approximate cos and sin)
VARIANTS = {
    "main": (True, _gather, False),
    "select4": (True, _select4, False),
    "approx": (True, _gather, True),
    "select4+approx": (True, _select4, True),
    "nozero": (True, _no_zeros(_gather), False),
    "nozero+approx": (True, _no_zeros(_gather), True),
    "select4+nozero+approx": (True, _no_zeros(_select4), True),
    "norope+select4": (False, _select4, False),
    "norope+contiguous": (False, _contiguous, False),
}


def main(out: str):
  key = jax.random.key(0)
  layer, lens = random_layer(key, SKVQ, B, HKV, LENGTH, D, jnp.bfloat16)
  hidden, m_rows = HKV * D, 32
  ks = jax.random.split(key, 2)
  q, q_rot = (jax.random.normal(k, (B, 1, m_rows, hidden), jnp.bfloat16) for k in ks)
  theta = jnp.linspace(1e-4, 1.0, hidden, dtype=jnp.float32)
  blocks = (layer.k.codes, layer.k.scale, layer.k.zero, layer.v.codes, layer.v.scale,
            layer.v.zero)
  nq = n_quantized(lens, SKVQ)
  rows = {}
  for name, (rope, expand, approx) in VARIANTS.items():
    if SMOKE and approx:  # inline PTX: no interpret mode
      continue
    hid._expand = expand
    hid.jnp = _jnp_approx if approx else jnp
    jax.clear_caches()
    fn = jax.jit(functools.partial(  # a fresh jit of the kernels: traced with `expand`
        hid.hidden_decode_attention.__wrapped__, interpret=SMOKE, k_bits=SKVQ.k_bits, v_bits=SKVQ.v_bits,
        group_size=SKVQ.group_size, head_dim=D, rep=1, sm_scale=0.1, pos_offset=SKVQ.sinks))
    args = (q, *blocks, nq, jnp.zeros_like(nq), layer.k_map.groups, layer.v_map.groups,
            layer.v_map.perm) + ((q_rot, theta) if rope else ())
    o = fn(*args)[0]
    if name == "main":
      main_o = o
    # onehot is exact while tiles span at most 32 groups (here 2): 0 from main.
    diff = float(jnp.max(jnp.abs(o - main_o)))
    print(f"{name}: max abs difference from main {diff}", flush=True)
    if SMOKE:
      continue
    ms = bench._time(fn, [args], repeats=20)
    with tempfile.TemporaryDirectory() as d:
      with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(10):
          jax.block_until_ready(fn(*args))
      by = {}
      for e in device_kernels(d):
        name_k = e["name"].split("_triton")[0][:40]
        by[name_k] = by.get(name_k, 0.0) + e.get("dur", 0) / 10
    rows[name] = {"ms": ms, "max_abs_from_main": diff, "device_us_by_kernel": dict(sorted(by.items(), key=lambda kv: -kv[1])[:6])}
    print(f"{name:20s} {ms:.3f} ms  " + "  ".join(
        f"{k} {v:.1f}" for k, v in list(rows[name]["device_us_by_kernel"].items())[:3]),
        flush=True)
  hid._expand, hid.jnp = _gather, jnp
  with open(out, "w") as f:
    json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                   date=datetime.date.today().isoformat(),
                   commit=os.environ.get("KIVI_JAX_COMMIT", "unknown"),
                   shape=dict(B=B, Hq=HQ, Hkv=HKV, d=D, L=LENGTH, preset="skvq-k2v2-g16-fp8"),
                   rows=rows), f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])
