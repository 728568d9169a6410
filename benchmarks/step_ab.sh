#!/usr/bin/env bash
# exp/step128 on a Hopper GPU: ncu's registers and blocks an SM, then P1's rows,
# for main's policy and 128-token steps and updates (V^T in halves) at three and
# four blocks of splits. Writes under $OUT. KIVI_JAX_COMMIT must name the commit.
set -u
: "${KIVI_JAX_COMMIT:?set KIVI_JAX_COMMIT}" "${OUT:?}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
NCU=/usr/local/cuda/bin/ncu
configs=${CONFIGS:-"base:: s128b4:KIVI_EXP_STEP=128,KIVI_EXP_UPDATE=128,KIVI_EXP_HALVES=1,KIVI_EXP_BLOCKS=4 s128b3:KIVI_EXP_STEP=128,KIVI_EXP_UPDATE=128,KIVI_EXP_HALVES=1,KIVI_EXP_BLOCKS=3"}
for c in $configs; do
  name=${c%%:*}; envs=${c#*:}; envs=${envs#:}
  envargs=$(echo "$envs" | tr ',' ' ')
  for m in kivi2 kivi4; do
    echo "== ncu $name $m ($envargs)"
    env $envargs PYTHONPATH=. XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 120 $NCU \
      --section LaunchStats --section Occupancy --section SpeedOfLight -k regex:mosaic \
      --launch-count 1 python scripts/profile_decode.py --layout pairs --rows 4 --method $m \
      > $OUT/ncu_${name}_${m}.txt 2>&1
    grep -E "Registers Per|Block Limit (Reg|Shared)|Achieved Occ|Theoretical Occ|^    Duration|Grid Size|Dynamic Shared" $OUT/ncu_${name}_${m}.txt
  done
done
for c in $configs; do
  name=${c%%:*}; envs=${c#*:}; envs=${envs#:}
  envargs=$(echo "$envs" | tr ',' ' ')
  echo "== P1 $name ($envargs)"
  env $envargs timeout 200 kivi-jax bench attention --lengths 32768,131072 --methods kivi2,kivi4 \
    --layouts pairs --repeats 20 --out $OUT/p1_${name}.json 2>&1 | grep -vi warning | tail -8
done
date
echo "== float64 and decode-step checks, 128-token steps and updates, V^T in halves"
KIVI_EXP_STEP=128 KIVI_EXP_UPDATE=128 KIVI_EXP_HALVES=1 timeout 240 python -m pytest -q -x -n 4 \
  -W ignore::DeprecationWarning tests/test_decode_pairs.py -k "float64 or decode_step" 2>&1 | tail -4
date
