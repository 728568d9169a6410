# exp/fsplit on the H200: the folded (MHA) kernel's products in two halves of K for the
# keys alone (KIVI_EXP_FSPLIT=k) or the values alone (=v), against main's (no split;
# both split measured 1013 us a launch against 867 in exp/round15). The 512-row
# Llama-2-7B KIVI-2 step with per-launch times, then B=256 L=1536 (MHA). About 300 s.
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
for f in none k v; do
  echo "== KIVI_EXP_FSPLIT=$f"
  KIVI_EXP_FSPLIT=$f KIVI_JAX_COMMIT=fsplit-$f timeout 140 kivi-jax bench generate \
    --shape llama2-7b --methods kivi2 --requests '' --step-batches 512 --hf-batches '' \
    --row-timeout 130 --out $OUT/step_$f.json 2>&1 | grep step_ms
  python scripts/trace_launches.py $OUT/step_$f.json 'kivi_pair_decode'
  KIVI_EXP_FSPLIT=$f timeout 60 kivi-jax bench attention --batch 256 --q-heads 32 --kv-heads 32 \
    --lengths 1536 --methods kivi2,kivi4 --layouts pairs --repeats 20 \
    --out $OUT/serving_$f.json 2>&1 | grep -E "^\| kivi"
done
