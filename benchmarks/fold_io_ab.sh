# exp/fold-io on the H200 (prepared 2026-12-04, not yet run): the folded pair kernel
# reading q's one row unpadded and writing its output row alone (no pad fusion, no
# partials' slice: 0.67 + 0.72 ms of a 512-row Llama-2-7B KIVI-2 step at 6b18eb7,
# benchmarks/results/step_launches_h200.txt), beside main's kernel in the same call.
# Before the call, here: rm -rf .devrun/main && mkdir -p .devrun/main && git archive main
#   kivi_jax models pallas_kernels | tar -x -C .devrun/main && mv .devrun/main/models
#   .devrun/main/pallas_kernels .devrun/main/kivi_jax/   (and carry .devrun)
# Then: bash benchmarks/fold_io_ab.sh   (about 350 s)
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
timeout 150 python -m pytest -q -p no:cacheprovider -n 0 tests/test_decode_pairs.py \
  -k "(float64 and (2-2-32-1-128 or 4-4-32-1-128 or 2-4-32-1-128 or 2-2-32-4-128)) or (through_the_kernel and 1-None)" \
  2>&1 | grep -E "passed|failed|^FAILED|Error: \(" | head -12
for t in branch main; do
  P=""; [ $t = main ] && P=.devrun/main
  PYTHONPATH=$P KIVI_JAX_COMMIT=$t timeout 150 kivi-jax bench generate --shape llama2-7b \
    --methods kivi2 --requests '' --step-batches 512 --hf-batches '' --row-timeout 140 \
    --out $OUT/step_$t.json 2>&1 | grep step_ms
  python scripts/trace_launches.py $OUT/step_$t.json 'pair_decode|pad_fusion|slice_fusion|broadcast'
done
