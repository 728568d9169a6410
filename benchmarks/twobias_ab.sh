# exp/twobias on a Hopper GPU: biased codes in the two folded kernels (`base + code` fed to
# `wgmma`, no subtraction a pair; the bases' sums taken off the scores' correction, and off
# the values' zero term), env knobs KIVI_EXP_KBIAS=1 (scores kernel) and KIVI_EXP_VBIAS=1
# (values kernel). Lowered for CUDA on a CPU only; never run. Run as
# `bash benchmarks/twobias_ab.sh check|time` from the repository's root, $OUT set.
#   check (~120 s): one compile check (seconds), then the float64 checks of one query row a
#     kv head with each knob and both, and the decode step through the kernels.
#   time (~400 s): B=256 L=1536 and the Llama-2-7B KIVI-2 step (512 rows on an H200, 256 on
#     an H100) with per-launch times: knobs off, keys, values, both, off again.
set -o pipefail
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
case "$1" in
check)
  KIVI_EXP_KBIAS=1 KIVI_EXP_VBIAS=1 timeout 120 python -m pytest -q -p no:cacheprovider -n 0 \
    -W ignore::DeprecationWarning tests/test_decode_pairs.py \
    -k "matches_float64 and 2-2-32-1-128" 2>&1 | tail -3 || exit 1
  for knobs in 1:0 0:1 1:1; do
    echo "== KIVI_EXP_KBIAS=${knobs%:*} KIVI_EXP_VBIAS=${knobs#*:}"
    KIVI_EXP_KBIAS=${knobs%:*} KIVI_EXP_VBIAS=${knobs#*:} timeout 150 python -m pytest -q \
      -p no:cacheprovider -n 0 -W ignore::DeprecationWarning tests/test_decode_pairs.py \
      -k "(matches_float64 and 32-1-128) or (reads_a_block and 32-1]) or (decode_step and 1-None)" \
      2>&1 | tail -3
  done
  ;;
time)
  mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  rows=512; [ "$mem" -lt 100000 ] && rows=256
  for knobs in 0:0 1:0 0:1 1:1 0:0; do
    kb=${knobs%:*}; vb=${knobs#*:}
    echo "== KIVI_EXP_KBIAS=$kb KIVI_EXP_VBIAS=$vb"
    export KIVI_EXP_KBIAS=$kb KIVI_EXP_VBIAS=$vb
    timeout 60 kivi-jax bench attention --batch 256 --q-heads 32 --kv-heads 32 \
      --lengths 1536 --methods kivi2,kivi4 --layouts pairs --repeats 20 \
      --out $OUT/serving_$kb$vb.json 2>&1 | grep -E "^\| (kivi|cudnn)"
    KIVI_JAX_COMMIT=twobias-$kb$vb timeout 140 kivi-jax bench generate \
      --shape llama2-7b --methods kivi2 --requests '' --step-batches $rows --hf-batches '' \
      --row-timeout 130 --out $OUT/step_$kb$vb.json 2>&1 | grep step_ms
    python scripts/trace_launches.py $OUT/step_$kb$vb.json 'kivi_pair'
  done
  ;;
esac
