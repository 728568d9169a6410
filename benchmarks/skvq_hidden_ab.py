"""A/B of the SKVQ hidden kernels' scale expansion and RoPE (one process, monkeypatched).

Run on the H200 at a1a716f as `OUT=dir LAYERS=4 KIVI_JAX_COMMIT=a1a716f python
skvq_hidden_ab.py`; output in benchmarks/results/skvq_hidden_ab_h200.json."""
import dataclasses, json, os, re, sys, tempfile, time
import jax, jax.numpy as jnp
from jax.experimental import pallas as pl
from kivi_jax import bench_generate as bg
from kivi_jax.pallas_kernels import decode_attention_hidden as dh

gather_expand, table_rope = dh._expand, dh._rope_cos_sin

def loop_expand(ref, tok0, g_sz, group_map):
  rows = pl.ds(tok0, g_sz)
  g_lo, g_hi = jnp.min(group_map), jnp.max(group_map)
  def one(g, out):
    return jnp.where(group_map == g, ref[rows, g].astype(jnp.float32)[:, None], out)
  return jax.lax.fori_loop(g_lo, g_hi + 1, one, jnp.zeros((g_sz, group_map.shape[1]), jnp.float32))

def trans_rope(pos0, theta_ref, table_ref, cols):
  theta = (theta_ref[0, cols] + theta_ref[1, cols])[None, :]
  g_sz = table_ref.shape[1]
  pos = (pos0 + jax.lax.broadcasted_iota(jnp.int32, (g_sz, 1), 0)).astype(jnp.float32)
  angle = pos * theta
  return jnp.cos(angle), jnp.sin(angle)

layers = int(os.environ.get("LAYERS", "4"))
config = dataclasses.replace(bg.SHAPES["llama2-7b"], num_layers=layers)
model = bg.random_model(config)
copy = bg.copy_bandwidth_tbps()
out = []
variants = {"gather+table": (gather_expand, table_rope), "gather+trans": (gather_expand, trans_rope),
            "loop+table": (loop_expand, table_rope), "loop+trans": (loop_expand, trans_rope)}
plan = [(32, v) for v in variants] + [(1, "gather+table"), (1, "gather+trans"), (1, "loop+trans")]
for batch, name in plan:
  dh._expand, dh._rope_cos_sin = variants[name]
  jax.clear_caches()
  t0 = time.time()
  try:
    row = bg.time_decode_step(model, "skvq-k2v2-g16-fp8", batch, 1280, steps=8, repeats=3,
                              copy_tbps=copy, profile_dir=tempfile.mkdtemp())
  except Exception as e:  # noqa
    print(name, batch, "FAILED", repr(e)[:400], flush=True); continue
  top = {k["name"]: round(k["ms_per_step"] / layers, 4) for k in row["profile"]["top_kernels"][:6]}
  r = {"variant": name, "batch": batch, "layers": layers, "step_ms": row["step_ms"],
       "ms_per_layer": row["step_ms"] / layers, "top_ms_per_layer": top, "wall_s": time.time() - t0}
  out.append(r); print(json.dumps(r), flush=True)
json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "commit": os.environ.get("KIVI_JAX_COMMIT"), "rows": out},
          open(os.environ["OUT"] + "/skvq_ab.json", "w"), indent=1)
