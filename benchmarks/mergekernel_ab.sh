# exp/mergekernel on a Hopper GPU: the pair kernel's and the ring kernel's partials read
# where they lie and merged by one Triton kernel (`pallas_kernels/merge_partials.py`), env
# knob KIVI_EXP_MERGE=1, against XLA's merge (knob 0). Lowered for CUDA and run in interpret
# mode on a CPU only; never run compiled. Run as `bash benchmarks/mergekernel_ab.sh
# check|time` from the repository's root, $OUT set.
#   check (~120 s): the merge kernel compiled against XLA's merge (the fake-block test:
#     compiled ring and merge kernels), then the decode step through the kernels with the
#     knob (rows 1, 4, a window, and 3 rows, which keep XLA's merge).
#   time (~450 s): scripts/trace_attention.py (P1 32k and 128k, B=32 and 256 at 1536:
#     bench attention's time and the device time by kernel) knob 0, 1, 0, 1; then the
#     Llama-2-7B KIVI-2 step at batch 1 and 32 for each knob, with per-launch times.
set -o pipefail
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
case "$1" in
check)
  timeout 100 python -m pytest -q -p no:cacheprovider -n 0 -W ignore::DeprecationWarning \
    tests/test_decode_pairs.py -k "merge_kernel" 2>&1 | tail -3 || exit 1
  KIVI_EXP_MERGE=1 timeout 200 python -m pytest -q -p no:cacheprovider -n 0 \
    -W ignore::DeprecationWarning tests/test_decode_pairs.py -k "decode_step" 2>&1 | tail -3
  ;;
time)
  i=0
  for knob in 0 1 0 1; do
    i=$((i + 1))
    echo "== KIVI_EXP_MERGE=$knob"
    KIVI_EXP_MERGE=$knob KIVI_JAX_COMMIT=mergekernel-$knob timeout 150 python \
      scripts/trace_attention.py $OUT/trace_$i$knob.json --methods kivi2 2>&1 | grep -v Warn
  done
  for knob in 0 1; do
    echo "== KIVI_EXP_MERGE=$knob, the step"
    KIVI_EXP_MERGE=$knob KIVI_JAX_COMMIT=mergekernel-$knob timeout 160 kivi-jax bench generate \
      --shape llama2-7b --methods kivi2 --requests '' --step-batches 1,32 --hf-batches '' \
      --row-timeout 75 --out $OUT/step_$knob.json 2>&1 | grep step_ms
    python scripts/trace_launches.py $OUT/step_$knob.json 'kivi_merge|kivi_ring|kivi_pair'
  done
  ;;
esac
