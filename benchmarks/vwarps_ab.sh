# exp/vwarps on the H200 (prepared 2026-12-04, not yet run): the pair layout's value
# writer with 2 warps a program (KIVI_EXP_VWARPS=2, the branch's default) against 4
# (main's), each in its own process: the 512-row Llama-2-7B KIVI-2 step and the
# writers' per-launch device times from its traces (a flush launch is the max; the
# step's median holds no flush). A flush alone took 687 us with 2 warps against 971
# with 4 by wall time (results/pair_writer_h200.txt). About 160 s.
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
timeout 60 python -m pytest -q -p no:cacheprovider -n 0 tests/test_quantize_pack.py -k "pair" \
  2>&1 | tail -1
for w in 2 4; do
  KIVI_EXP_VWARPS=$w KIVI_JAX_COMMIT=vwarps$w timeout 150 kivi-jax bench generate \
    --shape llama2-7b --methods kivi2 --requests '' --step-batches 512 --hf-batches '' \
    --row-timeout 140 --out $OUT/step_w$w.json 2>&1 | grep step_ms
  python scripts/trace_launches.py $OUT/step_w$w.json 'quantize_pack|ring_update'
done
