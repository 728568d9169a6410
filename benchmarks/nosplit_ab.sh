# exp/nosplit on the H200: the unfolded pair kernel with one product a tile (the shared
# shifts kept), as 780018e's product structure; main (2769c26 on) splits each product in
# two halves of K, which measured no faster (NOTES.md, fifteenth round). Checks the
# float64 cases first, then P1 (32k, 128k) and B=256 alternately with main's kernels
# (a copy of main's files first on PYTHONPATH, its subpackages inside kivi_jax/ so that
# the editable install's mapping does not win; before the call, here:
#   rm -rf .devrun/main && mkdir -p .devrun/main && git archive main kivi_jax models
#   pallas_kernels | tar -x -C .devrun/main && mv .devrun/main/models
#   .devrun/main/pallas_kernels .devrun/main/kivi_jax/   (and carry .devrun)).
# About 400 s.
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
timeout 120 python -m pytest -q -p no:cacheprovider -n 0 tests/test_decode_pairs.py \
  -k "unpack_plan or (float64 and (2-2-32-1-128 or 4-4-32-1-128 or 2-4-32-1-128 or 2-2-32-4-128 or 4-4-32-4-128 or 8-8-32-4-128 or 2-2-128-4-128 or 2-2-32-4-64)) or (through_the_kernel and 1-None)" \
  2>&1 | tail -1
for r in 1 2; do
  for v in nosplit main; do
    if [ $v = main ]; then pp=$PWD/.devrun/main; else pp=; fi
    PYTHONPATH=$pp python -c "import kivi_jax.pallas_kernels as p; print('$v kernels:', p.__file__)"
    echo "== $v $r"
    PYTHONPATH=$pp KIVI_JAX_COMMIT=$v timeout 100 kivi-jax bench attention --lengths 32768,131072 \
      --methods kivi2,kivi4 --out $OUT/p1_${v}_$r.json 2>&1 | grep -E "^\| (kivi|bf16)"
    PYTHONPATH=$pp KIVI_JAX_COMMIT=$v timeout 60 kivi-jax bench attention --batch 256 --q-heads 32 \
      --kv-heads 32 --lengths 1536 --methods kivi2,kivi4 --out $OUT/b256_${v}_$r.json 2>&1 | grep -E "^\| kivi"
  done
done
