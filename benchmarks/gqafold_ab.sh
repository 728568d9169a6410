# exp/gqafold on the H200 (prepared 2026-12-05, not yet run): the folded pair kernel for
# up to 4 query rows a kv head (GQA: P1's shape, Llama-3-8B), env knob KIVI_EXP_GQAFOLD=1
# (0: main's unfolded kernel there). Column c(r, g) = 8 (g // 2) + 2 r + g % 2 of both
# products holds row r's group g, so each lane's own registers hold its row's groups
# (no shuffles); rows at softmax columns 2 r, 2 r + 1. Run first in a small call: a
# Mosaic GPU kernel that hangs shows only as the timeout.
#   bash benchmarks/gqafold_ab.sh check    the float64 checks with the knob (<= 200 s)
#   bash benchmarks/gqafold_ab.sh time     P1 32k/128k and a Llama-3-8B KIVI-2 step at
#                                          batch 128, knob off and on alternately (~350 s)
case "$1" in check|time) ;; *) echo "usage: bash $0 check|time"; exit 2 ;; esac
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
if [ "$1" = check ]; then
  KIVI_EXP_GQAFOLD=1 timeout 180 python -m pytest -q -p no:cacheprovider -n 0 -x \
    tests/test_decode_pairs.py -k "(float64 and (2-2-32-4-128 or 4-4-32-4-128 or 2-4-32-4-128 or 2-2-32-1-128)) or (through_the_kernel and 4-None)" \
    2>&1 | grep -E "passed|failed|^FAILED|Error|assert" | head -20
  exit
fi
for r in 1 2; do
  for f in 0 1; do
    echo "== KIVI_EXP_GQAFOLD=$f ($r)"
    KIVI_EXP_GQAFOLD=$f timeout 100 kivi-jax bench attention --lengths 32768,131072 \
      --methods kivi2,kivi4 --out $OUT/p1_${f}_$r.json 2>&1 | grep -E "^\| kivi"
  done
done
for f in 0 1; do
  KIVI_EXP_GQAFOLD=$f KIVI_JAX_COMMIT=gqafold-$f timeout 120 kivi-jax bench generate \
    --shape llama3-8b --methods kivi2 --requests '' --step-batches 128 --hf-batches '' \
    --row-timeout 110 --out $OUT/step_$f.json 2>&1 | grep step_ms
  python scripts/trace_launches.py $OUT/step_$f.json 'kivi_pair_decode'
done
