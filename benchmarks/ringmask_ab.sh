# exp/ringmask on the H200: the ring's kernel loads only live slots' keys and values
# (masked loads; after each flush the ring's window holds up to G - 1 dead slots, an
# eighth of the ring's bytes on average at R = 128, G = 32). The compiled ring-kernel
# checks against float64, then the 512-row Llama-2-7B KIVI-2 step with per-launch
# times of the ring kernel, this tree and main's kernels alternately. Before the call,
# here:
#   rm -rf .devrun/main && mkdir -p .devrun/main && git archive main kivi_jax models
#   pallas_kernels | tar -x -C .devrun/main && mv .devrun/main/models
#   .devrun/main/pallas_kernels .devrun/main/kivi_jax/   (and carry .devrun).
# About 330 s with a warm machine.
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
timeout 120 python -m pytest -q -p no:cacheprovider -n 0 tests/test_decode_attention.py \
  -k "ring_kernel_matches_float64" 2>&1 | tail -1
for r in 1 2; do
  for v in ringmask main; do
    if [ $v = main ]; then pp=$PWD/.devrun/main; else pp=; fi
    (cd /tmp && PYTHONPATH=$pp python -c "import kivi_jax.pallas_kernels as p; print('$v kernels:', p.__file__)")
    PYTHONPATH=$pp KIVI_JAX_COMMIT=$v timeout 140 kivi-jax bench generate --shape llama2-7b \
      --methods kivi2 --requests '' --step-batches 512 --hf-batches '' --row-timeout 130 \
      --out $OUT/step_${v}_$r.json 2>&1 | grep step_ms
    python scripts/trace_launches.py $OUT/step_${v}_$r.json 'kivi_ring_attention'
  done
done
