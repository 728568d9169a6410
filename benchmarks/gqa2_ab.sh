# exp/gqa2 on a Hopper GPU: the folded pair kernel for up to 4 query rows a kv head
# (GQA: P1's shape, Llama-3-8B) as two kernels, scores then values, env knob
# KIVI_EXP_GQA2=1 (0: main's unfolded one-kernel form there). The scores go through HBM
# as `[B, K, 4, tokens]` float32 (16 bytes a token and kv head against KIVI-2's 96 of
# codes, scales and zeros), written once and read once. Run from the repository root:
#   bash benchmarks/gqa2_ab.sh check   float64 checks with the knob, rows 2, 3, 4 (<= 300 s)
#   bash benchmarks/gqa2_ab.sh time    P1 32k/128k knob off, on, off, on; then a
#                                      Llama-3-8B KIVI-2 step at 128 rows each way (~300 s)
case "$1" in check|time) ;; *) echo "usage: bash $0 check|time"; exit 2 ;; esac
if [ "$1" = check ]; then
  KIVI_EXP_GQA2=1 timeout 200 python -m pytest -q -p no:cacheprovider -n 0 -x \
    tests/test_decode_pairs.py -k "(float64 and (2-2-32-4-128 or 4-4-32-4-128 or 2-4-32-4-128)) or (partial_step and not lowers and (2-2-32-4 or 4-4-32-4)) or (through_the_kernel and 4-)" \
    2>&1 | grep -E "passed|failed|^FAILED|Error|assert" | head -20
  KIVI_EXP_GQA2=1 timeout 100 python -c "
import sys; sys.path.insert(0, 'tests')
from test_decode_pairs import _check_against_float64 as check
for rep in (2, 3):
  for kb, vb in ((2, 2), (4, 4), (2, 4)):
    check(kb, vb, 32, rep, 128, 2048); print('float64 passed: rows', rep, 'bits', kb, vb)
" 2>&1 | grep -E "passed|Error|assert" | head -10
  exit
fi
for r in 1 2; do
  for f in 0 1; do
    echo "== KIVI_EXP_GQA2=$f ($r)"
    KIVI_EXP_GQA2=$f timeout 100 kivi-jax bench attention --lengths 32768,131072 \
      --methods kivi2,kivi4 --out $OUT/p1_${f}_$r.json 2>&1 | grep -E "^\| (kivi|cudnn)"
  done
done
for f in 0 1; do
  KIVI_EXP_GQA2=$f KIVI_JAX_COMMIT=gqa2-$f timeout 120 kivi-jax bench generate \
    --shape llama3-8b --methods kivi2 --requests '' --step-batches 128 --hf-batches '' \
    --row-timeout 110 --out $OUT/step_$f.json 2>&1 | grep -o '"step_ms": [0-9.]*'
  python scripts/trace_launches.py $OUT/step_$f.json 'kivi_pair'
done
