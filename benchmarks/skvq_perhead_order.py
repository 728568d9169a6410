"""exp/skvq-perhead-order: SKVQ's channel reordering within each kv head (a cluster never spans
heads) against SPEC's reordering over the whole hidden dim, quick KV-perplexity on SmolLM2.
python benchmarks/skvq_perhead_order.py [METHOD [OFFSET]] (the CPU: some 23 minutes on 2 cores);
with OFFSET, the per-head order alone, each head's k-means seeded 1000 OFFSET further."""
import sys, json, time
import numpy as np
import jax
import kivi_jax
from kivi_jax import calibration, eval as kv_eval
from kivi_jax.cli import _calibrations
from kivi_jax.default_model import default_model_path

method = sys.argv[1] if len(sys.argv) > 1 else "skvq-k2v2-g16-fp8"
path = default_model_path()
model = kivi_jax.load_model(path, dtype="float32")
tokens = kv_eval.wikitext_tokens(kivi_jax.load_tokenizer(path),
                                 "../shared/data/wikitext-2-raw/wiki.test.raw")
config = kivi_jax.get_preset(method)
hkv, d = model.config.num_kv_heads, model.config.head_dim
spec_order = calibration.channel_order


def per_head_order(x, n_groups, seed):
  """channel_order within each kv head's d channels, n_groups / Hkv clusters each."""
  assert n_groups % hkv == 0, (n_groups, hkv)
  k = n_groups // hkv
  perms, groups = [], []
  for h in range(hkv):
    p, g = spec_order(x[:, h * d:(h + 1) * d], k, seed * 131 + h + 1000 * OFFSET)
    perms.append(p + h * d)
    groups.append(g + h * k)
  return np.concatenate(perms).astype(np.int32), np.concatenate(groups).astype(np.int32)


OFFSET = int(sys.argv[2]) if len(sys.argv) > 2 else 0
runs = (("spec", spec_order),) * (len(sys.argv) <= 2) + (("per_head", per_head_order),)
out = {}
for name, order in runs:
  t0 = time.time()
  calibration.channel_order = order
  with jax.default_matmul_precision("highest"):
    calib = _calibrations(model, {method: config}, tokens, "wiki.test.raw")[method]
    res = kv_eval.kv_perplexity(model, tokens, config, **kv_eval.QUICK, calibration=calib,
                                progress=False)
  out[name] = {"kv_ppl": res.kv_ppl, "clip_k": calib.clip_k.tolist(),
               "clip_v": calib.clip_v.tolist(), "seconds": time.time() - t0}
  print(name, res.kv_ppl, f"{time.time() - t0:.0f} s", flush=True)
print(json.dumps({"method": method, "setting": kv_eval.QUICK, **out}))
