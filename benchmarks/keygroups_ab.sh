# exp/keygroups on the H200: the pair layout's keys' writer with a program a (row, head,
# group) instead of a (row, head, 128-token span) (benchmarks/NOTES.md, "Where the
# prefill's time goes": 107 us a launch, 157 GB/s, in a 64-row KIVI-2 prefill). The
# compiled pair-writer checks (the keys' cases), then scripts/profile_prefill.py with
# this tree and with main's kernels from a copy of main (subpackages inside its
# kivi_jax/), alternately. Before the call, here:
#   rm -rf .devrun/main && mkdir -p .devrun/main && git archive main kivi_jax models
#   pallas_kernels | tar -x -C .devrun/main && mv .devrun/main/models
#   .devrun/main/pallas_kernels .devrun/main/kivi_jax/   (and carry .devrun).
# About 200 s with a warm machine.
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
timeout 90 python -m pytest -q -p no:cacheprovider -n 0 tests/test_quantize_pack.py \
  -k "pair_kernel_matches and channel" 2>&1 | tail -1
for r in 1 2; do
  for v in keygroups main; do
    if [ $v = main ]; then pp=$PWD/.devrun/main; else pp=; fi
    (cd /tmp && PYTHONPATH=$pp python -c "import kivi_jax.pallas_kernels as p; print('$v kernels:', p.__file__)")
    PYTHONPATH=$pp KIVI_JAX_COMMIT=$v timeout 90 python scripts/profile_prefill.py \
      --out $OUT/prefill_${v}_$r.json --batch 64 kivi2 2>&1 | grep -v Warn | tail -1
  done
done
