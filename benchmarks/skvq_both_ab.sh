# Run on an H100 on 2026-12-06 (from .devrun/ of the session; raw files in main:
# benchmarks/results/skvq_approx_spread_h100.json). From the repository root, $OUT set.
# exp/skvq-approx and exp/skvq-spread2 in one call (exp/skvq-both): the approx checks,
# the kernels alone with KIVI_EXP_APPROX 0 and 1, then the Llama-2-7B SKVQ step at batch
# 32 for: main's forms, approx, spread=gather, spread=barrier, main's again, approx again.
t0=$(date +%s)
left() { echo $(( $1 - $(date +%s) + t0 )); }
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
nvidia-smi --query-gpu=name --format=csv,noheader
KIVI_EXP_APPROX=1 timeout 150 python -m pytest -q -p no:cacheprovider -n 0 \
  -W ignore::DeprecationWarning tests/test_decode_attention.py \
  -k "without_fast_rope or (hidden_kernels_match and 2-2-16)" 2>&1 | tail -2
echo "t=$(( $(date +%s) - t0 ))"
for knob in 0 1; do
  KIVI_EXP_APPROX=$knob timeout 90 python benchmarks/skvq_approx/ab.py $OUT/ab_$knob.json \
    2>&1 | grep KIVI_EXP
done
i=0
for setting in "0 0" "1 0" "0 gather" "0 barrier" "0 0" "1 0"; do
  set -- $setting; i=$((i + 1))
  l=$(left 585); [ $l -lt 75 ] && { echo "stop: $l s left"; break; }
  KIVI_EXP_APPROX=$1 KIVI_EXP_SPREAD=$2 KIVI_JAX_COMMIT=skvq-both-approx$1-spread$2 \
    timeout $(( l < 150 ? l : 150 )) kivi-jax bench generate --shape llama2-7b \
    --methods skvq-k2v2-g16-fp8 --requests '' --step-batches 32 --hf-batches '' \
    --row-timeout 140 --out $OUT/step_${i}_approx$1_spread$2.json 2>&1 | grep step_ms
  python -c "import json, sys; r = json.load(open(sys.argv[1]))['rows'][-1]; print(sys.argv[2], round(r['step_ms'], 2), [(k['name'][:28], round(k['ms_per_step'], 2)) for k in r['profile']['top_kernels'][:5]])" $OUT/step_${i}_approx$1_spread$2.json "$setting" 2>&1 | tail -1
  echo "t=$(( $(date +%s) - t0 ))"
done
