# exp/skvq-isolate on a GPU (not yet run): the Llama-2-7B skvq-k2v2-g16-fp8 decode step
# at batch 32 with KIVI_EXP_ISOLATE 0, 1, 0, 1 (1: the ring's scores behind an
# optimization barrier after the block's kernels, so XLA cannot fuse them with the
# query rows built for the kernels), each with its 8 largest kernels: which of the two
# takes input_reduce_select_fusion's 6.3 ms a step. Run from the repository's root,
# $OUT set: bash benchmarks/skvq_isolate_ab.sh   (about 5 minutes on a warm machine)
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
nvidia-smi --query-gpu=name --format=csv,noheader
i=0
for knob in 0 1 0 1; do
  i=$((i + 1))
  KIVI_EXP_ISOLATE=$knob KIVI_JAX_COMMIT=skvq-isolate-$knob timeout 140 kivi-jax bench generate \
    --shape llama2-7b --methods skvq-k2v2-g16-fp8 --requests '' --step-batches 32 \
    --hf-batches '' --row-timeout 130 --out $OUT/step_${i}_$knob.json 2>&1 | grep step_ms
  python -c "import json, sys; r = json.load(open(sys.argv[1]))['rows'][-1]; print(sys.argv[2], round(r['step_ms'], 2), [(k['name'][:30], round(k['ms_per_step'], 2)) for k in r['profile']['top_kernels'][:8]])" $OUT/step_${i}_$knob.json $knob
done
