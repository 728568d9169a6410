# exp/twophase on the H200: the folded (MHA) pair kernel as two kernels, the scores
# (each token's score through HBM, 4 bytes, and each split's maximum) then the values
# (p = exp(s - m) with no running maximum or rescaling), env knob KIVI_EXP_TWOPHASE=1,
# splits for KIVI_EXP_TP_BLOCKS blocks an SM (3 by default). Lowered for CUDA on a CPU
# only; never run. First `check` (under timeout: a Mosaic GPU kernel that hangs shows as
# a timeout), then `time`. Run as `bash benchmarks/twophase_ab.sh check|time` from the
# repository's root, $OUT set.
#   check (~150 s): the float64 checks of one query row a kv head with the knob (the
#     folded shapes; the other cases run main's kernels), the decode step through it.
#   time (~420 s): B=256 L=1536 and the 512-row Llama-2-7B KIVI-2 step with per-launch
#     times, main's kernel, then two kernels at 3, 4 and 5 blocks an SM, then main's.
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
case "$1" in
check)
  KIVI_EXP_TWOPHASE=1 timeout 240 python -m pytest -q -p no:cacheprovider -n 0 \
    tests/test_decode_pairs.py \
    -k "((matches_float64 and 32-1-128) or (partial_step and 32-1)) and not 8-" 2>&1 | tail -8
  KIVI_EXP_TWOPHASE=1 timeout 120 python -m pytest -q -p no:cacheprovider -n 0 \
    tests/test_decode_pairs.py -k "decode_step and 1-None" 2>&1 | tail -4
  ;;
time)
  for knob in 0:3 1:3 1:4 1:5 0:3; do
    two=${knob%:*}; blocks=${knob#*:}
    echo "== KIVI_EXP_TWOPHASE=$two KIVI_EXP_TP_BLOCKS=$blocks"
    export KIVI_EXP_TWOPHASE=$two KIVI_EXP_TP_BLOCKS=$blocks
    timeout 60 kivi-jax bench attention --batch 256 --q-heads 32 --kv-heads 32 \
      --lengths 1536 --methods kivi2,kivi4 --layouts pairs --repeats 20 \
      --out $OUT/serving_$two$blocks.json 2>&1 | grep -E "^\| (kivi|cudnn)"
    KIVI_JAX_COMMIT=twophase-$two$blocks timeout 140 kivi-jax bench generate \
      --shape llama2-7b --methods kivi2 --requests '' --step-batches 512 --hf-batches '' \
      --row-timeout 130 --out $OUT/step_$two$blocks.json 2>&1 | grep step_ms
    python scripts/trace_launches.py $OUT/step_$two$blocks.json 'kivi_pair'
  done
  ;;
esac
