# exp/skvq-approx on a Hopper GPU (never run compiled): SKVQ's scores kernel with
# RoPE's sin and cos by PTX's .approx after _sincos's 2 pi stage (env knob
# KIVI_EXP_APPROX=1) against _sincos (knob 0). Run from the repository's root, $OUT set:
#   bash benchmarks/skvq_approx_ab.sh   (about 4 minutes on a warm machine)
# 1. the hidden kernels' float64 checks compiled with the knob (bf16: BF16_RTOL);
# 2. the kernels alone, knob 0, 1, 0, 1 (benchmarks/skvq_approx/ab.py);
# 3. the Llama-2-7B skvq-k2v2-g16-fp8 step at batch 32, knob 0 then 1.
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
KIVI_EXP_APPROX=1 timeout 150 python -m pytest -q -p no:cacheprovider -n 0 \
  -W ignore::DeprecationWarning tests/test_decode_attention.py \
  -k "without_fast_rope or (hidden_kernels_match and 2-2-16)" 2>&1 | tail -2
i=0
for knob in 0 1 0 1; do
  i=$((i + 1))
  KIVI_EXP_APPROX=$knob timeout 90 python benchmarks/skvq_approx/ab.py $OUT/ab_$i$knob.json \
    2>&1 | grep KIVI_EXP
done
for knob in 0 1; do
  KIVI_EXP_APPROX=$knob KIVI_JAX_COMMIT=skvq-approx-$knob timeout 150 kivi-jax bench generate \
    --shape llama2-7b --methods skvq-k2v2-g16-fp8 --requests '' --step-batches 32 \
    --hf-batches '' --row-timeout 140 --out $OUT/step_$knob.json 2>&1 | grep step_ms
done
