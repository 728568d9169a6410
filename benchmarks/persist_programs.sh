#!/bin/bash
# The persistent form's slowdown (benchmarks/NOTES.md, seventeenth round): the
# 512-row Llama-2-7B KIVI-2 step with the pair kernel's programs walking the
# items, at several program counts, beside one program an item; then ncu's
# occupancy of one launch at 396 programs. On an H200:
#   bash benchmarks/persist_programs.sh OUT_DIR
set -u
OUT=$1
C=$(git rev-parse --short HEAD 2>/dev/null || cat .devrun/commit)
python -c "import jax; print(jax.devices()[0], jax.devices()[0].core_count)"
for n in 0 264 396 528 792 0; do
  if [ "$n" = 0 ]; then unset KIVI_EXP_PROGRAMS; else export KIVI_EXP_PROGRAMS=$n; fi
  KIVI_JAX_COMMIT=$C-programs$n timeout 140 kivi-jax bench generate --shape llama2-7b \
    --methods kivi2 --requests '' --step-batches 512 --hf-batches '' --row-timeout 130 \
    --out "$OUT/step_programs$n.json" 2>&1 | grep -v WARNING | tail -1
  python scripts/trace_launches.py "$OUT/step_programs$n.json" 'kivi_pair'
done
# One launch of the step's kernel under ncu (the bench's worker is a child process).
KIVI_EXP_PROGRAMS=396 timeout 300 ncu --target-processes all --section LaunchStats \
  --section Occupancy -k regex:kivi_pair -c 1 kivi-jax bench generate --shape llama2-7b \
  --methods kivi2 --requests '' --step-batches 512 --hf-batches '' --row-timeout 280 \
  > "$OUT/ncu_programs396.txt" 2>&1
grep -E "Registers|Shared Memory|Block Limit|Achieved|Theoretical|Grid Size|Waves" \
  "$OUT/ncu_programs396.txt"
