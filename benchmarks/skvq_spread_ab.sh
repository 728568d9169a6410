# exp/skvq-spread2 on a GPU (never run compiled): SKVQ's query rows over the hidden dim
# built three ways (env knob KIVI_EXP_SPREAD: 0 the one-hot product and its gather as in
# main, gather: from the small query under each head's mask, barrier: main's form
# behind an optimization barrier), the Llama-2-7B skvq-k2v2-g16-fp8 decode step at
# batch 32 for each, twice, with the step's largest kernels. Run from the repository's
# root, $OUT set: bash benchmarks/skvq_spread_ab.sh   (about 7 minutes on a warm
# machine: each row about a minute, its compiling included)
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
for mode in 0 gather barrier 0 gather barrier; do
  KIVI_EXP_SPREAD=$mode KIVI_JAX_COMMIT=skvq-spread-$mode timeout 150 kivi-jax bench generate \
    --shape llama2-7b --methods skvq-k2v2-g16-fp8 --requests '' --step-batches 32 \
    --hf-batches '' --row-timeout 140 --out $OUT/step_$mode.json 2>&1 | grep step_ms
  python -c "import json, sys; r = json.load(open(sys.argv[1]))['rows'][-1]; print(sys.argv[2], [(k['name'][:28], round(k['ms_per_step'], 2)) for k in r['profile']['top_kernels'][:5]])" $OUT/step_$mode.json $mode
done
