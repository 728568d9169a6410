# exp/ksplit on the H200 (prepared 2026-12-04, not yet run): the pair kernel's
# products in two halves of K, the second half dequantized while the first half's
# `wgmma` runs (KIVI_EXP_KSPLIT=1, the branch's default) against one product a tile
# (=0), each setting in its own process. About 500 s. Then: results into
# benchmarks/results/, the knob removed (kept form landed, or the branch dropped).
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
timeout 170 python -m pytest -q -p no:cacheprovider -n 0 tests/test_decode_pairs.py \
  -k "(float64 and (2-2-32-1-128 or 4-4-32-1-128 or 2-4-32-1-128 or 2-2-32-4-128 or 4-4-32-4-128 or 8-8-32-4-128 or 2-2-128-4-128)) or (through_the_kernel and 1-None)" \
  2>&1 | grep -E "passed|failed|^FAILED|Error: \(" | head -12
for k in 1 0; do
  KIVI_EXP_KSPLIT=$k timeout 100 kivi-jax bench attention --lengths 1536 --methods kivi2,kivi4 \
    --batch 256 --q-heads 32 --kv-heads 32 --layouts pairs --repeats 20 \
    --out $OUT/serving_k$k.json 2>&1 | grep -iE "kivi|cudnn" | tail -4
  KIVI_EXP_KSPLIT=$k timeout 100 kivi-jax bench attention --lengths 32768 --methods kivi2,kivi4 \
    --batch 8 --q-heads 32 --kv-heads 8 --layouts pairs --repeats 20 \
    --out $OUT/p1_k$k.json 2>&1 | grep -iE "kivi|cudnn" | tail -4
done
for k in 1 0; do
  KIVI_EXP_KSPLIT=$k KIVI_JAX_COMMIT=ksplit$k timeout 150 kivi-jax bench generate \
    --shape llama2-7b --methods kivi2 --requests '' --step-batches 512 --hf-batches '' \
    --row-timeout 140 --out $OUT/step_k$k.json 2>&1 | grep step_ms
done
