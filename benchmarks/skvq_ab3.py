"""A/B of SKVQ step knobs without code changes (one process, monkeypatched): the values
kernel's span (value_tiles), the tile width, the groups a step (slots), and the flush's segment reductions (masked
against scan). Run on a GPU as `OUT=dir LAYERS=4 KIVI_JAX_COMMIT=... python ab2.py`."""
import dataclasses, functools, json, os, tempfile, time
import jax
from kivi_jax import bench_generate as bg, quantization
from kivi_jax.pallas_kernels import decode_attention_hidden as dh

orig, pairs = dh.hidden_decode_attention, quantization.SEGMENT_MASKED_PAIRS
variants0 = {
    "head": ({}, pairs), "value_tiles=2": ({"value_tiles": 2}, pairs),
    "value_tiles=4": ({"value_tiles": 4}, pairs), "tile=64": ({"tile": 64}, pairs),
    "tile=16": ({"tile": 16}, pairs), "slots=2": ({"slots": 2}, pairs),
    "slots=4": ({"slots": 4}, pairs), "slots=2, value_tiles=2": ({"slots": 2, "value_tiles": 2}, pairs),
    "masked flush": ({}, 10**9)}
variants = {"head": ({}, pairs), "masked flush": ({}, 10**9)}
layers = int(os.environ.get("LAYERS", "4"))
config = dataclasses.replace(bg.SHAPES["llama2-7b"], num_layers=layers)
model = bg.random_model(config)
copy = bg.copy_bandwidth_tbps()
out = []
for batch in (2, 4, 8, 16):
  for name, (kw, masked) in variants.items():
    dh.hidden_decode_attention = functools.partial(orig, **kw) if kw else orig
    quantization.SEGMENT_MASKED_PAIRS = masked
    jax.clear_caches()
    t0 = time.time()
    try:
      row = bg.time_decode_step(model, "skvq-k2v2-g16-fp8", batch, 1280, steps=8, repeats=3,
                                copy_tbps=copy, profile_dir=tempfile.mkdtemp())
    except Exception as e:  # noqa: BLE001
      print(name, batch, "FAILED", repr(e)[:300], flush=True)
      continue
    prof = row["profile"]
    r = {"variant": name, "batch": batch, "layers": layers, "step_ms": row["step_ms"],
         "ms_per_layer": row["step_ms"] / layers,
         "by_kind_ms_per_layer": {k: v / layers for k, v in prof["by_kind_ms"].items()},
         "top_ms_per_layer": {k["name"]: k["ms_per_step"] / layers
                              for k in prof["top_kernels"][:8]},
         "wall_s": time.time() - t0}
    out.append(r)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                      if k in ("variant", "batch", "step_ms", "ms_per_layer")}), flush=True)
    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "commit": os.environ.get("KIVI_JAX_COMMIT"), "rows": out},
              open(os.environ["OUT"] + "/skvq_ab3.json", "w"), indent=1)
